"""MMEarth: Sentinel-1 + Sentinel-2 pairs from the MMEarth HDF5 release for pretraining.

Layout under `base_path` (e.g. `$RDIR/datasets/mmearth/data_1M_v001`, name = folder name):
`<name>.h5` (one dataset per modality, `[hf5_idx, band, H, W]`), `<name>.parquet` (columns `hf5_idx`, `split`,
`sensor` (list of band-group names), `s2_type`) and `<name>_band_stats.json` (`{modality: {mean, std}}`).

Fixes relative to the published reader: S2 ids follow the h5 channel order (B8A before B8, config `mmearth_s2`),
and no-data (S2: 0, S1: -inf/non-finite) is detected on the raw values, before normalisation.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov2.data.io import (FaultyFileLog, LazyHandles, UnreadableFileError, open_h5, read_json, require_path,
                            resolve_root, with_retries)
from dinov2.data.normalize import BandNormalizer
from dinov2.data.sensors import ds_chn_ids
from dinov2.data.views import choose_indices, make_view

# modality -> (dataset band config, number of h5 channels)
MODALITIES = {"sentinel2": ("mmearth_s2", 13), "sentinel1": ("mmearth_s1", 8)}
MODALITY_MINIMAL_SET1 = {"sentinel2": "all", "sentinel1": "all", "month": "all"}


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
        if split not in ("all", "train", "eval", "val"):
            raise ValueError(f"split must be all/train/eval, got {split!r}")
        self.base = resolve_root(base_path, "MMEarth base_path")
        name = os.path.basename(os.path.normpath(self.base))
        self.h5_path = require_path(os.path.join(self.base, f"{name}.h5"), "MMEarth HDF5 file")
        meta_path = require_path(os.path.join(self.base, f"{name}.parquet"), "MMEarth metadata parquet")
        stats_path = require_path(os.path.join(self.base, f"{name}_band_stats.json"), "MMEarth band stats")
        self.stats = read_json(stats_path, "MMEarth band statistics")

        df = pd.read_parquet(meta_path)
        df.columns = [c.lower() for c in df.columns]
        for col in ("hf5_idx", "split", "sensor", "s2_type"):
            if col not in df.columns:
                raise ValueError(f"{meta_path}: missing column {col!r} (have {list(df.columns)})")
        has_s1 = df["sensor"].map(lambda s: "sentinel1_asc" in list(s) or "sentinel1_desc" in list(s))
        df = df[has_s1]
        if split != "all":
            df = df[df["split"] == ("eval" if split == "val" else split)]
        self.hf5_idx = df["hf5_idx"].to_numpy(np.int64)
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
