"""Per-image regression probes (task id ``regression``): linear heads on frozen features.

Features of every (n_last_blocks, pooling) combination are extracted once per split with the split's (eval)
transform; targets are standardised with the train split's mean/std; one linear head per (feature key, lr) is
trained with AdamW on the mean squared error of the standardised targets (all heads on the same mini-batches,
cosine schedule); the head with the lowest validation score (``task.select_on``: ``MSE`` averaged over the
variables, or ``relative_MSE``) is reported on the test split(s). Metrics come from torchmetrics in the targets'
own units: ``MSE``, ``RMSE``, ``MAE`` and ``R2`` (averaged over target variables), and ``relative_MSE``: each
variable's MSE divided by the MSE of predicting the training mean, averaged over the variables -- the score of the
HYPERVIEW challenge (1 = that baseline, lower is better). Per-variable values in ``results_eval_regression.json``.

Regression was not part of the published evaluation engine; the protocol follows its linear probes (frozen
backbone, several blocks/poolings/lrs at once, model selection on validation) on cached features.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dinov2.eval import results as res
from dinov2.eval.registry import register_task
from dinov2.eval.task_common import (build_dataset, dl_settings, extract, feat_specs, plain, require_tests, seed_of,
                                     test_name)

FeatKey = Tuple[int, str]
SELECT_ON = {"MSE": "val_mse", "relative_MSE": "val_relative_mse"}  # validation score that picks the head


def regression_metrics(pred: torch.Tensor, target: torch.Tensor,
                       train_mean: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """torchmetrics MSE / RMSE / MAE / R2 (uniform average over variables) and per-variable lists; with
    ``train_mean`` (the training targets' mean per variable) also ``relative_MSE``: each variable's MSE divided by
    the MSE of predicting ``train_mean``, averaged over the variables (the HYPERVIEW challenge score; 1 = that
    baseline, lower is better)."""
    from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

    pred, target = pred.float().reshape(len(pred), -1), target.float().reshape(len(target), -1)
    if len(target) < 2:
        raise ValueError("Regression metrics need at least 2 samples (R2 is undefined for one)")
    per_mse = [float(mean_squared_error(pred[:, j], target[:, j])) for j in range(target.shape[1])]
    per_mae = [float(mean_absolute_error(pred[:, j], target[:, j])) for j in range(target.shape[1])]
    per_r2 = [float(r2_score(pred[:, j], target[:, j])) for j in range(target.shape[1])]
    out = {"MSE": sum(per_mse) / len(per_mse), "RMSE": sum(math.sqrt(v) for v in per_mse) / len(per_mse),
           "MAE": sum(per_mae) / len(per_mae), "R2": float(r2_score(pred, target, multioutput="uniform_average")),
           "per_variable": {"MSE": per_mse, "MAE": per_mae, "R2": per_r2}}
    if train_mean is not None:
        base = [float(mean_squared_error(train_mean.float().reshape(-1)[j].expand(len(target)),
                                                         target[:, j])) for j in range(target.shape[1])]
        if min(base) <= 0:
            raise ValueError("relative_MSE is undefined: a target variable equals the training mean on every sample")
        mean_relative = [m / b for m, b in zip(per_mse, base)]
        out["relative_MSE"] = sum(mean_relative) / len(mean_relative)
        out["per_variable"].update({"baseline_MSE": base, "relative_MSE": mean_relative})
    return out


def train_regression_heads(train: Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor],
                           val: Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor],
                           lrs: Sequence[float], epochs: float, batch_size: int, seed: int = 0,
                           weight_decay: float = 0.0) -> Dict[str, object]:
    """Train every (feature key, lr) head; returns the heads, the target scaler, validation MSE per head."""
    feats, y = train
    y = y.float().reshape(len(y), -1)
    mu, sd = y.mean(0), y.std(0).clamp_min(1e-8)
    z = (y - mu) / sd
    heads = nn.ModuleDict()
    specs: Dict[str, Tuple[FeatKey, float]] = {}
    for key, f in feats.items():
        for lr in lrs:
            name = f"regressor_{key[0]}_blocks_pooling_{key[1]}_lr_{lr:.5f}".replace(".", "_")
            heads[name] = nn.Linear(f.shape[1], z.shape[1])
            specs[name] = (key, float(lr))
    opt = torch.optim.AdamW([{"params": heads[n].parameters(), "lr": lr, "base_lr": lr}
                             for n, (_, lr) in specs.items()], weight_decay=weight_decay)
    n = len(z)
    per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, int(math.ceil(per_epoch * epochs)))
    gen = torch.Generator().manual_seed(seed)
    it, losses = 0, []
    while it < total:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            if it >= total:
                break
            idx = perm[s:s + batch_size]
            scale = 0.5 * (1 + math.cos(math.pi * it / total))
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            loss = sum(nn.functional.mse_loss(heads[name](feats[key][idx]), z[idx])
                       for name, (key, _) in specs.items())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()) / len(specs))
            it += 1
    vfeats, vy = val
    vy = vy.float().reshape(len(vy), -1)
    with torch.no_grad():
        val_err = {name: ((heads[name](vfeats[key]) * sd + mu) - vy).pow(2).mean(0) for name, (key, _) in specs.items()}
    base = (vy - mu).pow(2).mean(0).clamp_min(1e-12)  # predicting the training mean
    return {"heads": heads, "specs": specs, "mean": mu, "std": sd, "train_loss": losses,
            "val_mse": {n: float(e.mean()) for n, e in val_err.items()},
            "val_relative_mse": {n: float((e / base).mean()) for n, e in val_err.items()}}


@torch.no_grad()
def predict(out: Mapping[str, object], name: str, feats: Mapping[FeatKey, torch.Tensor]) -> torch.Tensor:
    """Predictions of head ``name`` in the targets' units."""
    key = out["specs"][name][0]
    return out["heads"][name](feats[key]) * out["std"] + out["mean"]


@register_task("regression", "default_eval_regression.yaml")
def run_regression_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Eval-CLI runner of ``task.id: regression``."""
    seed = seed_of(cfg)
    specs = feat_specs(cfg)
    tests_cfg = require_tests(cfg, task_dir, "Regression")
    train = extract(backbone, build_dataset(cfg.train_dataset, seed), specs, cfg, device, "regression train")
    val = extract(backbone, build_dataset(cfg.val_dataset, seed), specs, cfg, device, "regression val")
    for what, (_, y) in (("train", train), ("val", val)):
        if y.dtype not in (torch.float32, torch.float64) or y.ndim not in (1, 2):
            raise ValueError(f"{task_dir.name}: regression needs float targets per image, the {what} split gives "
                             f"{y.dtype} of shape {tuple(y.shape)}")
    optim = cfg.get("optim", {})
    out = train_regression_heads(train, val, [float(lr) for lr in cfg.heads.learning_rates],
                                 epochs=float(optim.get("epochs", 100)), batch_size=dl_settings(cfg)["batch_size"],
                                 seed=seed, weight_decay=float(optim.get("weight_decay", 0.0)))
    select_on = str(cfg.task.get("select_on") or "MSE")
    if select_on not in SELECT_ON:
        raise ValueError(f"task.select_on must be one of {list(SELECT_ON)}, got {select_on!r}")
    val_scores = out[SELECT_ON[select_on]]
    best = min(val_scores, key=val_scores.get)
    tests = {}
    for i, tcfg in enumerate(tests_cfg):
        name = test_name(tcfg, i)
        feats, y = extract(backbone, build_dataset(tcfg, seed), specs, cfg, device, f"regression {name}")
        tests[name] = regression_metrics(predict(out, best, feats), y, train_mean=out["mean"])
    rows = []
    for name, vals in tests.items():
        for m in ("relative_MSE", "MSE", "RMSE", "MAE", "R2"):
            rows.append((m if len(tests) == 1 else f"{name}/{m}", round(float(vals[m]), 6), best))
    names = plain(cfg.task.get("target_names")) or None
    res.write_json(task_dir / "results_eval_regression.json", {
        "best_regressor": best, "selected_on": select_on, "target_names": names, "val_mse": out["val_mse"],
        "val_relative_mse": out["val_relative_mse"], "test": tests})
    res.write_json(task_dir / "training_metrics.json", {"train_loss": out["train_loss"]})
    torch.save({"heads": out["heads"].state_dict(), "best_regressor": best, "target_mean": out["mean"],
                "target_std": out["std"]}, task_dir / "model_final.pth")
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"regression {task_dir.name} ({best})",
                  bars={m: v for m, v, _ in rows if not m.endswith("MSE")},
                  curves={"train loss": list(enumerate(out["train_loss"]))})
    return {m: v for m, v, _ in rows}
