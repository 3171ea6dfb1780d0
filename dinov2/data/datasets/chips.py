"""ChipsDataset (dataset id ``chips``): a folder of GeoTIFF chips and a CSV of labels — the user's own labelled
data for classification, multi-label classification, regression or segmentation.

CSV columns: ``file`` (chip path, relative to the CSV's folder or absolute) and, by ``task``:
- ``classification``: ``label`` (a class name or an integer id; names are mapped through ``classes`` or sorted);
- ``multilabel``: ``labels`` (class names or ids separated by ``;``), as a multi-hot vector;
- ``regression``: the columns named in ``target_columns`` (floats), as a float vector;
- ``segmentation``: ``mask`` (path of a single-band GeoTIFF of class ids on the chip's grid; its nodata value
  becomes ``ignore_index``).
Bands: ``sensor`` + ``bands`` (registry names, one per chip band, in file order) or ``wavelengths_nm`` for a
sensor outside the registry. Splits: a ``split`` column if the CSV has one, else spatial blocks of
``block_size_m`` over the chip centres (in each chip's CRS; see ``dinov2.data.spatial_split``). Normalisation:
``mean``/``std`` if given, else per-band statistics of the train-split chips. Chips are resized to ``img_size``
(image bilinear, mask nearest) when given; no-data pixels are set to the band mean (0 after normalisation).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import UnreadableFileError, expand_path
from dinov2.data.normalize import BandNormalizer, pooled_band_stats
from dinov2.data.spatial_split import DEFAULT_FRACTIONS, SPLIT_ALIASES, block_split, select_split

TASKS = ("classification", "multilabel", "regression", "segmentation")


def _read(path: str):
    """(C, H, W) float32 pixels with NaN at no-data, and the raster's CRS and bounds."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            arr = src.read().astype(np.float32)
            if src.nodata is not None:
                arr[arr == src.nodata] = np.nan
            return arr, src.crs, src.bounds, src.nodata
    except rasterio.errors.RasterioError as e:
        raise UnreadableFileError(path, e) from e


class ChipsDataset(EvalDataset):
    """Labelled GeoTIFF chips; see the module docstring."""

    def __init__(self, csv: str, task: str = "classification", split: str = "train",
                 sensor: Optional[str] = None, bands: Optional[Sequence[str]] = None,
                 wavelengths_nm: Optional[Sequence[float]] = None, classes: Optional[Sequence[str]] = None,
                 target_columns: Optional[Sequence[str]] = None, block_size_m: float = 1000.0,
                 split_fractions: Optional[Dict[str, float]] = None, seed: int = 0, img_size: Optional[int] = None,
                 normalize: bool = True, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, ignore_index: int = 255, num_classes: Optional[int] = None,
                 full_spectra: bool = False, transform=None, **kwargs):
        import pandas as pd

        if task not in TASKS:
            raise ValueError(f"chips: task must be one of {TASKS}, got {task!r}")
        if task == "segmentation" and transform is not None:
            raise ValueError("chips: segmentation takes no transform (it would move the image but not the mask)")
        self.display_name = kwargs.pop("display_name", "chips")
        if kwargs:
            raise ValueError(f"chips: unknown options {sorted(kwargs)}")
        self.csv = Path(expand_path(str(csv), "chips CSV"))
        if not self.csv.is_file():
            raise FileNotFoundError(f"chips: label CSV not found: {self.csv}")
        df = pd.read_csv(self.csv)
        need = {"classification": ["label"], "multilabel": ["labels"], "segmentation": ["mask"],
                "regression": list(target_columns or [])}[task]
        if task == "regression" and not need:
            raise ValueError("chips: regression needs target_columns (the CSV columns holding the targets)")
        missing = [c for c in ["file", *need] if c not in df.columns]
        if missing:
            raise ValueError(f"{self.csv}: missing columns {missing} (has {list(df.columns)})")
        if df.empty:
            raise ValueError(f"{self.csv}: no rows")
        self.task, self.img_size, self.transform = task, img_size, transform
        self.ignore_index = int(ignore_index)
        self.is_segmentation, self.is_multilabel = task == "segmentation", task == "multilabel"
        self.files = [self._path(f) for f in df["file"]]
        self.chn_ids = self._chn_ids(sensor, bands, wavelengths_nm, full_spectra)
        if "split" in df.columns:
            names = [SPLIT_ALIASES.get(str(s), str(s)) for s in df["split"]]
        else:
            xs, ys = [], []
            crs_index: Dict[str, int] = {}
            for f in self.files:
                _, crs, b, _ = _read(f)
                k = crs_index.setdefault(str(crs), len(crs_index))
                xs.append((b.left + b.right) / 2 + k * block_size_m * 1e6)  # chips in other CRSs never share a block
                ys.append((b.bottom + b.top) / 2)
            names = block_split(xs, ys, float(block_size_m), split_fractions or DEFAULT_FRACTIONS, seed)
        train_rows = [i for i, s in enumerate(names) if s == "train"]
        rows = select_split(names, split, str(self.csv))
        self.rows = rows
        self.labels = self._labels(df, rows, classes, target_columns, num_classes)
        self.normalizer = None
        if normalize:
            if (mean is None) != (std is None):
                raise ValueError("chips: give both mean and std, or neither")
            if mean is None:
                if not train_rows:
                    raise ValueError(f"{self.csv}: no train chips to compute band statistics from; give mean/std")
                mean, std = pooled_band_stats((_read(self.files[i])[0] for i in train_rows),
                                              f"{self.csv} (train chips)")
            self.normalizer = BandNormalizer(list(mean), list(std), str(self.csv))

    def _path(self, f: Any) -> str:
        p = expand_path(str(f), "chip path")
        p = p if os.path.isabs(p) else str(self.csv.parent / p)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{self.csv}: chip file not found: {p}")
        return p

    @staticmethod
    def _chn_ids(sensor, bands, wavelengths_nm, full_spectra) -> torch.Tensor:
        from dinov2.data.sensors import band_chn_ids

        if (wavelengths_nm is None) == (sensor is None):
            raise ValueError("chips: give either sensor + bands or wavelengths_nm")
        if wavelengths_nm is not None:
            return torch.tensor([float(w) for w in wavelengths_nm], dtype=torch.float32).floor().to(torch.int16)
        if not bands:
            raise ValueError(f"chips: sensor {sensor!r} needs a bands list (one registry band per chip band)")
        return band_chn_ids(sensor, list(bands), full_spectra)

    def _labels(self, df, rows, classes, target_columns, num_classes) -> List[Any]:
        if self.task == "segmentation":
            masks = [self._path(m) for m in df["mask"]]
            if num_classes:
                self.num_classes = int(num_classes)
            else:  # the largest class id in any mask (all splits, so every split agrees)
                ids = [np.nanmax(np.where(_read(m)[0][0] == self.ignore_index, np.nan, _read(m)[0][0]))
                       for m in masks]
                self.num_classes = int(np.nanmax(ids)) + 1
            return [masks[i] for i in rows]
        if self.task == "regression":
            vals = df[list(target_columns)].to_numpy(np.float32)
            if not np.isfinite(vals).all():
                raise ValueError(f"{self.csv}: non-finite values in {list(target_columns)}")
            self.num_targets = len(target_columns)
            return [torch.tensor(vals[i]) for i in rows]
        col = "label" if self.task == "classification" else "labels"
        raw = [[t.strip() for t in str(v).split(";") if t.strip()] for v in df[col]]
        names = sorted({t for r in raw for t in r})
        if classes is None:
            numeric = all(t.lstrip("-").isdigit() for t in names)
            classes = [str(i) for i in range(max(int(t) for t in names) + 1)] if numeric else names
        classes = [str(c) for c in classes]
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{self.csv}: labels {unknown} are not in classes {classes}")
        self.classes = classes
        self.num_classes = int(num_classes or len(classes))
        index = {c: k for k, c in enumerate(classes)}
        if self.task == "classification":
            return [index[raw[i][0]] for i in rows]
        out = []
        for i in rows:
            v = torch.zeros(self.num_classes)
            v[[index[t] for t in raw[i]]] = 1.0
            out.append(v)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path = self.files[self.rows[i]]
        arr, *_ = _read(path)
        if arr.shape[0] != self.chn_ids.shape[0]:
            raise ValueError(f"{path}: {arr.shape[0]} bands, but {self.chn_ids.shape[0]} band ids are configured")
        imgs = torch.from_numpy(arr)
        invalid = ~torch.isfinite(imgs)
        if self.normalizer is not None:
            imgs = self.normalizer(torch.nan_to_num(imgs))
        imgs[invalid] = 0.0
        label = self.labels[i]
        if self.task == "segmentation":
            m, _, _, nodata = _read(label)
            mask = torch.from_numpy(np.where(np.isfinite(m[0]), m[0], self.ignore_index).astype(np.int64))
            if mask.shape != imgs.shape[-2:]:
                raise ValueError(f"{label}: mask {tuple(mask.shape)} is not on the grid of {path} "
                                 f"{tuple(imgs.shape[-2:])}")
            label = mask
        if self.img_size and imgs.shape[-1] != self.img_size:
            size = (int(self.img_size), int(self.img_size))
            imgs = F.interpolate(imgs[None], size=size, mode="bilinear", align_corners=False)[0]
            if self.task == "segmentation":
                label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
        x = {"imgs": imgs, "chn_ids": self.chn_ids.clone()}
        if self.transform is not None:
            x = self.transform(x)
        return x, label
