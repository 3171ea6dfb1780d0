"""GEO-Bench v1.0 tasks (ids ``geobench.<task>``), read WITHOUT the ``geobench`` package.

On-disk layout (``$GEO_BENCH_DIR/{classification,segmentation}_v1.0/<task>/``):
- ``task_specs.pkl``: pickled ``TaskSpecifications`` (band infos in file order, label type with class count);
- ``default_partition.json`` (and ``<name>_partition.json``): ``{"train": [...], "valid": [...], "test": [...]}``
  sample names;
- ``band_stats.json``: ``{band name: {"mean", "std", "min", "max", ...}}``;
- ``<sample>.hdf5``: one dataset per band (named by the band name; segmentation masks in ``label``) and an
  attribute ``pickle`` = ``str(pickle.dumps(attr_dict))`` holding per-band metadata and ``label``.

Pickles are never executed: ``SafeGeobenchUnpickler`` only materialises a short allow-list of GEO-Bench classes
(as plain local records), datetime/numpy array types and a few builtins; anything else raises
``GeobenchPickleError`` naming the class and the file.
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.normalize import BandNormalizer

# GEO-Bench classes that occur in task_specs.pkl and sample attribute pickles (module names under `geobench.` or
# its pre-release name `ccb.`).
KNOWN_GEOBENCH_CLASSES = frozenset({
    "TaskSpecifications", "BandInfo", "SpectralBand", "Sentinel1", "Sentinel2", "Landsat8", "Mask", "Height",
    "ElevationBand", "CloudProbability", "HyperSpectralBands", "MultiBand", "Band", "Classification",
    "MultiLabelClassification", "SegmentationClasses", "Regression", "Accuracy", "MultilabelAccuracy",
    "SegmentationAccuracy", "Stats", "Partition",
})
_GEOBENCH_PACKAGES = ("geobench", "ccb")
_SO2SAT_DEFAULT_KEEP = [0, 2, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]  # VH real, VV real + 10 S2 bands


class GeobenchPickleError(pickle.UnpicklingError):
    """A GEO-Bench pickle referenced a class outside the allow-list."""


class GeobenchRecord:
    """Plain stand-in for a GEO-Bench object: its pickled state becomes attributes; ``geobench_class`` names the
    original class."""

    geobench_class = "GeobenchRecord"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise GeobenchPickleError(f"Unexpected state {type(state).__name__} for {self.geobench_class}")
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{self.geobench_class}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"


_RECORD_TYPES: Dict[str, type] = {}


def _record_type(name: str) -> type:
    if name not in _RECORD_TYPES:
        _RECORD_TYPES[name] = type(name, (GeobenchRecord,), {"geobench_class": name})
    return _RECORD_TYPES[name]


class AffineRecord(tuple):
    """Stand-in for ``affine.Affine`` (a 6/9-tuple of coefficients)."""

    def __new__(cls, *args):
        return tuple.__new__(cls, args)


class CrsRecord(GeobenchRecord):
    """Stand-in for ``rasterio.crs.CRS`` (keeps its pickled state, e.g. ``wkt``)."""

    geobench_class = "CRS"

    def __setstate__(self, state: Any) -> None:  # rasterio pickles a CRS as its WKT string (or a dict)
        self.__dict__["value"] = state


def _crs_from(value: Any) -> CrsRecord:
    rec = CrsRecord()
    rec.__dict__["value"] = value
    return rec


def _safe_reconstructor(cls: type, base: type, state: Any):
    """``copyreg._reconstructor`` restricted to classes this unpickler already vetted."""
    if base is not object:
        raise GeobenchPickleError(f"copyreg._reconstructor with base {base!r} is not allowed")
    return object.__new__(cls)


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles to store bytes; only str -> bytes."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() not in ("latin1", "utf8"):
        raise GeobenchPickleError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode(encoding)


def _numpy_allowed() -> Dict[tuple, Any]:
    """numpy array/scalar reconstruction functions under both their numpy 1.x and 2.x module names."""
    import importlib

    allowed: Dict[tuple, Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy._core", "numpy.core"):  # numpy >= 2 first (numpy.core warns there)
        try:
            multiarray = importlib.import_module(f"{pkg}.multiarray")
            numeric = importlib.import_module(f"{pkg}.numeric")
            break
        except ImportError:
            continue
    for pkg in ("numpy._core", "numpy.core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # protocol-5 arrays
            allowed[(f"{pkg}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "Int16DType", "UInt8DType",
                 "UInt16DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return allowed


class SafeGeobenchUnpickler(pickle.Unpickler):
    """Unpickler that only resolves GEO-Bench records, datetime, numpy arrays and plain builtins."""

    _ALLOWED = {
        ("datetime", "date"): __import__("datetime").date,
        ("datetime", "datetime"): __import__("datetime").datetime,
        ("datetime", "timedelta"): __import__("datetime").timedelta,
        ("datetime", "timezone"): __import__("datetime").timezone,
        ("builtins", "object"): object,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
        ("_codecs", "encode"): _latin1_encode,
        ("affine", "Affine"): AffineRecord,
        ("rasterio.crs", "CRS"): CrsRecord, ("rasterio.crs", "CRS.from_wkt"): _crs_from,
        ("rasterio.crs", "CRS.from_dict"): _crs_from, ("rasterio.crs", "CRS.from_epsg"): _crs_from,
        **_numpy_allowed(),
    }

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 names
        if module.split(".")[0] in _GEOBENCH_PACKAGES and name in KNOWN_GEOBENCH_CLASSES:
            return _record_type(name)
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise GeobenchPickleError(
            f"Refusing to unpickle '{module}.{name}' in {self.source}: only known GEO-Bench classes "
            f"({', '.join(sorted(KNOWN_GEOBENCH_CLASSES))}), datetime and numpy array types are allowed")


def safe_loads(data: bytes, source: str) -> Any:
    """Unpickle GEO-Bench bytes with ``SafeGeobenchUnpickler``; ``source`` names the file in errors."""
    return SafeGeobenchUnpickler(io.BytesIO(data), source).load()


def decode_attr_pickle(raw: Any, source: str) -> Dict[str, Any]:
    """The ``pickle`` HDF5 attribute: ``str(pickle.dumps(d))`` (GEO-Bench) or raw bytes."""
    if isinstance(raw, np.ndarray):
        raw = raw.tobytes()
    if isinstance(raw, np.void):
        raw = raw.tobytes()
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"Attribute 'pickle' of {source} is not a bytes literal: {e}") from e
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"Attribute 'pickle' of {source} has unexpected type {type(raw).__name__}")
    out = safe_loads(bytes(raw), source)
    if not isinstance(out, dict):
        raise ValueError(f"Attribute pickle of {source} is a {type(out).__name__}, expected a dict")
    return out


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
            raise ValueError(f"{ds_name}: task_specs.pkl lists {len(all_bands)} bands {all_bands} but the band YAML "
                             f"has {chn_ids.shape[0]} entries")
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
        with open(path) as f:
            return json.load(f)

    def _load_task_specs(self):
        path = self.task_dir / "task_specs.pkl"
        if not path.is_file():
            raise FileNotFoundError(f"GEO-Bench file missing: {path}")
        specs = safe_loads(path.read_bytes(), str(path))
        if not hasattr(specs, "bands_info"):
            raise ValueError(f"{path} holds {specs!r}, not a TaskSpecifications with bands_info")
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
            raise ValueError(f"{self.task_dir / 'band_stats.json'} has no statistics for bands {missing}")
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
                arrays = [np.asarray(fp[b], dtype=np.float32) for b in self.band_names]
                mask = np.asarray(fp["label"]) if self.is_segmentation and "label" in fp else None
        except OSError as e:
            raise OSError(f"Cannot read GEO-Bench sample {path}: {e}") from e
        imgs = self._stack(arrays, path)
        if self.is_segmentation:
            if mask is None:
                raise ValueError(f"{path}: segmentation sample without a 'label' dataset")
            label = torch.from_numpy(mask.astype(np.int64)).squeeze()
        elif "label" not in attrs:
            raise ValueError(f"{path}: attribute pickle has no 'label'")
        elif self.is_multilabel:
            label = torch.as_tensor(np.asarray(attrs["label"], dtype=np.float32))
            if label.shape != (self.num_classes,):
                raise ValueError(f"{path}: multilabel label shape {tuple(label.shape)} != ({self.num_classes},)")
        else:
            label = int(attrs["label"])
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

