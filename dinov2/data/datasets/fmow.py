"""FmowDataset: footprint-indexed multi-sensor fMoW (fMoW-full RGB / WorldView MS + fMoW-Sentinel) for
pretraining.

Metadata: `<root>/fmow/metadata_v2/fmow_iwm_onid_<split>.parquet`, one row per footprint with list columns
`img_id, path, sensor, gsd, timestamp, img_height, img_width` (one entry per image). Images are TIFFs under
`<root>` (paths relative to it). A sample is `num_sens` views of one footprint, each
`{'imgs': [(C,H,W)], 'chn_ids': [(C,)]}`.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov2.data.io import (FaultyFileLog, UnreadableFileError, expand_path, read_tiff_chw, require_path,
                            resolve_root, with_retries)
from dinov2.data.normalize import BandNormalizer, normalizer_from_ds_cfg, to_float_tensor
from dinov2.data.sensors import ds_chn_ids, ds_rgb_indices
from dinov2.data.views import choose_indices, choose_large_enough, make_view

logger = logging.getLogger("dinov2")

SENSOR_DS = {"wv23": "fmow_wv23", "s2": "fmow_s2", "rgb": "fmow_rgb"}
LIST_COLUMNS = ["img_id", "path", "sensor", "gsd", "timestamp", "img_height", "img_width"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def metadata_path(root: str, split: Optional[str]) -> str:
    """Metadata parquet for a split name ('train'/'val'), None (the cleaned train+val file) or a path."""
    meta_dir = os.path.join(root, "fmow", "metadata_v2")
    if split in ("train", "val"):
        return os.path.join(meta_dir, f"fmow_iwm_onid_{split}.parquet")
    if split is None:  # the published default lacked the suffix
        return os.path.join(meta_dir, "fmow_iwm_onid_train_val_savioclean_min42max1024.parquet")
    return os.path.join(root, expand_path(split, "FmowDataset split"))


class FmowDataset(Dataset):
    """Multi-view fMoW footprints; see module docstring. Constructor defaults as the published reader."""

    def __init__(
        self,
        split: Optional[str],
        num_sens: int = 2,
        normalize: bool = True,
        root: str = "${RDIR}/datasets",
        timestamp_format: str = "days_since_2002-01-01",
        max_crop: int = 256,
        min_crop: Optional[int] = None,
        min_img_size: Optional[int] = None,
        max_img_size: Optional[int] = None,
        relpaths_to_drop: Sequence[str] = (),
        keep_sensors: Sequence[str] = ("wv23", "s2", "rgb"),
        return_rgb: bool = False,
        transform: Optional[Callable] = None,
        max_tries_load_img: int = 3,
        faulty_imgs_file: Optional[str] = None,
        full_spectra: bool = False,
        get_idx_mode: str = "large_enough",
        output_dtype: str = "float32",
    ):
        import pandas as pd

        bad = [s for s in keep_sensors if s not in SENSOR_DS]
        if bad:
            raise ValueError(f"unknown fMoW sensors {bad}; valid: {sorted(SENSOR_DS)}")
        if get_idx_mode not in ("large_enough", "unique"):
            raise ValueError(f"get_idx_mode must be 'large_enough' or 'unique', got {get_idx_mode!r}")
        if output_dtype not in _DTYPES:
            raise ValueError(f"output_dtype must be one of {sorted(_DTYPES)}, got {output_dtype!r}")
        if timestamp_format != "days_since_2002-01-01":
            raise ValueError(f"unsupported timestamp_format {timestamp_format!r}")
        self.root = resolve_root(root, "fMoW dataset root")
        self.meta_path = require_path(metadata_path(self.root, split), "fMoW metadata parquet")
        self.M = int(num_sens)
        self.normalize, self.return_rgb, self.full_spectra = normalize, return_rgb, full_spectra
        self.transform, self.max_crop, self.get_idx_mode = transform, max_crop, get_idx_mode
        self.max_tries = max_tries_load_img
        self.dtype = _DTYPES[output_dtype]
        self.keep_sensors = list(keep_sensors)
        if faulty_imgs_file is None:
            faulty_imgs_file = os.path.splitext(self.meta_path)[0] + "_faulty_imgs"
        self.faulty = FaultyFileLog(faulty_imgs_file)

        df = pd.read_parquet(self.meta_path)
        missing = [c for c in LIST_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{self.meta_path}: missing columns {missing} (have {list(df.columns)})")
        rows = self._filter(df, set(self.keep_sensors), set(relpaths_to_drop), min_img_size, max_img_size, min_crop)
        self.rows = rows
        logger.info("FmowDataset %s: %d footprints of %d kept", self.meta_path, len(rows), len(df))
        self.chn_ids = {s: ds_chn_ids(SENSOR_DS[s], full_spectra) for s in self.keep_sensors}
        self.rgb_idx = {s: ds_rgb_indices(SENSOR_DS[s]) for s in self.keep_sensors} if return_rgb else {}
        self.norms: Dict[str, BandNormalizer] = (
            {s: normalizer_from_ds_cfg(SENSOR_DS[s]) for s in self.keep_sensors} if normalize else {})

    def _filter(self, df, keep, drop, min_size, max_size, min_crop) -> List[Dict[str, Any]]:
        """Per-row list filtering in the published order; rows become dicts of numpy arrays."""
        rows = []
        for rec in df[LIST_COLUMNS].itertuples(index=False):
            r = {c: np.asarray(v) for c, v in zip(LIST_COLUMNS, rec)}
            sizes = np.minimum(r["img_height"], r["img_width"])
            ok = np.isin(r["sensor"], list(keep)) & ~np.isin(r["path"], list(drop))
            if min_size is not None:
                ok &= r["img_height"] >= min_size
            if max_size is not None:
                ok &= r["img_height"] <= max_size
            if ok.sum() < self.M:
                continue
            if not (sizes[ok] >= self.max_crop).any():
                continue
            if min_crop is not None:
                ok &= sizes >= min_crop
            if ok.sum() < self.M:
                continue
            r = {c: v[ok] for c, v in r.items()}
            r["img_size"] = sizes[ok]
            if self.get_idx_mode == "unique" and len(set(r["sensor"].tolist())) < self.M:
                continue
            rows.append(r)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def _choose(self, row: Dict[str, np.ndarray]) -> List[int]:
        if self.get_idx_mode == "large_enough":
            return choose_large_enough(row["img_size"].tolist(), self.M, self.max_crop)
        sensors = sorted(set(row["sensor"].tolist()))
        picked = [sensors[i] for i in choose_indices(len(sensors), self.M)]
        out = []
        for s in picked:
            cand = np.flatnonzero(row["sensor"] == s)
            out.append(int(cand[choose_indices(len(cand), 1)[0]]))
        return out

    def load_image(self, relpath: str, sensor: str) -> torch.Tensor:
        """One image as a normalised (C,H,W) tensor of the output dtype."""
        path = os.path.join(self.root, relpath)
        arr = read_tiff_chw(path)
        n_exp = len(self.chn_ids[sensor])
        if arr.shape[0] != n_exp:
            raise UnreadableFileError(path, ValueError(f"{arr.shape[0]} bands, sensor {sensor!r} has {n_exp}"))
        x = to_float_tensor(arr)
        if self.normalize:
            x = self.norms[sensor](x)
        return x.to(self.dtype)

    def __getitem__(self, idx: int):
        row = self.rows[idx]

        def build(_attempt: int):
            views = []
            for i in self._choose(row):
                sensor = str(row["sensor"][i])
                x, ids = self.load_image(str(row["path"][i]), sensor), self.chn_ids[sensor]
                if self.return_rgb:
                    x, ids = x[self.rgb_idx[sensor]], ids[self.rgb_idx[sensor]]
                views.append(make_view([x], [ids.clone()]))
            return views

        sample = with_retries(build, self.max_tries, self.faulty, f"fMoW footprint {idx} ({self.meta_path})")
        return self.transform(sample) if self.transform is not None else sample
