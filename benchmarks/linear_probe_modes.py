"""Linear-probe cost of the two protocols on a GEO-Bench-format task: the default on-the-fly mode (fresh
augmentations and a backbone forward every iteration, the published protocol) vs ``optim.feature_cache: true``
(one pass over the train set, heads trained on cached features). Prints a table.

    python benchmarks/linear_probe_modes.py [--epochs 2 8] [--train 128] [--size 64] [--device cpu]

The task is written to a temporary folder with the test suite's GEO-Bench fixture writer (m-eurosat layout,
13 Sentinel-2 bands); the backbone is a randomly initialised small Panopticon ViT; the heads are the shipped
defaults (n_last_blocks [1, 4] x pooling [avgpool, cls] x 16 learning rates = 64 heads).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from eval_fixtures import write_geobench_task  # noqa: E402  (the real GEO-Bench v1.0 on-disk layout)


class CountingBackbone(torch.nn.Module):
    """Counts the images the frozen backbone is run on (to show the work of each mode)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.images = inner, 0

    norm = property(lambda self: self.inner.norm)

    def last_blocks(self, x, n):
        self.images += x["imgs"].shape[0]
        return self.inner.last_blocks(x, n)


def small_backbone(size: int, depth: int, dim: int):
    from dinov2.eval.model_loading import EvalBackbone
    from dinov2.models import build_model

    torch.manual_seed(0)
    cfg = dict(arch="vit_small", embed_dim=dim, depth=depth, num_heads=max(1, dim // 64), patch_size=8,
               embed_layer="PanopticonPE", layerscale=1.0, drop_path_rate=0.0, pos_emb_img_size=size,
               pe_args=dict(attn_dim=dim, chnfus_cfg=dict(attn_cfg=dict(num_heads=max(1, dim // 64)))))
    model, _ = build_model(cfg, only_teacher=True, img_size=size)
    return CountingBackbone(EvalBackbone(model))


def task_cfg(folder: Path, crop: int, epochs: int, batch_size: int, feature_cache: bool, workers: int):
    from dinov2.eval.tasks import build_task_cfg

    gb = lambda split, tf: {"id": "geobench.m-eurosat", "split": split, "transform": tf}  # noqa: E731
    train_tf = [{"id": "RandomResizedCrop", "size": crop, "scale": [0.2, 1.0], "antialias": True},
                {"id": "RandomHVFlip", "p": 0.5}]
    test_tf = [{"id": "Resize", "size": crop}, {"id": "CenterCrop", "size": crop}]
    cfg = {"task": {"id": "classification"}, "train_dataset": gb("train", train_tf),
           "val_dataset": gb("val", test_tf), "test_datasets_list": [gb("test", test_tf)],
           "optim": {"epochs": epochs, "feature_cache": feature_cache,
                     "dl": {"batch_size": batch_size, "num_workers": workers}}}
    path = folder / f"probe_{epochs}_{int(feature_cache)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return build_task_cfg(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 8], help="probe epochs to time")
    ap.add_argument("--train", type=int, default=128, help="train samples (val and test: a quarter each)")
    ap.add_argument("--size", type=int, default=64, help="image size of the fixture (px)")
    ap.add_argument("--crop", type=int, default=56, help="crop size fed to the backbone (px)")
    ap.add_argument("--depth", type=int, default=6, help="ViT depth")
    ap.add_argument("--dim", type=int, default=192, help="ViT embedding dim")
    ap.add_argument("--batch-size", type=int, default=32, help="probe batch size")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    args = ap.parse_args(argv)
    os.environ.setdefault("PANOPTICON_NO_TQDM", "1")

    from dinov2.eval.features import resolve_device
    from dinov2.eval.tasks import run_task

    dev = resolve_device(args.device)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, device {dev}, "
          f"{torch.get_num_threads()} threads; ViT depth {args.depth} dim {args.dim} patch 8, "
          f"{args.crop}px crops of {args.size}px 13-band images, {args.train} train images, "
          f"batch {args.batch_size}, 64 heads")
    rows: List[Dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_p = Path(tmp)
        q = max(1, args.train // 4)
        write_geobench_task(tmp_p / "gb", "m-eurosat", {"train": args.train, "valid": q, "test": q},
                            size=args.size)
        os.environ["GEO_BENCH_DIR"] = str(tmp_p / "gb")
        # warm-up (imports, first-call allocations), not reported
        run_task(task_cfg(tmp_p, args.crop, 1, args.batch_size, True, args.workers),
                 small_backbone(args.crop, args.depth, args.dim), tmp_p / "warmup", device=str(dev))
        for epochs in args.epochs:
            for cache in (False, True):
                cfg = task_cfg(tmp_p, args.crop, epochs, args.batch_size, cache, args.workers)
                backbone = small_backbone(args.crop, args.depth, args.dim)
                torch.manual_seed(0)
                start, cpu_start = time.perf_counter(), time.process_time()
                res = run_task(cfg, backbone, tmp_p / f"out_{epochs}_{int(cache)}", device=str(dev))
                secs, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                rows.append({"mode": "feature_cache" if cache else "on-the-fly (published)", "epochs": epochs,
                             "seconds": secs, "cpu": cpu, "images": backbone.images, "acc": res["acc_top-1_micro"]})
    # CPU seconds of this process are less sensitive than wall time to other jobs sharing the cores
    print("| mode | epochs | wall s | process CPU s | backbone images | test acc_top-1_micro |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['epochs']} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['images']} | "
              f"{r['acc']:.1f} |")
    by = {(r["mode"], r["epochs"]): r for r in rows}
    for e in args.epochs:
        fly, cached = by[("on-the-fly (published)", e)], by[("feature_cache", e)]
        print(f"epochs {e}: on-the-fly / feature_cache = {fly['seconds'] / cached['seconds']:.2f}x wall, "
              f"{fly['cpu'] / cached['cpu']:.2f}x process CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
