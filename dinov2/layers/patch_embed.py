"""Standard (RGB) patch embedding: a strided conv over a fixed number of input channels."""
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn


def make_2tuple(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"expected an int or a 2-tuple, got {x!r}")
        return x
    return (int(x), int(x))


class PatchEmbed(nn.Module):
    """2D image to patch tokens. Accepts a tensor `(B,C,H,W)` or an x_dict (reads `imgs`).

    Returns `(tokens (B, N, D), h, w)` with h, w the patch grid size.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: Union[int, Tuple[int, int]] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Optional[Callable] = None,
    ) -> None:
        super().__init__()
        self.img_size = make_2tuple(img_size)
        self.patch_size = make_2tuple(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x) -> Tuple[torch.Tensor, int, int]:
        imgs = x["imgs"] if isinstance(x, dict) else x
        if imgs.ndim != 4:
            raise ValueError(f"imgs must be 4-D (B,C,H,W), got shape {tuple(imgs.shape)}")
        if imgs.shape[1] != self.in_chans:
            raise ValueError(f"PatchEmbed expects {self.in_chans} channels, got {imgs.shape[1]}; "
                             "use embed_layer='PanopticonPE' for arbitrary bands")
        H, W = imgs.shape[-2:]
        if H < self.patch_size[0] or W < self.patch_size[1]:
            raise ValueError(f"image {H}x{W} is smaller than one patch {self.patch_size}")
        x = self.proj(imgs)
        h, w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, h, w
