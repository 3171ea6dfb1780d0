"""Fixture writers: tiny copies of the real on-disk layouts of the pretraining datasets (and of the SpectralEarth
CORINE downstream task, which shares the SpectralEarth reader).

Each writer creates files exactly as the public releases lay them out (parquet with list columns, HDF5, PNG tiles,
TIFF patches, georeferenced GeoTIFFs) under a given directory and returns what a test needs to know about them.
Pixel values are deterministic (seeded numpy) so tests can check them.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

FMOW_SPLIT_FILE = "fmow/metadata_v2/fmow_iwm_onid_train.parquet"
FMOW_BANDS = {"rgb": 3, "wv23": 8, "s2": 13}


def _write_tiff_hwc(path: str, arr: np.ndarray) -> None:
    import tifffile

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")


def write_fmow(root: str, n_footprints: int = 3, size: int = 40, seed: int = 0,
               entries: Sequence[Tuple[str, int, int]] = ()) -> Dict[str, object]:
    """fMoW-full (rgb, wv23 `_ms`) + fMoW-Sentinel (s2) TIFFs and the footprint-indexed metadata_v2 parquet
    (one row per footprint, list columns). Footprint 0 has one image of each sensor plus a second s2 date;
    image sizes vary so that size filters can be tested; `entries` ((sensor, h, w), ...) overrides the images
    of every footprint. Returns {'rows': [...], 'paths': {...}}."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows, paths = [], {}
    for f in range(n_footprints):
        images = entries or [("rgb", size, size + 4), ("wv23", size // 2, size // 2 + 2), ("s2", 12, 12),
                             ("s2", 12, 13)]
        rec = {c: [] for c in ("img_id", "path", "sensor", "gsd", "timestamp", "img_height", "img_width")}
        for k, (sensor, h, w) in enumerate(images):
            name = f"airport_{f}_{k}"
            if sensor == "s2":
                rel = f"fmow-sentinel/train/airport/airport_{f}/{name}.tif"
                arr = rng.integers(0, 4000, (h, w, 13), dtype=np.uint16)
            elif sensor == "wv23":
                rel = f"fmow/train/airport/airport_{f}/{name}_ms.tif"
                arr = rng.integers(0, 2000, (h, w, 8), dtype=np.uint16)
            else:
                rel = f"fmow/train/airport/airport_{f}/{name}_rgb.tif"
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            _write_tiff_hwc(os.path.join(root, rel), arr)
            paths[rel] = arr
            rec["img_id"].append(name)
            rec["path"].append(rel)
            rec["sensor"].append(sensor)
            rec["gsd"].append({"rgb": 0.5, "wv23": 2.0, "s2": 10.0}[sensor])
            rec["timestamp"].append(pd.Timestamp("2016-01-01") + pd.Timedelta(days=30 * k))
            rec["img_height"].append(h)
            rec["img_width"].append(w)
        rows.append(rec)
    df = pd.DataFrame(rows)
    meta = os.path.join(root, FMOW_SPLIT_FILE)
    os.makedirs(os.path.dirname(meta), exist_ok=True)
    df.to_parquet(meta)
    return {"rows": rows, "paths": paths, "metadata": meta}


MMEARTH_S2_ORDER = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12"]


def write_mmearth(root: str, n: int = 4, tile: int = 16, name: str = "data_1M_v001", seed: int = 0,
                  layout: str = "parquet") -> Dict:
    """MMEarth `<base>/<name>.h5` (datasets `sentinel2` (N,13,T,T), `sentinel1` (N,8,T,T)) and
    `<name>_band_stats.json`, plus the row metadata:
    - `layout="parquet"`: `<name>.parquet` (hf5_idx, split, sensor list, s2_type) as the published code shipped it;
    - `layout="released"`: exactly the public MMEarth download -- no parquet; the h5 also holds `metadata`
      (compound `tile_id`/`S2_type` bytes), `month`, `lat`, `lon`; `<name>_tile_info.json` ({tile_id: {S2_type,
      BANDS, lat, lon, S2_DATE}}) and `<name>_splits.json` ({train, val, test}: shuffled h5 indices: train
      0..n-3, val n-2, test n-1). S2 is uint16 there, and the l2a row has its B10 channel filled with 0.
    S2 channel c holds the constant 100*(c+1) + noise so band order is checkable; sample 0 has S2 no-data (0) in a
    corner; S1 HH/HV are -inf (not acquired); sample 1 is l2a, the others l1c; sample n-1 lacks sentinel1."""
    import h5py
    import pandas as pd

    if layout not in ("parquet", "released"):
        raise ValueError(f"layout must be 'parquet' or 'released', got {layout!r}")
    base = os.path.join(root, "mmearth", name)
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(seed)
    s2 = np.stack([np.full((n, tile, tile), 100.0 * (c + 1)) for c in range(13)], 1)
    s2 = (s2 + rng.normal(0, 5, s2.shape)).astype(np.float32)
    s2[0, :, :4, :4] = 0.0
    s1 = rng.normal(-12, 3, (n, 8, tile, tile)).astype(np.float32)
    s1[:, [2, 3, 6, 7]] = -np.inf
    s2_types = ["l1c", "l2a"] + ["l1c"] * (n - 2)
    released = layout == "released"
    if released:
        s2 = np.round(s2).astype(np.uint16)
        s2[1, 10] = 0  # l2a products have no B10: the release stores zeros (= no-data)
        s1[n - 1] = -np.inf  # no S1 acquisition for the last tile
    tile_ids = [f"{i:04d}_tile_{31 + i}N_{7 + i}E" for i in range(n)]
    with h5py.File(os.path.join(base, f"{name}.h5"), "w") as f:
        f.create_dataset("sentinel2", data=s2, chunks=(1, 13, tile, tile), compression="gzip" if released else None)
        f.create_dataset("sentinel1", data=s1, chunks=(1, 8, tile, tile), compression="gzip" if released else None)
        if released:
            meta = np.array(list(zip(tile_ids, s2_types)), dtype=[("tile_id", "S100"), ("S2_type", "S10")])
            f.create_dataset("metadata", data=meta, chunks=(1,), compression="gzip")
            month = np.array([[np.sin(2 * np.pi * m / 12), np.cos(2 * np.pi * m / 12)] for m in range(1, n + 1)])
            f.create_dataset("month", data=month.astype(np.float32), chunks=(1, 2))
            for key in ("lat", "lon"):
                f.create_dataset(key, data=rng.uniform(-1, 1, (n, 2)).astype(np.float32), chunks=(1, 2))
    has_s1 = [True] * (n - 1) + [False]
    if released:
        s2_bands = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12", "QA60"]
        tile_info = {
            tid: {"S2_type": s2_types[i], "S2_DATE": f"2019-{i % 12 + 1:02d}-15", "lat": 31.0 + i, "lon": 7.0 + i,
                  "BANDS": {"sentinel2": [b for b in s2_bands if not (s2_types[i] == "l2a" and b == "B10")],
                            "sentinel1_asc": ["VV", "VH"] if has_s1[i] else None,
                            "sentinel1_desc": ["VV", "VH"] if has_s1[i] else None,
                            "aster": ["elevation", "slope"], "dynamic_world": ["label"],
                            "canopy_height_eth": ["height", "std"], "esa_worldcover": ["Map"]}}
            for i, tid in enumerate(tile_ids)}
        with open(os.path.join(base, f"{name}_tile_info.json"), "w") as fh:
            json.dump(tile_info, fh)
        train = list(rng.permutation(n - 2).tolist())
        with open(os.path.join(base, f"{name}_splits.json"), "w") as fh:
            json.dump({"train": train, "val": [n - 2], "test": [n - 1]}, fh)
    else:
        meta = pd.DataFrame({
            "hf5_idx": np.arange(n),
            "split": ["train"] * (n - 1) + ["eval"],
            "sensor": [["sentinel2", "sentinel1_asc", "sentinel1_desc"] if s else ["sentinel2"] for s in has_s1],
            "s2_type": s2_types,
        })
        meta.to_parquet(os.path.join(base, f"{name}.parquet"))
    stats = {
        "sentinel2_l1c": {"mean": [100.0 * (c + 1) for c in range(13)], "std": [5.0] * 13},
        "sentinel2_l2a": {"mean": [100.0 * (c + 1) - 50 for c in range(13)], "std": [10.0] * 13},
        "sentinel1": {"mean": [-12.0] * 8, "std": [3.0] * 8},
    }
    if released:
        for v in stats.values():
            v["min"], v["max"] = [0.0] * len(v["mean"]), [10000.0] * len(v["mean"])
    with open(os.path.join(base, f"{name}_band_stats.json"), "w") as fh:
        json.dump(stats, fh)
    return {"base": base, "s2": s2, "s1": s1, "stats": stats, "tile_ids": tile_ids, "s2_types": s2_types}


SATLAS_META = "satlas/metadata_v2/satlas_iwm_onid_3sensors_all_clean.parquet"


def write_satlas(root: str, n: int = 2, s2_size: int = 32, ls_size: int = 16, seed: int = 0) -> Dict:
    """SatlasPretrain PNG tiles: `sentinel2/<s2_dir>/tci/<id>.png` (RGB) + `b05,b06,b07,b08,b11,b12`,
    `sentinel1/<time>/{vv,vh}/<id>.png`, `landsat/<time>/b1..b11/<id>.png` (pan 2x, TIRS 1/4 size), and the
    footprint metadata parquet (`id`, `sensor` list, `time` list, `s2_dir`). Band b of each tile holds the
    constant value 10*(band position+1) so order is checkable."""
    import pandas as pd
    from PIL import Image

    def png(rel: str, arr: np.ndarray) -> None:
        path = os.path.join(root, "satlas", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(arr).save(path)

    rows = []
    for i in range(n):
        tid, s2_dir, t_s1, t_ls = f"{100 + i}_{200 + i}", f"S2_2022-0{i + 1}", f"2022-0{i + 1}", f"2021-1{i}"
        tci = np.stack([np.full((s2_size, s2_size), v, np.uint8) for v in (10, 20, 30)], -1)
        png(f"sentinel2/{s2_dir}/tci/{tid}.png", tci)
        for j, b in enumerate(["b05", "b06", "b07", "b08", "b11", "b12"]):
            png(f"sentinel2/{s2_dir}/{b}/{tid}.png", np.full((s2_size, s2_size), 40 + 10 * j, np.uint8))
        for j, b in enumerate(["vv", "vh"]):
            png(f"sentinel1/{t_s1}/{b}/{tid}.png", np.full((s2_size, s2_size), 10 * (j + 1), np.uint8))
        for j in range(11):
            sz = ls_size * 2 if j == 7 else (ls_size // 4 if j >= 9 else ls_size)
            png(f"landsat/{t_ls}/b{j + 1}/{tid}.png", np.full((sz, sz), 10 * (j + 1), np.uint8))
        rows.append({"id": tid, "sensor": ["s2", "s1", "landsat"], "time": [s2_dir, t_s1, t_ls], "s2_dir": s2_dir})
    meta = os.path.join(root, SATLAS_META)
    os.makedirs(os.path.dirname(meta), exist_ok=True)
    pd.DataFrame(rows).to_parquet(meta)
    return {"rows": rows, "metadata": meta}


def write_spectral_earth(root: str, n: int = 3, size: int = 8, n_bands: int = 202, seed: int = 0) -> Dict:
    """SpectralEarth EnMAP patches `spectral_earth/enmap/<tile>/<patch>.tif` (202-band int16 HWC TIFFs) and
    the split list `spectral_earth/splits/enmap/train.txt` (relative paths)."""
    rng = np.random.default_rng(seed)
    rels, arrays = [], []
    for i in range(n):
        rel = f"ENMAP01-TILE{i // 2}/patch_{i}.tif"
        arr = rng.integers(-100, 12000, (size, size, n_bands)).astype(np.int16)
        _write_tiff_hwc(os.path.join(root, "spectral_earth", "enmap", rel), arr)
        rels.append(rel)
        arrays.append(arr)
    split = os.path.join(root, "spectral_earth", "splits", "enmap", "train.txt")
    os.makedirs(os.path.dirname(split), exist_ok=True)
    with open(split, "w") as fh:
        fh.write("\n".join(rels) + "\n")
    return {"rels": rels, "arrays": arrays, "split": split}


CORINE_DIR = "spectral_earth/spectral_earth_downstream_datasets/enmap_corine"


def write_spectral_earth_corine(root: str, codes_per_split: Dict[str, Sequence[Sequence[int]]], size: int = 8,
                                n_bands: int = 202, seed: int = 0) -> Dict:
    """SpectralEarth CORINE task: 202-band int16 HWC EnMAP patches under `<CORINE_DIR>/enmap/<tile>/<patch>.tif`,
    uint16 CLC code rasters under `<CORINE_DIR>/corine/<same relpath>` and split lists
    `spectral_earth/splits/corine/<split>.txt`. Patch k of a split carries the CLC codes `codes_per_split[split][k]`
    as horizontal stripes; its pixels are a smooth spectrum plus one seeded spatial pattern per code, so patches
    with different codes differ. Returns `{split: [(relpath, codes, image array HWC), ...]}`."""
    rng = np.random.default_rng(seed)
    spectrum = np.linspace(1500, 4500, n_bands)[None, None, :]
    out: Dict[str, List] = {}
    for split, patches in codes_per_split.items():
        rels = []
        for k, codes in enumerate(patches):
            codes = [int(c) for c in codes]
            if not codes:
                raise ValueError("every fixture patch needs at least one CLC code")
            rel = f"T{k % 2}/{split}_{k:03d}.tif"
            label = np.zeros((size, size), np.uint16)
            for i, c in enumerate(codes):  # stripes of equal height, the last one takes the remainder
                label[i * size // len(codes):] = c
            img = spectrum + 50 * rng.normal(size=(size, size, n_bands))
            for c in codes:
                img += 1500 * np.random.default_rng(1000 + c).normal(size=(size, size, 1))
            img = np.clip(img, 0, 10000).astype(np.int16)
            _write_tiff_hwc(os.path.join(root, CORINE_DIR, "enmap", rel), img)
            _write_tiff_hwc(os.path.join(root, CORINE_DIR, "corine", rel), label)
            rels.append((rel, codes, img))
        split_file = os.path.join(root, "spectral_earth", "splits", "corine", f"{split}.txt")
        os.makedirs(os.path.dirname(split_file), exist_ok=True)
        with open(split_file, "w") as fh:
            fh.write("\n".join(r for r, _, _ in rels) + "\n")
        out[split] = rels
    return out


def write_geotiff(path: str, arr: np.ndarray, left: float, top: float, res: float, epsg: int = 32632,
                  nodata=None) -> str:
    """A GeoTIFF (bands, H, W) with a north-up UTM transform."""
    import rasterio
    from affine import Affine

    arr = arr if arr.ndim == 3 else arr[None]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, crs=f"EPSG:{epsg}", transform=Affine(res, 0.0, left, 0.0, -res, top),
                       nodata=nodata, tiled=arr.shape[1] >= 256 and arr.shape[2] >= 256) as dst:
        dst.write(arr)
    return path


S2_SCENE_BANDS: List[Tuple[str, int]] = [("B02", 10), ("B03", 10), ("B04", 10), ("B08", 10), ("B05", 20),
                                        ("B8A", 20), ("B11", 20), ("B01", 60), ("B09", 60)]


def write_s2_scene(folder: str, extent_m: int = 1200, left: float = 500000.0, top: float = 5000020.0,
                   bands: Sequence[Tuple[str, int]] = S2_SCENE_BANDS, nodata_east_m: int = 0) -> Dict:
    """A Sentinel-2-like scene: one uint16 GeoTIFF per band at its native 10/20/60 m, all covering the same
    `extent_m` square (EPSG:32632). Pixel value = 1000*(band position+1) + floor(x/60 m) (x of the pixel centre
    from the western edge, identical on the ground at every resolution), except the eastern `nodata_east_m`
    metres, which are 0 (= nodata). Returns {'files': {band: path}, 'values': {band: base value}}."""
    files, values = {}, {}
    for pos, (band, res) in enumerate(bands):
        n = extent_m // res
        x_centre = (np.arange(n) + 0.5) * res
        arr = np.broadcast_to(1000 * (pos + 1) + (x_centre // 60), (n, n)).astype(np.uint16).copy()
        if nodata_east_m:
            arr[:, n - nodata_east_m // res:] = 0
        files[band] = write_geotiff(os.path.join(folder, f"T32_{band}.tif"), arr, left, top, res)
        values[band] = 1000 * (pos + 1)
    return {"files": files, "values": values, "extent_m": extent_m, "left": left, "top": top}


def write_multiband_scene(path: str, n_bands: int = 4, size: int = 60, res: float = 30.0, seed: int = 0) -> Dict:
    """One multi-band GeoTIFF (e.g. a Landsat stack) at a single resolution; band b = 500*(b+1) + noise."""
    rng = np.random.default_rng(seed)
    arr = np.stack([500 * (b + 1) + rng.integers(0, 10, (size, size)) for b in range(n_bands)]).astype(np.uint16)
    write_geotiff(path, arr, 300000.0, 4000020.0, res, epsg=32633)
    return {"file": path, "array": arr}


def write_all_pretrain(rdir: str) -> Dict[str, Dict]:
    """Every pretraining layout under `<rdir>/datasets` (the `$RDIR` convention of the readers' defaults)."""
    ds = os.path.join(rdir, "datasets")
    return {"fmow": write_fmow(ds), "mmearth": write_mmearth(ds), "satlas": write_satlas(ds),
            "se": write_spectral_earth(ds)}
