"""EuroSAT-SAR (eval id ``eurosat-sar``): Sentinel-1 VV/VH (dB) 64x64 patches in the 10 EuroSAT classes.

Layout: ``<root>/<split>.csv`` with columns ``filepath`` (relative to root, or absolute) and ``class_name``;
each file a 2-band float GeoTIFF (VV, VH). chn_ids and normalisation statistics from the ``eurosat-sar``
band YAML. ``split`` may be a comma-separated list of CSV stems, concatenated.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import read_tiff_chw, resolve_root
from dinov2.data.normalize import normalizer_from_ds_cfg

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake")


class EurosatSAR(EvalDataset):
    """EuroSAT-SAR split; samples ``({'imgs': (2,64,64), 'chn_ids': (2,) = [-1 VV, -2 VH]}, class index)``."""

    num_classes = len(CLASSES)

    def __init__(self, root: str = "${RDIR}/datasets/eurosat_SAR", full_spectra: bool = False,
                 normalize: bool = True, transform=None, split: str = "train", **kwargs):
        import pandas as pd

        self.root = Path(resolve_root(root, "eurosat-sar dataset folder"))
        self.display_name = kwargs.pop("display_name", "eurosat-sar")
        self.samples: List[Tuple[Path, int]] = []
        for stem in [s.strip() for s in str(split).split(",") if s.strip()]:
            csv = self.root / f"{stem}.csv"
            if not csv.is_file():
                raise FileNotFoundError(f"eurosat-sar: split file {csv} does not exist")
            df = pd.read_csv(csv)
            if not {"filepath", "class_name"} <= set(df.columns):
                raise ValueError(f"eurosat-sar: {csv} needs columns filepath, class_name (has {list(df.columns)})")
            for fp, cls in zip(df["filepath"], df["class_name"]):
                if cls not in CLASSES:
                    raise ValueError(f"eurosat-sar: unknown class {cls!r} in {csv}")
                path = Path(fp) if Path(fp).is_absolute() else self.root / fp
                self.samples.append((path, CLASSES.index(cls)))
        self.transform = transform
        self.normalizer = normalizer_from_ds_cfg("eurosat-sar") if normalize else None
        self.chn_ids = sensors.ds_chn_ids("eurosat-sar", full_spectra=full_spectra)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def read_image(path: Path) -> torch.Tensor:
        """(2,H,W) float32 from a 2-band tif (pixel- or band-interleaved)."""
        if not path.is_file():
            raise FileNotFoundError(f"eurosat-sar: image {path} does not exist")
        arr = read_tiff_chw(str(path)).astype(np.float32)
        if arr.shape[0] != 2:
            raise ValueError(f"eurosat-sar: {path} has shape {arr.shape}, expected 2 bands (VV, VH)")
        return torch.from_numpy(np.ascontiguousarray(arr))

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        imgs = self.read_image(path)
        return self.make_sample(imgs, label)
