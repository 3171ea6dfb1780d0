"""Fixture writers: tiny evaluation datasets in the on-disk layouts of their public releases.

- GEO-Bench v1.0 (``write_geobench_task``): ``<root>/{classification,segmentation}_v1.0/<task>/`` with
  ``task_specs.pkl`` (a pickled ``geobench.task.TaskSpecifications``), ``default_partition.json``,
  ``0.10x_train_partition.json``, ``band_stats.json`` and one ``<sample>.hdf5`` per sample (one dataset per band,
  ``label`` dataset for segmentation, attribute ``pickle`` = ``str(pickle.dumps(attr_dict))``). The pickles
  reference ``geobench.*`` classes exactly as the real files do; they are produced with stand-in modules
  registered in ``sys.modules`` only while dumping.
- RESISC45, BigEarthNet-v2, EuroSAT-SAR: see each writer.

Images carry a class-specific spatial pattern plus small noise, so a frozen random network separates classes.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import sys
import types
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

S2_GEOBENCH_NAMES = ["01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
                     "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge",
                     "09 - Water vapour", "10 - SWIR - Cirrus", "11 - SWIR", "12 - SWIR"]
S2_WAVELENGTHS = [0.443, 0.49, 0.56, 0.665, 0.705, 0.74, 0.783, 0.842, 0.865, 0.945, 1.375, 1.61, 2.19]
SO2SAT_S1_NAMES = ["01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary", "05 - VH.LEE Filtered",
                   "06 - VV.LEE Filtered", "07 - PolSAR.Real", "08 - PolSAR.Imaginary"]
CLOUD = "Cloud Probability"  # GEO-Bench's CloudProbability band (a mask band, no wavelength)
S2_12 = [n for n in S2_GEOBENCH_NAMES if not n.startswith("10 ")]
# The band layout of every GEO-Bench v1.0 task (bands_info of task_specs.pkl, in file order), as its converters
# write them: Sentinel-2 tasks without B10 keep the other 12 in order; m-cashew-plant and m-SA-crop-type append the
# cloud-probability band; m-forestnet holds Landsat-8 red, green, blue, NIR, SWIR1, SWIR2; the aerial tasks RGB
# (+ NIR for m-chesapeake-landcover); m-NeonTree is written by seg_fixtures.write_geobench_neontree.
GEOBENCH_V1_BANDS = {
    "classification_v1.0": {
        "m-bigearthnet": S2_12, "m-brick-kiln": S2_GEOBENCH_NAMES, "m-eurosat": S2_GEOBENCH_NAMES,
        "m-forestnet": ["04 - Red", "03 - Green", "02 - Blue", "05 - NIR", "06 - SWIR1", "07 - SWIR2"],
        "m-pv4ger": ["Red", "Green", "Blue"],
        "m-so2sat": SO2SAT_S1_NAMES + [n for n in S2_GEOBENCH_NAMES if n[:2] in
                                       ("02", "03", "04", "05", "06", "07", "08", "11", "12")]},
    "segmentation_v1.0": {
        "m-cashew-plant": S2_12 + [CLOUD], "m-SA-crop-type": S2_12 + [CLOUD],
        "m-chesapeake-landcover": ["Red", "Green", "Blue", "NearInfrared"], "m-nz-cattle": ["Red", "Green", "Blue"],
        "m-pv4ger-seg": ["Red", "Green", "Blue"],
        "m-NeonTree": ["Red", "Green", "Blue", "Canopy Height Model", "Neon"]},
}
TASK_BANDS = {k: v for bench in GEOBENCH_V1_BANDS.values() for k, v in bench.items()}


# ----------------------------------------------------------------------------------------- GEO-Bench stand-ins
def _make_class(module: str, name: str, fields: Sequence[str]):
    def __init__(self, *args, **kwargs):
        for f, a in zip(fields, args):
            setattr(self, f, a)
        for k, v in kwargs.items():
            setattr(self, k, v)
    cls = type(name, (), {"__init__": __init__, "__module__": module})
    cls.__qualname__ = name
    return cls


_GEOBENCH_LAYOUT = {
    "geobench.dataset": {"BandInfo": ("name", "alt_names", "spatial_resolution"),
                         "SpectralBand": ("name", "alt_names", "spatial_resolution", "wavelength"),
                         "Sentinel1": ("name", "alt_names", "spatial_resolution"),
                         "Sentinel2": ("name", "alt_names", "spatial_resolution", "wavelength"),
                         "Mask": ("name", "alt_names", "spatial_resolution"),
                         "CloudProbability": ("alt_names", "spatial_resolution"),
                         "ElevationBand": ("name", "alt_names", "spatial_resolution"),
                         "HyperSpectralBands": ("name", "alt_names", "spatial_resolution", "n_bands",
                                                "wavelength_range")},
    "geobench.label": {"Classification": ("n_classes", "class_names"),
                       "MultiLabelClassification": ("n_classes", "class_names"),
                       "SegmentationClasses": ("name", "n_classes", "class_names"),
                       "Accuracy": ()},
    "geobench.task": {"TaskSpecifications": ("dataset_name", "benchmark_name", "patch_size", "n_time_steps",
                                             "bands_info", "bands_stats", "label_type", "eval_loss",
                                             "eval_metrics", "spatial_resolution")},
}


@contextlib.contextmanager
def fake_geobench():
    """Temporarily register ``geobench.{dataset,label,task}`` stand-in modules so pickles name the real classes."""
    saved = {k: sys.modules.get(k) for k in ["geobench", *_GEOBENCH_LAYOUT]}
    ns = {"geobench": types.ModuleType("geobench")}
    for mod, classes in _GEOBENCH_LAYOUT.items():
        m = types.ModuleType(mod)
        for name, fields in classes.items():
            setattr(m, name, _make_class(mod, name, fields))
        ns[mod] = m
        setattr(ns["geobench"], mod.split(".")[1], m)
    try:
        sys.modules.update(ns)
        yield ns
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def cloud_band(ds):
    """GEO-Bench's ``CloudProbability`` band info (named "Cloud Probability"; alternative names CPL, CLD)."""
    info = ds.CloudProbability(("CPL", "CLD"), 10.0)
    info.name = CLOUD
    return info


def _pattern(label: int, n_bands: int, size: int, seed: int = 1234) -> np.ndarray:
    return np.random.default_rng(seed + 7919 * int(label)).normal(size=(n_bands, size, size)).astype(np.float32)


def write_geobench_task(root: Path, task: str, n_per_split: Dict[str, int], n_classes: int = 4, size: int = 16,
                        kind: str = "classification", shuffle_labels: bool = False, seed: int = 0,
                        bad_pickle_sample: Optional[str] = None) -> Path:
    """Write a GEO-Bench task folder; returns it. ``kind``: classification | multilabel | segmentation.
    ``bad_pickle_sample``: name of an extra sample (put in the test split) whose attribute pickle references
    ``posix.system``."""
    bench = "segmentation_v1.0" if kind == "segmentation" else "classification_v1.0"
    tdir = Path(root) / bench / task
    tdir.mkdir(parents=True, exist_ok=True)
    names = TASK_BANDS[task]
    rng = np.random.default_rng(seed)
    with fake_geobench() as gb:
        ds, lb, tk = gb["geobench.dataset"], gb["geobench.label"], gb["geobench.task"]
        infos = []
        for i, n in enumerate(names):
            if n in S2_GEOBENCH_NAMES:
                infos.append(ds.Sentinel2(n, (n.split(" - ")[-1],), 10.0, S2_WAVELENGTHS[S2_GEOBENCH_NAMES.index(n)]))
            elif n in SO2SAT_S1_NAMES:
                infos.append(ds.Sentinel1(n, (), 10.0))
            elif n == CLOUD:
                infos.append(cloud_band(ds))
            else:
                infos.append(ds.SpectralBand(n, (n.lower(),), 0.1, None))
        class_names = [f"class_{c}" for c in range(n_classes)]
        label_type = {"classification": lb.Classification, "multilabel": lb.MultiLabelClassification}.get(kind)
        label_type = (label_type(n_classes, class_names) if label_type else
                      lb.SegmentationClasses("label", n_classes, class_names))
        specs = tk.TaskSpecifications(task, bench, (size, size), 1, infos, None, label_type, lb.Accuracy(), None, 10.0)
        (tdir / "task_specs.pkl").write_bytes(pickle.dumps(specs))
        partition: Dict[str, List[str]] = {}
        sums = {n: [] for n in names}
        for split, count in n_per_split.items():
            partition[split] = []
            for j in range(count):
                sname = f"id_{split}_{j:04d}"
                label = int(rng.integers(n_classes))
                shown = int(rng.integers(n_classes)) if shuffle_labels else label
                data = _pattern(label, len(names), size) + 0.05 * rng.normal(size=(len(names), size, size))
                data = (data * 100 + 1000).astype(np.float32)
                for b, n in enumerate(names):
                    sums[n].append(data[b])
                attr_label = shown
                if kind == "multilabel":
                    attr_label = [int(c == shown or c == (shown + 1) % n_classes) for c in range(n_classes)]
                mask = np.full((size, size), shown, dtype=np.int16) if kind == "segmentation" else None
                _write_sample(tdir / f"{sname}.hdf5", names, infos, data, attr_label, mask, ds)
                partition[split].append(sname)
        if bad_pickle_sample:
            import os
            data = np.zeros((len(names), size, size), np.float32)
            _write_sample(tdir / f"{bad_pickle_sample}.hdf5", names, infos, data, 0, None, ds,
                          extra={"evil": os.system})
            partition.setdefault("test", []).append(bad_pickle_sample)
    (tdir / "default_partition.json").write_text(json.dumps(partition))
    small = {k: (v[: max(1, len(v) // 10)] if k == "train" else v) for k, v in partition.items()}
    (tdir / "0.10x_train_partition.json").write_text(json.dumps(small))
    stats = {}
    for n, arrs in sums.items():
        a = np.stack(arrs) if arrs else np.ones((1, 1))
        stats[n] = {"min": float(a.min()), "max": float(a.max()), "mean": float(a.mean()), "std": float(a.std()),
                    "median": float(np.median(a)), "percentile_0.1": float(np.percentile(a, 0.1)),
                    "percentile_1": float(np.percentile(a, 1)), "percentile_99": float(np.percentile(a, 99)),
                    "percentile_99.9": float(np.percentile(a, 99.9))}
    (tdir / "band_stats.json").write_text(json.dumps(stats))
    return tdir


def _write_sample(path: Path, names, infos, data, label, mask, ds, extra=None) -> None:
    import h5py
    from affine import Affine
    from rasterio.crs import CRS

    attr = {}
    crs, transform = CRS.from_epsg(32633), Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)
    with h5py.File(path, "w") as fp:
        for n, info, band in zip(names, infos, data):
            fp.create_dataset(n, data=band)
            attr[n] = {"band_info": info, "date": date(2020, 6, 1), "spatial_resolution": info.spatial_resolution,
                       "transform": transform, "crs": crs, "meta_info": {}, "convert_to_int16": True}
        if mask is not None:
            fp.create_dataset("label", data=mask)
            attr["label"] = {"band_info": ds.Mask("label", (), 10.0), "date": None, "spatial_resolution": 10.0,
                             "transform": None, "crs": None, "meta_info": {}, "convert_to_int16": True}
        else:
            attr["label"] = label
        attr["bands_order"] = list(names)
        attr.update(extra or {})
        fp.attrs["pickle"] = str(pickle.dumps(attr))


# ------------------------------------------------------------------------------------------------ RESISC45
def write_resisc45(root: Path, classes: Sequence[str] = ("airplane", "beach", "forest"), n_per_class: int = 6,
                   size: int = 32, seed: int = 0) -> Path:
    """``<root>/NWPU-RESISC45/<class>/<class>_<nnn>.jpg`` + ``resisc45-{train,val,test}.txt`` (4:1:1 per class)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": [], "test": []}
    for ci, cls in enumerate(classes):
        d = Path(root) / "NWPU-RESISC45" / cls
        d.mkdir(parents=True, exist_ok=True)
        base = _pattern(ci, 3, size)
        for j in range(n_per_class):
            img = np.clip(128 + 40 * base + 3 * rng.normal(size=base.shape), 0, 255).astype(np.uint8)
            name = f"{cls}_{j + 1:03d}.jpg"
            Image.fromarray(img.transpose(1, 2, 0)).save(d / name, quality=95)
            split = "train" if j < n_per_class * 4 // 6 else ("val" if j < n_per_class * 5 // 6 else "test")
            splits[split].append(name)
    for split, names in splits.items():
        (Path(root) / f"resisc45-{split}.txt").write_text("\n".join(names) + "\n")
    return Path(root)


# ------------------------------------------------------------------------------------------ BigEarthNet-v2
BEN_S2_SIZES = {"B01": 20, "B02": 120, "B03": 120, "B04": 120, "B05": 60, "B06": 60, "B07": 60, "B08": 120,
                "B8A": 60, "B09": 20, "B11": 60, "B12": 60}


def _write_tif(path: Path, arr: np.ndarray) -> None:
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    res = 1200.0 / arr.shape[0]
    transform = Affine(res, 0.0, 500000.0, 0.0, -res, 5000000.0)
    with rasterio.open(path, "w", driver="GTiff", height=arr.shape[0], width=arr.shape[1], count=1,
                       dtype=arr.dtype, crs="EPSG:32633", transform=transform) as dst:
        dst.write(arr, 1)


def write_benv2(root: Path, n_per_split: Dict[str, int], vv: float = -10.0, vh: float = -20.0,
                seed: int = 0) -> Path:
    """``metadata.parquet`` + ``BigEarthNet-S1/<tile>/<s1_name>/<s1_name>_{VV,VH}.tif`` (float32 dB, constant
    ``vv`` / ``vh`` so the channel order is testable) + ``BigEarthNet-S2/<tile>/<patch>/<patch>_B??.tif`` (uint16,
    native 10/20/60 m sizes)."""
    import pandas as pd

    from dinov2.data.datasets.benv2 import LABELS_19

    rng = np.random.default_rng(seed)
    rows = []
    k = 0
    for split, count in n_per_split.items():
        for _ in range(count):
            label = int(rng.integers(3))
            pid = f"S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_{26 + k}_{57 + k}"
            s1 = f"S1A_IW_GRDH_1SDV_20170613T165043_33UUP_{61 + k}_{39 + k}"
            k += 1
            s2dir = Path(root) / "BigEarthNet-S2" / "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP" / pid
            for b, sz in BEN_S2_SIZES.items():
                img = 1000 + 300 * _pattern(label, 1, sz)[0] + 5 * rng.normal(size=(sz, sz))
                _write_tif(s2dir / f"{pid}_{b}.tif", np.clip(img, 0, 60000).astype(np.uint16))
            s1dir = Path(root) / "BigEarthNet-S1" / "S1A_IW_GRDH_1SDV_20170613T165043" / s1
            _write_tif(s1dir / f"{s1}_VV.tif", np.full((120, 120), vv, np.float32))
            _write_tif(s1dir / f"{s1}_VH.tif", np.full((120, 120), vh, np.float32))
            rows.append({"patch_id": pid, "labels": [LABELS_19[label], LABELS_19[label + 8]], "split": split,
                         "country": "Austria", "s1_name": s1, "s2v1_name": pid.replace("MSIL2A", "MSIL1C"),
                         "contains_seasonal_snow": False, "contains_cloud_or_shadow": False})
    pd.DataFrame(rows).to_parquet(Path(root) / "metadata.parquet")
    return Path(root)


# ---------------------------------------------------------------------------------------------- EuroSAT-SAR
def write_eurosat_sar(root: Path, n_per_split: Dict[str, int], classes: Sequence[str] = ("Forest", "River",
                      "Industrial"), size: int = 16, seed: int = 0) -> Path:
    """``<root>/<split>.csv`` (filepath, class_name) + ``<class>/<class>_<n>.tif`` 2-band float32 (H,W,2) VV, VH."""
    import pandas as pd
    import tifffile

    rng = np.random.default_rng(seed)
    k = 0
    for split, count in n_per_split.items():
        rows = []
        for _ in range(count):
            ci = int(rng.integers(len(classes)))
            rel = f"{classes[ci]}/{classes[ci]}_{k}.tif"
            k += 1
            img = np.stack([-11.6 + 6 * _pattern(ci, 1, size)[0], -18.5 + 6 * _pattern(ci + 50, 1, size)[0]], -1)
            img = img + 0.05 * rng.normal(size=img.shape)
            (Path(root) / classes[ci]).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(Path(root) / rel, img.astype(np.float32), photometric="minisblack",
                             planarconfig="contig")
            rows.append({"filepath": rel, "class_name": classes[ci]})
        pd.DataFrame(rows).to_csv(Path(root) / f"{split}.csv", index=False)
    return Path(root)


def write_eurosat_sar_release(root: Path, per_class: Dict[str, int], size: int = 8, seed: int = 0) -> Dict[str, list]:
    """The EuroSAT-SAR download as released: only ``<root>/<Class>/<Class>_<n>.tif`` (2-band float32 VV, VH in dB),
    no split files. Returns {class: [relative paths]}."""
    import tifffile

    rng = np.random.default_rng(seed)
    out: Dict[str, list] = {}
    for cls, count in per_class.items():
        (Path(root) / cls).mkdir(parents=True, exist_ok=True)
        out[cls] = []
        for n in range(1, count + 1):
            rel = f"{cls}/{cls}_{n}.tif"
            img = np.stack([-11.6 + 6 * rng.normal(size=(size, size)), -18.5 + 6 * rng.normal(size=(size, size))], -1)
            tifffile.imwrite(Path(root) / rel, img.astype(np.float32), photometric="minisblack", planarconfig="contig")
            out[cls].append(rel)
    return out
