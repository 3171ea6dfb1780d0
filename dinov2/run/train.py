"""Submit pretraining to SLURM with submitit (requeued jobs resume from `last_checkpoint`).

    python dinov2/run/train.py --nodes=2 --ngpus=8 --partition=<p> --config-file=<yaml> --output-dir=<dir> [k=v ...]
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from dinov2.run.submit import get_args_parser, set_rank_environment, submit_job  # noqa: E402
from dinov2.train.train import get_args_parser as train_args_parser  # noqa: E402


class Trainer:
    """Picklable job: runs the training CLI in the job's environment."""

    def __init__(self, train_argv: List[str]):
        self.train_argv = list(train_argv)

    def __call__(self):
        from dinov2.train.train import main as train_main

        set_rank_environment()
        return train_main(self.train_argv)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on timeout/preemption: requeue the same command; training resumes from
        `last_checkpoint`."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.train_argv))


def _train_argv(args) -> List[str]:
    argv = [f"--config-file={args.config_file}", f"--output-dir={args.output_dir}"]
    if args.env:
        argv.append(f"--env={args.env}")
    if args.fastdevrun:
        argv.append("--fastdevrun")
    if not args.resume:
        argv.append("--no-resume")
    return argv + [o for o in (args.opts or []) if o != "--"]


def main(argv: Optional[Sequence[str]] = None):
    parser = get_args_parser("Submit Panopticon pretraining", parents=[train_args_parser(add_help=False)])
    args = parser.parse_args(argv)
    if not args.output_dir:
        raise ValueError("--output-dir is required for a submitted job (checkpoints and submitit logs go there)")
    args.output_dir = os.path.abspath(args.output_dir)
    return submit_job(Trainer(_train_argv(args)), args, args.output_dir, name="panopticon:train")


if __name__ == "__main__":
    main()
