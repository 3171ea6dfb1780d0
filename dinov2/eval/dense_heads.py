"""Dense prediction heads on ViT feature maps (``get_intermediate_layers(..., reshape=True)``).

Every head takes a list of ``(B, D_i, h_i, w_i)`` maps (one per selected block or stage, shallow to deep) and
returns logits ``(B, K, h', w')`` that the caller upsamples bilinearly to the label size. ViT maps share one patch
grid (``pyramid=True`` first turns them into a multi-scale pyramid, x4 / x2 / x1 / x0.5 of the patch grid for four
maps); CNN stages already form a pyramid (``pyramid=False`` uses them as they are).

- ``linear``: BatchNorm + 1x1 convolution on the channel-concatenation of the maps (a linear per-patch
  classifier; the BatchNorm only standardises the frozen features, as DINOv2's linear segmentation probe does);
- ``upernet``: "UPerNet-lite", this project's fast CPU decoder: the pyramid, an FPN top-down fusion, the levels
  concatenated at the finest scale and classified (no pyramid pooling module, no dropout; default width 128);
- ``upernet_ppm``: a full UPerNet as the PANGAEA benchmark runs it on plain-ViT encoders (its ``SegUPerNet``
  decoder behind a ``Feature2Pyramid`` neck): the pyramid, a pyramid pooling module (scales 1, 2, 3, 6) on the
  coarsest level, FPN laterals and top-down fusion, 3x3 FPN convolutions, concatenation at the finest level, a
  3x3 bottleneck, ``Dropout2d(0.1)`` and a 1x1 classifier; width ``channels`` (512 in that protocol).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DECODERS = ("linear", "upernet", "upernet_ppm")
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
PPM_SCALES = (1, 2, 3, 6)


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
        maps = [m if m.shape[-2:] == size else _up(m, size) for m in maps]
        return self.cls(self.bn(torch.cat(list(maps), dim=1)))


def _up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


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


def _scales(n_maps: int, pyramid: bool, name: str) -> tuple:
    if not 1 <= n_maps <= len(PYRAMID_SCALES):
        raise ValueError(f"{name} decoder takes 1 to {len(PYRAMID_SCALES)} block maps, got {n_maps}")
    # the deepest map gets the coarsest scale; with fewer maps the finest scales are kept
    return PYRAMID_SCALES[:n_maps] if pyramid else (1.0,) * n_maps


class FeaturePyramid(nn.Module):
    """Plain-ViT maps (one grid) -> pyramid: x4 (2 transposed convs with BN + GELU between), x2 (1 transposed
    conv), x1, x0.5 (max pool), as PANGAEA's ``Feature2Pyramid`` neck; identity per level when not ``pyramid``."""

    def __init__(self, in_dims: Sequence[int], pyramid: bool = True, name: str = "upernet"):
        super().__init__()
        self.scales = _scales(len(in_dims), pyramid, name)
        self.resample = nn.ModuleList([_resampler(d, s) for d, s in zip(in_dims, self.scales)])

    def forward(self, maps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        if len(maps) != len(self.scales):
            raise ValueError(f"decoder built for {len(self.scales)} maps, got {len(maps)}")
        return [rs(m) for m, rs in zip(maps, self.resample)]


class UPerNetLite(nn.Module):
    """Feature pyramid from ViT maps + FPN top-down fusion + concatenation head (UPerNet without the PPM)."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, channels: int = 128, pyramid: bool = True):
        super().__init__()
        self.scales = _scales(len(in_dims), pyramid, "upernet")
        self.resample = nn.ModuleList([_resampler(d, s) for d, s in zip(in_dims, self.scales)])
        self.lateral = nn.ModuleList([_conv_bn_relu(d, channels, 1) for d in in_dims])
        self.smooth = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in self.scales])
        self.fuse = _conv_bn_relu(channels * len(in_dims), channels, 3)
        self.cls = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.scales):
            raise ValueError(f"upernet decoder built for {len(self.scales)} maps, got {len(maps)}")
        feats: List[torch.Tensor] = [lat(rs(m)) for m, rs, lat in zip(maps, self.resample, self.lateral)]
        for i in range(len(feats) - 1, 0, -1):  # top-down: coarse to fine
            feats[i - 1] = feats[i - 1] + _up(feats[i], feats[i - 1].shape[-2:])
        feats = [sm(f) for sm, f in zip(self.smooth, feats)]
        size = feats[0].shape[-2:]
        return self.cls(self.fuse(torch.cat([feats[0]] + [_up(f, size) for f in feats[1:]], dim=1)))


class PyramidPooling(nn.Module):
    """UPerNet's pyramid pooling module on one map: per scale s, adaptive average pooling to s x s, 1x1 conv + BN +
    ReLU, bilinear upsampling back; the input and the pooled maps are concatenated and fused by a 3x3 conv + BN +
    ReLU bottleneck."""

    def __init__(self, in_dim: int, channels: int, scales: Sequence[int] = PPM_SCALES):
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(nn.AdaptiveAvgPool2d(s), *_conv_bn_relu(in_dim, channels, 1))
                                     for s in scales])
        self.bottleneck = _conv_bn_relu(in_dim + len(scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_up(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x] + pooled, dim=1))


class UPerNet(nn.Module):
    """UPerNet (pyramid pooling + FPN) behind a ViT feature pyramid, in the layout PANGAEA's ``SegUPerNet`` uses for
    plain-ViT encoders: PPM on the coarsest level, 1x1 laterals on the others, top-down bilinear addition, 3x3 FPN
    convs, all levels upsampled to the finest and concatenated, 3x3 bottleneck, ``Dropout2d(dropout)``, 1x1
    classifier."""

    def __init__(self, in_dims: Sequence[int], num_classes: int, channels: int = 512, pyramid: bool = True,
                 dropout: float = 0.1):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"upernet_ppm needs at least 2 block maps (PANGAEA uses 4), got {len(in_dims)}")
        self.neck = FeaturePyramid(in_dims, pyramid, "upernet_ppm")
        self.ppm = PyramidPooling(in_dims[-1], channels)
        self.lateral = nn.ModuleList([_conv_bn_relu(d, channels, 1) for d in in_dims[:-1]])
        self.fpn = nn.ModuleList([_conv_bn_relu(channels, channels, 3) for _ in in_dims[:-1]])
        self.bottleneck = _conv_bn_relu(channels * len(in_dims), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.cls = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        levels = self.neck(maps)
        lat = [conv(m) for conv, m in zip(self.lateral, levels[:-1])] + [self.ppm(levels[-1])]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + _up(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(f) for conv, f in zip(self.fpn, lat[:-1])] + [lat[-1]]
        size = outs[0].shape[-2:]
        fused = self.bottleneck(torch.cat([outs[0]] + [_up(o, size) for o in outs[1:]], dim=1))
        return self.cls(self.dropout(fused))


def build_dense_head(kind: str, in_dims: Sequence[int], num_classes: int, channels: int = 128,
                     pyramid: bool = True) -> nn.Module:
    """A dense head by name (``linear``, ``upernet`` or ``upernet_ppm``) for maps with ``in_dims`` channels."""
    if kind == "linear":
        return LinearSegHead(in_dims, num_classes)
    if kind == "upernet":
        return UPerNetLite(in_dims, num_classes, channels, pyramid)
    if kind == "upernet_ppm":
        return UPerNet(in_dims, num_classes, channels, pyramid)
    raise ValueError(f"Unknown decoder {kind!r}; choose from {list(DECODERS)}")
