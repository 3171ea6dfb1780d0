"""Per-band normalisation shared by the dataset readers (constants come from the dataset YAMLs)."""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch


class BandNormalizer:
    """z-score per channel of a (C,H,W) tensor: `(x - mean) / std` (a new tensor; the input is not modified)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], name: str = ""):
        self.mean = torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(-1)
        self.std = torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(-1)
        if self.mean.shape != self.std.shape:
            raise ValueError(f"normaliser {name!r}: {len(self.mean)} means but {len(self.std)} stds")
        if bool((self.std <= 0).any()):
            raise ValueError(f"normaliser {name!r}: std must be positive, got {self.std.tolist()}")
        self.name = name

    def __len__(self) -> int:
        return len(self.mean)

    def select(self, idx: Sequence[int]) -> "BandNormalizer":
        """Normaliser for a subset of the channels."""
        idx = list(idx)
        return BandNormalizer(self.mean[idx].tolist(), self.std[idx].tolist(), self.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.mean):
            raise ValueError(f"normaliser {self.name!r} has {len(self.mean)} channels, image has shape "
                             f"{tuple(x.shape)}")
        return (x - self.mean[:, None, None].to(x.dtype)) / self.std[:, None, None].to(x.dtype)


def normalizer_from_ds_cfg(ds_name: str, key: str = "norm_stats") -> BandNormalizer:
    """Normaliser from the `norm_stats: {mean, std}` entry of a dataset band YAML."""
    from dinov2.data.sensors import load_ds_cfg

    cfg = load_ds_cfg(ds_name)
    stats = cfg["metainfo"].get(key)
    if not isinstance(stats, dict) or "mean" not in stats or "std" not in stats:
        raise ValueError(f"dataset config {ds_name!r} has no '{key}: {{mean, std}}' entry")
    norm = BandNormalizer(stats["mean"], stats["std"], ds_name)
    if len(norm) != len(cfg["bands"]):
        raise ValueError(f"dataset config {ds_name!r}: {len(norm)} norm stats for {len(cfg['bands'])} bands")
    return norm


def robust_band_stats(values: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> Tuple[float, float]:
    """Mean/std of the values inside the [low_pct, high_pct] percentiles (outliers such as saturated or
    dead pixels do not dominate). A constant band gets std 1 so that it normalises to zeros."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("cannot compute band statistics: no valid pixels")
    lo, hi = np.percentile(v, [low_pct, high_pct])
    core = v[(v >= lo) & (v <= hi)]
    mean, std = float(core.mean()), float(core.std())
    return mean, (std if std > 0 else 1.0)


def pooled_band_stats(images: Iterable[np.ndarray], what: str) -> Tuple[List[float], List[float]]:
    """Per-band mean / std over the valid pixels (finite in every band) of several ``(C, H, W)`` arrays, pooled
    as if they were one image (float64 sums, so millions of pixels lose no precision)."""
    total = sq = None
    n = 0
    for arr in images:
        px = np.asarray(arr).reshape(arr.shape[0], -1).astype(np.float64)
        px = px[:, np.isfinite(px).all(0)]
        total = px.sum(1) if total is None else total + px.sum(1)
        sq = (px ** 2).sum(1) if sq is None else sq + (px ** 2).sum(1)
        n += px.shape[1]
    if not n:
        raise ValueError(f"{what}: no valid pixels to compute band statistics from")
    mean = total / n
    return mean.tolist(), np.sqrt(np.maximum(sq / n - mean ** 2, 1e-12)).tolist()


def to_float_tensor(arr: np.ndarray, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
    """numpy image (any numeric dtype) -> float tensor (float32 by default)."""
    if arr.dtype == np.uint16 or arr.dtype == np.uint32:
        arr = arr.astype(np.float32)  # torch has limited unsigned support
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
