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

from eval_fixtures import TASK_BANDS, fake_geobench, _write_sample

SEG_TASK_BANDS = {**TASK_BANDS, "m-pv4ger-seg": ["Red", "Green", "Blue"],
                  "m-chesapeake-landcover": ["Red", "Green", "Blue", "NearInfrared"]}


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
        infos = [ds.SpectralBand(n, (n.lower(),), 10.0, None) for n in names]
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
