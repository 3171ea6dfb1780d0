"""NWPU-RESISC45 scene classification (eval id ``resisc45``).

Layout: ``<root>/NWPU-RESISC45/<class>/<class>_<nnn>.jpg`` and split files ``<root>/resisc45-{train,val,test}.txt``
(one image file name per line; torchgeo splits). RGB uint8 -> /255 -> per-channel normalisation; chn_ids and
normalisation statistics from the ``resisc45`` band YAML (Sentinel-2 R, G, B ids).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import resolve_root
from dinov2.data.normalize import normalizer_from_ds_cfg

CLASSES = (
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake", "meadow",
    "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot", "railway",
    "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship", "snowberg",
    "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace", "thermal_power_station", "wetland",
)


class RESISC45(EvalDataset):
    """RESISC45 split; samples ``({'imgs': (3,256,256), 'chn_ids': (3,)}, class index)``."""

    num_classes = len(CLASSES)

    def __init__(self, root: str = "${RDIR}/datasets/resisc45", split: str = "train", normalize: bool = True,
                 transform=None, full_spectra: bool = False, **kwargs):
        self.root = Path(resolve_root(root, "resisc45 dataset folder"))
        self.display_name = kwargs.pop("display_name", "resisc45")
        split = {"valid": "val", "validation": "val"}.get(split, split)
        split_file = self.root / f"resisc45-{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"resisc45: split file {split_file} does not exist")
        self.img_dir = self.root / "NWPU-RESISC45"
        if not self.img_dir.is_dir():
            raise FileNotFoundError(f"resisc45: image folder {self.img_dir} does not exist")
        self.samples: List[Tuple[str, int]] = []
        for line in split_file.read_text().splitlines():
            name = line.strip()
            if name:
                self.samples.append((name, self.class_of(name, split_file)))
        self.transform = transform
        self.normalizer = normalizer_from_ds_cfg("resisc45") if normalize else None
        self.chn_ids = sensors.ds_chn_ids("resisc45", full_spectra=full_spectra)

    @staticmethod
    def class_of(file_name: str, source=None) -> int:
        """Class index from ``<class>_<nnn>.jpg`` (file name minus its last ``_`` token)."""
        cls = file_name.rsplit("_", 1)[0]
        if cls not in CLASSES:
            raise ValueError(f"resisc45: unknown class {cls!r} of file {file_name!r}"
                             + (f" in {source}" if source else ""))
        return CLASSES.index(cls)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        name, label = self.samples[i]
        path = self.img_dir / CLASSES[label] / name
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except (OSError, ValueError) as e:
            raise OSError(f"resisc45: cannot read image {path}: {e}") from e
        imgs = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        return self.make_sample(imgs, label)
