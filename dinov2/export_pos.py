"""The position-table interpolation of `DinoVisionTransformer.interpolate_pos_encoding`, written so that an
exported graph keeps height and width symbolic.

The eager model resizes the stored M x M table with `F.interpolate(mode="bicubic", scale_factor=(g + offset) / M)`
(antialias off); with a symbolic grid size g, that call would fix g at export. Bicubic resizing is separable, so
the same values come from two small matrices: for each output row i, the source coordinate
`(i + 0.5) * M / (g + offset) - 0.5` (PyTorch's convention when a scale factor is given) picks four neighbours
(clamped at the border) weighted by the cubic convolution kernel with a = -0.75. The stored table is returned as is
when the grid equals it, as the eager model does. Equal to the eager result up to float rounding (~1e-7).
"""
from __future__ import annotations

import math

import torch

_A = -0.75  # PyTorch's bicubic kernel coefficient


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of the four neighbours at distances t+1, t, 1-t, 2-t: (..., 4)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _as_tensor(g: int) -> torch.Tensor:
    """A (possibly symbolic) size as a float tensor, without a Python branch on its value."""
    return torch.ones(g).sum()


def axis_matrix(g: int, m: int, offset: float, keep: torch.Tensor) -> torch.Tensor:
    """(g, m) matrix that resamples m table rows to g rows as the eager model does, or the identity where `keep`
    (a 0-d bool tensor; the eager model keeps the table only when both sides equal it). `g` may be symbolic."""
    idx = torch.arange(g, dtype=torch.float32)
    scale = m / (_as_tensor(g) + offset) if offset else m / _as_tensor(g)
    src = (idx + 0.5) * scale - 0.5
    left = torch.floor(src)
    weights = _cubic_weights(src - left)
    cols = torch.arange(m, dtype=torch.float32)
    out = torch.zeros_like(idx[:, None] * cols[None, :])
    for k in range(4):
        j = torch.clamp(left + (k - 1), 0, m - 1)
        out = out + weights[:, k:k + 1] * (j[:, None] == cols[None, :]).to(out.dtype)
    identity = (idx[:, None] == cols[None, :]).to(out.dtype)
    return torch.where(keep, identity, out)


def dynamic_pos_encoding(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Drop-in for `DinoVisionTransformer.interpolate_pos_encoding` (bound to a copy of the model at export)."""
    pos = self.pos_embed.float()
    m = int(math.sqrt(pos.shape[1] - 1))
    cls, table = pos[:, :1], pos[:, 1:].reshape(m, m, -1)
    offset = float(self.interpolate_offset or 0.0)
    keep = (_as_tensor(grid_h) == m) & (_as_tensor(grid_w) == m)
    rows = axis_matrix(grid_h, m, offset, keep).to(pos.device)
    cols = axis_matrix(grid_w, m, offset, keep).to(pos.device)
    patches = torch.einsum("im,mnd,jn->ijd", rows, table, cols).reshape(1, -1, table.shape[-1])
    return torch.cat([cls, patches], dim=1).to(x.dtype)
