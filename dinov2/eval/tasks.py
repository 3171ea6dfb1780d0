"""Evaluation tasks: config assembly (defaults <- task file <- overrides) and the runners for ``knn``,
``classification`` / ``multilabelclassification`` (linear probes) and ``retrieval``.

Each runner writes into its task folder: ``config.yaml`` (resolved), ``results.csv``, ``results_eval_<type>.json``
(all results) and ``plots.png``, and returns ``{metric: value}`` (accuracies etc. in %).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from dinov2.eval import results as res
from dinov2.eval.features import extract_features, resolve_device, select_channels
from dinov2.eval.knn import best_per_metric, run_knn
from dinov2.eval.linear import train_linear_probes, train_linear_probes_online
from dinov2.eval.metrics import build_metrics
from dinov2.eval.retrieval import check_disjoint, resolve_band_subset, retrieval_metrics

logger = logging.getLogger("dinov2")
PKG_EVAL_CFG = Path(__file__).resolve().parent.parent / "configs" / "eval"
DEFAULT_FILES = {"knn": "default_eval_knn.yaml", "classification": "default_eval_linear.yaml",
                 "multilabelclassification": "default_eval_linear_multilabel.yaml",
                 "retrieval": "default_eval_retrieval.yaml", "segmentation": "default_eval_segmentation.yaml",
                 "regression": "default_eval_regression.yaml"}
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
    if task_id not in DEFAULT_FILES:
        raise ValueError(f"{path}: task.id must be one of {sorted(DEFAULT_FILES)}, got {task_id!r}")
    default_path = eval_config_root() / "defaults" / DEFAULT_FILES[task_id]
    if not default_path.is_file():
        default_path = PKG_EVAL_CFG / "defaults" / DEFAULT_FILES[task_id]
    default = OmegaConf.load(default_path)
    check_task_keys(path, task, ov, default)
    for key in REPLACE_NOT_MERGE:  # a band subset replaces the one below it (default <- task <- override) entirely
        if OmegaConf.select(task, key) is not None or OmegaConf.select(ov, key) is not None:
            OmegaConf.update(default, key, None, merge=False)
        if OmegaConf.select(ov, key) is not None and OmegaConf.select(task, key) is not None:
            OmegaConf.update(task, key, None, merge=False)
    cfg = OmegaConf.merge(default, task, ov)
    if not resolve:
        return cfg
    plain = OmegaConf.to_container(cfg, resolve=True)
    for scratch in ("_vars", "_default_augms"):
        plain.pop(scratch, None)
    return OmegaConf.create(plain)


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


def _plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def build_dataset(ds_cfg, seed: int):
    """Dataset from a task dataset config (``{id, transform, subset, <ctor kwargs>}``) via ``make_dataset``."""
    from dinov2.data.loaders import make_dataset

    if ds_cfg is None:
        raise ValueError("Task config lacks a dataset entry")
    return make_dataset(_plain(ds_cfg), seed=seed)


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


def _dl(cfg) -> Dict[str, Any]:
    dl = cfg.get("optim", {}).get("dl", {}) if cfg.get("optim") else {}
    return {"batch_size": int(dl.get("batch_size", 64)), "num_workers": int(dl.get("num_workers", 0))}


def _extract(backbone, ds, specs, cfg, device, desc, x_transform=None):
    dl = _dl(cfg)
    return extract_features(backbone, ds, specs, batch_size=dl["batch_size"], num_workers=dl["num_workers"],
                            device=device, autocast_dtype=cfg.get("autocast_dtype", "auto"),
                            x_transform=x_transform, desc=desc)


def _pct(x: float) -> float:
    return round(float(x) * 100, 2)


def run_knn_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    seed = int(cfg.get("seed", 42))
    b2f = cfg.task.get("backbone_to_features", {})
    spec = (int(b2f.get("use_n_blocks", 1)), str(b2f.get("pooling", "knn")))
    train_ds, test_ds = build_dataset(cfg.train_dataset, seed), build_dataset(cfg.test_dataset, seed)
    ncls = num_classes_of(train_ds, cfg)
    tr_f, tr_y = _extract(backbone, train_ds, [spec], cfg, device, "knn train")
    te_f, te_y = _extract(backbone, test_ds, [spec], cfg, device, "knn test")
    heads = cfg.get("heads", {})
    out = run_knn(tr_f[spec], tr_y, te_f[spec], te_y, build_metrics(_plain(cfg.task.metrics)), ncls,
                  ks=[int(k) for k in heads.get("nb_knn", [20])], temperature=float(heads.get("temperature", 0.07)),
                  multilabel=bool(cfg.task.get("is_multilabel", False)),
                  n_per_class_list=[int(n) for n in heads.get("n_per_class_list", [-1])],
                  n_tries=int(heads.get("n_tries", 1)), seed=seed)
    res.write_json(task_dir / "results_eval_knn.json",
                   {str(k): {m: _pct(v) for m, v in vals.items()} for k, vals in out.items()})
    best = best_per_metric(out)
    rows = [(m, _pct(v), clf) for m, (v, clf) in best.items()]
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"kNN {task_dir.name}",
                  bars={f"{m} {k}": _pct(v) for k, vals in out.items() for m, v in vals.items()})
    return {m: v for m, v, _ in rows}


def _feat_specs(cfg) -> List[Tuple[int, str]]:
    heads = cfg.heads
    return [(int(n), str(p)) for n in heads.n_last_blocks_list for p in heads.pooling]


def run_linear_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    seed = int(cfg.get("seed", 42))
    multilabel = cfg.task.id == "multilabelclassification"
    specs = _feat_specs(cfg)
    train_ds = build_dataset(cfg.train_dataset, seed)
    val_ds = build_dataset(cfg.val_dataset, seed)
    tests_cfg = cfg.get("test_datasets_list") or []
    if not tests_cfg:
        raise ValueError(f"Linear task {task_dir} has no test_datasets_list (results would be empty)")
    ncls = num_classes_of(train_ds, cfg)
    optim = cfg.get("optim", {})
    ft_cfg = _plain(optim.get("finetune")) or {}
    if ft_cfg.get("enabled"):
        out, tuned = _finetune_linear_task(cfg, backbone, train_ds, val_ds, tests_cfg, specs, ncls, multilabel,
                                           device, seed, ft_cfg)
        tests, protocol = out["test"], "fine-tuning (backbone trained with the head)"
    else:
        tuned = None
        feature_cache = bool(optim.get("feature_cache", False))
        # val/test transforms are deterministic: their features are extracted once in both modes
        val = _extract(backbone, val_ds, specs, cfg, device, "linear val")
        tests = {}
        for i, tcfg in enumerate(tests_cfg):
            name = tcfg.get("display_name") or f"test{i}"
            tests[name] = _extract(backbone, build_dataset(tcfg, seed), specs, cfg, device, f"linear {name}")
        dl = _dl(cfg)
        bs = dl["batch_size"]
        iter_per_epoch = float(optim.get("iter_per_epoch", -1) or -1)
        if iter_per_epoch <= 0:
            iter_per_epoch = len(train_ds) / bs
        period = optim.get("eval_period_iter") or int(max(1, float(optim.get("eval_period_epoch", 1))
                                                             * iter_per_epoch))
        common = dict(num_classes=ncls, metrics=build_metrics(_plain(cfg.task.val_metrics)),
                      learning_rates=[float(lr) for lr in cfg.heads.learning_rates],
                      epochs=float(optim.get("epochs", 2)), batch_size=bs, multilabel=multilabel,
                      criterion=(cfg.task.get("criterion_cfg") or {}).get("id"),
                      eval_period_iter=int(period), seed=seed)
        if feature_cache:
            train = _extract(backbone, train_ds, specs, cfg, device, "linear train")
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
            rows.append((m if len(tests) == 1 else f"{name}/{m}", _pct(v), best))
    res.write_json(task_dir / "results_eval_linear.json", {
        "best_classifier": best, "max_iter": out["max_iter"], "protocol": protocol,
        "val": {m: _pct(v) for m, v in out["val"].items()},
        "test": {n: {m: _pct(v) for m, v in vals.items()} for n, vals in out["test"].items()},
        "all_val": {h: {m: _pct(v) for m, v in vals.items()} for h, vals in out["all_val"].items()}})
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


def _finetune_linear_task(cfg, backbone, train_ds, val_ds, tests_cfg, specs, ncls, multilabel, device, seed,
                          ft_cfg):
    """Classification fine-tuning (``optim.finetune.enabled``); see ``dinov2.eval.finetune``."""
    from dinov2.eval.finetune import evaluate_finetuned, finetune_classifier

    lrs = [float(lr) for lr in cfg.heads.learning_rates]
    if len(specs) != 1 or len(lrs) != 1:
        raise ValueError(f"Fine-tuning trains the backbone with one head: set one n_last_blocks_list entry, one "
                         f"pooling and one learning rate (got {specs} and learning_rates={lrs})")
    optim = cfg.optim
    ft = finetune_classifier(backbone, train_ds, specs[0], lrs[0], ncls, multilabel,
                             (cfg.task.get("criterion_cfg") or {}).get("id"), float(optim.get("epochs", 2)),
                             _dl(cfg)["batch_size"], ft_cfg, float(optim.get("warmup_epochs", 0) or 0),
                             float(optim.get("weight_decay", 0.05) or 0.0), _dl(cfg)["num_workers"], seed, device,
                             cfg.get("autocast_dtype", "auto"))
    tuned = ft["backbone"]
    val = _extract(tuned, val_ds, specs, cfg, device, "fine-tuned val")
    tests = {}
    for i, tcfg in enumerate(tests_cfg):
        name = tcfg.get("display_name") or f"test{i}"
        tests[name] = _extract(tuned, build_dataset(tcfg, seed), specs, cfg, device, f"fine-tuned {name}")
    return evaluate_finetuned(ft, val, tests, build_metrics(_plain(cfg.task.val_metrics))), tuned


def run_retrieval_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    seed = int(cfg.get("seed", 42))
    ds = build_dataset(cfg.test_dataset, seed)
    b2f = cfg.task.get("backbone_to_features", {})
    spec = (int(b2f.get("use_n_blocks", 1)), str(b2f.get("pooling", "knn")))
    query_spec, key_spec = _plain(cfg.task.query_bands), _plain(cfg.task.key_bands)
    seen: Dict[Tuple[tuple, tuple], int] = {}  # (query ids, key ids) -> number of samples (mixed sensors)

    def subset(which: str):
        def fn(x):  # one group of samples sharing channel ids
            ids = x["chn_ids"][0]
            idx_a = resolve_band_subset(query_spec, ids, "query_bands")
            idx_b = resolve_band_subset(key_spec, ids, "key_bands")
            check_disjoint(idx_a, idx_b)
            if which == "query":
                flat = ids[..., 0] if ids.ndim == 2 else ids
                pair = (tuple(flat[idx_a].tolist()), tuple(flat[idx_b].tolist()))
                seen[pair] = seen.get(pair, 0) + x["imgs"].shape[0]
            return select_channels(x, idx_a if which == "query" else idx_b)
        return fn

    fa, _ = _extract(backbone, ds, [spec], cfg, device, "retrieval query", subset("query"))
    fb, _ = _extract(backbone, ds, [spec], cfg, device, "retrieval key", subset("key"))
    ks = [int(k) for k in cfg.task.get("ks", [1, 5])]
    out = retrieval_metrics(fa[spec], fb[spec], ks)
    subsets = [{"query_chn_ids": list(q), "key_chn_ids": list(k), "n_samples": n} for (q, k), n in seen.items()]
    res.write_json(task_dir / "results_eval_retrieval.json",
                   dict(out, band_subsets=subsets, chance_recall_at_1=round(100.0 / out["n_samples"], 2)))
    first = subsets[0]
    note = f"query={first['query_chn_ids']} key={first['key_chn_ids']}"
    if len(subsets) > 1:
        note += f" (+{len(subsets) - 1} other sensor band sets)"
    rows = [(m, v, note) for m, v in out.items()]
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"cross-band retrieval {task_dir.name}",
                  bars={m: v for m, v in out.items() if m.startswith("recall@")})
    return dict(out)


def run_segmentation_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    from dinov2.eval.segmentation import run_segmentation_task as run

    return run(cfg, backbone, task_dir, device)


def run_regression_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    from dinov2.eval.regression import run_regression_task as run

    return run(cfg, backbone, task_dir, device)


RUNNERS = {"knn": run_knn_task, "classification": run_linear_task, "multilabelclassification": run_linear_task,
           "retrieval": run_retrieval_task, "segmentation": run_segmentation_task, "regression": run_regression_task}


def run_task(cfg, backbone, task_dir: Path, device: Optional[str] = None) -> Dict[str, float]:
    """Write the resolved config and run the task; returns ``{metric: value}``."""
    from omegaconf import OmegaConf

    task_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, task_dir / "config.yaml")
    torch.manual_seed(int(cfg.get("seed", 42)))
    return RUNNERS[cfg.task.id](cfg, backbone, task_dir, device)
