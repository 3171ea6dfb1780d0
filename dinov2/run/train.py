"""`panopticon train`: pretrain in this process, or submit the same run to SLURM (submitit).

    panopticon train --config-file dinov2/configs/demo.yaml --output-dir runs/demo optim.epochs=2
    panopticon train --cluster slurm --nodes 2 --ngpus 8 --partition gpu --config-file ... --output-dir ...
    python dinov2/run/train.py --nodes=2 --ngpus=8 --partition=<p> --config-file=<yaml> --output-dir=<dir> [k=v ...]

Run as a script this file is the DINOv2-style SLURM launcher (`--cluster` defaults to slurm). SLURM jobs are
requeued on timeout or preemption and resume from `last_checkpoint`. Without SLURM, `--cluster slurm` fails with
an error; it never falls back to running locally.
"""
from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from dinov2.run.submit import (  # noqa: E402
    get_args_parser,
    launcher_options_given,
    set_rank_environment,
    submit_job,
)
from dinov2.train.train import get_args_parser as train_args_parser  # noqa: E402

EPILOG = """examples:
  panopticon train --config-file dinov2/configs/demo.yaml --output-dir runs/demo train.dataset.scenes=scenes.yaml
  torchrun --nproc_per_node=2 -m dinov2.run.cli train --config-file dinov2/configs/quick_check.yaml --output-dir q
  panopticon train --cluster slurm --nodes 1 --ngpus 8 --partition gpu \\
      --config-file dinov2/configs/stage1.yaml --output-dir $ODIR/stage1
"""


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


def launch(argv: Optional[Sequence[str]] = None, default_cluster: Optional[str] = None) -> Any:
    """Train in this process (no `--cluster`; returns the training result) or submit to `--cluster` (returns the
    submitit job)."""
    parser = get_args_parser(
        "Pretrain Panopticon. Without --cluster the run happens in this process (CPU, one GPU, or every rank of "
        "torchrun); with --cluster it is submitted through submitit.",
        parents=[train_args_parser(add_help=False)], default_cluster=default_cluster, epilog=EPILOG)
    args = parser.parse_args(argv)
    if args.cluster is None:
        given = launcher_options_given(args)
        if given:
            raise ValueError(f"{', '.join(given)} only apply to a submitted job: add --cluster slurm|local|debug, "
                             "or drop them to train in this process")
        from dinov2.train.train import main as train_main

        return train_main(_train_argv(args))
    if not args.output_dir:
        raise ValueError("--output-dir is required for a submitted job (checkpoints and submitit logs go there)")
    args.output_dir = os.path.abspath(args.output_dir)
    return submit_job(Trainer(_train_argv(args)), args, args.output_dir, name="panopticon:train")


def main(argv: Optional[Sequence[str]] = None, default_cluster: Optional[str] = None) -> int:
    """`panopticon train` entry point; returns 0 once the run finished or the job was submitted."""
    launch(argv, default_cluster=default_cluster)
    return 0


if __name__ == "__main__":
    from dinov2.run.cli import run_command

    sys.exit(run_command("train", lambda argv: main(argv, default_cluster="slurm"), sys.argv[1:],
                         prog="dinov2/run/train.py"))
