"""Help output of the commands: each option listed once.

Several options have aliases kept for scripts written for the DINOv2-era entry points (``--output_dir`` for
``--output-dir``, ``--gpus`` for ``--ngpus``). They keep working; `--help` lists each option under its short flag
(if any) and its first long spelling only, so a reader sees every flag once.
"""
from __future__ import annotations

import argparse
import copy


class OneSpellingHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`RawDescriptionHelpFormatter` that shows an option's single-dash flags and its first ``--`` spelling."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        long_flags = [s for s in action.option_strings if s.startswith("--")]
        if len(long_flags) > 1:
            action = copy.copy(action)  # the parser keeps the full list: every alias is still accepted
            action.option_strings = [s for s in action.option_strings if not s.startswith("--")] + long_flags[:1]
        return super()._format_action_invocation(action)
