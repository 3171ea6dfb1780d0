"""Eval-CLI runners of ``task.id: classification`` / ``multilabelclassification``: linear probes on a frozen
backbone (``dinov2.eval.linear``) or, with ``optim.finetune.enabled``, fine-tuning with one head
(``dinov2.eval.finetune``). Writes ``results_eval_linear.json``, ``training_metrics.json``, ``model_final.pth``
(the heads), ``results.csv`` and ``plots.png`` into the task folder."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from dinov2.eval import results as res
from dinov2.eval.features import resolve_device
from dinov2.eval.linear import train_linear_probes, train_linear_probes_online
from dinov2.eval.metrics import build_metrics
from dinov2.eval.registry import register_task
from dinov2.eval.task_common import (build_dataset, dl_settings, extract, feat_specs, num_classes_of, pct, plain,
                                     require_tests, seed_of, test_name)


@register_task("classification", "default_eval_linear.yaml")
@register_task("multilabelclassification", "default_eval_linear_multilabel.yaml")
def run_linear_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Train the task's head grid, pick the best head on validation, report it on every test set."""
    seed = seed_of(cfg)
    multilabel = cfg.task.id == "multilabelclassification"
    specs = feat_specs(cfg)
    train_ds = build_dataset(cfg.train_dataset, seed)
    val_ds = build_dataset(cfg.val_dataset, seed)
    tests_cfg = require_tests(cfg, task_dir, "Linear")
    ncls = num_classes_of(train_ds, cfg)
    optim = cfg.get("optim", {})
    ft_cfg = plain(optim.get("finetune")) or {}
    if ft_cfg.get("enabled"):
        out, tuned = _finetune(cfg, backbone, train_ds, val_ds, tests_cfg, specs, ncls, multilabel, device, seed,
                               ft_cfg)
        protocol = "fine-tuning (backbone trained with the head)"
    else:
        tuned = None
        feature_cache = bool(optim.get("feature_cache", False))
        # val/test transforms are deterministic: their features are extracted once in both modes
        val = extract(backbone, val_ds, specs, cfg, device, "linear val")
        tests = {test_name(t, i): extract(backbone, build_dataset(t, seed), specs, cfg, device,
                                          f"linear {test_name(t, i)}") for i, t in enumerate(tests_cfg)}
        dl = dl_settings(cfg)
        bs = dl["batch_size"]
        iter_per_epoch = float(optim.get("iter_per_epoch", -1) or -1)
        if iter_per_epoch <= 0:
            iter_per_epoch = len(train_ds) / bs
        period = optim.get("eval_period_iter") or int(max(1, float(optim.get("eval_period_epoch", 1))
                                                             * iter_per_epoch))
        common = dict(num_classes=ncls, metrics=build_metrics(plain(cfg.task.val_metrics)),
                      learning_rates=[float(lr) for lr in cfg.heads.learning_rates],
                      epochs=float(optim.get("epochs", 2)), batch_size=bs, multilabel=multilabel,
                      criterion=(cfg.task.get("criterion_cfg") or {}).get("id"),
                      eval_period_iter=int(period), seed=seed)
        if feature_cache:
            train = extract(backbone, train_ds, specs, cfg, device, "linear train")
            out = train_linear_probes(train, val, tests, device=str(resolve_device(device)), **common)
        else:
            out = train_linear_probes_online(backbone, train_ds, val, tests, feat_specs=specs,
                                             num_workers=dl["num_workers"], device=device,
                                             autocast_dtype=cfg.get("autocast_dtype", "auto"), **common)
        protocol = "feature_cache (not the published protocol)" if feature_cache else "on-the-fly augmentation"
    best = out["best_classifier"]
    rows = []
    for name, vals in out["test"].items():
        for m, v in vals.items():
            rows.append((m if len(out["test"]) == 1 else f"{name}/{m}", pct(v), best))
    res.write_json(task_dir / "results_eval_linear.json", {
        "best_classifier": best, "max_iter": out["max_iter"], "protocol": protocol,
        "val": {m: pct(v) for m, v in out["val"].items()},
        "test": {n: {m: pct(v) for m, v in vals.items()} for n, vals in out["test"].items()},
        "all_val": {h: {m: pct(v) for m, v in vals.items()} for h, vals in out["all_val"].items()}})
    res.write_json(task_dir / "training_metrics.json", {"train_loss": out["train_loss"],
                                                         "val_curve": out["val_curve"]})
    state = {"heads": out["heads"].state_dict(), "best_classifier": best}
    if tuned is not None:
        state["backbone"] = tuned.backbone.state_dict()
    torch.save(state, task_dir / "model_final.pth")
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"linear {task_dir.name} ({best})",
                  bars={m: v for m, v, _ in rows},
                  curves={"train loss": out["train_loss"], "val best " + next(iter(out["val"])): out["val_curve"]})
    return {m: v for m, v, _ in rows}


def _finetune(cfg, backbone, train_ds, val_ds, tests_cfg, specs, ncls, multilabel, device, seed, ft_cfg):
    """Classification fine-tuning (``optim.finetune.enabled``); see ``dinov2.eval.finetune``."""
    from dinov2.eval.finetune import evaluate_finetuned, finetune_classifier

    lrs = [float(lr) for lr in cfg.heads.learning_rates]
    if len(specs) != 1 or len(lrs) != 1:
        raise ValueError(f"Fine-tuning trains the backbone with one head: set one n_last_blocks_list entry, one "
                         f"pooling and one learning rate (got {specs} and learning_rates={lrs})")
    optim, dl = cfg.optim, dl_settings(cfg)
    ft = finetune_classifier(backbone, train_ds, specs[0], lrs[0], ncls, multilabel,
                             (cfg.task.get("criterion_cfg") or {}).get("id"), float(optim.get("epochs", 2)),
                             dl["batch_size"], ft_cfg, float(optim.get("warmup_epochs", 0) or 0),
                             float(optim.get("weight_decay", 0.05) or 0.0), dl["num_workers"], seed, device,
                             cfg.get("autocast_dtype", "auto"))
    tuned = ft["backbone"]
    val = extract(tuned, val_ds, specs, cfg, device, "fine-tuned val")
    tests = {test_name(t, i): extract(tuned, build_dataset(t, seed), specs, cfg, device,
                                      f"fine-tuned {test_name(t, i)}") for i, t in enumerate(tests_cfg)}
    return evaluate_finetuned(ft, val, tests, build_metrics(plain(cfg.task.val_metrics))), tuned
