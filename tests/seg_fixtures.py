"""Fixture writer: a GEO-Bench v1.0 segmentation task (``segmentation_v1.0/<task>/``) whose masks have spatial
structure: each ``block`` x ``block`` tile of an image belongs to one class, and every class has its own spectral
signature and its own texture inside the tile (plus noise), so a per-patch classifier on the features of even a
random network can recover the mask when ``block`` equals the patch size."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from eval_fixtures import CLOUD, TASK_BANDS, cloud_band, fake_geobench, _write_sample

SEG_TASK_BANDS = TASK_BANDS


def block_mask(rng: np.random.Generator, size: int, block: int, n_classes: int) -> np.ndarray:
    """A (size, size) int16 mask made of block x block tiles of random classes."""
    nb = -(-size // block)
    tiles = rng.integers(n_classes, size=(nb, nb))
    return np.kron(tiles, np.ones((block, block), dtype=np.int64))[:size, :size].astype(np.int16)


def write_geobench_segmentation(root: Path, task: str, n_per_split: Dict[str, int], n_classes: int = 3,
                                size: int = 32, block: int = 8, seed: int = 0, noise: float = 0.1,
                                bands: Optional[Sequence[str]] = None) -> Path:
    """Write ``<root>/segmentation_v1.0/<task>/``; returns the task folder. Sample names ``id_<split>_<j>``."""
    tdir = Path(root) / "segmentation_v1.0" / task
    tdir.mkdir(parents=True, exist_ok=True)
    names = list(bands or SEG_TASK_BANDS[task])
    rng = np.random.default_rng(seed)
    signature = rng.normal(size=(n_classes, len(names))) * 3.0  # class -> per-band mean
    texture = rng.normal(size=(n_classes, block, block)) * 3.0  # class -> pattern inside a tile
    with fake_geobench() as gb:
        ds, lb, tk = gb["geobench.dataset"], gb["geobench.label"], gb["geobench.task"]
        infos = [cloud_band(ds) if n == CLOUD else ds.SpectralBand(n, (n.lower(),), 10.0, None) for n in names]
        label_type = lb.SegmentationClasses("label", n_classes, [f"class_{c}" for c in range(n_classes)])
        specs = tk.TaskSpecifications(task, "segmentation_v1.0", (size, size), 1, infos, None, label_type,
                                      lb.Accuracy(), None, 10.0)
        (tdir / "task_specs.pkl").write_bytes(pickle.dumps(specs))
        partition: Dict[str, List[str]] = {}
        sums: Dict[str, List[np.ndarray]] = {n: [] for n in names}
        for split, count in n_per_split.items():
            partition[split] = []
            for j in range(count):
                sname = f"id_{split}_{j:04d}"
                mask = block_mask(rng, size, block, n_classes)
                cls = mask.astype(np.int64)
                yy, xx = np.indices(mask.shape) % block
                data = signature[cls].transpose(2, 0, 1) + texture[cls, yy, xx][None]
                data = (data + noise * rng.normal(size=data.shape)) * 100 + 1000
                data = data.astype(np.float32)
                for b, n in enumerate(names):
                    sums[n].append(data[b])
                _write_sample(tdir / f"{sname}.hdf5", names, infos, data, None, mask, ds)
                partition[split].append(sname)
    (tdir / "default_partition.json").write_text(json.dumps(partition))
    stats = {n: {"mean": float(np.mean(a)), "std": float(np.std(a))} for n, a in sums.items()}
    (tdir / "band_stats.json").write_text(json.dumps(stats))
    return tdir


NEON_HS_CHANNELS = 369


def write_geobench_neontree(root: Path, n_per_split: Dict[str, int], size: int = 40, scale: int = 10,
                            n_hs: int = NEON_HS_CHANNELS, seed: int = 0,
                            bad_cube_sample: Optional[str] = None) -> Path:
    """``<root>/segmentation_v1.0/m-NeonTree/`` as GEO-Bench's converter writes it: bands Red, Green, Blue (size^2,
    0.1 m), "Canopy Height Model" (ElevationBand, (size/scale)^2 x 1) and "Neon" (HyperSpectralBands with
    ``n_bands`` channels, stored (size/scale, size/scale, n_bands) at 1 m), a 2-class ``label`` mask and a
    ``band_stats.json`` with one scalar entry per band name (the cube's entry pools all channels). Hyperspectral
    channel k has its own offset (~200 k) and spread, so per-channel statistics differ from the pooled ones.
    ``bad_cube_sample``: an extra test sample whose cube has one channel too few."""
    tdir = Path(root) / "segmentation_v1.0" / "m-NeonTree"
    tdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    small = size // scale
    offsets = 200.0 * np.arange(n_hs) + 500.0
    spreads = 20.0 + 5.0 * (np.arange(n_hs) % 7)
    with fake_geobench() as gb:
        ds, lb, tk = gb["geobench.dataset"], gb["geobench.label"], gb["geobench.task"]
        rgb = [ds.SpectralBand(n, (n.lower(),), 0.1, w) for n, w in (("Red", 0.665), ("Green", 0.56),
                                                                      ("Blue", 0.49))]
        chm = ds.ElevationBand("Canopy Height Model", ("lidar", "CHM"), 0.1)
        neon = ds.HyperSpectralBands("Neon", (), 1, n_hs, None)
        infos = rgb + [chm, neon]
        label_type = lb.SegmentationClasses("label", 2, ["no tree", "tree"])
        specs = tk.TaskSpecifications("NeonTree_segmentation", "segmentation_v1.0", (size, size), 1, infos, None,
                                      label_type, lb.Accuracy(), None, 0.1)
        (tdir / "task_specs.pkl").write_bytes(pickle.dumps(specs))
        partition: Dict[str, List[str]] = {}
        pooled: Dict[str, List[np.ndarray]] = {"Red": [], "Green": [], "Blue": [], "Canopy Height Model": [],
                                               "Neon": []}
        names = [s for s, c in n_per_split.items() for _ in range(c)]
        if bad_cube_sample:
            names.append("bad")
        for j, split in enumerate(names):
            sname = bad_cube_sample if split == "bad" else f"id_{split}_{j:04d}"
            partition.setdefault("test" if split == "bad" else split, []).append(sname)
            mask = block_mask(rng, size, scale, 2)
            trees = mask.reshape(small, scale, small, scale).mean((1, 3))  # tree fraction per 1 m pixel
            bands = {n: (rng.normal(800, 60, (size, size)) + 300 * mask).astype(np.int16)
                     for n in ("Red", "Green", "Blue")}
            bands["Canopy Height Model"] = (rng.normal(2, 0.5, (small, small, 1)) + 15 * trees[..., None]) \
                .astype(np.int16)
            k = n_hs - 1 if split == "bad" else n_hs
            cube = offsets[:k] + spreads[:k] * rng.normal(size=(small, small, k)) + 100 * trees[..., None]
            bands["Neon"] = cube.astype(np.int16)
            if split != "bad":  # band_stats.json covers the well-formed samples only
                for n, a in bands.items():
                    pooled[n].append(a.astype(np.float64).reshape(-1))
            _write_multiband_sample(tdir / f"{sname}.hdf5", infos, bands, mask, ds)
    (tdir / "default_partition.json").write_text(json.dumps(partition))
    stats = {n: {"mean": float(np.mean(np.concatenate(a))), "std": float(np.std(np.concatenate(a)))}
             for n, a in pooled.items()}
    (tdir / "band_stats.json").write_text(json.dumps(stats))
    return tdir


def _write_multiband_sample(path: Path, infos, bands: Dict[str, np.ndarray], mask: np.ndarray, ds) -> None:
    """One sample file as GEO-Bench's ``write_sample_hdf5`` lays it out (bands in task order, then ``label``)."""
    import h5py
    from datetime import date

    attr = {}
    with h5py.File(path, "w") as fp:
        for info in infos:
            fp.create_dataset(info.name, data=bands[info.name])
            attr[info.name] = {"band_info": info, "date": date(2018, 7, 1), "spatial_resolution":
                               info.spatial_resolution, "transform": None, "crs": None, "meta_info": None}
        fp.create_dataset("label", data=mask)
        attr["label"] = {"band_info": ds.Mask("label", (), 0.1), "date": None, "spatial_resolution": 0.1,
                         "transform": None, "crs": None, "meta_info": None}
        attr["bands_order"] = [i.name for i in infos] + ["label"]
        fp.attrs["pickle"] = str(pickle.dumps(attr))
