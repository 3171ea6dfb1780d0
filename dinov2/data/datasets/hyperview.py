"""HYPERVIEW (eval id ``hyperview``): soil parameters (P, K, Mg, pH) of agricultural fields from Intuition-1
hyperspectral imagery (150 bands, 2 m), a per-image regression task.

Layout of the public release: ``<root>/train_data/<sample_index>.npz`` — a masked array saved as the arrays
``data`` (150, H, W) and ``mask`` (True = pixel outside the field), with H, W from 11 to ~300 px — and
``<root>/train_gt.csv`` with columns ``sample_index, P, K, Mg, pH``. Only the training part is labelled, so the
train / val / test splits are a seeded random partition of it (``split_fractions``; the fields carry no
coordinates, so no spatial blocking is possible).

Pixels outside the field are set to the band mean (0 after normalisation; 0 in raw units with
``normalize=False``) — the published code fills them with -1 in raw units instead. Per-band mean/std come from the valid pixels of the samples of the train split (cached
in ``<root>/band_stats_<hash>.json``) unless ``mean``/``std`` are given. Images are resized to ``img_size``.
Labels are float tensors ``(4,)`` in the CSV's units.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import resolve_root
from dinov2.data.normalize import BandNormalizer, pooled_band_stats
from dinov2.data.spatial_split import DEFAULT_FRACTIONS, random_split, select_split

TARGETS = ("P", "K", "Mg", "pH")


def read_masked_npz(path: Path) -> np.ndarray:
    """(C, H, W) float32 pixels of a HYPERVIEW sample with NaN outside the field; errors name the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "data" not in z.files or "mask" not in z.files:
                raise ValueError(f"{path}: expected arrays 'data' and 'mask', found {z.files}")
            data, mask = z["data"].astype(np.float32), z["mask"].astype(bool)
    except (OSError, EOFError, ValueError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable HYPERVIEW npz file ({e})") from e
    if data.ndim != 3 or mask.shape != data.shape:
        raise ValueError(f"{path}: data {data.shape} / mask {mask.shape} must both be (C, H, W)")
    data[mask] = np.nan
    return data


class Hyperview(EvalDataset):
    """One split of HYPERVIEW; samples ``({'imgs': (150, S, S), 'chn_ids': (150,)}, targets (4,) float)``."""

    is_regression = True
    num_targets = len(TARGETS)

    def __init__(self, root: str = "${RDIR}/datasets/hyperview", split: str = "train", img_size: int = 64,
                 split_fractions: Optional[Dict[str, float]] = None, seed: int = 0, normalize: bool = True,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 full_spectra: bool = False, transform=None, **kwargs):
        import pandas as pd

        self.root = Path(resolve_root(root, "HYPERVIEW dataset folder"))
        self.display_name = kwargs.pop("display_name", "hyperview")
        if kwargs:
            raise ValueError(f"hyperview: unknown options {sorted(kwargs)}")
        csv = self.root / "train_gt.csv"
        if not csv.is_file():
            raise FileNotFoundError(f"HYPERVIEW labels file missing: {csv}")
        df = pd.read_csv(csv)
        missing = [c for c in ("sample_index", *TARGETS) if c not in df.columns]
        if missing:
            raise ValueError(f"{csv}: missing columns {missing} (has {list(df.columns)})")
        df = df.sort_values("sample_index").reset_index(drop=True)
        names = random_split(len(df), split_fractions or DEFAULT_FRACTIONS, seed)
        self.train_ids = [int(df.sample_index[i]) for i in select_split(names, "train", "hyperview")]
        rows = select_split(names, split, "hyperview")
        self.ids = [int(df.sample_index[i]) for i in rows]
        self.targets = torch.tensor(df.loc[rows, list(TARGETS)].to_numpy(np.float32))
        if not torch.isfinite(self.targets).all():
            raise ValueError(f"{csv}: non-finite target values")
        self.chn_ids = sensors.ds_chn_ids("hyperview", full_spectra=full_spectra)
        self.img_size, self.transform = int(img_size), transform
        self.normalizer = None
        if normalize:
            if (mean is None) != (std is None):
                raise ValueError("hyperview: give both mean and std, or neither")
            if mean is None:
                mean, std = self._train_stats()
            self.normalizer = BandNormalizer(list(mean), list(std), str(self.root))

    def _file(self, sample_index: int) -> Path:
        path = self.root / "train_data" / f"{sample_index}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"HYPERVIEW sample file missing: {path}")
        return path

    def _train_stats(self):
        """Per-band mean/std over the valid pixels of the train split; cached beside the data."""
        key = hashlib.sha1(repr(sorted(self.train_ids)).encode()).hexdigest()[:12]
        cache = self.root / f"band_stats_{key}.json"
        if cache.is_file():
            stats = json.loads(cache.read_text())
            return stats["mean"], stats["std"]
        mean, std = pooled_band_stats((read_masked_npz(self._file(sid)) for sid in self.train_ids),
                                      f"{self.root} (train split)")
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"mean": mean, "std": std}))
        os.replace(tmp, cache)  # atomic: ranks computing the same statistics never see a partial file
        return mean, std

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        path = self._file(self.ids[i])
        arr = torch.from_numpy(read_masked_npz(path))
        if arr.shape[0] != self.chn_ids.shape[0]:
            raise ValueError(f"{path}: {arr.shape[0]} bands, the hyperview band table has {self.chn_ids.shape[0]}")
        invalid = ~torch.isfinite(arr)
        if self.normalizer is not None:  # normalised before filling: outside pixels become the band mean (0)
            arr = self.normalizer(torch.nan_to_num(arr))
        arr[invalid] = 0.0
        arr = F.interpolate(arr[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                            antialias=arr.shape[-1] > self.img_size)[0]
        x = {"imgs": arr, "chn_ids": self.chn_ids.clone()}
        return (self.transform(x) if self.transform is not None else x), self.targets[i].clone()
