"""Wrapping the student for data-parallel training: DDP by default, FSDP2 (`fully_shard`) for large models.

FSDP2 is only offered on CUDA (it shards over NCCL); on CPU, or in a single process, modules stay as they are
or use DDP over gloo. Helpers return full (unsharded) state dicts so checkpoints look the same in every mode.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from dinov2 import distributed

logger = logging.getLogger("dinov2")

MODES = ("ddp", "fsdp")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6 keeps it under _composable
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def check_mode(mode: str, allow_cpu: bool = False) -> str:
    """Validate a `compute_precision.distributed` value; FSDP needs CUDA (unless `allow_cpu`, used by the tests
    to exercise the sharded code path over gloo) and a process group."""
    mode = str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"compute_precision.distributed must be one of {MODES}, got {mode!r}")
    if mode == "fsdp":
        if not torch.cuda.is_available() and not allow_cpu:
            raise RuntimeError("compute_precision.distributed=fsdp needs CUDA; use ddp on CPU")
        if not distributed.is_enabled():
            raise RuntimeError("compute_precision.distributed=fsdp needs a process group (torchrun or SLURM)")
    return mode


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers (FSDP2 has no sync_module_states)."""
    if not distributed.is_enabled():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src=0)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DDP wrapper (identity without a process group or with a world of one)."""
    if not distributed.is_enabled() or distributed.get_world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    # unused parameters happen legitimately (no masked patch on this rank, an idle iBOT head)
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True,
        broadcast_buffers=False,
    )


def shard_fsdp(module: nn.Module, mp_dtype: Optional[torch.dtype] = None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: shard every transformer block of a backbone (if it has `.blocks`) and then the module itself."""
    fully_shard = _fully_shard()
    kwargs = {"reshard_after_forward": reshard_after_forward}
    if mp_dtype is not None:
        try:
            from torch.distributed.fsdp import MixedPrecisionPolicy
        except ImportError:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32)
    blocks: Iterable[nn.Module] = getattr(module, "blocks", [])
    for blk in blocks:
        fully_shard(blk, **kwargs)
    fully_shard(module, **kwargs)
    return module


def is_sharded(module: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in module.parameters())


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor parameter (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Unsharded state dict on CPU (plain `state_dict()` when nothing is sharded)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, model_sd: dict, optimizer=None, optim_sd: Optional[dict] = None,
                    strict: bool = True):
    """Load full state dicts into a possibly sharded model / optimizer; returns load_state_dict's key report."""
    if not is_sharded(model):
        res = model.load_state_dict(model_sd, strict=strict)
        if optimizer is not None and optim_sd is not None:
            optimizer.load_state_dict(optim_sd)
        return res
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=strict)
    res = set_model_state_dict(model, model_sd, options=opts)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    return res
