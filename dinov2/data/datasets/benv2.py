"""BigEarthNet v2.0 multilabel classification (eval id ``benv2``), read from the public release layout.

Layout under ``root``: ``metadata.parquet`` (columns ``patch_id``, ``s1_name``, ``split`` in {train, validation,
test}, ``labels`` = list of 19-class names), ``BigEarthNet-S1/<tile>/<s1_name>/<s1_name>_{VV,VH}.tif`` and
``BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_B??.tif`` (tile = name without its last 3 (S1) / 2 (S2) ``_``
tokens). Every band is bilinearly resampled to 120x120.

Channel order follows the band YAMLs ``ben-s1`` / ``ben-s2`` / ``ben-s1s2``: S1 is VV then VH, so the ids
``[-1 (VV), -2 (VH)]`` describe the data (the published reader sorted files by name, giving VH, VV under VV, VH
ids — docs/differences.md). Normalisation statistics come from the same YAMLs, in the same channel order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import resolve_root
from dinov2.data.normalize import normalizer_from_ds_cfg

# 19-class BigEarthNet nomenclature (Sumbul et al. 2021), index = position
LABELS_19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters",
)
S2_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
SIZE = 120
_DS_NAMES = {"s1": "ben-s1", "s2": "ben-s2", "all": "ben-s1s2"}


def tile_of(name: str, n_drop: int) -> str:
    """Tile folder of a patch name: the name without its last ``n_drop`` ``_`` tokens."""
    parts = name.split("_")
    if len(parts) <= n_drop:
        raise ValueError(f"benv2: patch name {name!r} has too few '_' tokens to derive its tile")
    return "_".join(parts[:-n_drop])


class BigEarthNetv2(EvalDataset):
    """BigEarthNet-v2 split; samples ``({'imgs': (C,120,120), 'chn_ids': (C,)}, multi-hot (19,) float)``.

    ``bands``: ``s1`` (VV, VH), ``s2`` (12 bands) or ``all`` (S1 then S2).
    """

    def __init__(self, root: str = "${RDIR}/datasets/benv2", split: str = "train", bands: str = "all",
                 num_classes: int = 19, transform=None, normalize: bool = True, full_spectra: bool = False,
                 **kwargs):
        import pandas as pd

        if bands not in _DS_NAMES:
            raise ValueError(f"benv2: bands must be one of {sorted(_DS_NAMES)}, got {bands!r}")
        if num_classes != len(LABELS_19):
            raise ValueError(f"benv2: only the 19-class nomenclature is supported, got num_classes={num_classes}")
        self.root = Path(resolve_root(root, "benv2 dataset folder"))
        self.display_name = kwargs.pop("display_name", f"benv2-{bands}")
        self.bands, self.transform = bands, transform
        self.num_classes = num_classes
        meta_path = self.root / "metadata.parquet"
        if not meta_path.is_file():
            raise FileNotFoundError(f"benv2: metadata file {meta_path} does not exist")
        meta = pd.read_parquet(meta_path)
        need = {"patch_id", "s1_name", "split", "labels"}
        if not need <= set(meta.columns):
            raise ValueError(f"benv2: {meta_path} lacks columns {sorted(need - set(meta.columns))}")
        split = {"val": "validation", "valid": "validation"}.get(split, split)
        meta = meta[meta["split"] == split]
        self.rows: List[Dict] = meta[["patch_id", "s1_name", "labels"]].to_dict("records")
        self.s1_order = ["VV", "VH"]  # matches ids -1 (VV), -2 (VH) of ben-s1
        self.chn_ids = sensors.ds_chn_ids(_DS_NAMES[bands], full_spectra=full_spectra)
        self.normalizer = normalizer_from_ds_cfg(_DS_NAMES[bands]) if normalize else None

    def __len__(self) -> int:
        return len(self.rows)

    def encode_labels(self, names, patch_id: str) -> torch.Tensor:
        """Multi-hot ``(19,)`` float vector from label names."""
        y = torch.zeros(self.num_classes)
        for n in list(names):
            if n not in LABELS_19:
                raise ValueError(f"benv2: unknown label {n!r} of patch {patch_id}")
            y[LABELS_19.index(n)] = 1.0
        return y

    @staticmethod
    def _read_band(path: Path) -> np.ndarray:
        import rasterio
        from rasterio.enums import Resampling

        if not path.is_file():
            raise FileNotFoundError(f"benv2: band file {path} does not exist")
        try:
            with rasterio.open(path) as src:
                return src.read(1, out_shape=(SIZE, SIZE), resampling=Resampling.bilinear).astype(np.float32)
        except rasterio.errors.RasterioIOError as e:
            raise OSError(f"benv2: cannot read {path}: {e}") from e

    def band_paths(self, row: Dict) -> List[Path]:
        """Band files of one patch in channel order."""
        paths: List[Path] = []
        if self.bands in ("s1", "all"):
            s1 = row["s1_name"]
            folder = self.root / "BigEarthNet-S1" / tile_of(s1, 3) / s1
            paths += [folder / f"{s1}_{p}.tif" for p in self.s1_order]
        if self.bands in ("s2", "all"):
            pid = row["patch_id"]
            folder = self.root / "BigEarthNet-S2" / tile_of(pid, 2) / pid
            paths += [folder / f"{pid}_{b}.tif" for b in S2_BANDS]
        return paths

    def __getitem__(self, i: int):
        row = self.rows[i]
        imgs = torch.from_numpy(np.stack([self._read_band(p) for p in self.band_paths(row)]))
        return self.make_sample(imgs, self.encode_labels(row["labels"], row["patch_id"]))
