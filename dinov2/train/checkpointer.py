"""Training checkpoints: atomic `model_<iter>.pth` + `last_checkpoint`, keep-N, resume with RNG states.

File content: `{'model': SSLMetaArch state dict, 'optimizer', 'iteration' (last completed iteration),
'scaler' (fp16 GradScaler or None), 'rng_states' (one per rank), 'world_size'}` plus optional plain extras
(`loss_history`); everything loads with `torch.load(weights_only=True)`.

Resuming tries the checkpoint named by `last_checkpoint` first, then the other periodic checkpoints from the
newest down: a truncated, unreadable or non-finite file is skipped with a warning. Temporary files left by a save
that was killed (`.tmp_*`) are removed when the main rank creates the checkpointer.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from dinov2 import distributed
from dinov2 import fsdp as dp
from dinov2.utils.checkpoint import conform_state_dict, save_atomic
from dinov2.utils.utils import get_rng_state, set_rng_state

logger = logging.getLogger("dinov2")

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")
LAST = "last_checkpoint"
TMP_PREFIX = ".tmp_"  # save_atomic / _write_text_atomic temporary files


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete temporary files of interrupted atomic saves in `folder` and its `eval/<iteration>/` folders.
    Only safe while no other job writes there (the run lock guarantees it)."""
    removed = []
    dirs = [folder]
    ev = os.path.join(folder, "eval")
    if os.path.isdir(ev):
        dirs += [os.path.join(ev, d) for d in os.listdir(ev) if os.path.isdir(os.path.join(ev, d))]
    for d in dirs:
        for f in os.listdir(d):
            if f.startswith(TMP_PREFIX):
                path = os.path.join(d, f)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
                logger.warning("removed %s, left by a checkpoint save that did not finish", path)
    return removed


def _non_finite_tensors(sd: Dict[str, Any]) -> List[str]:
    return [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


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
        if distributed.is_main_process():
            remove_stale_temp_files(output_dir)
        distributed.barrier()

    # -------------------------------------------------------------------------------------------- save
    def save(self, name: str, iteration: int, extra: Optional[Dict[str, Any]] = None) -> str:
        """Write `<output_dir>/<name>.pth` atomically, point `last_checkpoint` at it and prune old periodic files.
        `extra`: further plain entries (lists of numbers, strings) stored in the file."""
        model_sd = dp.full_state_dict(self.model)
        optim_sd = dp.full_optimizer_state_dict(self.model, self.optimizer) if self.optimizer is not None else None
        rng_states = distributed.all_gather_object(get_rng_state())
        path = os.path.join(self.output_dir, f"{name}.pth")
        if distributed.is_main_process():
            obj = {"model": model_sd, "optimizer": optim_sd, "iteration": int(iteration),
                   "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                   "rng_states": rng_states, "world_size": distributed.get_world_size(), **(extra or {})}
            save_atomic(obj, path)
            _write_text_atomic(os.path.join(self.output_dir, LAST), os.path.basename(path))
            logger.info("saved checkpoint %s (iteration %d)", path, iteration)
            self._prune()
        distributed.barrier()
        return path

    def save_periodic(self, iteration: int, extra: Optional[Dict[str, Any]] = None) -> str:
        return self.save(f"model_{iteration:07d}", iteration, extra)

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

    @staticmethod
    def read(path: str) -> Dict[str, Any]:
        """`torch.load` a checkpoint file; RuntimeError naming the file if it is unreadable (e.g. truncated)."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not read checkpoint {path}: {e}") from e
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
            raise KeyError(f"checkpoint {path} has no 'model' entry (keys: {keys})")
        return ckpt

    def load(self, path: str, *, resume: bool, ckpt: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Load a checkpoint (`ckpt`: its already read content). With `resume` also optimizer and scaler.

        Returns the checkpoint's dict (without the large tensors)."""
        ckpt = self.read(path) if ckpt is None else ckpt
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

    def resume_candidates(self) -> List[str]:
        """Checkpoints to resume from, best first: the one named by `last_checkpoint`, then the periodic ones from
        the newest down."""
        out = []
        marker = os.path.join(self.output_dir, LAST)
        if os.path.isfile(marker):
            with open(marker) as f:
                name = f.read().strip()
            if name and os.path.isfile(os.path.join(self.output_dir, name)):
                out.append(os.path.join(self.output_dir, name))
            else:
                logger.warning("%s points to %r, which does not exist; looking for older checkpoints", marker, name)
        periodic = sorted((f for f in os.listdir(self.output_dir) if _PERIODIC.match(f)), reverse=True)
        out += [os.path.join(self.output_dir, f) for f in periodic if os.path.join(self.output_dir, f) not in out]
        return out

    def read_resumable(self) -> Optional[tuple]:
        """(path, content) of the best checkpoint that reads completely and holds finite weights, or None.
        Skipped files are named in warnings."""
        for path in self.resume_candidates():
            try:
                ckpt = self.read(path)
            except (RuntimeError, KeyError) as e:
                logger.warning("cannot resume from %s (%s); falling back to the previous checkpoint", path, e)
                continue
            bad = _non_finite_tensors(ckpt["model"])
            if bad:
                logger.warning("cannot resume from %s: non-finite values in %s; falling back to the previous "
                               "checkpoint", path, ", ".join(bad[:5]))
                continue
            return path, ckpt
        return None

    def resume_or_load(self, weights: str = "", resume: bool = True) -> Dict[str, Any]:
        """Resume from the newest usable checkpoint (`last_checkpoint`, else older periodic ones; start at its
        iteration + 1, restoring RNG states); otherwise load `weights` (MODEL.WEIGHTS) as a starting point and
        start at 0.

        Returns `{'start_iter': int, 'rng_state': state or None, 'checkpoint': path or None, 'meta': dict}`; the
        caller restores the RNG state once the data iterator exists (creating it consumes random numbers)."""
        found = self.read_resumable() if resume else None
        if found is not None:
            last, content = found
            meta = self.load(last, resume=True, ckpt=content)
            states = meta.get("rng_states") or []
            rank, world = distributed.get_rank(), distributed.get_world_size()
            rng = states[rank] if len(states) == world else None
            if rng is None:
                logger.warning("checkpoint was written by %d ranks, now %d: RNG states not restored",
                               len(states), world)
            return {"start_iter": int(meta["iteration"]) + 1, "rng_state": rng, "checkpoint": last, "meta": meta}
        if resume and self.resume_candidates():
            raise RuntimeError(f"no usable checkpoint in {self.output_dir}: every candidate is unreadable or holds "
                               f"non-finite weights (see the warnings above); pass --no-resume to start over")
        if weights:
            self.load(weights, resume=False)
        return {"start_iter": 0, "rng_state": None, "checkpoint": None, "meta": {}}


def restore_rng(state) -> None:
    """Restore a rank's RNG snapshot from `resume_or_load` (no-op for None)."""
    set_rng_state(state)
