"""Data throughput: per-sample read time of each pretraining dataset on 128x128 fixture data, and the time of
the pretraining augmentation on one fMoW-like two-view sample. Prints a table (single process, no workers).

    python benchmarks/data_throughput.py [--min-seconds 1.0]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Callable, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import data_fixtures as fx  # noqa: E402  (fixture writers of the test suite: the real on-disk layouts)


def time_calls(fn: Callable[[int], object], n_items: int, min_seconds: float, min_calls: int = 20) -> float:
    """Mean seconds per call of fn(i) cycling over the items, after one warm-up pass."""
    for i in range(n_items):
        fn(i)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn(calls % n_items)
        calls += 1
    return (time.perf_counter() - start) / calls


def describe(sample) -> str:
    views = sample if isinstance(sample, list) else [sample[0]]
    parts = []
    for v in views:
        imgs = v["imgs"] if isinstance(v["imgs"], list) else [v["imgs"]]
        parts.append("+".join(f"{x.shape[0]}x{x.shape[-2]}x{x.shape[-1]}" for x in imgs))
    return " | ".join(parts)


def build_datasets(tmp: str) -> List[Tuple[str, object]]:
    from dinov2.data.datasets.fmow import FmowDataset
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes
    from dinov2.data.datasets.mmearth import MMEarth
    from dinov2.data.datasets.satlas import SatlasDataset
    from dinov2.data.datasets.spectral_earth import SpectralEarthDataset

    ds_root = os.path.join(tmp, "datasets")
    fx.write_fmow(ds_root, n_footprints=4, entries=[("rgb", 128, 128), ("wv23", 128, 128), ("s2", 128, 128)])
    mm = fx.write_mmearth(ds_root, n=5, tile=128)
    sat = fx.write_satlas(ds_root, n=4, s2_size=128, ls_size=64)
    fx.write_spectral_earth(ds_root, n=4, size=128)
    bands_10_20 = [(b, r) for b, r in fx.S2_SCENE_BANDS if r <= 20]  # 1280 m is not a multiple of 60 m
    scene = fx.write_s2_scene(os.path.join(tmp, "scene"), extent_m=3840, bands=bands_10_20)
    return [
        ("FmowDataset (2 views)", FmowDataset("train", root=ds_root, max_crop=128)),
        ("MMEarth (S1+S2)", MMEarth(base_path=mm["base"], remove_nans=False)),
        ("SatlasDataset (2 views)", SatlasDataset(root=os.path.join(ds_root, "satlas"), metadata_path=sat["metadata"])),
        ("SpectralEarthDataset", SpectralEarthDataset(root=ds_root)),
        ("GeoTiffScenes (S2 10+20 m, 1280 m)", GeoTiffScenes([{"sensor": "sentinel2", "files": scene["files"]}],
                                                     patch_size_m=1280, split="all")),
    ]


def main(min_seconds: float = 1.0) -> None:
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ds in build_datasets(tmp):
            sec = time_calls(lambda i: ds[i], len(ds), min_seconds)
            rows.append((name, describe(ds[0]), sec))
    try:
        from dinov2.data.augmentations import PanopticonAugmentation
    except ImportError as e:
        print(f"(augmentation row skipped: {e})")
    else:
        aug = PanopticonAugmentation()
        views = [{"imgs": [torch.randn(8, 256, 256)], "chn_ids": [torch.arange(8, dtype=torch.int16) + 400]},
                 {"imgs": [torch.randn(13, 96, 96)], "chn_ids": [torch.arange(13, dtype=torch.int16) + 900]}]
        sec = time_calls(lambda i: aug(views), 1, min_seconds)
        rows.append(("PanopticonAugmentation (defaults)", describe(views) + " -> 2x224 + 4x98", sec))
    print(f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}")
    print(f"| {'dataset':34s} | {'sample (views: C x H x W per group)':58s} | {'ms/sample':>9s} | {'samples/s':>9s} |")
    print(f"|{'-' * 36}|{'-' * 60}|{'-' * 11}|{'-' * 11}|")
    for name, shape, sec in rows:
        print(f"| {name:34s} | {shape:58s} | {sec * 1e3:9.2f} | {1.0 / sec:9.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum timing duration per row")
    main(parser.parse_args().min_seconds)
