"""Semantic segmentation (task id ``segmentation``): dense heads on a frozen (default) or fine-tuned backbone.

Two protocols (``task.protocol``; a task file that names none runs ``quick``):

- ``quick`` — this project's fast CPU probe: the last ``heads.n_last_blocks`` blocks feed every
  (decoder x learning rate) head at once (``linear`` and ``upernet``, the UPerNet-lite); images (and masks, nearest)
  resized to ``task.img_size``; AdamW with warm-up + cosine; scored at the resized label size.
- ``pangaea`` — the frozen-encoder protocol of the PANGAEA benchmark (values in
  ``configs/eval/defaults/protocols/segmentation_pangaea.yaml``, sources in ``docs/evaluation.md``): blocks
  3, 5, 7, 11 (``heads.blocks``), a UPerNet with pyramid pooling (``upernet_ppm``, width 512, dropout 0.1), AdamW lr
  1e-4 / weight decay 0.05, step decay at 60 % and 90 % of the iterations, 80 epochs, batch 8; training on random
  ``img_size`` crops at native resolution; evaluation at the native label resolution with sliding windows.

Either way the backbone runs on every training batch (so random flips and crops are real augmentations); logits
are upsampled bilinearly to the label size; the loss is pixel cross-entropy with ``task.ignore_index``. After
training every head is scored on the validation split; the head with the best validation ``mIoU`` is reported
on the test split(s). Metrics (``dinov2.eval.dense_metrics``): ``mIoU`` (mean over ALL classes, absent ones
count 0), ``mIoU_present_classes`` (over the classes present in the target), ``mF1``, ``mAcc`` / ``pixel_acc``
(overall pixel accuracy), per-class IoU in ``results_eval_segmentation.json``.

Fine-tuning (``optim.finetune.enabled: true``): the backbone trains too, with layer-wise lr decay, stochastic
depth and warm-up; a single decoder and lr must then be configured (they share the backbone's gradients).

Datasets must give no ``transform`` (a transform of the image alone would misalign the mask).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from dinov2.eval import results as res
from dinov2.eval.dense_data import CROP, NATIVE, RESIZE, DenseCollate, check_no_transform, make_loader
from dinov2.eval.dense_metrics import SegMetrics  # noqa: F401  (importable from here, as before)
from dinov2.eval.dense_plot import plot_predictions
from dinov2.eval.dense_probe import (DenseProbe, backbone_maps, backbone_param_groups, head_key,  # noqa: F401
                                     set_drop_path, warmup_cosine)
from dinov2.eval.registry import register_task
from dinov2.eval.task_common import build_dataset, num_classes_of, require_tests, seed_of, test_name

logger = logging.getLogger("dinov2")
REPORTED = ("mIoU", "mIoU_present_classes", "mF1", "mAcc", "pixel_acc")
_loader = make_loader  # former name (benchmarks)


def _pct(d: Dict[str, Any]) -> Dict[str, Any]:
    """Fractions in % (rounded 2); class index lists unchanged."""
    out = {}
    for k, v in d.items():
        if isinstance(v, float):
            out[k] = round(v * 100, 2)
        elif k == "IoU_per_class":
            out[k] = [round(u * 100, 2) for u in v]
        else:
            out[k] = v
    return out


@register_task("segmentation", "default_eval_segmentation.yaml")
def run_segmentation_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Eval-CLI runner of ``task.id: segmentation``; writes results and the trained head(s) into ``task_dir``."""
    seed = seed_of(cfg)
    tests_cfg = require_tests(cfg, task_dir, "Segmentation")
    for key in ("train_dataset", "val_dataset"):
        check_no_transform(cfg.get(key), f"{task_dir.name}: {key}")
    for i, t in enumerate(tests_cfg):
        check_no_transform(t, f"{task_dir.name}: test_datasets_list[{i}]")
    train_ds, val_ds = build_dataset(cfg.train_dataset, seed), build_dataset(cfg.val_dataset, seed)
    ncls = num_classes_of(train_ds, cfg)
    vit = getattr(backbone, "backbone", backbone)
    finetune = bool(((cfg.optim.get("finetune") or {}).get("enabled", False)))
    if finetune:  # never alter the caller's backbone: later tasks evaluate the same model
        vit = copy.deepcopy(vit)
    probe = DenseProbe(cfg, vit, ncls, device)
    img_size = cfg.task.get("img_size")
    coll = dict(patch_size=int(vit.patch_size), ignore_index=probe.ignore_index, img_size=img_size)
    train_mode = CROP if str(cfg.task.get("train_input") or RESIZE) == CROP else RESIZE
    eval_mode = RESIZE if probe.inference == "resize" else NATIVE
    train_dl = make_loader(train_ds, cfg, DenseCollate(**coll, augment=bool(cfg.task.get("augment", True)),
                                                       seed=seed, mode=train_mode), True, seed)
    losses = probe.train(train_dl, float(cfg.optim.get("epochs", 10)))
    val = probe.score(make_loader(val_ds, cfg, DenseCollate(**coll, mode=eval_mode), False, seed))
    best = max(val, key=lambda k: val[k]["mIoU"])
    tests = {}
    for i, tcfg in enumerate(tests_cfg):
        test_dl = make_loader(build_dataset(tcfg, seed), cfg, DenseCollate(**coll, mode=eval_mode), False, seed)
        tests[test_name(tcfg, i)] = probe.score(test_dl, [best])[best]
        if i == 0:
            plot_predictions(task_dir / "predictions.png", probe, best, test_dl,
                             class_names=list(cfg.task.get("class_names") or []) or None)
    rows = [(m if len(tests) == 1 else f"{name}/{m}", round(vals[m] * 100, 2), best)
            for name, vals in tests.items() for m in REPORTED]
    res.write_json(task_dir / "results_eval_segmentation.json", {
        "best_head": best, "finetune": finetune, "protocol": str(cfg.task.get("protocol") or "quick"),
        "inference": probe.inference, "blocks": probe.blocks, "val": _pct(val[best]),
        "test": {n: _pct(v) for n, v in tests.items()}, "all_val": {k: _pct(v) for k, v in val.items()}})
    res.write_json(task_dir / "training_metrics.json", {"train_loss": losses})
    state = {"heads": probe.heads.state_dict(), "best_head": best, "num_classes": ncls,
             "n_last_blocks": probe.n_maps, "ignore_index": probe.ignore_index, "img_size": img_size,
             "decoders": [str(d) for d in cfg.heads.decoders], "learning_rates": list(probe.lrs.values()),
             "channels": int(cfg.heads.get("channels", 128)),
             "class_names": [str(c) for c in (cfg.task.get("class_names") or [])]}
    if not isinstance(probe.blocks, int):
        state["blocks"] = list(probe.blocks)  # 0-based indices of the blocks the head reads (else the last n)
    if finetune:
        state["backbone"] = vit.state_dict()
    from dinov2.eval.head_metadata import head_metadata  # what `panopticon predict` needs (bands, stats, sizes)
    state.update(head_metadata(cfg, train_ds, vit, ncls))
    torch.save(state, task_dir / "model_final.pth")
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"segmentation {task_dir.name} ({best})", bars={m: v for m, v, _ in rows},
                  curves={"train loss": list(enumerate(losses))})
    return {m: v for m, v, _ in rows}
