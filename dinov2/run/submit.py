"""Shared submitit plumbing: launcher arguments, rank environment inside a job, job submission."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dinov2.utils.cli_help import OneSpellingHelpFormatter

logger = logging.getLogger("dinov2")


CLUSTERS = ("slurm", "local", "debug")
# launcher options and their defaults; None on the command line means "not given" (see `launcher_options_given`)
LAUNCHER_DEFAULTS = dict(ngpus=8, nodes=1, cpus_per_task=10, mem_gb=0, timeout=2800, partition="", account="",
                         qos="", comment="", exclude="", slurm_folder="")


class SlurmUnavailableError(RuntimeError):
    """`--cluster slurm` was asked for on a machine without SLURM."""


def get_args_parser(description: Optional[str] = None, parents: Sequence[argparse.ArgumentParser] = (),
                    add_help: bool = True, default_cluster: Optional[str] = "slurm",
                    epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """Launcher options; `parents` contribute the task's own options (e.g. the training CLI)."""
    p = argparse.ArgumentParser(description=description, parents=list(parents), add_help=add_help, epilog=epilog,
                                formatter_class=OneSpellingHelpFormatter)
    add_launcher_arguments(p, default_cluster)
    return p


def add_launcher_arguments(p: argparse.ArgumentParser, default_cluster: Optional[str] = "slurm") -> None:
    """The launcher options (`--cluster`, `--nodes`, `--ngpus`, ...) as a group of `p`."""
    g = p.add_argument_group("launcher (submitit)")
    here = "run in this process" if default_cluster is None else default_cluster
    g.add_argument("--cluster", default=default_cluster, choices=CLUSTERS,
                   help=f"where the job runs: slurm (submit with sbatch; an error if SLURM is not available), "
                        f"local (submitit subprocesses on this machine), debug (submitit, in this process); "
                        f"default: {here}")
    g.add_argument("--ngpus", "--gpus", "--gpus-per-node", type=int, default=None,
                   help=f"GPUs (= tasks) per node (default {LAUNCHER_DEFAULTS['ngpus']})")
    g.add_argument("--nodes", "--nnodes", type=int, default=None,
                   help=f"number of nodes (default {LAUNCHER_DEFAULTS['nodes']})")
    g.add_argument("--cpus-per-task", type=int, default=None,
                   help=f"CPU cores per task, data workers + 1 (default {LAUNCHER_DEFAULTS['cpus_per_task']})")
    g.add_argument("--mem-gb", type=int, default=None, help="memory per node in GB (default: the cluster's)")
    g.add_argument("--timeout", type=int, default=None,
                   help=f"job duration in minutes (default {LAUNCHER_DEFAULTS['timeout']})")
    g.add_argument("--partition", default=None, help="SLURM partition (default: $SLURM_PARTITION)")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--comment", default=None, help="SLURM comment")
    g.add_argument("--exclude", default=None, help="nodes to exclude, e.g. node[01-03]")
    g.add_argument("--slurm-folder", default=None, help="folder of the submitit logs (default: <output dir>/slurm)")


def without_launcher_arguments(argv: Sequence[str]) -> list:
    """`argv` without the launcher options and their values (what the submitted job runs)."""
    p = argparse.ArgumentParser(add_help=False)
    add_launcher_arguments(p)
    flags = {s for a in p._actions for s in a.option_strings}  # every launcher option takes one value
    out, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in flags:
            skip = True
        elif not (tok.startswith("--") and tok.split("=", 1)[0] in flags):
            out.append(tok)
    return out


def launcher_options_given(args: argparse.Namespace) -> list:
    """Names of the launcher options set on the command line (they only mean something with --cluster)."""
    return [f"--{k.replace('_', '-')}" for k in LAUNCHER_DEFAULTS if getattr(args, k, None) is not None]


def _fill_launcher_defaults(args: argparse.Namespace) -> None:
    for key, value in LAUNCHER_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, os.environ.get("SLURM_PARTITION", "") if key == "partition" else value)


def check_slurm_available() -> None:
    """Raise `SlurmUnavailableError` unless `sbatch` is on PATH (never fall back to running locally)."""
    if shutil.which("sbatch") is None:
        raise SlurmUnavailableError(
            "--cluster slurm: SLURM is not available on this machine (no `sbatch` on PATH). Run on a SLURM login "
            "node, or choose explicitly: `--cluster local` (submitit subprocesses here) or no --cluster with "
            "`panopticon train` (this process; also under torchrun)")


def set_rank_environment() -> None:
    """Inside a submitit job with several tasks: export torchrun-style RANK/WORLD_SIZE/... so that
    `dinov2.distributed.enable` sees the same variables for SLURM and local multi-task jobs."""
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return
    port = 20000 + zlib.crc32(str(env.job_id).split("_")[0].encode()) % 20000
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(max(1, env.num_tasks // max(1, env.num_nodes))),
                      MASTER_ADDR=env.hostnames[0], MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))


def submit_job(task: Callable[[], Any], args: argparse.Namespace, output_dir: str, name: str):
    """Submit `task` (a picklable callable, ideally with a `checkpoint` method for requeueing) to `args.cluster`
    (slurm, local or debug; never chosen automatically), print the job id and log paths, return the job."""
    import submitit

    if args.cluster not in CLUSTERS:
        raise ValueError(f"--cluster must be one of {', '.join(CLUSTERS)}; got {args.cluster!r}")
    if args.cluster == "slurm":
        check_slurm_available()
    _fill_launcher_defaults(args)
    folder = Path(args.slurm_folder or os.path.join(output_dir, "slurm")) / "%j"
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=30)
    params = dict(gpus_per_node=args.ngpus, tasks_per_node=args.ngpus, cpus_per_task=args.cpus_per_task,
                  nodes=args.nodes, timeout_min=args.timeout, name=name)
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    if executor.cluster == "slurm":
        params["slurm_signal_delay_s"] = 120
        for key in ("partition", "account", "qos", "comment", "exclude"):
            if getattr(args, key):
                params[f"slurm_{key}"] = getattr(args, key)
    else:
        params.pop("gpus_per_node")  # local executors run tasks on this machine's devices
        params["tasks_per_node"] = max(1, min(args.ngpus, 1 if executor.cluster == "debug" else args.ngpus))
    executor.update_parameters(**params)
    job = executor.submit(task)
    logs = Path(str(folder).replace("%j", str(job.job_id)))
    print(f"submitted job {job.job_id} ({executor.cluster}); logs: {logs}/ "
          f"(stdout {job.paths.stdout.name}, stderr {job.paths.stderr.name}); output: {output_dir}", flush=True)
    logger.info("submitted job %s (%s) -> logs in %s", job.job_id, executor.cluster, logs)
    return job
