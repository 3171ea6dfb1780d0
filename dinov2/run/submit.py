"""Shared submitit plumbing: launcher arguments, rank environment inside a job, job submission."""
from __future__ import annotations

import argparse
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("dinov2")


def get_args_parser(description: Optional[str] = None, parents: Sequence[argparse.ArgumentParser] = (),
                    add_help: bool = True) -> argparse.ArgumentParser:
    """Launcher options; `parents` contribute the task's own options (e.g. the training CLI)."""
    p = argparse.ArgumentParser(description=description, parents=list(parents), add_help=add_help)
    p.add_argument("--cluster", default=None, choices=[None, "slurm", "local", "debug"],
                   help="submitit backend (default: slurm if available, else local; debug runs in-process)")
    p.add_argument("--ngpus", "--gpus", "--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node")
    p.add_argument("--nodes", "--nnodes", type=int, default=1, help="number of nodes")
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data workers + 1)")
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0 = cluster default)")
    p.add_argument("--timeout", type=int, default=2800, help="job duration in minutes")
    p.add_argument("--partition", default=os.environ.get("SLURM_PARTITION", ""), help="SLURM partition")
    p.add_argument("--account", default="", help="SLURM account")
    p.add_argument("--qos", default="", help="SLURM QOS")
    p.add_argument("--comment", default="", help="SLURM comment")
    p.add_argument("--exclude", default="", help="nodes to exclude")
    p.add_argument("--slurm-folder", default="", help="submitit logs (default: <output dir>/slurm)")
    return p


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
    """Submit `task` (a picklable callable, ideally with a `checkpoint` method for requeueing) and return the
    submitit job."""
    import submitit

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
    elif executor.cluster in ("local", "debug"):
        params.pop("gpus_per_node")  # local executors run tasks on this machine's devices
        params["tasks_per_node"] = max(1, min(args.ngpus, 1 if executor.cluster == "debug" else args.ngpus))
    executor.update_parameters(**params)
    job = executor.submit(task)
    logger.info("submitted job %s (%s) -> logs in %s", job.job_id, executor.cluster, folder)
    return job
