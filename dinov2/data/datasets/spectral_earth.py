"""SpectralEarthDataset: EnMAP hyperspectral patches (202 bands), pretraining and the CORINE task.

Layout: split lists `<root>/spectral_earth/splits/<task_dir>/<split>.txt` (one relative TIFF path per line);
`task_dir='enmap'` (pretraining) reads images under `<root>/spectral_earth/enmap/`; `task_dir='corine'` reads
images under `<root>/spectral_earth/spectral_earth_downstream_datasets/enmap_corine/enmap/` and CORINE Land Cover
label rasters under `.../enmap_corine/corine/` with the same relative path. Images are HWC TIFFs (202 bands,
128x128). Normalisation: clamp to [0, 10000], divide by 10000, then per-band z-score. The published per-band
constants are not part of this repository; the statistics are given as `band_stats={'mean': [...], 'std': [...]}`
(or a JSON path) or computed robustly from a sample of training patches and cached in
`<splits dir>/band_stats.json` (a downstream task reuses the pretraining cache `splits/enmap/band_stats.json`
when it has none of its own, so the probe sees the pretraining normalisation).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dinov2.data.datasets.corine_labels import load_corine_nomenclature, raster_codes
from dinov2.data.io import FaultyFileLog, read_tiff_chw, require_path, resolve_root, with_retries
from dinov2.data.normalize import BandNormalizer, robust_band_stats, to_float_tensor
from dinov2.data.sensors import ds_chn_ids
from dinov2.data.views import make_view

logger = logging.getLogger("dinov2")
RGB_IDX = [43, 28, 10]
N_BANDS = 202
SCALE = 10000.0
PRETRAIN_TASK = "enmap"
# task_dir -> folder of its images (and of its label rasters) below `<root>/spectral_earth`
TASK_DIRS = {
    PRETRAIN_TASK: ("enmap", None),
    "corine": ("spectral_earth_downstream_datasets/enmap_corine/enmap",
               "spectral_earth_downstream_datasets/enmap_corine/corine"),
}


class SpectralEarthDataset(Dataset):
    """EnMAP patches. `task_dir='enmap'`: single-view pretraining samples `[{'imgs': [(202,H,W)],
    'chn_ids': [(202,)]}]`. `task_dir='corine'`: eval samples `({'imgs': (202,H,W), 'chn_ids': (202,)}, label)`,
    label = the CLC code raster `(H,W)` int64, or with `return_multilabel` the `(19,)` int64 multi-hot of the
    BigEarthNet-19 classes its codes map to (`num_classes = 19`). The transform applies to the pretraining sample
    resp. to the eval x_dict."""

    def __init__(
        self,
        split: Optional[str] = None,
        normalize: bool = True,
        root: str = "${RDIR}/datasets",
        task_dir: str = "enmap",
        return_rgb: bool = False,
        transform: Optional[Callable] = None,
        faulty_imgs_file: Optional[str] = None,
        full_spectra: bool = False,
        build_dataset: bool = False,
        return_chns_by_id: Optional[Sequence[int]] = None,
        band_stats: Union[None, str, Dict[str, Sequence[float]]] = None,
        stats_num_samples: int = 64,
        max_tries_load_img: int = 3,
        return_multilabel: bool = False,
        display_name: Optional[str] = None,
    ):
        split = "train" if split is None else split
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be train/val/test, got {split!r}")
        if task_dir not in TASK_DIRS:
            raise ValueError(f"SpectralEarth task_dir {task_dir!r} is unknown; valid: {', '.join(TASK_DIRS)}")
        if return_multilabel and task_dir == PRETRAIN_TASK:
            raise ValueError("return_multilabel needs a labelled task_dir (e.g. 'corine'), not the pretraining 'enmap'")
        if return_rgb and return_chns_by_id is not None:
            raise ValueError("give either return_rgb or return_chns_by_id, not both")
        self.root = resolve_root(root, "SpectralEarth root")
        img_rel, label_rel = TASK_DIRS[task_dir]
        self.task_dir = task_dir
        self.img_dir = os.path.join(self.root, "spectral_earth", img_rel)
        self.label_dir = None if label_rel is None else os.path.join(self.root, "spectral_earth", label_rel)
        self.split_dir = os.path.join(self.root, "spectral_earth", "splits", task_dir)
        self.display_name = display_name or f"spectral_earth-{task_dir}"
        self.return_multilabel = return_multilabel
        self.nomenclature = load_corine_nomenclature() if self.label_dir is not None else None
        if self.nomenclature is not None:
            self.num_classes = self.nomenclature.num_classes
        if build_dataset:
            self.build_split_file(os.path.join(self.split_dir, "train.txt"))
        self.split_file = require_path(os.path.join(self.split_dir, f"{split}.txt"), "SpectralEarth split list")
        self.relpaths = self._read_list(self.split_file)
        self.normalize, self.transform, self.max_tries = normalize, transform, max_tries_load_img
        self.faulty = FaultyFileLog(faulty_imgs_file)
        chn = ds_chn_ids("spectral_earth", full_spectra)
        if len(chn) != N_BANDS:
            raise ValueError(f"config spectral_earth lists {len(chn)} bands, expected {N_BANDS}")
        self.chn_idx: Optional[List[int]] = RGB_IDX if return_rgb else (
            list(return_chns_by_id) if return_chns_by_id is not None else None)
        if self.chn_idx is not None and not all(-N_BANDS <= i < N_BANDS for i in self.chn_idx):
            raise ValueError(f"channel indices {self.chn_idx} out of range for {N_BANDS} bands")
        self.chn_ids = chn if self.chn_idx is None else chn[self.chn_idx]
        self.norm: Optional[BandNormalizer] = None
        if normalize:
            self.norm = self._load_stats(band_stats, stats_num_samples)
            self._scale = (1.0 / (SCALE * self.norm.std))[:, None, None]
            self._shift = (self.norm.mean / self.norm.std)[:, None, None]

    @staticmethod
    def _read_list(path: str) -> List[str]:
        with open(path) as fh:
            rels = [ln.strip() for ln in fh if ln.strip()]
        if not rels:
            raise ValueError(f"split list {path} is empty")
        return rels

    def build_split_file(self, out_path: str) -> None:
        """Write every `*.tif` under the task's image folder (relative paths) to `out_path`."""
        require_path(self.img_dir, f"SpectralEarth {self.task_dir} image folder")
        rels = sorted(os.path.relpath(os.path.join(d, f), self.img_dir)
                      for d, _, fs in os.walk(self.img_dir) for f in fs if f.endswith(".tif"))
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as fh:
            fh.write("\n".join(rels) + "\n")

    def _load_stats(self, band_stats, n_samples: int) -> BandNormalizer:
        cache = os.path.join(self.split_dir, "band_stats.json")
        pretrain_cache = os.path.join(os.path.dirname(self.split_dir), PRETRAIN_TASK, "band_stats.json")
        for candidate in (cache, pretrain_cache):
            if band_stats is None and os.path.exists(candidate):
                band_stats = candidate
        if isinstance(band_stats, str):
            with open(band_stats) as fh:
                band_stats = json.load(fh)
        if band_stats is None:
            band_stats = self._compute_stats(n_samples)
            try:
                with open(cache, "w") as fh:
                    json.dump(band_stats, fh)
            except OSError as e:
                logger.warning("SpectralEarth: cannot cache band stats in %s: %s", cache, e)
        norm = BandNormalizer(band_stats["mean"], band_stats["std"], "spectral_earth")
        if len(norm) != N_BANDS:
            raise ValueError(f"SpectralEarth band stats have {len(norm)} entries, expected {N_BANDS}")
        return norm

    def _compute_stats(self, n_samples: int) -> Dict[str, List[float]]:
        """Robust per-band mean/std of scaled reflectance over evenly spaced training patches."""
        train = os.path.join(self.split_dir, "train.txt")
        rels = self._read_list(train) if os.path.exists(train) else self.relpaths
        pick = np.unique(np.linspace(0, len(rels) - 1, min(n_samples, len(rels))).astype(int))
        chunks = []
        for i in pick:
            x = self._scaled(read_tiff_chw(os.path.join(self.img_dir, rels[i])), rels[i])
            chunks.append(x[:, ::4, ::4].reshape(N_BANDS, -1))
        vals = np.concatenate(chunks, 1)
        stats = [robust_band_stats(v) for v in vals]
        logger.info("SpectralEarth: band stats computed from %d patches", len(pick))
        return {"mean": [m for m, _ in stats], "std": [s for _, s in stats]}

    @staticmethod
    def _scaled(arr: np.ndarray, rel: str) -> np.ndarray:
        if arr.shape[0] != N_BANDS:
            raise ValueError(f"SpectralEarth patch {rel} has {arr.shape[0]} bands, expected {N_BANDS}")
        return np.clip(arr.astype(np.float32), 0.0, SCALE) / SCALE

    def __len__(self) -> int:
        return len(self.relpaths)

    def load(self, idx: int) -> torch.Tensor:
        """One patch as a float32 (C,H,W) tensor, scaled and normalised."""
        rel = self.relpaths[idx]
        arr = read_tiff_chw(os.path.join(self.img_dir, rel))
        if arr.shape[0] != N_BANDS:
            raise ValueError(f"SpectralEarth patch {rel} has {arr.shape[0]} bands, expected {N_BANDS}")
        x = to_float_tensor(arr).clamp_(0.0, SCALE)
        if self.norm is None:
            x.div_(SCALE)
        else:  # (x / SCALE - mean) / std folded into one multiply-subtract over the 202-band cube
            x.mul_(self._scale).sub_(self._shift)
        return x if self.chn_idx is None else x[self.chn_idx]

    def load_label(self, idx: int) -> torch.Tensor:
        """The label of one patch: CLC code raster `(H,W)` or, with `return_multilabel`, the 19-dim multi-hot."""
        if self.label_dir is None:
            raise ValueError(f"SpectralEarth task_dir {self.task_dir!r} has no labels")
        path = os.path.join(self.label_dir, self.relpaths[idx])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SpectralEarth {self.task_dir} label raster {path} does not exist")
        arr = read_tiff_chw(path)
        if arr.shape[0] != 1:
            raise ValueError(f"SpectralEarth label raster {path} has {arr.shape[0]} bands, expected 1")
        if not self.return_multilabel:
            return torch.from_numpy(arr[0].astype(np.int64))
        return self.nomenclature.multihot(raster_codes(arr).tolist())

    def _eval_sample(self, idx: int):
        x_dict = {"imgs": self.load(idx), "chn_ids": self.chn_ids.clone()}
        label = self.load_label(idx)
        return (self.transform(x_dict) if self.transform is not None else x_dict), label

    def __getitem__(self, idx: int):
        # a single-view sample has nothing to re-draw: the retries re-read the same file
        what = f"SpectralEarth patch {self.relpaths[idx]}"
        if self.label_dir is not None:
            return with_retries(lambda _a: self._eval_sample(idx), self.max_tries, self.faulty, what)
        sample = with_retries(lambda _a: [make_view([self.load(idx)], [self.chn_ids.clone()])], self.max_tries,
                              self.faulty, what)
        return self.transform(sample) if self.transform is not None else sample
