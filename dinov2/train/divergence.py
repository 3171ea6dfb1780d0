"""When a training step counts as failed: a non-finite or spiking loss, non-finite or runaway weights.

Checked before every optimizer step (loss) and before anything is saved (weights), so that no checkpoint is ever
worse than the one before it. Config (`train.divergence`):

- `max_abs_weight` (default 1e6): any model tensor (student, teacher, loss centers) with |w| above it, or with a
  NaN/inf entry, stops the run; <= 0 checks finiteness only.
- `loss_spike_factor` (default 10) and `loss_window` (default 20): once `loss_window` losses are known, a loss
  above `median + loss_spike_factor * max(|median|, 1)` of the last `loss_window` losses stops the run;
  a factor <= 0 disables the rule.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from dinov2 import distributed


class TrainingDivergedError(FloatingPointError):
    """A non-finite or diverged training step; the message names the last good checkpoint."""


def largest_weight(module: nn.Module) -> Tuple[float, str]:
    """(largest |w| over the module's floating state, its tensor name); inf (with the name) if a tensor holds
    NaN/inf. Local shards of FSDP tensors are checked, and the result is the maximum over ranks."""
    names, maxima = [], []
    with torch.no_grad():
        for k, t in module.state_dict().items():
            if not torch.is_tensor(t) or not t.is_floating_point():
                continue
            if hasattr(t, "to_local"):  # FSDP shard
                t = t.to_local()
            if t.numel():
                names.append(k)
                maxima.append(t.detach().abs().amax().float())
    worst, name = 0.0, ""
    if maxima:
        # one device->host copy for all tensors; NaN/inf become inf so that max() reports them
        m = torch.stack([x.to(maxima[0].device) for x in maxima]).cpu()
        m = torch.where(torch.isfinite(m), m, torch.full_like(m, math.inf))
        i = int(torch.argmax(m))
        worst, name = float(m[i]), names[i]
    if distributed.is_enabled():
        worst, name = max(distributed.all_gather_object((worst, name)), key=lambda p: p[0])
    return worst, name


class DivergenceGuard:
    """Loss and weight checks of one run; `history` (recent finite losses) is saved with each checkpoint."""

    def __init__(self, max_abs_weight: float = 1e6, loss_spike_factor: float = 10.0, loss_window: int = 20,
                 history: Optional[Iterable[float]] = None):
        if int(loss_window) < 1:
            raise ValueError(f"train.divergence.loss_window must be >= 1, got {loss_window}")
        self.max_abs_weight, self.factor = float(max_abs_weight), float(loss_spike_factor)
        self.history: deque = deque((float(x) for x in (history or [])), maxlen=int(loss_window))

    def check_loss(self, loss: float) -> Optional[str]:
        """Why `loss` is a failed step, or None (then it joins the history)."""
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if self.factor > 0 and len(self.history) == self.history.maxlen:
            med = statistics.median(self.history)
            bound = med + self.factor * max(abs(med), 1.0)
            if loss > bound:
                return (f"loss spike: {loss:.6g} > {bound:.6g} (median {med:.6g} of the last {len(self.history)} "
                        f"losses + train.divergence.loss_spike_factor={self.factor:g} x max(|median|, 1))")
        self.history.append(float(loss))
        return None

    def check_weights(self, module: nn.Module) -> Optional[str]:
        """Why the module's weights are unusable (non-finite or beyond `max_abs_weight`), or None."""
        worst, name = largest_weight(module)
        if not math.isfinite(worst):
            return f"non-finite weights in {name}"
        if self.max_abs_weight > 0 and worst > self.max_abs_weight:
            return (f"diverged weights: |w| = {worst:.4g} in {name} exceeds train.divergence.max_abs_weight="
                    f"{self.max_abs_weight:g}")
        return None
