"""Side outputs of a training run: W&B (optional, imported lazily), the training-curve plot, evaluation calls."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

from dinov2 import distributed

logger = logging.getLogger("dinov2")

_WANDB_MODES = ("online", "offline", "disabled")


def run_name(output_dir: str) -> str:
    """Experiment name: path relative to $ODIR when the run lives under it, else the folder name."""
    odir = os.environ.get("ODIR")
    out = os.path.abspath(output_dir)
    if odir and out.startswith(os.path.abspath(odir) + os.sep):
        return os.path.relpath(out, odir)
    return os.path.basename(out.rstrip(os.sep))


def init_wandb(cfg, output_dir: str):
    """Start (or resume) a W&B run on the main rank when `train.use_wandb`; returns the run or None.

    `train.wandb_mode`: online | offline | disabled. A missing wandb package only logs a warning."""
    if not bool(cfg.train.get("use_wandb", False)) or not distributed.is_main_process():
        return None
    mode = str(cfg.train.get("wandb_mode", "online"))
    if mode not in _WANDB_MODES:
        raise ValueError(f"train.wandb_mode must be one of {_WANDB_MODES}, got {mode!r}")
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        logger.warning("train.use_wandb is set but wandb is not installed (pip install wandb): not logging to W&B")
        return None
    from omegaconf import OmegaConf

    name = run_name(output_dir)
    run_id = hashlib.sha1(os.path.abspath(output_dir).encode()).hexdigest()[:16]  # same dir -> same run on resume
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "panopticon"), name=name, id=run_id,
                      resume="allow", dir=output_dir, mode=mode,
                      config=OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg))


_PARAM_KEYS = ("lr", "wd", "mom", "teacher_temp", "last_layer_lr")


def log_wandb(run, record: dict, epoch_len: int, batch_size_total: int) -> None:
    """Log one metrics record: `params/*`, `loss/*` and the rest un-prefixed, at step=iteration."""
    if run is None:
        return
    it = int(record["iteration"])
    out = {"iteration": it, "epoch": it // max(epoch_len, 1), "epoch_act": it / max(epoch_len, 1),
           "nsamples": (it + 1) * batch_size_total}
    for k, v in record.items():
        if k in ("iteration",):
            continue
        if k in _PARAM_KEYS:
            out[f"params/{k}"] = v
        elif k.endswith("loss"):
            out[f"loss/{k}"] = v
        else:
            out[k] = v
    run.log(out, step=it)


def read_metrics(path: str) -> list:
    """Records of a `training_metrics.json` (one JSON object per line); a corrupt line names the file."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n} is not valid JSON: {e}") from None
    return records


def plot_training_curve(metrics_file: str, out_png: str) -> Optional[str]:
    """Loss terms (and lr on a second axis) against iteration; returns the png path or None without data."""
    records = read_metrics(metrics_file)
    if not records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib not installed: no training curve plot")
        return None
    its = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    loss_keys = [k for k in records[-1] if k.endswith("loss")]
    for k in sorted(loss_keys, key=lambda k: k != "total_loss"):
        ax.plot(its, [r.get(k, float("nan")) for r in records], label=k, lw=2 if k == "total_loss" else 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if "lr" in records[-1]:
        ax2 = ax.twinx()
        ax2.plot(its, [r.get("lr", float("nan")) for r in records], color="gray", ls="--", label="lr")
        ax2.set_ylabel("lr")
        ax2.legend(loc="upper center", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("training curve")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def eval_configured(cfg) -> bool:
    """True when `eval` asks for evaluation after training (not skipped and a config_obj given)."""
    ev = cfg.get("eval")
    return bool(ev) and not bool(ev.get("skip", False)) and bool(ev.get("config_obj"))


def _eval_kwargs(overwrites) -> dict:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(overwrites):
        overwrites = OmegaConf.to_container(overwrites, resolve=True)
    return flatten_dotted(overwrites or {})


def _log_eval_wandb(run, results: dict, prefix: str, step: Optional[int] = None) -> None:
    if run is None or not results:
        return
    flat = {f"{prefix}{task}/{metric}": v for task, metrics in results.items() for metric, v in metrics.items()}
    run.log(flat, step=step) if step is not None else run.summary.update(flat)


def run_evaluations(cfg, output_dir: str, wandb_run=None) -> dict:
    """Evaluate with `dinov2.eval.eval.main` (imported lazily; called on every rank, it splits tasks over ranks):
    every periodic teacher checkpoint `<out>/eval/<iter>/teacher_checkpoint.pth` with `eval.config_obj`, then
    `<out>/model_final.pth` with `eval.final_model` into `<out>/eval_model_final/`. With `eval.remove_ckpts` the
    teacher checkpoints are deleted once evaluated. Returns `{'periodic': {iter: results}, 'final': results}`."""
    if not eval_configured(cfg):
        return {}
    from dinov2.eval import eval as eval_mod

    ev = cfg.eval
    out = {"periodic": {}, "final": None}
    ckpts = sorted(Path(output_dir, "eval").glob("*/teacher_checkpoint.pth"), key=lambda p: int(p.parent.name))
    for ckpt in ckpts:
        it = int(ckpt.parent.name)
        logger.info("evaluating teacher checkpoint %s with %s", ckpt, ev.config_obj)
        res = eval_mod.main(model_obj=str(ckpt), config_obj=str(ev.config_obj), overwrite=bool(ev.get("overwrite")),
                            **_eval_kwargs(ev.get("overwrites")))
        out["periodic"][it] = res
        _log_eval_wandb(wandb_run, res, "val/", step=it)
        if bool(ev.get("remove_ckpts", False)) and distributed.is_main_process():
            ckpt.unlink()
    final = ev.get("final_model") or {}
    if final.get("config_obj") and os.path.isfile(os.path.join(output_dir, "model_final.pth")):
        logger.info("evaluating %s with %s", output_dir, final.config_obj)
        out["final"] = eval_mod.main(model_obj=output_dir, config_obj=str(final.config_obj),
                                     overwrite=bool(final.get("overwrite", False)),
                                     **_eval_kwargs(final.get("overwrites") or ev.get("overwrites")))
        _log_eval_wandb(wandb_run, out["final"], "final/")
    return out


def flatten_dotted(d: dict, prefix: str = "") -> dict:
    """{'optim': {'dl': {'batch_size': 20}}} -> {'optim.dl.batch_size': 20} (eval.main's override form)."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dotted(v, key + "."))
        else:
            out[key] = v
    return out
