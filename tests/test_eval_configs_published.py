"""Every published evaluation task ships at the same path with the published protocol values -- task type,
metrics, epochs, batch size, datasets with their splits, subsets, shard urls and transforms (channel selections
included), kNN k lists and head grids -- checked value by value against the published files as typed in
tests/published_eval_configs.py. The only differences are those in DIFFERENCES, each explained in
docs/differences.md."""
import re

import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf
from published_eval_configs import PUBLISHED_EVAL_DEFAULTS, PUBLISHED_EVAL_TASKS
from published_tables import PUBLISHED_WANDB_GROUPS

from dinov2.eval.knn import few_shot_ks, run_knn
from dinov2.eval.metrics import build_metrics
from dinov2.eval.tasks import build_task_cfg

EVAL = ROOT / "dinov2" / "configs" / "eval"
GB = "1h/geobench/"
DEFAULT_OF = {"knn": "default_eval_knn", "classification": "default_eval_linear",
              "multilabelclassification": "default_eval_linear_multilabel"}
ADDED = {"5min/m-eurosat_retrieval", "demo/retrieval_interleaved_bands", "demo/retrieval_visible_vs_infrared"}
# dense and regression tasks (not part of the published evaluation; checked in test_segmentation.py)
DENSE_ADDED = {"demo_dense/landcover_from_visible", "1h/hyperview/soil", GB + "cashew-plant-seg",
               GB + "sa-crop-type-seg", GB + "pv4ger-seg", GB + "chesapeake-landcover-seg", GB + "nz-cattle-seg",
               GB + "neontree-seg"}
# (task, compared key) -> the phrase of docs/differences.md that explains the difference
_S2_SELECT = "channels are selected by wavelength"
DIFFERENCES = {
    ("1h/resisc45_lin", "val_dataset[0].transform"): "RESISC45 linear probe",
    ("1h/resisc45_lin", "test_datasets_list"): "RESISC45 linear probe",
    ("15min/sim/corine-s2", "train_dataset[0].transform"): _S2_SELECT,
    ("15min/sim/corine-s2", "val_dataset[0].transform"): _S2_SELECT,
    ("15min/sim/corine-s2", "test_datasets_list[0].transform"): _S2_SELECT,
}
_RATE_METRICS = ("MulticlassAccuracy", "MultilabelAccuracy")


def _unflatten(flat: dict) -> dict:
    """``{'a.b[0].c': v}`` -> nested dicts and lists; ``${env:X}`` (an older OmegaConf resolver) -> ``${oc.env:X}``."""
    out: dict = {}
    for key, value in flat.items():
        if isinstance(value, str):
            value = value.replace("${env:", "${oc.env:")
        parts = [int(p) if p.isdigit() else p for p in re.findall(r"[^.\[\]]+", key)]
        node = out
        for p, nxt in zip(parts[:-1], parts[1:]):
            if isinstance(node, list):
                while len(node) <= p:
                    node.append(None)
                node[p] = node[p] if node[p] is not None else ([] if isinstance(nxt, int) else {})
                node = node[p]
            else:
                node = node.setdefault(p, [] if isinstance(nxt, int) else {})
        if isinstance(node, list):
            while len(node) <= parts[-1]:
                node.append(None)
        node[parts[-1]] = value
    return out


def published_cfg(rel: str) -> dict:
    task = _unflatten(PUBLISHED_EVAL_TASKS[rel])
    default = _unflatten(PUBLISHED_EVAL_DEFAULTS[DEFAULT_OF[task["task"]["id"]]])
    return OmegaConf.to_container(OmegaConf.merge(default, task), resolve=True)


def shipped_cfg(rel: str) -> dict:
    return OmegaConf.to_container(build_task_cfg(EVAL / f"{rel}.yaml"))


def _flat_transforms(t) -> list:
    if t is None:
        return []
    if isinstance(t, dict):
        return [t]
    return [d for item in t for d in _flat_transforms(item)]


def _metric(m: dict) -> tuple:
    default_avg = "micro" if m["id"] in _RATE_METRICS else "macro"
    return m["id"], m.get("top_k", 1) if m["id"] in _RATE_METRICS else None, m.get("average", default_avg)


def _dataset(d: dict) -> dict:
    extra = {k: d[k] for k in ("task_dir", "return_multilabel") if k in d}
    return {"id": d["id"], "split": d.get("split"), "subset": d.get("subset", -1), "url": d.get("url"),
            "full_spectra": d.get("full_spectra", False), "transform": _flat_transforms(d.get("transform")), **extra}


def view(cfg: dict) -> dict:
    """What decides a task's numbers, flattened to ``{key: value}``."""
    task, kind, heads = cfg["task"], cfg["task"]["id"], cfg.get("heads") or {}
    out = {"task.id": kind, "metrics": [_metric(m) for m in task["metrics" if kind == "knn" else "val_metrics"]],
           "optim.dl.batch_size": cfg["optim"]["dl"]["batch_size"]}
    if kind == "knn":
        roles = ("train_dataset", "test_dataset")
        out.update({f"heads.{k}": heads[k] for k in ("nb_knn", "temperature", "n_per_class_list", "n_tries")})
        out.update({"task.is_multilabel": task["is_multilabel"], "task.backbone_to_features":
                    task["backbone_to_features"]})
    else:
        roles = ("train_dataset", "val_dataset", "test_datasets_list")
        out.update({"optim.epochs": cfg["optim"]["epochs"], "criterion": task["criterion_cfg"]["id"],
                    "heads.n_last_blocks_list": heads["n_last_blocks_list"], "heads.pooling": heads["pooling"],
                    "heads.learning_rates": [float(lr) for lr in heads["learning_rates"]]})
    for role in roles:
        items = cfg.get(role) or []
        items = items if isinstance(items, list) else [items]
        out[role] = len(items)
        for i, d in enumerate(items):
            out.update({f"{role}[{i}].{k}": v for k, v in _dataset(d).items()})
    return out


@pytest.fixture(autouse=True)
def _rdir(monkeypatch):
    monkeypatch.setenv("RDIR", "$RDIR")  # published paths resolve to the spelling of the shipped ones


def test_every_shipped_task_is_published_or_listed():
    shipped = {str(p.relative_to(EVAL).with_suffix("")) for p in EVAL.rglob("*.yaml")
               if p.relative_to(EVAL).parts[0] != "defaults"}
    assert set(PUBLISHED_EVAL_TASKS) <= shipped, "published tasks missing at their path"
    assert shipped == set(PUBLISHED_EVAL_TASKS) | ADDED | DENSE_ADDED


@pytest.mark.parametrize("rel", sorted(PUBLISHED_EVAL_TASKS))
def test_shipped_task_has_the_published_values(rel):
    ours, theirs = view(shipped_cfg(rel)), view(published_cfg(rel))
    differ = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    listed = {k for (task, k) in DIFFERENCES if task == rel}
    unexplained = {k: (ours.get(k), theirs.get(k)) for k in differ if not any(k.startswith(d) for d in listed)}
    assert not unexplained, f"{rel}: differs from the published config (ours, published): {unexplained}"
    stale = {d for d in listed if not any(k.startswith(d) for k in differ)}
    assert not stale, f"{rel}: listed differences that no longer differ: {stale}"


def test_listed_differences_are_explained_in_the_docs():
    doc = (ROOT / "docs" / "differences.md").read_text()
    assert all(phrase in doc for phrase in DIFFERENCES.values())


def test_values_the_issue_named():
    """The batch sizes, the RESISC45 validation subset and the BENv2 shard subsets, as published."""
    sizes = {t: shipped_cfg(GB + t)["optim"]["dl"]["batch_size"] for t in
             ("ben-10", "brick-kiln", "eurosat", "forestnet", "pv4ger", "so2sat")}
    assert sizes == {"ben-10": 400, "brick-kiln": 300, "eurosat": 200, "forestnet": 600, "pv4ger": 600,
                     "so2sat": 200}
    resisc = shipped_cfg("1h/resisc45_lin")
    assert resisc["optim"]["dl"]["batch_size"] == 200 and resisc["val_dataset"]["subset"] == 0.1
    benv2 = shipped_cfg("15min/saropt/benv2-opt")
    assert benv2["train_dataset"]["id"] == "benv2_webdataset" and benv2["train_dataset"]["subset"] == 0.1
    assert benv2["train_dataset"]["url"] == "$RDIR/datasets/benv2/wds/train-s2/dataset-*.tar"


def test_published_wandb_groups_as_published():
    import yaml

    groups = yaml.safe_load((EVAL / "defaults" / "wandb_averages.yaml").read_text())
    for name, keys in PUBLISHED_WANDB_GROUPS.items():
        assert groups[name] == keys, name
    added = [g for g in groups if g not in PUBLISHED_WANDB_GROUPS]
    assert added == ["_avg1_sim", "_xband"]


def test_knn_few_shot_k_list_semantics():
    """With n samples per class the published code evaluates k in nb_knn plus n itself, keeping k <= n; the full
    train set keeps nb_knn."""
    assert few_shot_ks([10, 20, 50], -1) == [10, 20, 50]
    assert few_shot_ks([10, 20, 50], 5) == [5]
    assert few_shot_ks([10, 20, 50], 20) == [10, 20]
    assert few_shot_ks([1, 5, 20], 10) == [1, 5, 10]
    # end to end: two separable classes, 4 per class -> keys (full, k) for every k and (4, k) for k in {1, 4}
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 8, generator=g) * 0.1 + torch.stack([y.float(), 1 - y.float()], 1).repeat(1, 4)
    metrics = build_metrics([{"id": "MulticlassAccuracy", "top_k": 1, "average": "micro"}])
    res = run_knn(x[:30], y[:30], x[30:], y[30:], metrics, 2, ks=[1, 10], n_per_class_list=[-1, 4], n_tries=2)
    assert set(res) == {("full", 1), ("full", 10), ("4", 1), ("4", 4)}
    assert all(v["acc_top-1_micro"] == 1.0 for v in res.values())
    with pytest.raises(ValueError, match="n_per_class=0 leaves no k"):
        run_knn(x[:30], y[:30], x[30:], y[30:], metrics, 2, ks=[1], n_per_class_list=[0])


def test_retrieval_tasks_select_bands_without_fixed_positions():
    for rel in ADDED:
        task = shipped_cfg(rel)["task"]
        for key in ("query_bands", "key_bands"):
            assert "channels" not in task[key], f"{rel} {key} uses fixed channel positions"
