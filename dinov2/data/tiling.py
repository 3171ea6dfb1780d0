"""Tiling georeferenced rasters into patches given in metres, across bands of different native resolution.

A *group* is a set of channels sharing one pixel grid (same resolution and origin). All groups of a patch
cover the same ground square of `patch_m` metres: a group with pixel size `res` contributes `patch_m / res`
pixels per side, so `patch_m` must be a multiple of every group's resolution. The patch grid is anchored on the
coarsest group's pixel grid (exact there); finer grids whose origins are offset (e.g. Sentinel-2 10 m vs 20 m
rasters that start 10 m apart) are aligned to the nearest pixel, i.e. within half a fine pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np


@dataclass
class RasterGroup:
    """Channels on one pixel grid: `files[i]` / `band_indexes[i]` (1-based) hold channel `bands[i]`."""

    res: float
    left: float
    top: float
    width: int
    height: int
    bands: List[str] = field(default_factory=list)
    files: List[str] = field(default_factory=list)
    band_indexes: List[int] = field(default_factory=list)

    @property
    def right(self) -> float:
        return self.left + self.width * self.res

    @property
    def bottom(self) -> float:
        return self.top - self.height * self.res


def patch_pixels(patch_m: float, res: float) -> int:
    """Pixels per patch side for a group; `patch_m` must be a whole number of pixels."""
    px = patch_m / res
    if abs(px - round(px)) > 1e-6 or round(px) < 1:
        raise ValueError(f"patch size {patch_m} m is not a whole number of {res} m pixels; use a multiple of "
                         f"{res} m")
    return int(round(px))


def valid_patch_sizes(resolutions: Sequence[float], upto: float = 4000.0) -> List[float]:
    """Patch sizes (m, up to `upto`) compatible with all resolutions — for error messages and docs."""
    scaled = [int(round(r * 100)) for r in resolutions]
    lcm = scaled[0]
    for s in scaled[1:]:
        lcm = lcm * s // math.gcd(lcm, s)
    step = lcm / 100
    return [step * k for k in range(1, int(upto // step) + 1)]


def common_extent(groups: Sequence[RasterGroup]) -> Tuple[float, float, float, float]:
    """Intersection (left, bottom, right, top) of all groups' footprints."""
    left = max(g.left for g in groups)
    right = min(g.right for g in groups)
    top = min(g.top for g in groups)
    bottom = max(g.bottom for g in groups)
    if right <= left or top <= bottom:
        raise ValueError("the rasters of a scene do not overlap")
    return left, bottom, right, top


def grid_origin(groups: Sequence[RasterGroup]) -> Tuple[float, float]:
    """Top-left corner of the patch grid: the first coarsest-grid pixel corner inside the common extent."""
    left, _, _, top = common_extent(groups)
    coarse = max(groups, key=lambda g: g.res)
    ox = coarse.left + math.ceil((left - coarse.left) / coarse.res - 1e-6) * coarse.res
    oy = coarse.top - math.ceil((coarse.top - top) / coarse.res - 1e-6) * coarse.res
    return ox, oy


def patch_origins(groups: Sequence[RasterGroup], patch_m: float, stride_m: Optional[float] = None,
                  holdout_fraction: float = 0.0, split: str = "all") -> List[Tuple[float, float]]:
    """Top-left corners (x, y) in map units of the patches inside the common extent.

    `split='train'` keeps patches entirely west of the holdout line (the eastern `holdout_fraction` of the
    extent), `'val'` those entirely east of it, `'all'` every patch; patches crossing the line are dropped from
    both so train and val never share ground.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    stride = patch_m if stride_m is None else stride_m
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    left, bottom, right, top = common_extent(groups)
    ox, oy = grid_origin(groups)
    line = right - holdout_fraction * (right - left)
    nx = int(math.floor((right - ox - patch_m) / stride + 1e-6)) + 1
    ny = int(math.floor((oy - bottom - patch_m) / stride + 1e-6)) + 1
    out = []
    for j in range(max(ny, 0)):
        for i in range(max(nx, 0)):
            x, y = ox + i * stride, oy - j * stride
            if split == "train" and x + patch_m > line + 1e-6:
                continue
            if split == "val" and x < line - 1e-6:
                continue
            out.append((x, y))
    return out


def group_window(group: RasterGroup, x: float, y: float, patch_m: float) -> Tuple[int, int, int]:
    """(row_off, col_off, size) of a patch with top-left corner (x, y) in this group's pixels."""
    px = patch_pixels(patch_m, group.res)
    col = int(round((x - group.left) / group.res))
    row = int(round((group.top - y) / group.res))
    col, row = min(max(col, 0), group.width - px), min(max(row, 0), group.height - px)
    if col < 0 or row < 0:
        raise ValueError(f"a {patch_m} m patch does not fit into a {group.width}x{group.height} px raster")
    return row, col, px


def cell_grid(groups: Sequence[RasterGroup], cell_m: float) -> Tuple[float, float, int, int]:
    """Origin and shape (ox, oy, ny, nx) of a coarse analysis grid of `cell_m` cells over the common extent."""
    _, bottom, right, _ = common_extent(groups)
    ox, oy = grid_origin(groups)
    return ox, oy, max(int((oy - bottom) // cell_m), 1), max(int((right - ox) // cell_m), 1)


def patch_valid_fraction(cell_valid: np.ndarray, ox: float, oy: float, cell_m: float, x: float, y: float,
                         patch_m: float) -> float:
    """Fraction of valid analysis cells under a patch (cells partly outside the grid count as invalid)."""
    c0, r0 = int(round((x - ox) / cell_m)), int(round((oy - y) / cell_m))
    n = max(int(round(patch_m / cell_m)), 1)
    block = cell_valid[max(r0, 0): r0 + n, max(c0, 0): c0 + n]
    return float(block.sum()) / float(n * n)
