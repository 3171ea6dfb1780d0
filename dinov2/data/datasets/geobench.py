"""GEO-Bench v1.0 tasks (ids ``geobench.<task>``), read WITHOUT the ``geobench`` package.

On-disk layout (``$GEO_BENCH_DIR/{classification,segmentation}_v1.0/<task>/``):
- ``task_specs.pkl``: pickled ``TaskSpecifications`` (band infos in file order, label type with class count);
- ``default_partition.json`` (and ``<name>_partition.json``): ``{"train": [...], "valid": [...], "test": [...]}``
  sample names;
- ``band_stats.json``: ``{band name: {"mean", "std", "min", "max", ...}}``;
- ``<sample>.hdf5``: one dataset per band (named by the band name, plus ``_<date>`` for dated bands; segmentation
  masks in ``label``) and an attribute ``pickle`` = ``str(pickle.dumps(attr_dict))`` holding ``bands_order``, each
  dataset's metadata (its ``band_info`` names the band) and ``label``.

Bands are selected by GEO-Bench band name, as the published band lists do: the dataset band YAML's
``band_subselect_by_geob_id`` names the GEO-Bench bands that are model inputs, in channel order (m-cashew-plant and
m-SA-crop-type: the 12 Sentinel-2 bands, without the cloud-probability band their files also hold; m-NeonTree: Red,
Green, Blue, Neon, without the canopy height model, which has no wavelength); without it every band of
``task_specs.pkl`` is an input. Multi-channel bands (GEO-Bench ``MultiBand`` / ``HyperSpectralBands``, e.g.
m-NeonTree's 369-channel "Neon" cube, stored as one ``(H, W, n_bands)`` dataset) expand to ``n_bands`` channels.
Bands of coarser resolution are resampled bilinearly to the finest grid. ``band_stats.json`` has one mean/std per
band name; for a multi-channel band with a single (scalar) entry, per-channel statistics are computed from the
task's training split by default (``multiband_stats``).

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
from typing import Dict, List, Optional, Sequence, Tuple

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
# per-channel statistics of multi-channel bands computed from a training split, per (task dir, partition, band)
_TRAIN_STATS_CACHE: Dict[Tuple[str, str, str], Tuple[np.ndarray, np.ndarray]] = {}


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
    (segmentation). ``bands``: GEO-Bench band names to keep (default: all model-input bands, in task order;
    chn_ids follow the dataset band YAML ``configs/data/eval/<task>.yaml``, whose channel list is in that order; a
    multi-channel band contributes all its channels). ``multiband_stats`` normalises multi-channel bands whose
    ``band_stats.json`` entry is a single number: ``train`` (default: per-channel mean/std over the training
    split of ``partition``), ``geobench`` (that single number for every channel) or a JSON file
    ``{"mean": [...], "std": [...]}`` (or ``{band: {"mean": [...], "std": [...]}}``) with one value per channel.
    """

    def __init__(self, ds_name: Optional[str] = None, split: str = "train", normalize: bool = True,
                 transform=None, so2sat_keep_bands: Optional[Sequence[int]] = None, full_spectra: bool = False,
                 bands: Optional[Sequence[str]] = None, partition: str = "default",
                 benchmark: Optional[str] = None, id: Optional[str] = None, multiband_stats: str = "train",
                 **kwargs):
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
        self.partition = partition
        specs_path = self.task_dir / "task_specs.pkl"
        self.band_channels = {b.name: _band_channel_count(b, specs_path) for b in self.task_specs.bands_info}
        model_bands = self._model_bands(meta, specs_path)
        # one (band name, channel index within the band or None) per model-input channel, in band-YAML order
        channels = [(b, k) for b in model_bands
                    for k in ([None] if self.band_channels[b] is None else range(self.band_channels[b]))]
        chn_ids = sensors.ds_chn_ids(ds_name, full_spectra=full_spectra)
        if chn_ids.shape[0] != len(channels):
            raise ValueError(f"{ds_name}: {specs_path} gives {len(channels)} channels for bands {model_bands} "
                             f"(multi-channel bands expanded) but the band YAML has {chn_ids.shape[0]} entries")
        idx = self._band_indices(model_bands, channels, bands, so2sat_keep_bands)
        self.channels = [channels[i] for i in idx]
        self.band_names = list(dict.fromkeys(b for b, _ in self.channels))
        self.chn_ids = chn_ids[idx]
        self.num_classes = int(meta.get("num_classes") or getattr(self.task_specs.label_type, "n_classes"))
        split_key = {"val": "valid", "validation": "valid"}.get(split, split)
        part = self._load_json(f"{partition}_partition.json")
        if split_key not in part:
            raise ValueError(f"Split {split!r} not in {self.task_dir / f'{partition}_partition.json'} "
                             f"(has {sorted(part)})")
        self.samples: List[str] = list(part[split_key])
        self._train_samples = list(part.get("train", []))
        stats = self._load_json("band_stats.json") if normalize else {}
        self.normalizer = self._norm_stats(stats, multiband_stats) if normalize else None

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

    def _model_bands(self, meta, specs_path: Path) -> List[str]:
        """The GEO-Bench bands that are model inputs, in channel order: the band YAML's
        ``band_subselect_by_geob_id`` (GEO-Bench band names or alternative names, as published; old name
        ``geobench_bands``) or else every band of ``task_specs.pkl``."""
        wanted = meta.get("band_subselect_by_geob_id") or meta.get("geobench_bands")
        if not wanted:
            return list(self.band_channels)
        by_name = {}
        for info in self.task_specs.bands_info:
            for alias in (info.name, *(getattr(info, "alt_names", None) or ())):
                by_name.setdefault(str(alias), info.name)
        unknown = [b for b in wanted if str(b) not in by_name]
        if unknown:
            raise ValueError(f"{self.ds_name}: band_subselect_by_geob_id names {unknown}, which {specs_path} does not "
                             f"have (bands: {list(self.band_channels)})")
        return [by_name[str(b)] for b in wanted]

    def _band_indices(self, model_bands, channels, bands, so2sat_keep_bands) -> List[int]:
        """Indices into `channels` of the channels to keep."""
        if bands is not None:
            missing = [b for b in bands if b not in model_bands]
            if missing:
                extra = [b for b in self.band_channels if b not in model_bands]
                raise ValueError(f"{self.ds_name}: unknown bands {missing}; model-input bands: {model_bands}"
                                 + (f" ({extra} have no channel ids in the band YAML)" if extra else ""))
            return [i for b in bands for i, (name, _) in enumerate(channels) if name == b]
        keep = so2sat_keep_bands
        if keep is None and self.ds_name == "m-so2sat":
            keep = _SO2SAT_DEFAULT_KEEP
        if keep is None:
            return list(range(len(channels)))
        bad = [i for i in keep if not 0 <= int(i) < len(channels)]
        if bad:
            raise ValueError(f"{self.ds_name}: band indices {bad} out of range for {len(channels)} channels")
        return [int(i) for i in keep]

    def _norm_stats(self, stats: Dict, multiband_stats: str = "train") -> BandNormalizer:
        src = str(self.task_dir / "band_stats.json")
        missing = [b for b in self.band_names if b not in stats]
        if missing:
            raise ValueError(f"{src} has no statistics for bands {missing} (listed in "
                             f"{self.task_dir / 'task_specs.pkl'})")
        per_band: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        extra: List[str] = []  # multi-channel bands normalised from another source
        for b in self.band_names:
            n = self.band_channels[b] or 1
            try:
                mean = np.asarray(stats[b]["mean"], np.float64).reshape(-1)
                std = np.asarray(stats[b]["std"], np.float64).reshape(-1)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{src}: band {b!r} needs numeric 'mean' and 'std' ({e})") from None
            if self.band_channels[b] is not None and mean.size == 1 and multiband_stats != "geobench":
                mean, std = (self._train_channel_stats(b) if multiband_stats == "train"
                             else _stats_file_entry(multiband_stats, b, n))
                extra.append(f"{b}: {multiband_stats}")
            if mean.size not in (1, n) or std.size != mean.size:
                raise ValueError(f"{src}: band {b!r} has {mean.size} means / {std.size} stds for its {n} channels")
            per_band[b] = (np.broadcast_to(mean, (n,)), np.broadcast_to(std, (n,)))
        pick = [(per_band[b][0][k or 0], per_band[b][1][k or 0]) for b, k in self.channels]
        return BandNormalizer([m for m, _ in pick], [s for _, s in pick],
                              src + (f" ({', '.join(extra)})" if extra else ""))

    def _train_channel_stats(self, band: str) -> Tuple[np.ndarray, np.ndarray]:
        """Per-channel mean/std of multi-channel `band` over every pixel of the training split (cached)."""
        key = (str(self.task_dir.resolve()), self.partition, band)
        if key not in _TRAIN_STATS_CACHE:
            if not self._train_samples:
                raise ValueError(f"{self.task_dir / f'{self.partition}_partition.json'} has no training samples to "
                                 f"compute per-channel statistics of band {band!r} from; pass multiband_stats")
            n = int(self.band_channels[band])
            total, total_sq, count = np.zeros(n), np.zeros(n), 0
            for name in self._train_samples:
                flat = self._read_file(name, [band], with_mask=False)[1][band].reshape(n, -1).astype(np.float64)
                total += flat.sum(1)
                total_sq += np.square(flat).sum(1)
                count += flat.shape[1]
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
            flat_bands = np.flatnonzero(std == 0)
            if flat_bands.size:
                raise ValueError(f"{self.task_dir}: channels {flat_bands.tolist()} of band {band!r} are constant over "
                                 "the training split; they cannot be z-scored (give multiband_stats)")
            _TRAIN_STATS_CACHE[key] = (mean, std)
        return _TRAIN_STATS_CACHE[key]

    def __len__(self) -> int:
        return len(self.samples)

    def _read_file(self, name: str, bands: Sequence[str], with_mask: bool):
        """``(attr_dict, {band: (channels, H, W) array}, mask or None)`` of one sample file, with errors that name
        it."""
        import h5py

        path = self.task_dir / f"{name}.hdf5"
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench sample file missing: {path}")
        try:
            with h5py.File(path, "r") as fp:
                if "pickle" not in fp.attrs:
                    raise ValueError(f"{path} has no 'pickle' attribute")
                attrs = decode_attr_pickle(fp.attrs["pickle"], str(path))
                where = _dataset_names(attrs, list(fp.keys()), path)
                missing = [b for b in bands if b not in where]
                if missing:
                    raise ValueError(f"{path} lacks band datasets {missing} (has {sorted(fp.keys())})")
                arrays = {b: _channels_first(_read_plain_dataset(fp, where[b], path, "biuf"), self.band_channels[b],
                                             b, path) for b in bands}
                mask = (_read_plain_dataset(fp, where["label"], path, "biu")
                        if with_mask and "label" in where else None)
        except Exception as e:  # h5py/HDF5 report damaged files as OSError, KeyError, RuntimeError, TypeError ...
            if str(path) in str(e):
                raise
            if isinstance(e, ValueError):
                raise ValueError(f"{path}: {e}") from e
            raise UnreadableFileError(str(path), e) from e
        return attrs, arrays, mask

    def read_sample(self, name: str):
        """Raw ``(imgs (C,H,W) float32, label, attr_dict)`` of one sample file (selected bands, unnormalised)."""
        path = self.task_dir / f"{name}.hdf5"
        attrs, arrays, mask = self._read_file(name, self.band_names, self.is_segmentation)
        # a segmentation mask fixes the grid (only coarse bands may be selected), as GEO-Bench's largest_shape does
        imgs = self._stack(arrays, path, None if mask is None else np.squeeze(mask).shape)
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

    def _stack(self, arrays: Dict[str, np.ndarray], path: Path, size: Optional[Tuple[int, ...]] = None
               ) -> torch.Tensor:
        """(C, H, W) float32 of the selected channels; bands of coarser resolution are resampled bilinearly to
        `size` or else the finest grid (as GEO-Bench's ``pack_to_3d`` does), all channels of a band at once."""
        if size is not None and len(size) != 2:
            raise ValueError(f"{path}: segmentation mask has shape {size}; expected a 2-D mask")
        h, w = size or (max(a.shape[1] for a in arrays.values()), max(a.shape[2] for a in arrays.values()))
        cubes = {}
        for b, a in arrays.items():
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            if t.shape[1:] != (h, w):
                t = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            cubes[b] = t
        return torch.stack([cubes[b][k or 0] for b, k in self.channels])

    def __getitem__(self, i: int):
        imgs, label, _ = self.read_sample(self.samples[i])
        return self.make_sample(imgs, label)


def _dataset_names(attrs: Dict, keys: Sequence[str], path: Path) -> Dict[str, str]:
    """Band name -> HDF5 dataset name of one sample file. GEO-Bench's writer names a dataset by its band name plus
    ``_<date>`` when the band has a date, and lists the datasets in ``bands_order``, each with its ``band_info``;
    the band name is read from there (as GEO-Bench's own loader does), else the dataset name is the band name."""
    out: Dict[str, str] = {}
    for key in attrs.get("bands_order") or keys:
        entry = attrs.get(key)
        info = entry.get("band_info") if isinstance(entry, dict) else None
        name = str(getattr(info, "name", None) or key)
        if name in out:
            raise ValueError(f"{path}: datasets {out[name]!r} and {key!r} both hold band {name!r} (a time series?); "
                             "GEO-Bench v1.0 samples have one date per band")
        out[name] = str(key)
    if "label" not in out and "label" in keys:
        out["label"] = "label"
    return out


def _band_channel_count(info, specs_path: Path) -> Optional[int]:
    """Channels of a GEO-Bench band info: None for a plain 2-D band, ``n_bands`` for a multi-channel one."""
    n = getattr(info, "n_bands", None)
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 < int(n) <= 4096:
        raise ValueError(f"{specs_path}: band {info.name!r} declares n_bands={n!r}")
    return int(n)


def _channels_first(arr: np.ndarray, n_bands: Optional[int], band: str, path: Path) -> np.ndarray:
    """A band array as (channels, H, W): 2-D bands (or (H, W, 1)) give one channel; a multi-channel band is stored
    (H, W, n_bands) by GEO-Bench."""
    if n_bands is None:
        a = arr.squeeze()
        if a.ndim != 2:
            raise ValueError(f"{path}: band '{band}' has shape {arr.shape}; expected a 2-D image")
        return a[None]
    if arr.ndim != 3 or arr.shape[2] != n_bands:
        raise ValueError(f"{path}: band '{band}' has shape {arr.shape}; task_specs.pkl declares {n_bands} channels, "
                         f"stored as (H, W, {n_bands})")
    return arr.transpose(2, 0, 1)


def _stats_file_entry(path: str, band: str, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of `band` from a JSON stats file (see ``GeobenchDataset``)."""
    full = Path(os.path.expanduser(path))
    if not full.is_file():
        raise ValueError(f"multiband_stats {path!r}: expected 'train', 'geobench' or a JSON stats file, and no such "
                         "file exists")
    data = read_json(str(full), "band statistics")
    entry = data.get(band, data) if isinstance(data, dict) else None
    if not isinstance(entry, dict) or "mean" not in entry or "std" not in entry:
        raise ValueError(f"{full}: expected {{'mean': [...], 'std': [...]}} or {{{band!r}: {{'mean', 'std'}}}}")
    mean, std = np.asarray(entry["mean"], np.float64).reshape(-1), np.asarray(entry["std"], np.float64).reshape(-1)
    if mean.size != n or std.size != n:
        raise ValueError(f"{full}: {mean.size} means / {std.size} stds for the {n} channels of band {band!r}")
    return mean, std


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
        raise ValueError(f"{path}: dataset '{name}' has shape {dset.shape}; expected a 2-D image (or an (H, W, "
                         f"channels) cube) of at most {MAX_SAMPLE_PIXELS} values")
    return dset[()]

