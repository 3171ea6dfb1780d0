"""One code path for single-process runs, `torchrun --nproc_per_node=N` and SLURM jobs.

`enable()` reads the launcher's environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; SLURM:
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST) and initialises a process group with NCCL on CUDA and
gloo on CPU. Every helper works without a process group (then rank 0 of a world of 1).
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("dinov2")

_LOCAL_RANK = 0
_LOCAL_WORLD_SIZE = 1
_ENABLED_BY_US = False


def is_enabled() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def get_local_rank() -> int:
    return _LOCAL_RANK if is_enabled() else 0


def get_local_size() -> int:
    return _LOCAL_WORLD_SIZE if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if is_enabled():
        dist.barrier()


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as `node[003-005,9],gpu1` -> `node003`."""
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from None


def _read_launcher_env() -> Optional[dict]:
    """Rank layout from torchrun or SLURM environment variables, or None for a plain single process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return dict(
            rank=_env_int("RANK"),
            world_size=_env_int("WORLD_SIZE"),
            local_rank=_env_int("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            local_world_size=_env_int("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=env.get("MASTER_PORT", "29500"),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        n_nodes = _env_int("SLURM_JOB_NUM_NODES") if "SLURM_JOB_NUM_NODES" in env else 1
        world = _env_int("SLURM_NTASKS")
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        return dict(
            rank=_env_int("SLURM_PROCID"),
            world_size=world,
            local_rank=_env_int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            local_world_size=max(1, world // max(1, n_nodes)),
            master_addr=env.get("MASTER_ADDR", _first_slurm_host(nodelist)),
            # a port derived from the job id lets every task agree without communication
            master_port=env.get("MASTER_PORT", str(20000 + _env_int("SLURM_JOB_ID") % 20000)),
        )
    return None


def enable(
    *,
    set_cuda_current_device: bool = True,
    overwrite: bool = False,
    allow_nccl_timeout: bool = False,
    backend: Optional[str] = None,
    force_single_process_group: bool = False,
    timeout_minutes: int = 30,
) -> None:
    """Initialise torch.distributed from the launcher environment.

    A plain `python train.py` (no launcher variables) stays without a process group unless
    `force_single_process_group` asks for a world of one. Backend: NCCL when CUDA is available, else gloo.
    """
    global _LOCAL_RANK, _LOCAL_WORLD_SIZE, _ENABLED_BY_US
    if is_enabled():
        if overwrite:
            return
        raise RuntimeError("torch.distributed is already initialised; call enable() once (or pass overwrite=True)")
    spec = _read_launcher_env()
    if spec is None:
        if not force_single_process_group:
            logger.info("distributed: single process (no torchrun/SLURM environment found)")
            return
        spec = dict(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="127.0.0.1",
                    master_port=str(_free_port()))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("distributed backend 'nccl' was requested but CUDA is not available; use 'gloo'")
    os.environ.update(MASTER_ADDR=spec["master_addr"], MASTER_PORT=str(spec["master_port"]),
                      RANK=str(spec["rank"]), WORLD_SIZE=str(spec["world_size"]),
                      LOCAL_RANK=str(spec["local_rank"]), LOCAL_WORLD_SIZE=str(spec["local_world_size"]))
    if backend == "nccl":
        if allow_nccl_timeout:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        if set_cuda_current_device:
            torch.cuda.set_device(spec["local_rank"] % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", rank=spec["rank"],
                            world_size=spec["world_size"], timeout=datetime.timedelta(minutes=timeout_minutes))
    _LOCAL_RANK, _LOCAL_WORLD_SIZE, _ENABLED_BY_US = spec["local_rank"], spec["local_world_size"], True
    logger.info("distributed: rank %d/%d (local %d) backend %s", spec["rank"], spec["world_size"],
                spec["local_rank"], backend)


def disable() -> None:
    """Destroy the process group created by `enable()` (used at the end of a run and in tests)."""
    global _ENABLED_BY_US
    if is_enabled() and _ENABLED_BY_US:
        dist.destroy_process_group()
    _ENABLED_BY_US = False


def get_device() -> torch.device:
    """This process's device: `cuda:<local rank>` when CUDA is available (unless $PANOPTICON_DEVICE says
    otherwise), else CPU."""
    forced = os.environ.get("PANOPTICON_DEVICE")
    if forced:
        dev = torch.device(forced)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"PANOPTICON_DEVICE={forced!r} but CUDA is not available")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", get_local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (returns a new tensor; identity without a process group)."""
    t = t.detach().clone()
    if is_enabled():
        dist.all_reduce(t)
        t /= get_world_size()
    return t


def all_reduce_sum(value: float) -> float:
    """Sum of a number over ranks (the value itself without a process group)."""
    if not is_enabled():
        return value
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return int(round(t.item())) if isinstance(value, int) else float(t.item())


def all_gather_object(obj) -> list:
    """List of `obj` from every rank (a one-element list without a process group)."""
    if not is_enabled():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def launched_by_torchrun() -> bool:
    """True in a rank process started by torchrun (torch elastic sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the Linux kernel to send `sig` to this process when its parent exits (prctl PR_SET_PDEATHSIG);
    False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(poll_s: float = 1.0) -> int:
    """Make this process die (SIGKILL: nothing more is written) as soon as its parent, the launcher, dies.

    Two mechanisms: the kernel's parent-death signal (Linux, immediate) and a daemon thread that polls the parent
    pid every `poll_s` seconds (any POSIX system; a dead parent re-parents us, changing `os.getppid()`).
    Returns the parent pid being watched. Call it early in a rank process started by a launcher: a plain
    `python train.py` would otherwise die with its shell."""
    parent = os.getppid()
    pdeath = set_parent_death_signal(signal.SIGKILL)

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()
    logger.info("rank exits with its launcher (pid %d; parent-death signal %s, watchdog every %.1f s)", parent,
                "armed" if pdeath else "unavailable", poll_s)
    return parent


def worker_dies_with_parent(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: the worker gets SIGKILL when its training process dies."""
    set_parent_death_signal(signal.SIGKILL)
