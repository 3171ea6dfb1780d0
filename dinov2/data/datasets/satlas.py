"""SatlasDataset: SatlasPretrain Sentinel-1 / Sentinel-2 / Landsat PNG tiles for pretraining.

Layout under `root` (default `$RDIR/datasets/satlas`), 8-bit PNGs:
- s2: `sentinel2/<s2_dir>/tci/<id>.png` (RGB = B04,B03,B02) and `.../{b05,b06,b07,b08,b11,b12}/<id>.png`
- s1: `sentinel1/<time>/{vv,vh}/<id>.png`
- landsat: `landsat/<time>/b1..b11/<id>.png` (pan b8 at 2x, TIRS b10/b11 at 1/4 of the 30 m tiles)
Metadata parquet: one row per footprint with `id`, `sensor` (list of 's1'|'s2'|'landsat'), `time` (list aligned
with `sensor`) and `s2_dir` (scalar, or a list aligned with `sensor`).

Bands of one view that share a tile size form one group (per-band native resolution is kept); `resize=True`
resizes every band to the largest and returns a single group.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dinov2.data.io import (FaultyFileLog, LazyHandles, UnreadableFileError, expand_path, open_h5, read_png_chw,
                            require_path, resolve_root, with_retries)
from dinov2.data.normalize import BandNormalizer, normalizer_from_ds_cfg
from dinov2.data.sensors import ds_chn_ids, ds_rgb_indices
from dinov2.data.views import choose_indices, group_by_shape, make_view

logger = logging.getLogger("dinov2")

SENSOR_DS = {"s1": "satlas_s1", "s2": "satlas_s2", "landsat": "satlas_landsat"}
# (sub-folder, channels taken from that PNG) in the band order of the dataset configs above
LAYOUT: Dict[str, List[Tuple[str, int]]] = {
    "s2": [("tci", 3), ("b05", 1), ("b06", 1), ("b07", 1), ("b08", 1), ("b11", 1), ("b12", 1)],
    "s1": [("vv", 1), ("vh", 1)],
    "landsat": [(f"b{i}", 1) for i in range(1, 12)],
}
SENSOR_DIR = {"s1": "sentinel1", "s2": "sentinel2", "landsat": "landsat"}


class SatlasDataset(Dataset):
    """`num_sens` distinct acquisitions of one SatlasPretrain footprint per sample."""

    def __init__(
        self,
        root: str = "${RDIR}/datasets/satlas",
        num_sens: int = 2,
        normalize: bool = True,
        metadata_path: str = "${RDIR}/datasets/satlas/metadata_v2/satlas_iwm_onid_3sensors_all_clean.parquet",
        keep_sensors: Sequence[str] = ("s1", "s2", "landsat"),
        return_rgb: bool = False,
        transform: Optional[Callable] = None,
        full_spectra: bool = False,
        hdf5_path: Optional[str] = None,
        resize: bool = False,
        max_tries_load_img: int = 3,
        faulty_imgs_file: Optional[str] = None,
    ):
        import pandas as pd

        bad = [s for s in keep_sensors if s not in SENSOR_DS]
        if bad:
            raise ValueError(f"unknown Satlas sensors {bad}; valid: {sorted(SENSOR_DS)}")
        if return_rgb and "s1" in keep_sensors:
            raise ValueError("return_rgb needs optical sensors only; remove 's1' from keep_sensors")
        self.root = resolve_root(root, "Satlas root")
        self.meta_path = require_path(expand_path(metadata_path, "Satlas metadata_path"), "Satlas metadata parquet",
                                      given=metadata_path)
        self.hdf5_path = None
        if hdf5_path is not None:
            self.hdf5_path = require_path(expand_path(hdf5_path, "Satlas hdf5_path"), "Satlas HDF5 file")
        df = pd.read_parquet(self.meta_path)
        for col in ("id", "sensor", "time", "s2_dir"):
            if col not in df.columns:
                raise ValueError(f"{self.meta_path}: missing column {col!r} (have {list(df.columns)})")
        keep = set(keep_sensors)
        self.items: List[Tuple[str, List[Tuple[str, str]]]] = []
        dropped = 0
        for tid, sensors, times, s2_dir in df[["id", "sensor", "time", "s2_dir"]].itertuples(index=False):
            s2_dirs = list(s2_dir) if isinstance(s2_dir, (list, np.ndarray)) else [s2_dir] * len(sensors)
            entries = [(str(s), str(d if s == "s2" else t)) for s, t, d in zip(sensors, times, s2_dirs) if s in keep]
            if len(entries) < num_sens:
                dropped += 1
                continue
            self.items.append((str(tid), entries))
        if dropped:
            logger.info("SatlasDataset: %d footprints with fewer than %d kept acquisitions dropped", dropped, num_sens)
        self.num_sens, self.normalize, self.return_rgb, self.resize = num_sens, normalize, return_rgb, resize
        self.transform, self.max_tries = transform, max_tries_load_img
        self.chn_ids = {s: ds_chn_ids(SENSOR_DS[s], full_spectra) for s in keep}
        self.norms: Dict[str, BandNormalizer] = {s: normalizer_from_ds_cfg(SENSOR_DS[s]) for s in keep}
        self.faulty = FaultyFileLog(faulty_imgs_file)
        self._h5 = LazyHandles(open_h5)

    def __len__(self) -> int:
        return len(self.items)

    def _read_png(self, rel: str) -> np.ndarray:
        if self.hdf5_path is None:
            return read_png_chw(os.path.join(self.root, rel))
        import io

        from PIL import Image

        try:  # same relative paths as keys, PNG bytes as values
            data = bytes(np.asarray(self._h5.get(self.hdf5_path)[rel]))
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im)
        except Exception as e:
            raise UnreadableFileError(f"{self.hdf5_path}:{rel}", e) from e
        return arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)

    def load_view(self, tid: str, sensor: str, folder: str) -> dict:
        """All bands of one acquisition, /255 and normalised per band, grouped by tile size."""
        bands: List[torch.Tensor] = []
        for sub, n_ch in LAYOUT[sensor]:
            rel = os.path.join(SENSOR_DIR[sensor], folder, sub, f"{tid}.png")
            arr = self._read_png(rel)
            if arr.shape[0] < n_ch:
                raise UnreadableFileError(rel, ValueError(f"{arr.shape[0]} channels, expected {n_ch}"))
            bands.extend(torch.from_numpy(arr[c: c + 1].astype(np.float32) / 255.0) for c in range(n_ch))
        norm, ids = self.norms[sensor], self.chn_ids[sensor]
        if self.normalize:
            bands = [(b - norm.mean[i]) / norm.std[i] for i, b in enumerate(bands)]
        idx = ds_rgb_indices(SENSOR_DS[sensor]) if self.return_rgb else list(range(len(bands)))
        bands, id_list = [bands[i] for i in idx], [ids[i: i + 1].clone() for i in idx]
        if self.resize:
            size = max((b.shape[-2:] for b in bands), key=lambda s: s[0] * s[1])
            img = torch.cat([b if b.shape[-2:] == size else
                             F.interpolate(b[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
                             for b in bands], 0)
            return make_view([img], [torch.cat(id_list, 0)])
        return group_by_shape(bands, id_list)

    def __getitem__(self, idx: int):
        tid, entries = self.items[idx]

        def build(_attempt: int) -> List[dict]:
            return [self.load_view(tid, *entries[j]) for j in choose_indices(len(entries), self.num_sens)]

        sample = with_retries(build, self.max_tries, self.faulty, f"Satlas footprint {tid}")
        return self.transform(sample) if self.transform is not None else sample
