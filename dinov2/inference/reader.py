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
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from dinov2.data.io import LazyHandles, read_raster_band
from dinov2.data.normalize import robust_band_stats
from dinov2.data.raster_open import LOCAL_ONLY, RasterPolicy, named_opener
from dinov2.data.remote import clear_cached
from dinov2.data.tiling import RasterGroup, common_extent
from dinov2.inference.sources import SceneSource

STATS_MAX_SIDE = 1024  # decimated read for scene statistics (long side in pixels)
ABSURD_VALUE = 1e10  # |value| beyond this is no pixel value of any Earth-observation band
ABSURD_Z = 1e4  # normalised |value| beyond this (standard deviations from the mean) is not data either
WARM_THREADS = 8  # files of a remote scene fetched at once by `SceneReader.warm`


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
    """Reads windows of a scene's bands on its reference grid. Each thread reads through its own GDAL handles (a
    GDAL dataset must not be used by two threads at once), so windows may be read from several threads."""

    def __init__(self, scene: SceneSource, policy: Optional[RasterPolicy] = None):
        # the scene's URLs were named by the user (command line, scenes YAML, STAC item); nothing else is fetched
        self.scene, self.policy = scene, (policy or LOCAL_ONLY).with_urls(scene.urls)
        with self.policy.env():  # (GDAL sizes its download cache from these settings when first used)
            clear_cached(scene.urls)  # a remote file that changed since an earlier run in this process is read anew
        self._local = threading.local()
        self._all_handles: List[LazyHandles] = []
        self._lock = threading.Lock()
        self._warmers: Optional[ThreadPoolExecutor] = None
        groups: Dict[Tuple, RasterGroup] = {}
        self._chan_group: List[Tuple] = []
        self.crs = None
        nodatas = []
        if scene.urls:  # remote files opened together: one round trip instead of one per file
            self._handles.open_all(scene.input_files)
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
        if scene.clip is not None:
            left, bottom, right, top = self._clipped(fine, left, bottom, right, top)
        res = fine.res
        col0 = math.ceil((left - fine.left) / res - 1e-6)
        row0 = math.ceil((fine.top - top) / res - 1e-6)
        gl, gt = fine.left + col0 * res, fine.top - row0 * res
        self.grid = RefGrid(res, gl, gt, int(math.floor((right - gl) / res + 1e-6)),
                            int(math.floor((gt - bottom) / res + 1e-6)))
        if self.grid.width < 1 or self.grid.height < 1:
            raise ValueError(f"scene {scene.name}: the bands share no whole pixel")
        self.mask_group = self._open_mask() if scene.mask is not None else None

    @property
    def _handles(self) -> LazyHandles:
        """This thread's open files."""
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = LazyHandles(named_opener(self.policy))
            with self._lock:
                self._all_handles.append(handles)
        return handles

    def _clipped(self, fine: RasterGroup, left: float, bottom: float, right: float,
                 top: float) -> Tuple[float, float, float, float]:
        """The extent cut to the scene's WGS84 clip box (in the scene's CRS), grown to whole pixels of the finest
        grid so that every pixel the box touches stays."""
        from rasterio.warp import transform_bounds

        w, s, e, n = transform_bounds("EPSG:4326", self.crs, *self.scene.clip, densify_pts=21)
        r, x0, y0 = fine.res, fine.left, fine.top
        w, e = x0 + math.floor((w - x0) / r + 1e-6) * r, x0 + math.ceil((e - x0) / r - 1e-6) * r
        n, s = y0 - math.floor((y0 - n) / r + 1e-6) * r, y0 - math.ceil((y0 - s) / r - 1e-6) * r
        box = (max(left, w), max(bottom, s), min(right, e), min(top, n))
        if box[0] >= box[2] or box[1] >= box[3]:
            raise ValueError(f"scene {self.scene.name} does not intersect the clip box {list(self.scene.clip)} "
                             "(--bbox with --clip)")
        return box

    def _open_mask(self) -> RasterGroup:
        """The mask raster's grid; it must be in the scene's CRS and cover the reference grid."""
        m = self.scene.mask
        src = self._handles.get(m.path)
        what = f"scene {self.scene.name}: mask {m.path}"
        if m.index > src.count:
            raise ValueError(f"{what} has {src.count} bands, band {m.index} requested")
        if src.crs != self.crs:
            raise ValueError(f"{what} has CRS {src.crs}, the bands {self.crs}")
        t = src.transform
        if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or t.e >= 0 or abs(abs(t.e) - t.a) > 1e-6 * t.a:
            raise ValueError(f"{what} is not a north-up raster with square pixels ({t})")
        g = RasterGroup(t.a, t.c, t.f, src.width, src.height)
        r = self.grid
        tol = 1e-6 * r.res
        if (g.left > r.left + tol or g.top < r.top - tol or g.left + g.width * g.res < r.left + r.width * r.res - tol
                or g.top - g.height * g.res > r.top - r.height * r.res + tol):
            raise ValueError(f"{what} does not cover the scene's extent")
        return g

    @property
    def transform(self):
        """Affine transform of the reference grid."""
        from affine import Affine

        return Affine(self.grid.res, 0.0, self.grid.left, 0.0, -self.grid.res, self.grid.top)

    def _read_channel(self, ci: int, row: float, col: float, h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
        """A band's window in its own dtype (absurd values are found before conversion to float32)."""
        ch = self.scene.channels[ci]
        return self._read_band(ch.path, ch.index, self.groups[self._chan_group[ci]], row, col, h, w, out_h, out_w)

    def _read_band(self, path: str, index: int, g: RasterGroup, row: float, col: float, h: int, w: int, out_h: int,
                   out_w: int, categorical: bool = False) -> np.ndarray:
        """Band `index` of `path` (grid `g`) over a window of the reference grid, resampled onto it (nearest for
        `categorical` values such as masks, else bilinear up / average down)."""
        from rasterio.windows import Window

        src = self._handles.get(path)
        x0 = self.grid.left + col * self.grid.res
        y0 = self.grid.top - row * self.grid.res
        gc, gr = (x0 - g.left) / g.res, (g.top - y0) / g.res
        gw, gh = w * self.grid.res / g.res, h * self.grid.res / g.res
        same = abs(g.res - self.grid.res) < 1e-9 and abs(gc - round(gc)) < 1e-6 and abs(gr - round(gr)) < 1e-6
        if same and out_h == h and out_w == w:
            return read_raster_band(src, path, index, window=Window(int(round(gc)), int(round(gr)), w, h))
        gc, gr = max(gc, 0.0), max(gr, 0.0)
        gw, gh = min(gw, g.width - gc), min(gh, g.height - gr)
        how = "nearest" if categorical else "bilinear" if not same else "average"
        return read_raster_band(src, path, index, window=Window(gc, gr, gw, gh), out_shape=(out_h, out_w),
                                resampling=_resampling(how))

    def window_bytes(self, h: int, w: int) -> int:
        """Decoded bytes of the blocks (tiles) of every band file that a `h` x `w` window may touch: what GDAL's
        block cache must hold for `warm` to serve the chips inside the window."""
        total = 0
        for path in dict.fromkeys([*self.scene.input_files]):
            src = self._handles.get(path)
            bh, bw = src.block_shapes[0]
            res = abs(src.transform.a)
            rows = math.ceil(h * self.grid.res / res / bh) + 1
            cols = math.ceil(w * self.grid.res / res / bw) + 1
            total += rows * cols * bh * bw * src.count * np.dtype(src.dtypes[0]).itemsize
        return total

    def warm(self, row: int, col: int, h: int, w: int) -> None:
        """Read a window of every band file (and the mask) at its own resolution and discard it: GDAL fetches its
        tiles at once (parallel range requests for remote files) into this thread's block cache, where the reads
        of the chips inside it find them. Values are unaffected: chips are read as always."""
        from rasterio.windows import Window

        h, w = min(h, self.grid.height - row), min(w, self.grid.width - col)
        todo = {(ch.path, ch.index): self.groups[key] for ch, key in zip(self.scene.channels, self._chan_group)}
        if self.mask_group is not None:
            todo[(self.scene.mask.path, self.scene.mask.index)] = self.mask_group
        x0, y0 = self.grid.left + col * self.grid.res, self.grid.top - row * self.grid.res
        by_file: Dict[str, List[Tuple[int, Window]]] = {}
        for (path, index), g in todo.items():
            c0, r0 = max(0, math.floor((x0 - g.left) / g.res)), max(0, math.floor((g.top - y0) / g.res))
            c1 = min(g.width, math.ceil((x0 + w * self.grid.res - g.left) / g.res))
            r1 = min(g.height, math.ceil((g.top - y0 + h * self.grid.res) / g.res))
            if c1 > c0 and r1 > r0:
                by_file.setdefault(path, []).append((index, Window(c0, r0, c1 - c0, r1 - r0)))
        handles = {path: self._handles.get(path) for path in by_file}  # this thread's: its reads hit the cache

        def fetch(path: str) -> None:
            with self.policy.env():
                for index, window in by_file[path]:
                    read_raster_band(handles[path], path, index, window=window)

        if len(by_file) == 1:
            fetch(next(iter(by_file)))
            return
        # files at once: each dataset is used by one thread at a time (GDAL's rule), all files' requests in flight
        if self._warmers is None:
            with self._lock:
                self._warmers = self._warmers or ThreadPoolExecutor(max_workers=WARM_THREADS)
        for f in [self._warmers.submit(fetch, path) for path in by_file]:
            f.result()

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
            if self.mask_group is not None:  # cloud / quality mask: its marked pixels are no-data
                m = self.scene.mask
                valid &= ~m.masked(self._read_band(m.path, m.index, self.mask_group, row, col, h, w, out_h, out_w,
                                                   categorical=True))
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
        """Close the files of every thread (call when no thread reads any more)."""
        with self._lock:
            handles, self._all_handles = self._all_handles, []
            warmers, self._warmers = self._warmers, None
        if warmers is not None:
            warmers.shutdown()
        for h in handles:
            h.close()
        self._local = threading.local()
