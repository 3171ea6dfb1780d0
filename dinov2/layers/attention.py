"""Multi-head self-attention on `torch.nn.functional.scaled_dot_product_attention`.

xformers' memory-efficient kernel is used only when it is importable *and* the tensors live on CUDA (it imports on
CPU machines but cannot run there); everywhere else PyTorch's SDPA picks the best available kernel.
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional accelerator
    if os.environ.get("XFORMERS_DISABLED"):
        raise ImportError("disabled by XFORMERS_DISABLED")
    from xformers.ops import memory_efficient_attention as _xformers_attention  # type: ignore

    XFORMERS_AVAILABLE = True
except ImportError:
    _xformers_attention = None
    XFORMERS_AVAILABLE = False


class Attention(nn.Module):
    """Standard ViT attention; state-dict names `qkv`, `proj` as DINOv2."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if _xformers_attention is not None and x.is_cuda and attn_bias is None:
            q, k, v = qkv.unbind(2)  # (B, N, H, d)
            out = _xformers_attention(q, k, v, p=dropout_p).reshape(B, N, C)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)
            out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


# DINOv2 configs name the attention class `MemEffAttention`; the SDPA path above is already memory-efficient.
MemEffAttention = Attention
