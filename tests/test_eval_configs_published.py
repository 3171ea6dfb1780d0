"""Every shipped eval task config (dinov2/configs/eval/**, defaults merged) carries the published protocol values:
task type, epochs, batch size, training subset, kNN k list, channel selections. Values typed from the published
configs; tasks this project adds (retrieval) are listed separately. The GEO-Bench 1 h batch sizes are only known to
lie in 200-600 per task; the values below (growing with the training-set size) are this project's choice."""
import pytest
import torch
from conftest import ROOT
from omegaconf import OmegaConf

from dinov2.eval.knn import few_shot_ks, run_knn
from dinov2.eval.metrics import build_metrics
from dinov2.eval.tasks import build_task_cfg

EVAL = ROOT / "dinov2" / "configs" / "eval"
GB = "1h/geobench/"
# task: (task id, epochs (linear) or k list (knn), batch size, train subset (-1 = all))
PUBLISHED = {
    "5min/m-eurosat_knn": ("knn", [20], 200, -1),
    "5min/m-eurosat-rgb_knn": ("knn", [20], 200, -1),
    "5min/m-eurosat-norgb_knn": ("knn", [20], 200, -1),
    "5min/eurosat-sar_knn": ("knn", [20], 200, -1),
    "5min/resisc45_knn": ("knn", [10, 20, 50], 512, -1),
    "15min/sar/eurosat-sar_lin": ("classification", 20, 180, -1),
    "15min/saropt/benv2-both": ("multilabelclassification", 10, 300, 0.1),
    "15min/saropt/benv2-opt": ("multilabelclassification", 10, 300, 0.1),
    "15min/saropt/benv2-sar": ("multilabelclassification", 10, 300, 0.1),
    "15min/sim/corine-4c": ("multilabelclassification", 10, 350, -1),
    "15min/sim/corine-12c": ("multilabelclassification", 10, 180, -1),
    "15min/sim/corine-s2": ("multilabelclassification", 10, 180, -1),
    "1h/benv2-opt": ("multilabelclassification", 50, 700, 0.1),
    "1h/benv2-sar": ("multilabelclassification", 50, 700, 0.1),
    "1h/resisc45_lin": ("classification", 50, 256, -1),
    GB + "ben-10": ("multilabelclassification", 50, 200, 0.1),
    GB + "eurosat": ("classification", 50, 200, -1),
    GB + "forestnet": ("classification", 50, 300, -1),
    GB + "pv4ger": ("classification", 50, 400, -1),
    GB + "brick-kiln": ("classification", 50, 500, -1),
    GB + "so2sat": ("classification", 50, 600, -1),
}
ADDED = {"5min/m-eurosat_retrieval", "demo/retrieval_interleaved_bands", "demo/retrieval_visible_vs_infrared"}
# dense and regression tasks (not part of the published evaluation; checked in test_segmentation.py)
DENSE_ADDED = {"demo_dense/landcover_from_visible", "1h/hyperview/soil", GB + "cashew-plant-seg",
               GB + "sa-crop-type-seg", GB + "pv4ger-seg", GB + "chesapeake-landcover-seg", GB + "nz-cattle-seg",
               GB + "neontree-seg"}
CHN_SELECT = {"5min/m-eurosat-rgb_knn": [3, 2, 1], "5min/m-eurosat-norgb_knn": [0, 4, 5, 6, 7, 8, 9, 10, 11, 12],
              "15min/sim/corine-4c": [21, 111, 157, 171],
              "15min/sim/corine-12c": [12, 33, 50, 61, 84, 100, 107, 128, 139, 158, 182, 190]}


def _shipped():
    return sorted(str(p.relative_to(EVAL).with_suffix("")) for p in EVAL.rglob("*.yaml")
                  if p.relative_to(EVAL).parts[0] != "defaults")


def _cfg(rel: str):
    return OmegaConf.to_container(build_task_cfg(EVAL / f"{rel}.yaml"))


def test_every_shipped_task_is_listed():
    assert set(_shipped()) == set(PUBLISHED) | ADDED | DENSE_ADDED


@pytest.mark.parametrize("rel", sorted(PUBLISHED))
def test_shipped_task_has_published_values(rel):
    task_id, length, bs, subset = PUBLISHED[rel]
    cfg = _cfg(rel)
    assert cfg["task"]["id"] == task_id
    assert cfg["optim"]["dl"]["batch_size"] == bs
    assert cfg["train_dataset"].get("subset", -1) == subset
    evals = cfg.get("test_datasets_list", []) + [cfg[k] for k in ("val_dataset", "test_dataset") if k in cfg]
    assert all(d.get("subset", -1) == -1 for d in evals), "only the training set is subsampled"
    if task_id == "knn":
        assert cfg["heads"]["nb_knn"] == length and cfg["heads"]["n_per_class_list"] == [-1]
        assert cfg["heads"]["n_tries"] == 1 and cfg["heads"]["temperature"] == 0.07
    else:
        assert cfg["optim"]["epochs"] == length
    if rel in CHN_SELECT:
        sel = [t for t in cfg["train_dataset"]["transform"] if isinstance(t, dict) and t.get("id") == "ChnSelect"]
        assert len(sel) == 1 and sel[0]["idxs"] == CHN_SELECT[rel]


def test_geobench_1h_batch_sizes_are_per_task():
    sizes = {rel: _cfg(rel)["optim"]["dl"]["batch_size"] for rel in PUBLISHED if rel.startswith(GB)}
    assert all(200 <= b <= 600 for b in sizes.values()) and len(set(sizes.values())) > 1, sizes


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
        task = _cfg(rel)["task"]
        for key in ("query_bands", "key_bands"):
            assert "channels" not in task[key], f"{rel} {key} uses fixed channel positions"
