"""``panopticon eval``: evaluate models on a suite of tasks. The command line lives in ``dinov2.eval.cli`` (the
evaluation package never imports ``dinov2.run``); this module is the ``panopticon`` subcommand's entry."""
from __future__ import annotations

from dinov2.eval.cli import (EPILOG, build_parser, main, parse_value, split_argv,  # noqa: F401
                             split_overrides)

__all__ = ["EPILOG", "build_parser", "main", "parse_value", "split_argv", "split_overrides"]
