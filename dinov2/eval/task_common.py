"""Helpers shared by the task runners (datasets from task configs, loader settings, feature extraction).

Task modules import these from here, never from ``dinov2.eval.tasks`` (which dispatches to them), so the runners
and the dispatcher do not import each other.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from dinov2.eval.features import extract_features


def plain(node) -> Any:
    """An OmegaConf node as plain Python containers (resolved); anything else unchanged."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_dataset(ds_cfg, seed: int):
    """Dataset from a task dataset config (``{id, transform, subset, <ctor kwargs>}``) via ``make_dataset``."""
    from dinov2.data.loaders import make_dataset

    if ds_cfg is None:
        raise ValueError("Task config lacks a dataset entry")
    return make_dataset(plain(ds_cfg), seed=seed)


def num_classes_of(ds, cfg) -> int:
    """``task.num_classes`` if set, else the dataset's (unwrapping Subset / ConcatDataset)."""
    if cfg.task.get("num_classes"):
        return int(cfg.task.num_classes)
    while not hasattr(ds, "num_classes"):
        if hasattr(ds, "dataset"):
            ds = ds.dataset
        elif hasattr(ds, "datasets"):
            ds = ds.datasets[0]
        else:
            raise ValueError(f"Cannot tell the number of classes of {type(ds).__name__}; set task.num_classes")
    return int(ds.num_classes)


def dl_settings(cfg) -> Dict[str, Any]:
    """``{batch_size, num_workers}`` of a task's ``optim.dl`` (64 / 0 when unset)."""
    dl = cfg.get("optim", {}).get("dl", {}) if cfg.get("optim") else {}
    return {"batch_size": int(dl.get("batch_size", 64)), "num_workers": int(dl.get("num_workers", 0))}


def extract(backbone, ds, specs, cfg, device, desc, x_transform=None):
    """Frozen features of ``ds`` for every ``(n_blocks, pooling)`` in ``specs`` with the task's loader settings."""
    dl = dl_settings(cfg)
    return extract_features(backbone, ds, specs, batch_size=dl["batch_size"], num_workers=dl["num_workers"],
                            device=device, autocast_dtype=cfg.get("autocast_dtype", "auto"),
                            x_transform=x_transform, desc=desc)


def feat_specs(cfg) -> List[Tuple[int, str]]:
    """Every ``(n_last_blocks, pooling)`` of the task's head grid."""
    heads = cfg.heads
    return [(int(n), str(p)) for n in heads.n_last_blocks_list for p in heads.pooling]


def test_name(tcfg, i: int) -> str:
    """Display name of test set ``i``."""
    return tcfg.get("display_name") or f"test{i}"


def pct(x: float) -> float:
    return round(float(x) * 100, 2)


def require_tests(cfg, task_dir, kind: str) -> list:
    """The task's ``test_datasets_list``; an error when empty (the results would be empty)."""
    tests = list(cfg.get("test_datasets_list") or [])
    if not tests:
        raise ValueError(f"{kind} task {task_dir} has no test_datasets_list (results would be empty)")
    return tests


def seed_of(cfg) -> int:
    return int(cfg.get("seed", 42))

