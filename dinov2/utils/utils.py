"""Schedules, seeding and RNG state capture for training."""
from __future__ import annotations

import logging
import random
from typing import Any, Dict, Optional

import numpy as np
import torch

logger = logging.getLogger("dinov2")


class CosineScheduler:
    """Per-iteration values: `freeze_iters` zeros, linear warmup from `start_warmup_value` to `base_value`,
    `hold_iters` at `base_value`, then a cosine from `base_value` to `final_value`; the final value is kept for
    any index past `total_iters`."""

    def __init__(self, base_value: float, final_value: float, total_iters: int, warmup_iters: int = 0,
                 start_warmup_value: float = 0.0, freeze_iters: int = 0, hold_iters: int = 0):
        if total_iters <= 0:
            raise ValueError(f"schedule needs total_iters > 0, got {total_iters}")
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        parts = [np.zeros(max(0, int(freeze_iters)))]
        left = self.total_iters - len(parts[0])
        warm = min(max(0, int(warmup_iters)), max(left, 0))
        parts.append(np.linspace(start_warmup_value, base_value, warm, endpoint=False) if warm else np.zeros(0))
        left -= warm
        hold = min(max(0, int(hold_iters)), max(left, 0))
        parts.append(np.full(hold, float(base_value)))
        left -= hold
        if left > 0:
            t = np.arange(left)
            parts.append(final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * t / left)))
        self.schedule = np.concatenate(parts)[: self.total_iters]

    def __getitem__(self, it: int) -> float:
        return float(self.schedule[it]) if it < len(self.schedule) else self.final_value

    def __len__(self) -> int:
        return len(self.schedule)


def fix_random_seeds(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> Dict[str, Any]:
    """Snapshot of every RNG a training step may consume (python, numpy, torch CPU, CUDA if present)."""
    # plain containers and tensors only, so checkpoints holding it still load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore a snapshot from `get_rng_state` (CUDA states only if the device count matches)."""
    if not state:
        return
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint has CUDA RNG states for %d devices, %d visible: not restored",
                           len(cuda), torch.cuda.device_count())


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
