"""Fixture writer: a GEO-Bench v1.0 segmentation task written with the real ``geobench`` package (its band, label,
task, sample and partition classes and its own HDF5 writer), in the layout of its converters for m-cashew-plant /
m-SA-crop-type: the 13 Sentinel-2 bands without B10 (``geobench.sentinel2_13_bands``) plus a
``CloudProbability`` band, a ``SegmentationClasses`` label, ``task_specs.pkl``, ``default_partition.json`` (a link
to ``<name>_partition.json``, as ``Partition.save(as_default=True)`` makes it) and ``band_stats.json`` from
``geobench.compute_dataset_statistics``.

``geobench`` is installed by ``make setup`` without its dependencies (its pins would downgrade pandas and
huggingface-hub); tests that need it skip with that reason when it is missing.
"""
from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

GEOBENCH_REASON = "needs the geobench package (make setup installs it: pip install --no-deps geobench==1.0.0)"


def import_geobench(root: Path):
    """``geobench`` (imported with GEO_BENCH_DIR pointing at ``root``: the package creates that folder on import)."""
    saved = os.environ.get("GEO_BENCH_DIR")
    os.environ["GEO_BENCH_DIR"] = str(root)
    try:
        return pytest.importorskip("geobench", reason=GEOBENCH_REASON)
    finally:
        if saved is None:
            os.environ.pop("GEO_BENCH_DIR", None)
        else:
            os.environ["GEO_BENCH_DIR"] = saved


def write_release_segmentation(root: Path, task: str, n_per_split: Dict[str, int], n_classes: int = 3,
                               size: int = 40, block: int = 8, seed: int = 0) -> Path:
    """Write ``<root>/segmentation_v1.0/<task>/`` with the geobench package; returns the task folder. Pixels: int16
    reflectances whose per-class signature and texture follow a block mask (as tests/seg_fixtures.py), the cloud
    band a probability 0..100 unrelated to the classes."""
    gb = import_geobench(root)
    from affine import Affine
    from rasterio.crs import CRS

    tdir = Path(root) / "segmentation_v1.0" / task
    tdir.mkdir(parents=True, exist_ok=True)
    bands_info = list(gb.sentinel2_13_bands)
    dropped = bands_info.pop(10)
    assert dropped.name == "10 - SWIR - Cirrus"
    bands_info.append(gb.CloudProbability(alt_names=("CPL", "CLD"), spatial_resolution=10))
    label_type = gb.SegmentationClasses("label", spatial_resolution=10, n_classes=n_classes,
                                        class_names=[f"class_{c}" for c in range(n_classes)])
    gb.TaskSpecifications(dataset_name=task, benchmark_name="segmentation_v1.0", patch_size=(size, size),
                          n_time_steps=1, bands_info=bands_info, label_type=label_type,
                          spatial_resolution=10).save(str(tdir), overwrite=True)
    rng = np.random.default_rng(seed)
    signature = rng.normal(size=(n_classes, len(bands_info) - 1)) * 3.0
    texture = rng.normal(size=(n_classes, block, block)) * 3.0
    crs, transform = CRS.from_epsg(32631), Affine(10.0, 0.0, 400000.0, 0.0, -10.0, 1000000.0)
    partition = gb.Partition()
    for split, count in n_per_split.items():
        for j in range(count):
            nb = -(-size // block)
            mask = np.kron(rng.integers(n_classes, size=(nb, nb)), np.ones((block, block), np.int64))[:size, :size]
            yy, xx = np.indices(mask.shape) % block
            spectral = signature[mask].transpose(2, 0, 1) + texture[mask, yy, xx][None]
            spectral = (spectral + 0.1 * rng.normal(size=spectral.shape)) * 100 + 1500
            cloud = rng.integers(0, 101, size=(size, size))
            stack = [*spectral.astype(np.int16), cloud.astype(np.int16)]
            acquired = date(2019, 11, 1 + j % 28)  # one acquisition per sample
            bands = [gb.Band(data=a, band_info=info, spatial_resolution=10, date=acquired, transform=transform,
                             crs=crs) for a, info in zip(stack, bands_info)]
            label = gb.Band(data=mask.astype(np.int16), band_info=label_type, spatial_resolution=10,
                            transform=transform, crs=crs)
            name = f"{task}_{split}_{j:04d}"
            gb.Sample(bands, label=label, sample_name=name).write(str(tdir))
            partition.add(split, name)
    partition.save(str(tdir), "default_geobench", as_default=True)
    dataset = gb.GeobenchDataset(tdir, partition_name="default", split="train")
    _, stats = gb.compute_dataset_statistics(dataset, n_value_per_image=None)
    (tdir / "band_stats.json").write_text(json.dumps({k: v.to_dict() for k, v in stats.items()}, indent=2))
    return tdir
