"""`python dinov2/eval/main.py main --model-obj=... --config-obj=...`: the evaluation entry point under the name the
published README uses. It is `dinov2/eval/eval.py` (same `main`, same flags and outputs); see that module."""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and __package__ is None:  # `python dinov2/eval/main.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dinov2.eval.eval import main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":  # the script entry: the command line of dinov2.eval.cli (exit status as documented)
    from dinov2.eval.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:], prog="dinov2/eval/main.py main"))
