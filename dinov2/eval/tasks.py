"""Evaluation tasks: config assembly (defaults <- task file <- overrides) and dispatch to the task type's runner.

Task types live in their own modules and register themselves in ``dinov2.eval.registry`` (``knn``,
``classification`` / ``multilabelclassification``, ``retrieval``, ``segmentation``, ``regression``). Each runner
writes into its task folder: ``config.yaml`` (resolved), ``results.csv``, ``results_eval_<type>.json`` (all
results) and ``plots.png``, and returns ``{metric: value}`` (accuracies etc. in %).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from dinov2.eval.registry import task_type
from dinov2.eval.task_common import build_dataset, num_classes_of  # noqa: F401  (their former home)

logger = logging.getLogger("dinov2")
PKG_EVAL_CFG = Path(__file__).resolve().parent.parent / "configs" / "eval"
REPLACE_NOT_MERGE = ("task.query_bands", "task.key_bands")


def eval_config_root() -> Path:
    """``$CDIR/eval`` when it exists, else the package's ``dinov2/configs/eval``."""
    cdir = os.environ.get("CDIR")
    if cdir and (Path(os.path.expandvars(cdir)) / "eval").is_dir():
        return Path(os.path.expandvars(cdir)) / "eval"
    return PKG_EVAL_CFG


def dotted_to_nested(overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """``{'optim.epochs': 1}`` -> ``{'optim': {'epochs': 1}}``."""
    out: Dict[str, Any] = {}
    for key, value in overrides.items():
        node = out
        parts = str(key).split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"Override {key!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def build_task_cfg(path: Path, overrides: Optional[Mapping[str, Any]] = None, resolve: bool = True):
    """Merge default <- task file <- overrides and resolve interpolations (task files may use ``_vars`` and
    ``${_default_augms.*}``); ``_vars``/``_default_augms`` are dropped from the result. ``resolve=False`` returns
    the merge as written (scratch keys and interpolations kept; mandatory ``???`` values may be missing)."""
    from omegaconf import OmegaConf

    task = OmegaConf.load(path)
    ov = OmegaConf.create(dotted_to_nested(overrides or {}))
    task_id = OmegaConf.select(ov, "task.id") or OmegaConf.select(task, "task.id")
    try:
        defaults = task_type(str(task_id)).defaults
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    default_path = eval_config_root() / "defaults" / defaults
    if not default_path.is_file():
        default_path = PKG_EVAL_CFG / "defaults" / defaults
    default = OmegaConf.load(default_path)
    check_task_keys(path, task, ov, default)
    preset = protocol_preset(default, task, ov, path)
    for key in REPLACE_NOT_MERGE:  # a band subset replaces the one below it (default <- task <- override) entirely
        if OmegaConf.select(task, key) is not None or OmegaConf.select(ov, key) is not None:
            OmegaConf.update(default, key, None, merge=False)
        if OmegaConf.select(ov, key) is not None and OmegaConf.select(task, key) is not None:
            OmegaConf.update(task, key, None, merge=False)
    cfg = OmegaConf.merge(default, preset, task, ov)
    if not resolve:
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    for scratch in ("_vars", "_default_augms"):
        plain.pop(scratch, None)
    return OmegaConf.create(plain)


def protocol_preset(default, task, overrides, path: Path):
    """The values of the task's protocol (``task.protocol``, for task types whose defaults declare one):
    ``defaults/protocols/<task id>_<protocol>.yaml``, merged between the defaults and the task file."""
    from omegaconf import OmegaConf

    from dinov2.utils.config_schema import EVAL_FREE_FORM, find_unknown_keys, raise_if_problems

    if OmegaConf.select(default, "task.protocol") is None:
        return OmegaConf.create({})
    protocol = next(str(v) for v in (OmegaConf.select(overrides, "task.protocol"),
                                     OmegaConf.select(task, "task.protocol"),
                                     OmegaConf.select(default, "task.protocol")) if v is not None)
    task_id = str(OmegaConf.select(default, "task.id"))
    folder = _defaults_dir() / "protocols"
    file = folder / f"{task_id}_{protocol}.yaml"
    if not file.is_file():
        known = sorted(p.stem[len(task_id) + 1:] for p in folder.glob(f"{task_id}_*.yaml"))
        raise ValueError(f"{path}: task.protocol={protocol!r} is not a {task_id} protocol; choose from {known}")
    preset = OmegaConf.load(file)
    raise_if_problems(find_unknown_keys(OmegaConf.to_container(preset, resolve=False),
                                        OmegaConf.to_container(default, resolve=False), str(file),
                                        free_form=EVAL_FREE_FORM), "evaluation protocol preset")
    return preset


def _defaults_dir() -> Path:
    root = eval_config_root() / "defaults"
    return root if root.is_dir() else PKG_EVAL_CFG / "defaults"


def check_task_keys(path: Path, task, overrides, default) -> None:
    """Every key of the task file must be declared in its task type's defaults file, every override key in one
    of the defaults files (a suite-wide override may target one task type), except in `EVAL_FREE_FORM`
    sections; otherwise a ConfigError (ValueError) names the file, the key and the closest declared key."""
    from omegaconf import OmegaConf

    from dinov2.utils.config_schema import EVAL_FREE_FORM, eval_override_problems, find_unknown_keys, \
        raise_if_problems

    plain = lambda node: OmegaConf.to_container(node, resolve=False)  # noqa: E731
    problems = find_unknown_keys(plain(task), plain(default), f"{path}", free_form=EVAL_FREE_FORM)
    problems += eval_override_problems(plain(overrides), _defaults_dir(), "eval override")
    raise_if_problems(problems, "evaluation task config",
                      hint=f"new keys are declared with their default in {_defaults_dir()}/default_eval_*.yaml")


def run_task(cfg, backbone, task_dir: Path, device: Optional[str] = None) -> Dict[str, float]:
    """Write the resolved config and run the task; returns ``{metric: value}``."""
    from omegaconf import OmegaConf

    task_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, task_dir / "config.yaml")
    torch.manual_seed(int(cfg.get("seed", 42)))
    return task_type(str(cfg.task.id)).runner(cfg, backbone, task_dir, device)
