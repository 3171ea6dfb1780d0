"""Time per epoch of the segmentation protocols (``task.protocol: quick`` and ``pangaea``, frozen backbone) and of
fine-tuning, on a GEO-Bench-format segmentation task written to a temporary folder (the test suite's fixture
writer).

    python benchmarks/dense_probe.py [--arch tiny|demo|vitb] [--n-train 32] [--size 256] [--epochs 3]

Each protocol runs with the values of its preset (``configs/eval/defaults/protocols/segmentation_<name>.yaml``:
quick = linear + UPerNet-lite heads at 3 learning rates, images resized to 224 px; pangaea = one UPerNet with pyramid
pooling, width 512, random 224 px crops), except the batch size (``--batch-size``) and, for backbones with fewer
than 12 blocks, PANGAEA's blocks 3/5/7/11 (replaced by 4 evenly spaced blocks). ``tiny``: the test suite's model
(2 blocks, width 32, patch 8); ``demo``: the demo recipe's ViT/14 (6 blocks, width 192); ``vitb``: the released
architecture (ViT-B/14, 12 blocks, width 768) at random initialisation. Prints one row per mode: training seconds
per epoch (mean over the epochs after the first), training images/s, and the seconds to score the 8 validation
images (sliding windows at native resolution for pangaea).
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

_PE = "PanopticonPE"
ARCHS = {
    "tiny": dict(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=8, embed_layer=_PE,
                 pe_args=dict(attn_dim=32, chnfus_cfg=dict(attn_cfg=dict(num_heads=2))), layerscale=1.0),
    "demo": dict(arch="vit_small", embed_dim=192, depth=6, num_heads=3, patch_size=14, embed_layer=_PE,
                 pe_args=dict(attn_dim=96, chnfus_cfg=dict(attn_cfg=dict(num_heads=4))), layerscale=0.1),
    "vitb": dict(arch="vit_base", patch_size=14, embed_layer=_PE,
                 pe_args=dict(attn_dim=2304, chnfus_cfg=dict(layer_norm=False, attn_cfg=dict(num_heads=16))),
                 layerscale=1e-5),
}


def task_cfg(protocol: str, depth: int, batch_size: int, finetune: bool = False):
    """The merged task config of ``protocol`` (defaults <- preset), as the eval CLI builds it."""
    import yaml

    from dinov2.eval.tasks import build_task_cfg

    over = {"task.num_classes": 3, "optim.epochs": 1, "optim.dl.batch_size": batch_size, "optim.dl.num_workers": 0,
            "autocast_dtype": "none"}
    if protocol == "pangaea" and depth < 12:
        over["heads.blocks"] = sorted({max(0, round((k + 1) * depth / 4) - 1) for k in range(4)})
    if finetune:
        over.update({"heads.decoders": ["linear"], "heads.learning_rates": [1e-3], "optim.finetune.enabled": True})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "task.yaml"
        path.write_text(yaml.safe_dump({"task": {"id": "segmentation", "protocol": protocol}}))
        return build_task_cfg(path, over)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--n-train", type=int, default=32, help="training images")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (native resolution)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per mode (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    os.environ["PANOPTICON_NO_TQDM"] = "1"
    from dinov2.data.loaders import make_dataset
    from dinov2.eval.dense_data import CROP, NATIVE, RESIZE, DenseCollate, make_loader
    from dinov2.eval.dense_probe import DenseProbe
    from dinov2.models import build_model

    tmp = Path(tempfile.mkdtemp())
    patch = ARCHS[args.arch]["patch_size"]
    write_geobench_segmentation(tmp / "gb", "m-cashew-plant", {"train": args.n_train, "valid": 8, "test": 4},
                                size=args.size, block=patch)
    os.environ["GEO_BENCH_DIR"] = str(tmp / "gb")
    train = make_dataset({"id": "geobench.m-cashew-plant", "split": "train"})
    val = make_dataset({"id": "geobench.m-cashew-plant", "split": "val"})
    torch.manual_seed(0)
    vit, _ = build_model(ARCHS[args.arch], only_teacher=True, img_size=224)
    rows = []
    for mode, protocol, ft in (("quick (linear + UPerNet-lite, 3 lrs)", "quick", False),
                               ("pangaea (UPerNet + PPM, width 512)", "pangaea", False),
                               ("quick, fine-tune (backbone + linear head)", "quick", True)):
        cfg = task_cfg(protocol, int(vit.n_blocks), args.batch_size, ft)
        probe = DenseProbe(cfg, vit.eval(), 3, "cpu")
        coll = dict(patch_size=patch, ignore_index=255, img_size=cfg.task.img_size)
        train_mode = CROP if cfg.task.train_input == "crop" else RESIZE
        loader = make_loader(train, cfg, DenseCollate(**coll, augment=True, mode=train_mode), True, 0)
        times = []
        for _ in range(args.epochs):
            t = time.perf_counter()
            probe.train(loader, 1.0)
            times.append(time.perf_counter() - t)
        per_epoch = sum(times[1:]) / max(1, len(times) - 1)
        eval_mode = RESIZE if probe.inference == "resize" else NATIVE
        t = time.perf_counter()
        probe.score(make_loader(val, cfg, DenseCollate(**coll, mode=eval_mode), False, 0))
        rows.append((mode, per_epoch, args.n_train / per_epoch, time.perf_counter() - t))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; arch {args.arch}, {args.n_train} train images of {args.size} px, 12 bands, "
          f"batch {args.batch_size}")
    print("| mode | train s/epoch | train images/s | score 8 val images (s) |\n|---|---|---|---|")
    for mode, s, ips, score_s in rows:
        print(f"| {mode} | {s:.2f} | {ips:.1f} | {score_s:.2f} |")


if __name__ == "__main__":
    main()
