"""Time per epoch of the segmentation probe (frozen backbone, linear + UPerNet-lite heads) and of fine-tuning,
on a GEO-Bench-format segmentation task written to a temporary folder (the test suite's fixture writer).

    python benchmarks/dense_probe.py [--n-train 32] [--size 56] [--epochs 2] [--arch tiny|demo]

``tiny``: the test suite's model (2 blocks, width 32, patch 8); ``demo``: the demo recipe's ViT/14 (6 blocks,
width 192). Prints one row per mode: seconds per epoch (mean over the timed epochs after the first) and images/s.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from seg_fixtures import write_geobench_segmentation  # noqa: E402  (the real GEO-Bench layout)

ARCHS = {
    "tiny": dict(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=8, embed_layer="PanopticonPE",
                 pe_args=dict(attn_dim=32, chnfus_cfg=dict(attn_cfg=dict(num_heads=2))), layerscale=1.0),
    "demo": dict(arch="vit_small", embed_dim=192, depth=6, num_heads=3, patch_size=14, embed_layer="PanopticonPE",
                 pe_args=dict(attn_dim=96, chnfus_cfg=dict(attn_cfg=dict(num_heads=4))), layerscale=0.1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-train", type=int, default=32, help="training images")
    p.add_argument("--size", type=int, default=56, help="image size in pixels")
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode (the first is not timed)")
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    os.environ["PANOPTICON_NO_TQDM"] = "1"
    from omegaconf import OmegaConf

    from dinov2.data.loaders import make_dataset
    from dinov2.eval.segmentation import DenseCollate, DenseProbe, _loader
    from dinov2.models import build_model

    tmp = Path(tempfile.mkdtemp())
    block = ARCHS[args.arch]["patch_size"]
    write_geobench_segmentation(tmp / "gb", "m-cashew-plant", {"train": args.n_train, "valid": 4, "test": 4},
                                size=args.size, block=block)
    os.environ["GEO_BENCH_DIR"] = str(tmp / "gb")
    ds = make_dataset({"id": "geobench.m-cashew-plant", "split": "train"})
    rows = []
    modes = {"frozen, linear head (1 lr)": (False, ["linear"], [1e-3]),
             "frozen, linear + upernet heads (2 lrs each)": (False, ["linear", "upernet"], [1e-3, 1e-2]),
             "fine-tune, linear head": (True, ["linear"], [1e-3])}
    for mode, (ft, decoders, lrs) in modes.items():
        cfg = OmegaConf.create({
            "task": {"id": "segmentation", "ignore_index": 255}, "autocast_dtype": "none",
            "heads": {"n_last_blocks": 2, "decoders": decoders, "learning_rates": lrs, "channels": 64},
            "optim": {"epochs": 1, "warmup_epochs": 0, "weight_decay": 1e-4, "dl": {"batch_size": args.batch_size,
                                                                                     "num_workers": 0},
                      "finetune": {"enabled": ft, "backbone_lr": 1e-4, "layer_decay": 0.75, "drop_path": 0.1}}})
        torch.manual_seed(0)
        vit, _ = build_model(ARCHS[args.arch], only_teacher=True, img_size=args.size)
        probe = DenseProbe(cfg, vit.eval(), 3, "cpu")
        loader = _loader(ds, cfg, DenseCollate(vit.patch_size, 255, augment=True), True, 0)
        times = []
        for _ in range(args.epochs):
            t = time.perf_counter()
            probe.train(loader, 1.0)
            times.append(time.perf_counter() - t)
        per_epoch = sum(times[1:]) / max(1, len(times) - 1)
        rows.append((mode, per_epoch, args.n_train / per_epoch))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; arch {args.arch}, {args.n_train} images of {args.size} px, 12 bands, "
          f"batch {args.batch_size}")
    print(f"| mode | s/epoch | images/s |\n|---|---|---|")
    for mode, s, ips in rows:
        print(f"| {mode} | {s:.2f} | {ips:.1f} |")


if __name__ == "__main__":
    main()
