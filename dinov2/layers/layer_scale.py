"""LayerScale: a learned per-channel scaling of a residual branch (CaiT)."""
from typing import Union

import torch
from torch import nn


class LayerScale(nn.Module):
    """Multiply the input by a learned vector `gamma` initialised to `init_values`."""

    def __init__(self, dim: int, init_values: Union[float, torch.Tensor] = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
