"""Windowed reading of a scene onto one reference pixel grid, with validity masks and normalisation.

The reference grid is the finest band grid, cropped to the ground all bands cover (``data.tiling``'s
``common_extent``). Coarser bands are resampled onto it (bilinear) window by window, so memory depends on the
window, never on the scene. A pixel is invalid when any band is no-data, not finite or absurd; invalid pixels are
filled with the band mean (0 after normalisation) and reported in the mask so callers never mistake them for data.

Absurd values: beyond +-``ABSURD_VALUE`` (no Earth-observation band holds such numbers; float64 values beyond
float32's range would otherwise become infinities) or, once normalised, more than ``ABSURD_Z`` standard deviations
from the band mean. They are excluded from scene statistics (so they never shift the normalisation of their
neighbours), become no-data, and are reported so that callers can count them. Input files open through
`dinov2.data.raster_open` (the policy of what may be read), and reads run under the policy's GDAL settings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from dinov2.data.io import LazyHandles, read_raster_band
from dinov2.data.normalize import robust_band_stats
from dinov2.data.raster_open import LOCAL_ONLY, RasterPolicy, named_opener
from dinov2.data.tiling import RasterGroup, common_extent
from dinov2.inference.sources import SceneSource

STATS_MAX_SIDE = 1024  # decimated read for scene statistics (long side in pixels)
ABSURD_VALUE = 1e10  # |value| beyond this is no pixel value of any Earth-observation band
ABSURD_Z = 1e4  # normalised |value| beyond this (standard deviations from the mean) is not data either


@dataclass
class RefGrid:
    """North-up pixel grid: `res` metres (CRS units), top-left corner (left, top), `width` x `height`."""

    res: float
    left: float
    top: float
    width: int
    height: int


def _resampling(name: str):
    from rasterio.enums import Resampling

    return getattr(Resampling, name)


class SceneReader:
    """Reads windows of a scene's bands on its reference grid. Not thread-safe: use from one thread at a time."""

    def __init__(self, scene: SceneSource, policy: Optional[RasterPolicy] = None):
        self.scene, self.policy = scene, policy or LOCAL_ONLY
        self._handles = LazyHandles(named_opener(self.policy))
        groups: Dict[Tuple, RasterGroup] = {}
        self._chan_group: List[Tuple] = []
        self.crs = None
        nodatas = []
        for ch in scene.channels:
            src = self._handles.get(ch.path)
            if ch.index > src.count:
                raise ValueError(f"scene {scene.name}: {ch.path} has {src.count} bands, band {ch.index} requested")
            t = src.transform
            if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or t.e >= 0 or abs(abs(t.e) - t.a) > 1e-6 * t.a:
                raise ValueError(f"scene {scene.name}: {ch.path} is not a north-up raster with square pixels ({t})")
            if src.crs is None:
                raise ValueError(f"scene {scene.name}: {ch.path} has no CRS; embeddings could not be georeferenced")
            if self.crs is not None and src.crs != self.crs:
                raise ValueError(f"scene {scene.name}: {ch.path} has CRS {src.crs}, other bands {self.crs}")
            self.crs = src.crs
            key = (round(t.a, 6), round(t.c, 3), round(t.f, 3), src.width, src.height)
            g = groups.setdefault(key, RasterGroup(t.a, t.c, t.f, src.width, src.height))
            g.bands.append(ch.band)
            g.files.append(ch.path)
            g.band_indexes.append(ch.index)
            self._chan_group.append(key)
            nodatas.append(scene.nodata if scene.nodata is not None else src.nodata)
        self.groups = groups
        self.nodata = [None if v is None else float(v) for v in nodatas]
        left, bottom, right, top = common_extent(list(groups.values()))
        fine = min(groups.values(), key=lambda g: g.res)
        res = fine.res
        col0 = math.ceil((left - fine.left) / res - 1e-6)
        row0 = math.ceil((fine.top - top) / res - 1e-6)
        gl, gt = fine.left + col0 * res, fine.top - row0 * res
        self.grid = RefGrid(res, gl, gt, int(math.floor((right - gl) / res + 1e-6)),
                            int(math.floor((gt - bottom) / res + 1e-6)))
        if self.grid.width < 1 or self.grid.height < 1:
            raise ValueError(f"scene {scene.name}: the bands share no whole pixel")

    @property
    def transform(self):
        """Affine transform of the reference grid."""
        from affine import Affine

        return Affine(self.grid.res, 0.0, self.grid.left, 0.0, -self.grid.res, self.grid.top)

    def _read_channel(self, ci: int, row: float, col: float, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
        """A band's window in its own dtype (absurd values are found before conversion to float32)."""
        from rasterio.windows import Window

        ch = self.scene.channels[ci]
        g = self.groups[self._chan_group[ci]]
        src = self._handles.get(ch.path)
        x0 = self.grid.left + col * self.grid.res
        y0 = self.grid.top - row * self.grid.res
        gc, gr = (x0 - g.left) / g.res, (g.top - y0) / g.res
        gw, gh = w * self.grid.res / g.res, h * self.grid.res / g.res
        same = abs(g.res - self.grid.res) < 1e-9 and abs(gc - round(gc)) < 1e-6 and abs(gr - round(gr)) < 1e-6
        if same and out_h == h and out_w == w:
            return read_raster_band(src, ch.path, ch.index, window=Window(int(round(gc)), int(round(gr)), w, h))
        gc, gr = max(gc, 0.0), max(gr, 0.0)
        gw, gh = min(gw, g.width - gc), min(gh, g.height - gr)
        return read_raster_band(src, ch.path, ch.index, window=Window(gc, gr, gw, gh), out_shape=(out_h, out_w),
                                resampling=_resampling("bilinear" if not same else "average"))

    def read(self, row: int, col: int, h: int, w: int, out_h: Optional[int] = None,
             out_w: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw (C, h, w) float32 of a window inside the grid, its validity mask (h, w) and its absurd-value mask
        (h, w; those pixels are invalid too)."""
        if row < 0 or col < 0 or row + h > self.grid.height or col + w > self.grid.width:
            raise ValueError(f"window rows {row}..{row + h} cols {col}..{col + w} outside the "
                             f"{self.grid.height}x{self.grid.width} grid of scene {self.scene.name}")
        out_h, out_w = out_h or h, out_w or w
        arr = np.empty((len(self.scene.channels), out_h, out_w), np.float32)
        absurd = np.zeros((out_h, out_w), bool)
        valid = np.ones((out_h, out_w), bool)
        with self.policy.env():
            for ci, nd in enumerate(self.nodata):
                band = self._read_channel(ci, row, col, h, w, out_h, out_w)
                if nd is not None:
                    valid &= band != nd
                if band.dtype.kind == "f":
                    valid &= ~np.isnan(band)
                    with np.errstate(invalid="ignore"):
                        absurd |= ~(np.abs(band) <= ABSURD_VALUE) & ~np.isnan(band)
                elif band.dtype.itemsize >= 8:
                    absurd |= np.abs(band.astype(np.float64)) > ABSURD_VALUE
                with np.errstate(over="ignore", invalid="ignore"):
                    arr[ci] = band
        absurd &= valid
        return arr, valid & ~absurd, absurd

    def stats(self) -> Tuple[List[float], List[float]]:
        """Robust per-band mean/std of the valid pixels of a decimated read of the whole scene."""
        g = self.grid
        scale = max(1.0, max(g.width, g.height) / STATS_MAX_SIDE)
        oh, ow = max(1, int(round(g.height / scale))), max(1, int(round(g.width / scale)))
        arr, valid, _ = self.read(0, 0, g.height, g.width, oh, ow)
        if not valid.any():
            raise ValueError(f"scene {self.scene.name}: no valid pixels (nodata={self.nodata})")
        pairs = [robust_band_stats(a[valid]) for a in arr]
        return [m for m, _ in pairs], [s for _, s in pairs]

    def chip(self, row: int, col: int, size: int, mean: np.ndarray,
             std: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """A `size` x `size` chip with top-left (row, col): normalised (C, size, size) float32, validity mask,
        in-scene mask and absurd-value mask. The part beyond the scene's right/bottom edge is mirrored scene
        content (so edge patches see plausible surroundings) and flagged out-of-scene; invalid pixels are filled
        with the mean."""
        h, w = min(size, self.grid.height - row), min(size, self.grid.width - col)
        arr, valid, absurd = self.read(row, col, h, w)
        m, s = mean[:, None, None], std[:, None, None]
        with np.errstate(over="ignore", invalid="ignore"):
            z = (arr - m) / s
            far = valid & ~(np.abs(z) <= ABSURD_Z).all(0)
        absurd |= far
        valid &= ~far
        arr = np.where(valid[None], z, np.float32(0.0))
        inside = np.ones((h, w), bool)
        if h < size or w < size:
            pad = ((0, size - h), (0, size - w))
            mode = "reflect" if min(h, w) > 1 else "edge"
            arr = np.stack([np.pad(a, pad, mode=mode) for a in arr])
            valid = np.pad(valid, pad, constant_values=False)
            inside = np.pad(inside, pad, constant_values=False)
            absurd = np.pad(absurd, pad, constant_values=False)
        return arr.astype(np.float32, copy=False), valid, inside, absurd

    def close(self) -> None:
        self._handles.close()
