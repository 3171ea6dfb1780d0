"""GEO-Bench v1.0 tasks (ids ``geobench.<task>``), read WITHOUT the ``geobench`` package.

On-disk layout (``$GEO_BENCH_DIR/{classification,segmentation}_v1.0/<task>/``):
- ``task_specs.pkl``: pickled ``TaskSpecifications`` (band infos in file order, label type with class count);
- ``default_partition.json`` (and ``<name>_partition.json``): ``{"train": [...], "valid": [...], "test": [...]}``
  sample names;
- ``band_stats.json``: ``{band name: {"mean", "std", "min", "max", ...}}``;
- ``<sample>.hdf5``: one dataset per band (named by the band name; segmentation masks in ``label``) and an
  attribute ``pickle`` = ``str(pickle.dumps(attr_dict))`` holding per-band metadata and ``label``.

Pickles are never executed: ``SafeGeobenchUnpickler`` (``geobench_pickle``) only materialises a short allow-list of
GEO-Bench classes (as plain local records), numeric numpy data rebuilt from plain bytes, datetime values and a few
builtins; anything else raises ``GeobenchPickleError`` naming the file. Band datasets must be numeric, stored in the
sample file itself (no links, external or virtual storage) and at most ``MAX_SAMPLE_PIXELS`` pixels; any other
sample is refused with an error naming it (``ValueError``; ``UnreadableFileError``, an ``OSError``, when HDF5
cannot read it).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.datasets.geobench_pickle import (KNOWN_GEOBENCH_CLASSES, GeobenchPickleError,  # noqa: F401
                                                  GeobenchRecord, SafeGeobenchUnpickler, decode_attr_pickle,
                                                  safe_loads)
from dinov2.data.io import UnreadableFileError, read_json
from dinov2.data.normalize import BandNormalizer

_SO2SAT_DEFAULT_KEEP = [0, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # VH real, VV real + 10 S2 bands
# A band or mask larger than this (pixels) is refused before it is read: GEO-Bench samples are at most a few
# hundred pixels wide, and a crafted file could declare a huge, never-written dataset.
MAX_SAMPLE_PIXELS = 1 << 26


def geobench_root() -> Path:
    """``$GEO_BENCH_DIR`` as a path; clear errors when unset or missing."""
    root = os.environ.get("GEO_BENCH_DIR")
    if not root:
        raise EnvironmentError("GEO_BENCH_DIR is not set: point it at the GEO-Bench data root (the folder holding "
                               "classification_v1.0/ and segmentation_v1.0/), e.g. in .env")
    path = Path(os.path.expandvars(root)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"GEO_BENCH_DIR={root!r} does not exist or is not a directory")
    return path


class GeobenchDataset(EvalDataset):
    """One GEO-Bench task split; samples ``({'imgs': (C,H,W) float32, 'chn_ids': (C,)}, label)``.

    label: int (classification), float multi-hot ``(num_classes,)`` (multilabel) or long mask ``(H,W)``
    (segmentation). ``bands``: GEO-Bench band names to keep (default: all, in task order; chn_ids follow the
    dataset band YAML ``configs/data/eval/<task>.yaml``, whose band list is in task order).
    """

    def __init__(self, ds_name: Optional[str] = None, split: str = "train", normalize: bool = True,
                 transform=None, so2sat_keep_bands: Optional[Sequence[int]] = None, full_spectra: bool = False,
                 bands: Optional[Sequence[str]] = None, partition: str = "default",
                 benchmark: Optional[str] = None, id: Optional[str] = None, **kwargs):
        if ds_name is None and id is not None and id.startswith("geobench."):
            ds_name = id.split(".", 1)[1]
        if not ds_name:
            raise ValueError("GeobenchDataset needs ds_name (or id 'geobench.<task>')")
        self.ds_name, self.transform = ds_name, transform
        self.display_name = kwargs.pop("display_name", ds_name)
        cfg = sensors.load_ds_cfg(ds_name)
        meta = cfg["metainfo"]
        task_id = meta.get("task_id", "classification")
        self.is_segmentation = task_id == "segmentation"
        self.is_multilabel = task_id == "multilabelclass"
        bench = benchmark or ("segmentation_v1.0" if self.is_segmentation else "classification_v1.0")
        self.task_dir = geobench_root() / bench / ds_name
        if not self.task_dir.is_dir():
            raise FileNotFoundError(f"GEO-Bench task folder {self.task_dir} does not exist (GEO_BENCH_DIR="
                                    f"{os.environ.get('GEO_BENCH_DIR')})")
        self.task_specs = self._load_task_specs()
        all_bands = [b.name for b in self.task_specs.bands_info]
        chn_ids = sensors.ds_chn_ids(ds_name, full_spectra=full_spectra)
        if chn_ids.shape[0] != len(all_bands):
            raise ValueError(f"{ds_name}: {self.task_dir / 'task_specs.pkl'} lists {len(all_bands)} bands "
                             f"{all_bands} but the band YAML has {chn_ids.shape[0]} entries")
        idx = self._band_indices(all_bands, bands, meta, so2sat_keep_bands)
        self.band_names = [all_bands[i] for i in idx]
        self.chn_ids = chn_ids[idx]
        self.num_classes = int(meta.get("num_classes") or getattr(self.task_specs.label_type, "n_classes"))
        stats = self._load_json("band_stats.json") if normalize else {}
        self.normalizer = self._norm_stats(stats) if normalize else None
        split_key = {"val": "valid", "validation": "valid"}.get(split, split)
        part = self._load_json(f"{partition}_partition.json")
        if split_key not in part:
            raise ValueError(f"Split {split!r} not in {self.task_dir / f'{partition}_partition.json'} "
                             f"(has {sorted(part)})")
        self.samples: List[str] = list(part[split_key])

    def _load_json(self, name: str) -> Dict:
        path = self.task_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench file missing: {path}")
        data = read_json(str(path), "GEO-Bench metadata")
        if not isinstance(data, dict):
            raise ValueError(f"GEO-Bench metadata {path} holds a {type(data).__name__}, expected a JSON object")
        return data

    def _load_task_specs(self):
        path = self.task_dir / "task_specs.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench file missing: {path}")
        specs = safe_loads(path.read_bytes(), str(path))
        if not isinstance(getattr(specs, "bands_info", None), (list, tuple)) or \
                not all(isinstance(getattr(b, "name", None), str) for b in specs.bands_info):
            raise ValueError(f"{path} holds a {type(specs).__name__}, not a TaskSpecifications with a bands_info "
                             "list of named bands")
        return specs

    def _band_indices(self, all_bands, bands, meta, so2sat_keep_bands) -> List[int]:
        if bands is not None:
            missing = [b for b in bands if b not in all_bands]
            if missing:
                raise ValueError(f"{self.ds_name}: unknown bands {missing}; available: {all_bands}")
            return [all_bands.index(b) for b in bands]
        keep = so2sat_keep_bands
        if keep is None and self.ds_name == "m-so2sat":
            keep = _SO2SAT_DEFAULT_KEEP
        keep = keep if keep is not None else meta.get("band_subselect_by_geob_id")
        if keep is None:
            return list(range(len(all_bands)))
        bad = [i for i in keep if not 0 <= int(i) < len(all_bands)]
        if bad:
            raise ValueError(f"{self.ds_name}: band indices {bad} out of range for {len(all_bands)} bands")
        return [int(i) for i in keep]

    def _norm_stats(self, stats: Dict):
        missing = [b for b in self.band_names if b not in stats]
        if missing:
            raise ValueError(f"{self.task_dir / 'band_stats.json'} has no statistics for bands {missing} (listed in "
                             f"{self.task_dir / 'task_specs.pkl'})")
        return BandNormalizer([float(stats[b]["mean"]) for b in self.band_names],
                              [float(stats[b]["std"]) for b in self.band_names], str(self.task_dir / "band_stats.json"))

    def __len__(self) -> int:
        return len(self.samples)

    def read_sample(self, name: str):
        """Raw ``(imgs (C,H,W) float32, label, attr_dict)`` of one sample file (selected bands, unnormalised)."""
        import h5py

        path = self.task_dir / f"{name}.hdf5"
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench sample file missing: {path}")
        try:
            with h5py.File(path, "r") as fp:
                if "pickle" not in fp.attrs:
                    raise ValueError(f"{path} has no 'pickle' attribute")
                attrs = decode_attr_pickle(fp.attrs["pickle"], str(path))
                missing = [b for b in self.band_names if b not in fp]
                if missing:
                    raise ValueError(f"{path} lacks band datasets {missing} (has {sorted(fp.keys())})")
                arrays = [_read_plain_dataset(fp, b, path, "biuf").astype(np.float32) for b in self.band_names]
                mask = _read_plain_dataset(fp, "label", path, "biu") if self.is_segmentation and "label" in fp \
                    else None
        except Exception as e:  # h5py/HDF5 report damaged files as OSError, KeyError, RuntimeError, TypeError ...
            if str(path) in str(e):
                raise
            if isinstance(e, ValueError):
                raise ValueError(f"{path}: {e}") from e
            raise UnreadableFileError(str(path), e) from e
        imgs = self._stack(arrays, path)
        if self.is_segmentation:
            if mask is None:
                raise ValueError(f"{path}: segmentation sample without a 'label' dataset")
            label = torch.from_numpy(mask.astype(np.int64)).squeeze()
        elif "label" not in attrs:
            raise ValueError(f"{path}: attribute pickle has no 'label'")
        elif self.is_multilabel:
            try:
                label = torch.as_tensor(np.asarray(attrs["label"], dtype=np.float32))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}: multilabel label is not a list of numbers: {e}") from e
            if label.shape != (self.num_classes,):
                raise ValueError(f"{path}: multilabel label shape {tuple(label.shape)} != ({self.num_classes},)")
        else:
            raw = attrs["label"]
            if isinstance(raw, np.ndarray) and raw.size == 1 and raw.dtype.kind in "iu":
                raw = raw.item()
            if not isinstance(raw, (int, np.integer)) or isinstance(raw, bool):
                raise ValueError(f"{path}: label {raw!r:.50} is not an integer class index")
            label = int(raw)
            if not 0 <= label < self.num_classes:
                raise ValueError(f"{path}: label {label} outside [0, {self.num_classes})")
        return imgs, label, attrs

    @staticmethod
    def _stack(arrays: List[np.ndarray], path: Path) -> torch.Tensor:
        tensors = [torch.from_numpy(a.squeeze()) for a in arrays]
        if any(t.ndim != 2 for t in tensors):
            raise ValueError(f"{path}: band arrays must be 2-D, got shapes {[tuple(t.shape) for t in tensors]}")
        h = max(t.shape[0] for t in tensors)
        w = max(t.shape[1] for t in tensors)
        # bands of coarser resolution are resampled to the finest grid (as GEO-Bench's pack_to_3d does)
        tensors = [t if t.shape == (h, w) else
                   F.interpolate(t[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                   for t in tensors]
        return torch.stack(tensors)

    def __getitem__(self, i: int):
        imgs, label, _ = self.read_sample(self.samples[i])
        return self.make_sample(imgs, label)


def _read_plain_dataset(fp, name: str, path: Path, kinds: str) -> np.ndarray:
    """Dataset ``name`` of an open HDF5 file as an array, refusing anything but a plain numeric dataset stored in
    the file itself: links (which may point into other files), external or virtual storage (which read other local
    files as pixels), non-numeric dtypes and implausibly large shapes."""
    import h5py

    if "/" in name:
        raise ValueError(f"{path}: dataset name {name!r} must not contain '/'")
    link = fp.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{path}: '{name}' is a {type(link).__name__}, not a dataset stored in the file")
    dset = fp[name]
    if not isinstance(dset, h5py.Dataset):
        raise ValueError(f"{path}: '{name}' is a {type(dset).__name__}, not a dataset")
    if dset.is_virtual or dset.external:
        raise ValueError(f"{path}: dataset '{name}' uses {'virtual' if dset.is_virtual else 'external'} storage "
                         "(data from other files); GEO-Bench samples must store their pixels in the file")
    if dset.dtype.kind not in kinds or dset.dtype.fields is not None or dset.dtype.subdtype is not None:
        raise ValueError(f"{path}: dataset '{name}' has dtype {dset.dtype}, expected a numeric dtype")
    n = int(np.prod(dset.shape, dtype=np.float64)) if dset.shape is not None else 0
    if dset.shape is None or not 0 < n <= MAX_SAMPLE_PIXELS or dset.ndim not in (2, 3):
        raise ValueError(f"{path}: dataset '{name}' has shape {dset.shape}; expected a 2-D image of at most "
                         f"{MAX_SAMPLE_PIXELS} pixels")
    return dset[()]

