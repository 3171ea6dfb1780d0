"""MMEarth: Sentinel-1 + Sentinel-2 pairs from the MMEarth HDF5 release for pretraining.

The public download of e.g. `data_1M_v001` is one folder (its name = the file stem) with
- `<name>.h5`: one dataset per modality, `[hf5_idx, band, H, W]` (`sentinel2` uint16 in the channel order
  B1..B7, B8A, B8, B9..B12; `sentinel1` float32 asc VV,VH,HH,HV then desc VV,VH,HH,HV), plus `metadata`
  (per row: `tile_id`, `S2_type`);
- `<name>_tile_info.json`: `{tile_id: {"S2_type": "l1c"|"l2a", "BANDS": {"sentinel1_asc": [...] or null, ...}, ...}}`;
- `<name>_splits.json`: `{"train": [hf5 indices], "val": [...], "test": [...]}`;
- `<name>_band_stats.json`: `{modality: {"mean": [...], "std": [...], ...}}` (`sentinel2_l1c`, `sentinel2_l2a`, ...).

The reader needs one row per h5 index with its split, the band groups present and the S2 processing level:
`<name>.parquet` (columns `hf5_idx`, `tile_id`, `split`, `sensor`, `s2_type`). If it is missing it is built
from the three release files on first use (`prepare_metadata`; ahead of time:
`python -m dinov2.run.prepare_data mmearth <folder>`), written atomically under a file lock so that several ranks
starting at once build it once; a read-only dataset folder gets it in `~/.cache/panopticon/mmearth/`. A parquet
distributed with the published code (split values `train`/`eval`) is read as well.

Differences from the published reader, on purpose: the S2 ids follow the h5 channel order (B8A before B8, config
`mmearth_s2`; the published ids of those two channels were swapped), and no-data (S2: 0, S1: -inf/non-finite) is
detected on the raw values, before normalisation (the published replacement ran after it and never matched).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov2.data.io import (FaultyFileLog, LazyHandles, UnreadableFileError, expand_path, open_h5, read_json, require_path,
                            resolve_root, with_retries)
from dinov2.data.normalize import BandNormalizer
from dinov2.data.sensors import ds_chn_ids
from dinov2.data.views import choose_indices, make_view

logger = logging.getLogger("dinov2")

# modality -> (dataset band config, number of h5 channels)
MODALITIES = {"sentinel2": ("mmearth_s2", 13), "sentinel1": ("mmearth_s1", 8)}
MODALITY_MINIMAL_SET1 = {"sentinel2": "all", "sentinel1": "all", "month": "all"}
METADATA_COLUMNS = ("hf5_idx", "split", "sensor", "s2_type")
SPLIT_ALIASES = {"train": ("train",), "val": ("val", "eval"), "eval": ("val", "eval"), "test": ("test",)}
UNASSIGNED = "none"  # split value of h5 rows listed in no split


def release_paths(base: str) -> Dict[str, str]:
    """Paths of the release files of the folder `base` (named after the folder)."""
    name = os.path.basename(os.path.normpath(base))
    return {"h5": os.path.join(base, f"{name}.h5"), "tile_info": os.path.join(base, f"{name}_tile_info.json"),
            "splits": os.path.join(base, f"{name}_splits.json"),
            "band_stats": os.path.join(base, f"{name}_band_stats.json"),
            "metadata": os.path.join(base, f"{name}.parquet")}


def _text(v) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _h5_tile_ids(h5_path: str) -> List[str]:
    """Tile id of every h5 row, from the `metadata` dataset (structured with a `tile_id` field, or strings)."""
    import h5py

    from dinov2.utils.progress import progress_bar

    ids: List[str] = []
    with h5py.File(h5_path, "r") as f:
        if "metadata" not in f:
            raise ValueError(f"{h5_path}: no 'metadata' dataset (have {sorted(f.keys())}); is this an MMEarth file?")
        ds = f["metadata"]
        block = 65536  # the release stores one row per chunk: read in blocks, with progress
        for start in progress_bar(range(0, ds.shape[0], block), desc="MMEarth h5 metadata", unit="block",
                                  enabled=ds.shape[0] > block):
            meta = ds[start:start + block]
            if meta.dtype.names:
                col = meta["tile_id" if "tile_id" in meta.dtype.names else meta.dtype.names[0]]
            else:
                col = meta[:, 0] if meta.ndim == 2 else meta
            ids += [_text(v).strip() for v in col]
    return ids


def build_metadata_table(base: str):
    """The reader's metadata (a pandas DataFrame, one row per h5 index) from the release files of `base`."""
    import pandas as pd

    paths = release_paths(base)
    for key in ("h5", "tile_info", "splits"):
        require_path(paths[key], f"MMEarth {key} file")
    tile_ids = _h5_tile_ids(paths["h5"])
    n = len(tile_ids)
    with open(paths["splits"]) as fh:
        splits = json.load(fh)
    if not isinstance(splits, dict):
        raise ValueError(f"{paths['splits']}: expected {{split name: [h5 indices]}}, got {type(splits).__name__}")
    split_of = np.full(n, UNASSIGNED, dtype=object)
    for name, idx in splits.items():
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise ValueError(f"{paths['splits']}: split {name!r} has index {int(bad[0])} outside the {n} rows of "
                             f"{paths['h5']}")
        taken = idx[split_of[idx] != UNASSIGNED]
        if taken.size:
            raise ValueError(f"{paths['splits']}: h5 index {int(taken[0])} is in split {name!r} and in split "
                             f"{split_of[taken[0]]!r}")
        split_of[idx] = str(name)
    logger.info("MMEarth: reading %s (%d tiles)", paths["tile_info"], n)
    with open(paths["tile_info"]) as fh:
        tile_info = json.load(fh)
    sensors, s2_types = [], []
    for i, tid in enumerate(tile_ids):
        info = tile_info.get(tid)
        if info is None:
            raise ValueError(f"{paths['tile_info']}: no entry for tile {tid!r} (h5 row {i} of {paths['h5']})")
        bands = info.get("BANDS") or {}
        s2_type = str(info.get("S2_type", "")).lower()
        if s2_type not in ("l1c", "l2a"):
            raise ValueError(f"{paths['tile_info']}: tile {tid!r} has S2_type {info.get('S2_type')!r}, "
                             f"expected 'l1c' or 'l2a'")
        sensors.append(sorted(k for k, v in bands.items() if v))
        s2_types.append(s2_type)
    return pd.DataFrame({"hf5_idx": np.arange(n, dtype=np.int64), "tile_id": tile_ids, "split": split_of.astype(str),
                         "sensor": sensors, "s2_type": s2_types})


def _writable_target(base: str) -> str:
    target = release_paths(base)["metadata"]
    if os.access(base, os.W_OK):
        return target
    key = hashlib.sha1(os.path.abspath(base).encode()).hexdigest()[:12]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "panopticon", "mmearth")
    return os.path.join(cache, f"{os.path.basename(target)[:-len('.parquet')]}_{key}.parquet")


class _FileLock:
    """Exclusive advisory lock on `path` (POSIX `flock`); a no-op where locking is unavailable, which is still
    safe because every writer produces the same file and renames it into place atomically."""

    def __init__(self, path: str):
        self.path, self.fh = path, None

    def __enter__(self):
        try:
            import fcntl

            self.fh = open(self.path, "a")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except (ImportError, OSError) as e:
            logger.info("no lock on %s (%s); relying on the atomic rename", self.path, e)
            if self.fh is not None:
                self.fh.close()
            self.fh = None
        return self

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()  # closing releases the lock


def prepare_metadata(base_path: str, out_path: Optional[str] = None, overwrite: bool = False) -> str:
    """Build `<name>.parquet` for the MMEarth release folder `base_path` unless it exists (or `overwrite`).

    Safe when several processes call it at once: the build runs under a file lock and the result is renamed into
    place atomically. Returns the parquet path (a cache path when the folder is read-only)."""
    from dinov2.utils.checkpoint import write_atomic

    base = resolve_root(base_path, "MMEarth base_path")
    target = out_path or release_paths(base)["metadata"]
    if os.path.isfile(target) and not overwrite:
        return target
    if out_path is None:
        target = _writable_target(base)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    with _FileLock(target + ".lock"):
        if os.path.isfile(target) and not overwrite:
            return target  # another process built it while we waited
        df = build_metadata_table(base)
        write_atomic(target, lambda tmp: df.to_parquet(tmp, index=False), suffix=".parquet")
    logger.info("MMEarth: wrote %s (%d rows: %s)", target, len(df), df["split"].value_counts().to_dict())
    return target


class MMEarth(Dataset):
    """MMEarth S1/S2 views; `num_sens` of the two modalities are returned per sample (random order)."""

    def __init__(
        self,
        base_path: str = "${RDIR}/datasets/mmearth/data_1M_v001",
        modalities: Union[str, Dict[str, str]] = "MODALITY_MINIMAL_SET1",
        split: str = "all",
        transform: Optional[Callable] = None,
        full_spectra: bool = False,
        num_sens: int = 2,
        remove_nans: bool = True,
        normalize: bool = True,
        max_tries_load_img: int = 3,
        faulty_imgs_file: Optional[str] = None,
        metadata_path: Optional[str] = None,
    ):
        import pandas as pd

        if isinstance(modalities, str):
            if modalities != "MODALITY_MINIMAL_SET1":
                raise ValueError(f"unknown modality set {modalities!r}; use 'MODALITY_MINIMAL_SET1' or a dict")
            modalities = MODALITY_MINIMAL_SET1
        self.modalities = [m for m in dict(modalities) if m in MODALITIES]
        if not self.modalities:
            raise ValueError(f"modalities {list(modalities)} contain none of {list(MODALITIES)}")
        if not 1 <= num_sens <= len(self.modalities):
            raise ValueError(f"num_sens={num_sens} but only modalities {self.modalities} are available")
        if split != "all" and split not in SPLIT_ALIASES:
            raise ValueError(f"MMEarth split must be one of all/train/val/test ('eval' = 'val'), got {split!r}")
        self.base = resolve_root(base_path, "MMEarth base_path")
        paths = release_paths(self.base)
        self.h5_path = require_path(paths["h5"], "MMEarth HDF5 file")
        stats_path = require_path(paths["band_stats"], "MMEarth band stats")
        self.stats = read_json(stats_path, "MMEarth band statistics")
        if metadata_path is not None:
            meta_path = require_path(expand_path(metadata_path, "MMEarth metadata_path"), "MMEarth metadata parquet")
        elif os.path.isfile(paths["metadata"]):
            meta_path = paths["metadata"]
        elif os.path.isfile(_writable_target(self.base)):
            meta_path = _writable_target(self.base)
        else:
            meta_path = prepare_metadata(self.base)

        df = pd.read_parquet(meta_path)
        df.columns = [c.lower() for c in df.columns]
        for col in METADATA_COLUMNS:
            if col not in df.columns:
                raise ValueError(f"{meta_path}: missing column {col!r} (have {list(df.columns)})")
        has_s1 = df["sensor"].map(lambda s: "sentinel1_asc" in list(s) or "sentinel1_desc" in list(s))
        df = df[has_s1]
        if split != "all":
            df = df[df["split"].isin(SPLIT_ALIASES[split])]
        self.hf5_idx = df["hf5_idx"].to_numpy(np.int64)
        self._check_rows(meta_path)
        self.s2_type = df["s2_type"].astype(str).to_numpy()

        self.num_sens, self.remove_nans, self.normalize = num_sens, remove_nans, normalize
        self.transform, self.max_tries = transform, max_tries_load_img
        self.chn_ids = {m: ds_chn_ids(MODALITIES[m][0], full_spectra) for m in self.modalities}
        self.norms: Dict[str, BandNormalizer] = {}
        for key in ("sentinel1", "sentinel2_l1c", "sentinel2_l2a"):
            if key in self.stats:
                self.norms[key] = BandNormalizer(self.stats[key]["mean"], self.stats[key]["std"], key)
        self.faulty = FaultyFileLog(faulty_imgs_file)
        self._h5 = LazyHandles(open_h5)

    def _check_rows(self, meta_path: str) -> None:
        import h5py

        with h5py.File(self.h5_path, "r") as f:
            for m in self.modalities:
                if m not in f:
                    raise ValueError(f"{self.h5_path}: no dataset {m!r} (have {sorted(f.keys())})")
                n = f[m].shape[0]
                if len(self.hf5_idx) and int(self.hf5_idx.max()) >= n:
                    raise ValueError(f"{meta_path}: hf5_idx {int(self.hf5_idx.max())} is beyond the {n} rows of "
                                     f"{self.h5_path}[{m}]; rebuild it with `python -m dinov2.run.prepare_data "
                                     f"mmearth {self.base} --overwrite`")

    def __len__(self) -> int:
        return len(self.hf5_idx)

    def _norm_key(self, modality: str, s2_type: str) -> str:
        key = modality if modality != "sentinel2" else f"sentinel2_{s2_type}"
        if key not in self.norms:
            raise ValueError(f"band stats json has no entry {key!r} (have {sorted(self.stats)})")
        return key

    def read_modality(self, i: int, modality: str) -> torch.Tensor:
        """Raw channels of one modality of row i, float32 (C,H,W), no-data as NaN, then z-scored."""
        h5 = self._h5.get(self.h5_path)
        try:
            raw = np.asarray(h5[modality][int(self.hf5_idx[i])], dtype=np.float32)
        except Exception as e:  # corrupt chunk / missing dataset
            raise UnreadableFileError(f"{self.h5_path}[{modality}][{int(self.hf5_idx[i])}]", e) from e
        expected = MODALITIES[modality][1]
        if raw.ndim != 3 or raw.shape[0] != expected:
            raise ValueError(f"{self.h5_path}: {modality} sample has shape {raw.shape}, expected ({expected},H,W)")
        nodata = ~np.isfinite(raw)
        if modality == "sentinel2":
            nodata |= raw == 0
        x = torch.from_numpy(raw)
        if self.normalize:
            x = self.norms[self._norm_key(modality, self.s2_type[i])](x)
        return x.masked_fill(torch.from_numpy(nodata), float("nan"))

    def __getitem__(self, idx: int):
        def build(_attempt: int) -> List[dict]:
            views = []
            for j in choose_indices(len(self.modalities), self.num_sens):
                m = self.modalities[j]
                x, ids = self.read_modality(idx, m), self.chn_ids[m]
                if self.remove_nans:
                    keep = ~torch.isnan(x).flatten(1).any(1)
                    if not bool(keep.any()):
                        continue  # the whole modality is missing for this location
                    x, ids = x[keep], ids[keep]
                views.append(make_view([x], [ids.clone()]))
            if not views:
                raise UnreadableFileError(f"{self.h5_path}[{int(self.hf5_idx[idx])}]",
                                          ValueError("every channel of the chosen modalities is no-data"))
            return views

        sample = with_retries(build, self.max_tries, self.faulty, f"MMEarth sample {idx}")
        return self.transform(sample) if self.transform is not None else sample


MMEarthWrapper = MMEarth  # published name of the pretraining wrapper
