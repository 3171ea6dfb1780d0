"""Dense prediction heads on ViT feature maps (``get_intermediate_layers(..., reshape=True)``).

Every head takes a list of ``(B, D_i, h_i, w_i)`` maps (one per selected block or stage, shallow to deep) and
returns logits ``(B, K, h', w')`` that the caller upsamples bilinearly to the label size. ViT maps share one patch
grid (``pyramid=True`` builds the multi-scale pyramid from them); CNN stages already form a pyramid
(``pyramid=False`` uses them as they are).

- ``linear``: BatchNorm + 1x1 convolution on the channel-concatenation of the maps (a linear per-patch
  classifier; the BatchNorm only standardises the frozen features, as DINOv2's linear segmentation probe does);
- ``upernet``: a light UPerNet-style decoder as used by the PANGAEA protocol for ViT encoders: the maps are
  resampled to a feature pyramid (x4, x2, x1, x0.5 of the patch grid for four maps), fused top-down as in an
  FPN, concatenated at the finest scale and classified — it sees patch-grid structure below the patch size.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODERS = ("linear", "upernet")
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 conv over the concatenated block features (per-patch linear classifier); maps of other
    sizes are resized (bilinear) to the first map's grid first."""

    def __init__(self, in_dims: Sequence[int], num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(in_dims))
        self.cls = nn.Conv2d(sum(in_dims), num_classes, kernel_size=1)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return self.cls(self.bn(torch.cat(list(maps), dim=1)))


def _resampler(dim: int, scale: float) -> nn.Module:
    """Module changing the spatial scale of a ``(B, dim, h, w)`` map by ``scale`` (4, 2, 1 or 0.5)."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), nn.BatchNorm2d(dim), nn.GELU(),
                             nn.ConvTranspose2d(dim, dim, 2, stride=2))
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim, 2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, ceil_mode=True)
    raise ValueError(f"Unsupported pyramid scale {scale}")


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class UPerNetLite(nn.Module):
    """Feature pyramid from ViT maps + FPN top-down fusion + concatenation head (UPerNet without the PPM)."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, channels: int = 128, pyramid: bool = True):
        super().__init__()
        n_maps = len(in_dims)
        if not 1 <= n_maps <= len(PYRAMID_SCALES):
            raise ValueError(f"upernet decoder takes 1 to {len(PYRAMID_SCALES)} block maps, got {n_maps}")
        # the deepest map gets the coarsest scale; with fewer maps the finest scales are kept
        self.scales = PYRAMID_SCALES[:n_maps] if pyramid else (1.0,) * n_maps
        self.resample = nn.ModuleList([_resampler(d, s) for d, s in zip(in_dims, self.scales)])
        self.lateral = nn.ModuleList([_conv_bn_relu(d, channels, 1) for d in in_dims])
        self.smooth = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in self.scales])
        self.fuse = _conv_bn_relu(channels * n_maps, channels, 3)
        self.cls = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.scales):
            raise ValueError(f"upernet decoder built for {len(self.scales)} maps, got {len(maps)}")
        feats: List[torch.Tensor] = [lat(rs(m)) for m, rs, lat in zip(maps, self.resample, self.lateral)]
        for i in range(len(feats) - 1, 0, -1):  # top-down: coarse to fine
            feats[i - 1] = feats[i - 1] + F.interpolate(feats[i], size=feats[i - 1].shape[-2:], mode="bilinear",
                                                        align_corners=False)
        feats = [sm(f) for sm, f in zip(self.smooth, feats)]
        size = feats[0].shape[-2:]
        up = [feats[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats[1:]]
        return self.cls(self.fuse(torch.cat(up, dim=1)))


def build_dense_head(kind: str, in_dims: Sequence[int], num_classes: int, channels: int = 128,
                     pyramid: bool = True) -> nn.Module:
    """A dense head by name (``linear`` or ``upernet``) for maps with ``in_dims`` channels."""
    if kind == "linear":
        return LinearSegHead(in_dims, num_classes)
    if kind == "upernet":
        return UPerNetLite(in_dims, num_classes, channels, pyramid)
    raise ValueError(f"Unknown decoder {kind!r}; choose from {list(DECODERS)}")
