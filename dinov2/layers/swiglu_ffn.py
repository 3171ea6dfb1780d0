"""SwiGLU feed-forward network (used by the DINOv2 giant model)."""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUFFN(nn.Module):
    """w3(silu(x1) * x2) with [x1, x2] = w12(x) (state-dict names `w12`, `w3` as DINOv2)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Optional[Callable[..., nn.Module]] = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU with the hidden width rounded as DINOv2 does (2/3 of the MLP width, multiple of 8)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, **kwargs) -> None:
        hidden = hidden_features or in_features
        super().__init__(in_features, (int(hidden * 2 / 3) + 7) // 8 * 8, **kwargs)
