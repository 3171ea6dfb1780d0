"""`panopticon predict` memory and work-folder disk at two scene sizes: flat memory, disk no more than the outputs.

    python benchmarks/predict_memory.py                        # ViT-B/14 (random weights), 1024 and 2048 px scenes
    python benchmarks/predict_memory.py --model <run folder> --sizes 512 1024 --chip-size 96

For each scene size the script writes a 4-band uint16 GeoTIFF and a random linear segmentation head for the
backbone (a head file in the format a segmentation task writes, with its metadata), then a fresh worker process
(so peak memory is its own) runs `predict_scenes` on it while a thread samples resident memory (/proc) and the
size of the work folder every 0.1 s. Prints a table: chips, seconds, peak and median RSS, RSS before predicting,
peak work-folder bytes, the same per scene pixel, and the outputs' size. Flat memory: peak RSS about equal at both
sizes; work disk: about (1 + 4 x classes) bytes per pixel (the uncompressed class map and probabilities) plus the
COG copy written at the end, whatever the scene size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BANDS = ["B02", "B03", "B04", "B08"]


def _scene(path: str, size: int) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=4, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10), tiled=True,
                       compress="deflate") as dst:
        for r0 in range(0, size, 512):  # written in row blocks: the writer's memory is not the benchmark's
            h = min(512, size - r0)
            yy, xx = np.mgrid[r0:r0 + h, 0:size]
            block = np.stack([1000 + 400 * np.sin(xx / (9 + i)) * np.cos(yy / 13) + rng.normal(0, 40, (h, size))
                              for i in range(4)]).astype("uint16")
            dst.write(block, window=rasterio.windows.Window(0, r0, size, h))


def _head(path: str, model, n_classes: int, chip: int) -> None:
    """A random linear head over the last block, saved as a segmentation task's model_final.pth."""
    import torch

    from dinov2.data.sensors import band_info
    from dinov2.eval.dense_heads import build_dense_head
    from dinov2.utils.digest import state_dict_digest

    torch.manual_seed(0)
    head = build_dense_head("linear", [int(model.embed_dim)], n_classes)
    name = "linear_lr_0_01000"
    torch.save({"heads": {f"{name}.{k}": v for k, v in head.state_dict().items()}, "best_head": name,
                "num_classes": n_classes, "n_last_blocks": 1, "channels": 128, "format_version": 1,
                "bands": BANDS, "chn_ids": [int(band_info("sentinel2", b)["mu"]) for b in BANDS],
                "sensor": "sentinel2", "norm_mean": None, "norm_std": None, "norm_note": "per scene",
                "img_size": chip, "chip_size": chip, "patch_size": int(model.patch_size),
                "embed_dim": int(model.embed_dim), "class_names": [f"class_{k}" for k in range(n_classes)],
                "backbone_digest": state_dict_digest(model)}, path)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:  # renamed or removed while walking
                pass
    return total


def worker(args) -> dict:
    import numpy as np
    import torch

    from dinov2.inference.head import SegmentationHead
    from dinov2.inference.predict import PredictSettings, predict_scenes
    from dinov2.inference.sources import scene_from_raster
    from dinov2.run.embed import load_backbone

    model = load_backbone(args.model, random_init=not os.path.exists(args.model))
    tmp = os.path.dirname(args.tif)
    head_file = os.path.join(tmp, "model_final.pth")
    _head(head_file, model, args.classes, args.chip_size)
    head = SegmentationHead(head_file, model.embed_dim)
    scene = scene_from_raster(args.tif, "sentinel2", BANDS)
    settings = PredictSettings(chip_size=args.chip_size, batch_size=args.batch_size, progress=False)
    out = os.path.join(tmp, "out")
    rss0 = _rss_mb()
    samples, disk, stop = [], [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            samples.append(_rss_mb())
            disk[0] = max(disk[0], _folder_bytes(os.path.join(out, ".predict")))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    outs = predict_scenes([scene], model, head, out, settings, torch.device("cpu"))
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    from dinov2.inference.grid import ChipGrid

    chips = ChipGrid(args.worker, args.worker, args.chip_size, int(round(args.chip_size / 8))).n_chips
    return {"size": args.worker, "chips": chips, "seconds": seconds, "rss_before_mb": rss0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "median_rss_mb": float(np.median(samples)) if samples else float("nan"), "work_peak_bytes": disk[0],
            "outputs_bytes": sum(os.path.getsize(p) for p in outs[0].values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="panopticon_vitb14", help="load_model source (hub names: random weights)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="scene sides in pixels")
    p.add_argument("--chip-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--tif", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0
    rows = []
    for size in args.sizes:
        tif = os.path.join(tempfile.mkdtemp(prefix="predict_bench_"), "scene.tif")
        _scene(tif, size)  # written here so that the worker's peak memory is the prediction's own
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(size), "--tif", tif, "--model", args.model,
               "--chip-size", str(args.chip_size), "--batch-size", str(args.batch_size), "--classes",
               str(args.classes)]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not line:
            raise RuntimeError(f"worker for {size} px failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
    print(f"model {args.model}, chip {args.chip_size} px, batch {args.batch_size}, {args.classes} classes, torch "
          f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| scene px | chips | seconds | peak RSS MB | median RSS MB | RSS before MB | work folder peak MB "
          "| work bytes / pixel | outputs MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']}x{r['size']} | {r['chips']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r['median_rss_mb']:.0f} | {r['rss_before_mb']:.0f} | {r['work_peak_bytes'] / 2**20:.1f} | "
              f"{r['work_peak_bytes'] / r['size'] ** 2:.1f} | {r['outputs_bytes'] / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
