"""Training checkpoints: atomic `model_<iter>.pth` + `last_checkpoint`, keep-N, resume with RNG states.

File content: `{'model': SSLMetaArch state dict, 'optimizer', 'iteration' (last completed iteration),
'scaler' (fp16 GradScaler or None), 'rng_states' (one per rank), 'world_size'}`; everything loads with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import nn

from dinov2 import distributed
from dinov2 import fsdp as dp
from dinov2.utils.checkpoint import conform_state_dict, save_atomic
from dinov2.utils.utils import get_rng_state, set_rng_state

logger = logging.getLogger("dinov2")

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
LAST = "last_checkpoint"


def _write_text_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Checkpointer:
    """Save/resume for an `SSLMetaArch` + optimizer (+ GradScaler) in `output_dir`.

    `save` is called on every rank (state gathering may be collective); only the main rank writes.
    """

    def __init__(self, model: nn.Module, output_dir: str, optimizer: Optional[torch.optim.Optimizer] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, max_to_keep: int = 20):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.output_dir = output_dir
        self.max_to_keep = int(max_to_keep)
        os.makedirs(output_dir, exist_ok=True)

    # -------------------------------------------------------------------------------------------- save
    def save(self, name: str, iteration: int) -> str:
        """Write `<output_dir>/<name>.pth` atomically, point `last_checkpoint` at it and prune old periodic files."""
        model_sd = dp.full_state_dict(self.model)
        optim_sd = dp.full_optimizer_state_dict(self.model, self.optimizer) if self.optimizer is not None else None
        rng_states = distributed.all_gather_object(get_rng_state())
        path = os.path.join(self.output_dir, f"{name}.pth")
        if distributed.is_main_process():
            obj = {"model": model_sd, "optimizer": optim_sd, "iteration": int(iteration),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                   "rng_states": rng_states, "world_size": distributed.get_world_size()}
            save_atomic(obj, path)
            _write_text_atomic(os.path.join(self.output_dir, LAST), os.path.basename(path))
            logger.info("saved checkpoint %s (iteration %d)", path, iteration)
            self._prune()
        distributed.barrier()
        return path

    def save_periodic(self, iteration: int) -> str:
        return self.save(f"model_{iteration:07d}", iteration)

    def _prune(self) -> None:
        if self.max_to_keep <= 0:
            return
        files = sorted(f for f in os.listdir(self.output_dir) if _PERIODIC.match(f))
        for f in files[: max(0, len(files) - self.max_to_keep)]:
            os.remove(os.path.join(self.output_dir, f))
            logger.info("removed old checkpoint %s (keeping %d)", f, self.max_to_keep)

    # -------------------------------------------------------------------------------------------- load
    def last_checkpoint(self) -> Optional[str]:
        """Path named by `last_checkpoint`, or None; a dangling pointer is an error naming the file."""
        marker = os.path.join(self.output_dir, LAST)
        if not os.path.isfile(marker):
            return None
        with open(marker) as f:
            name = f.read().strip()
        path = os.path.join(self.output_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{marker} points to {name!r}, which does not exist in {self.output_dir}")
        return path

    def load(self, path: str, *, resume: bool) -> Dict[str, Any]:
        """Load a checkpoint. With `resume` also optimizer, scaler and this rank's RNG state.

        Returns the checkpoint's dict (without the large tensors)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
        if "model" not in ckpt:
            raise KeyError(f"checkpoint {path} has no 'model' entry (keys: {sorted(ckpt)})")
        if resume:
            dp.load_full_state(self.model, ckpt["model"], self.optimizer, ckpt.get("optimizer"), strict=True)
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        else:
            # a starting point may be a training checkpoint of the published code (iBOT center (1, 1, K))
            sd = conform_state_dict(ckpt["model"], self.model.state_dict(), path)
            res = dp.load_full_state(self.model, sd, strict=False)
            missing, unexpected = (res.missing_keys, res.unexpected_keys) if res is not None else ([], [])
            if missing or unexpected:
                logger.warning("loaded %s: %d missing keys %s, %d unexpected keys %s", path, len(missing),
                               missing[:10], len(unexpected), unexpected[:10])
        logger.info("loaded %s (%s)", path, "resume" if resume else "weights only")
        return {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "scaler")}

    def resume_or_load(self, weights: str = "", resume: bool = True) -> Dict[str, Any]:
        """Resume from `last_checkpoint` if present (start at its iteration + 1, restoring RNG states);
        otherwise load `weights` (MODEL.WEIGHTS) as a starting point and start at 0.

        Returns `{'start_iter': int, 'rng_state': state or None}`; the caller restores the RNG state once the
        data iterator exists (creating it consumes random numbers)."""
        last = self.last_checkpoint() if resume else None
        if last is not None:
            meta = self.load(last, resume=True)
            states = meta.get("rng_states") or []
            rank, world = distributed.get_rank(), distributed.get_world_size()
            rng = states[rank] if len(states) == world else None
            if rng is None:
                logger.warning("checkpoint was written by %d ranks, now %d: RNG states not restored",
                               len(states), world)
            return {"start_iter": int(meta["iteration"]) + 1, "rng_state": rng}
        if weights:
            self.load(weights, resume=False)
        return {"start_iter": 0, "rng_state": None}


def restore_rng(state) -> None:
    """Restore a rank's RNG snapshot from `resume_or_load` (no-op for None)."""
    set_rng_state(state)
