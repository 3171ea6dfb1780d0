"""End-to-end evaluation engine: tiny random Panopticon run folders, fixture datasets in their real layouts,
kNN / linear / retrieval tasks through `dinov2/eval/eval.py main` (CLI and Python)."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, tiny_student_cfg
from eval_fixtures import write_benv2, write_eurosat_sar, write_geobench_task, write_resisc45

from dinov2.eval.eval import EvalTaskError, main
from dinov2.models import build_model

# layerscale 1.0: with the default 1e-5 a random tiny ViT ignores its input and every feature is the same
STUDENT = tiny_student_cfg(layerscale=1.0, pos_emb_img_size=16)
DL = {"batch_size": 8, "num_workers": 0}


def make_run(folder: Path, seed: int = 0) -> Path:
    """A training run folder: config.yaml (student section) + model_final.pth with teacher.backbone.* keys."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"student": STUDENT, "train": {"seed": seed}}))
    torch.manual_seed(seed)
    teacher, _ = build_model(STUDENT, only_teacher=True, img_size=16)
    sd = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    sd.update({f"student.backbone.{k}": v for k, v in teacher.state_dict().items()})
    torch.save({"model": sd, "iteration": 10}, folder / "model_final.pth")
    return folder


def write_task(folder: Path, name: str, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return folder / f"{name}.yaml"


def gb(split, **kw):
    return {"id": "geobench.m-eurosat", "split": split, **kw}


def knn_task(train, test, **heads):
    return {"task": {"id": "knn"}, "train_dataset": train, "test_dataset": test,
            "heads": {"nb_knn": [1, 5], **heads}, "optim": {"dl": DL}}


def linear_task(train, val, test, multilabel=False, epochs=100, feature_cache=False):
    return {"task": {"id": "multilabelclassification" if multilabel else "classification"},
            "train_dataset": train, "val_dataset": val, "test_datasets_list": [test],
            "heads": {"n_last_blocks_list": [1, 2], "learning_rates": [0.01, 0.1, 1.0]},
            "optim": {"epochs": epochs, "dl": DL, "feature_cache": feature_cache}}


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_world")
    write_geobench_task(root / "geobench", "m-eurosat", {"train": 24, "valid": 8, "test": 12})
    write_geobench_task(root / "geobench_shuffled", "m-eurosat", {"train": 48, "valid": 8, "test": 64},
                        shuffle_labels=True, seed=1)
    cfg = root / "cfg" / "tiny"
    write_task(cfg, "gb_knn", knn_task(gb("train"), gb("test")))
    write_task(cfg / "linear", "gb_lin", linear_task(gb("train"), gb("val"), gb("test", display_name="m-eurosat")))
    # the same RGB bands twice (ids included) -> both band subsets carry identical information
    dup = [{"id": "ChnSelect", "idxs": [1, 2, 3, 1, 2, 3]}]
    write_task(cfg, "gb_retrieval_same", {"task": {"id": "retrieval", "query_bands": {"channels": [0, 1, 2]},
                                                   "key_bands": {"channels": [3, 4, 5]}},
                                          "test_dataset": gb("test", transform=dup), "optim": {"dl": DL}})
    write_task(cfg, "gb_retrieval_vis_nir", {"task": {"id": "retrieval"}, "test_dataset": gb("test"),
                                             "optim": {"dl": DL}})
    return {"root": root, "cfg": cfg, "run": make_run(root / "run")}


def test_cli_end_to_end_geobench(world, monkeypatch):
    env = dict(os.environ, GEO_BENCH_DIR=str(world["root"] / "geobench"), OMP_NUM_THREADS="1",
               PANOPTICON_NO_TQDM="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "dinov2/eval/eval.py", "main", f"--model-obj={world['run']}",
           f"--config-obj={world['cfg']}", "--device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = world["run"] / "eval_model_final"
    for task, kind in [("tiny/gb_knn", "knn"), ("tiny/linear/gb_lin", "linear"),
                       ("tiny/gb_retrieval_same", "retrieval")]:
        for f in ("config.yaml", "results.csv", f"results_eval_{kind}.json", "plots.png"):
            assert (out / task / f).is_file(), f"{task}/{f} missing"
    assert (out / "log").is_file()
    knn = {r["metric"]: float(r["value"]) for r in read_csv(out / "tiny/gb_knn/results.csv")}
    assert knn["acc_top-1_micro"] >= 90.0
    assert set(knn) == {"acc_top-1_micro", "acc_top-1_macro", "acc_top-1_macro_present_classes"}
    lin = {r["metric"]: r for r in read_csv(out / "tiny/linear/gb_lin/results.csv")}
    assert float(lin["acc_top-1_micro"]["value"]) >= 90.0
    assert lin["acc_top-1_micro"]["best_classifier"].startswith("classifier_")
    assert json.loads((out / "tiny/linear/gb_lin/results_eval_linear.json").read_text())["max_iter"] == 300
    same = {r["metric"]: float(r["value"]) for r in read_csv(out / "tiny/gb_retrieval_same/results.csv")}
    assert same["recall@1"] == 100.0 and same["mean_pair_cosine"] == pytest.approx(1.0, abs=1e-3)
    vis = {r["metric"]: float(r["value"]) for r in read_csv(out / "tiny/gb_retrieval_vis_nir/results.csv")}
    assert vis["recall@1"] < 50.0  # identity lies only in pixel noise -> far from 100 with random weights
    # aggregated results.csv at every folder level, with relpaths relative to that level
    top = read_csv(out / "results.csv")
    assert {r["relpath"] for r in top} == {"tiny/gb_knn", "tiny/linear/gb_lin", "tiny/gb_retrieval_same",
                                           "tiny/gb_retrieval_vis_nir"}
    assert {r["relpath"] for r in read_csv(out / "tiny" / "linear" / "results.csv")} == {"gb_lin"}
    assert (out / "tiny" / "results.txt").read_text().count("gb_knn") == 3  # one row per metric key
    # resolved config of the task: defaults merged (temperature), overrides absent
    cfg = yaml.safe_load((out / "tiny/gb_knn/config.yaml").read_text())
    assert cfg["heads"]["temperature"] == 0.07 and cfg["task"]["backbone_to_features"]["pooling"] == "knn"

    # finished tasks are skipped (files untouched); --overwrite with a dotted override reruns them
    mtime = (out / "tiny/gb_knn/results.csv").stat().st_mtime_ns
    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench"))
    res = main(str(world["run"]), str(world["cfg"] / "gb_knn.yaml"), device="cpu")
    assert (out / "tiny/gb_knn/results.csv").stat().st_mtime_ns == mtime
    assert res["tiny/gb_knn"]["acc_top-1_micro"] == knn["acc_top-1_micro"]
    res = main(str(world["run"]), str(world["cfg"] / "gb_knn.yaml"), overwrite=True, device="cpu",
               **{"heads.nb_knn": [3]})
    assert yaml.safe_load((out / "tiny/gb_knn/config.yaml").read_text())["heads"]["nb_knn"] == [3]
    assert "('full', 3)" in (out / "tiny/gb_knn/results.csv").read_text()


def test_shuffled_labels_stay_near_chance(world, monkeypatch, tmp_path):
    """Labels unrelated to the images: accuracy within 3 binomial standard deviations of the majority-class rate
    of the 64 test samples (the same task on the separable data reaches 100 %)."""
    import math

    from dinov2.data.datasets.geobench import GeobenchDataset

    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench_shuffled"))
    labels = [y for _, y in GeobenchDataset("m-eurosat", split="test", normalize=False)]
    p = max(labels.count(c) for c in set(labels)) / len(labels)
    bar = 100 * (p + 3 * math.sqrt(p * (1 - p) / len(labels)))
    assert len(labels) == 64 and bar < 50
    res = main(str(world["run"]), str(world["cfg"] / "gb_knn.yaml"), output_dir=str(tmp_path / "out"),
               device="cpu", **{"heads.nb_knn": [5]})
    assert res["tiny/gb_knn"]["acc_top-1_micro"] <= bar


def test_other_layouts_end_to_end(world, monkeypatch, tmp_path):
    data = tmp_path / "data"
    write_resisc45(data / "resisc45", n_per_class=6)
    write_eurosat_sar(data / "esar", {"train": 30, "val": 9, "test": 9})
    write_benv2(data / "ben", {"train": 6, "validation": 2, "test": 3})
    small = [{"id": "Resize", "size": 16}]
    cfg = tmp_path / "cfg" / "layouts"
    write_task(cfg, "resisc45_knn", knn_task({"id": "resisc45", "root": str(data / "resisc45"), "split": "train",
                                              "transform": small},
                                             {"id": "resisc45", "root": str(data / "resisc45"), "split": "test",
                                              "transform": small}))
    esar = {"id": "eurosat-sar", "root": str(data / "esar")}
    write_task(cfg, "esar_lin", linear_task(dict(esar, split="train"), dict(esar, split="val"),
                                            dict(esar, split="test"), epochs=100, feature_cache=True))
    ben = {"id": "benv2", "root": str(data / "ben"), "bands": "all", "transform": small}
    ml = linear_task(dict(ben, split="train"), dict(ben, split="validation"), dict(ben, split="test"),
                     multilabel=True, epochs=20)
    write_task(cfg, "benv2_lin", ml)
    res = main(str(world["run"]), str(cfg), device="cpu")
    assert res["layouts/resisc45_knn"]["acc_top-1_micro"] == 100.0
    assert res["layouts/esar_lin"]["acc_top-1_micro"] >= 88.0
    assert set(res["layouts/benv2_lin"]) == {"MulLabAvergPrec_macro", "MulLabAcc_top-1_micro",
                                             "MulLabAcc_top-1_macro", "MulLabAcc_top-5_micro",
                                             "MulLabAcc_top-5_micro_topk_applied"}
    assert 0.0 <= res["layouts/benv2_lin"]["MulLabAvergPrec_macro"] <= 100.0


def test_model_objects(world, tmp_path, monkeypatch):
    from dinov2.eval.model_loading import build_eval_backbone, resolve_model_objs

    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench"))
    run = make_run(tmp_path / "runs" / "a", seed=1)
    make_run(tmp_path / "runs" / "b", seed=2)
    # periodic teacher checkpoint -> outputs next to it in eval/<iter>/
    teacher_sd = torch.load(run / "model_final.pth", weights_only=True)["model"]
    it_dir = run / "eval" / "10"
    it_dir.mkdir(parents=True)
    torch.save({"teacher": {k[len("teacher."):]: v for k, v in teacher_sd.items() if k.startswith("teacher.")}},
               it_dir / "teacher_checkpoint.pth")
    spec, = resolve_model_objs(str(it_dir / "teacher_checkpoint.pth"))
    assert spec.output_dir == str(it_dir) and spec.kind == "teacher_checkpoint"
    # hub-format raw backbone state dict (config.yaml beside it gives the architecture)
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.yaml").write_text((run / "config.yaml").read_text())
    raw = {k[len("teacher.backbone."):]: v for k, v in teacher_sd.items() if k.startswith("teacher.backbone.")}
    torch.save(raw, hub / "panopticon_tiny_teacher.pth")
    spec_hub, = resolve_model_objs(str(hub / "panopticon_tiny_teacher.pth"))
    spec_run, = resolve_model_objs(str(run))
    x = {"imgs": torch.randn(2, 4, 16, 16), "chn_ids": torch.tensor([[492, 559, 664, 827]] * 2)}
    f_hub = build_eval_backbone(spec_hub).backbone(x)
    assert torch.allclose(f_hub, build_eval_backbone(spec_run).backbone(x), atol=1e-5)
    assert spec_run.output_dir == str(run / "eval_model_final")
    # several models: ';' list and glob; returns results per model output dir
    specs = resolve_model_objs(f"{tmp_path}/runs/*;")
    assert [Path(s.run_dir).name for s in specs] == ["a", "b"]
    res = main(f"{tmp_path / 'runs' / 'a'};{tmp_path / 'runs' / 'b'}", str(world["cfg"] / "gb_knn.yaml"),
               device="cpu")
    assert set(res) == {str(tmp_path / "runs" / n / "eval_model_final") for n in "ab"}
    with pytest.raises(ValueError, match="exactly one model"):
        main(f"{tmp_path}/runs/*", str(world["cfg"] / "gb_knn.yaml"), output_dir=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_model_objs(str(tmp_path / "nothing_here"))
    # a checkpoint that does not fit the configured backbone is refused, not evaluated at random
    torch.save({k: v for k, v in raw.items() if not k.startswith("blocks.1.")}, hub / "broken.pth")
    with pytest.raises(RuntimeError, match="missing"):
        build_eval_backbone(resolve_model_objs(str(hub / "broken.pth"))[0])


def test_task_config_errors(world, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench"))
    bad = write_task(tmp_path / "cfg", "bad", {"task": {"id": "detection"}})
    with pytest.raises(EvalTaskError, match="ValueError: .*task.id must be one of"):
        main(str(world["run"]), str(bad), output_dir=str(tmp_path / "o"))
    deep = write_task(tmp_path / "cfg2", "deep", dict(knn_task(gb("train"), gb("test")),
                                                      task={"id": "knn", "backbone_to_features":
                                                            {"pooling": "knn", "use_n_blocks": 3}}))
    with pytest.raises(EvalTaskError, match="ValueError: .*backbone has 2 blocks"):
        main(str(world["run"]), str(deep), output_dir=str(tmp_path / "o2"))
    monkeypatch.delenv("GEO_BENCH_DIR")
    with pytest.raises(EvalTaskError, match="OSError: GEO_BENCH_DIR"):  # a failed task is recorded
        main(str(world["run"]), str(world["cfg"] / "gb_knn.yaml"), output_dir=str(tmp_path / "o3"))
    assert not (tmp_path / "o3" / "tiny" / "gb_knn" / "results.csv").exists()


SHIPPED = sorted(p for p in (ROOT / "dinov2/configs/eval").rglob("*.yaml") if "defaults" not in p.parts)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.relative_to(ROOT / "dinov2/configs/eval").as_posix() for p in SHIPPED])
def test_shipped_task_configs_resolve(path):
    """Every shipped task names datasets, transforms and metrics that exist (published fault: configs naming
    classes that do not exist), and linear tasks have a test set (a published fault, docs/differences.md)."""
    from dinov2.data import sensors
    from dinov2.data.augmentations import make_augmentation
    from dinov2.data.datasets import get_dataset_class
    from dinov2.eval.metrics import build_metrics
    from dinov2.eval.tasks import build_task_cfg

    from omegaconf import OmegaConf

    raw = OmegaConf.load(path)
    # tasks whose data location is a mandatory variable (the dense demo) get a placeholder path
    missing = "_vars" in raw and "scenes" in raw["_vars"].keys() and OmegaConf.is_missing(raw["_vars"], "scenes")
    ov = {"_vars.scenes": "/data/scenes.yaml"} if missing else None
    cfg = OmegaConf.to_container(build_task_cfg(path, ov))
    tid = cfg["task"]["id"]
    keys = {"knn": ["train_dataset", "test_dataset"], "retrieval": ["test_dataset"]}.get(
        tid, ["train_dataset", "val_dataset"])
    ds_cfgs = [cfg[k] for k in keys] + list(cfg.get("test_datasets_list") or [])
    assert cfg["heads"] if tid != "retrieval" else cfg["task"]["query_bands"]
    if tid in ("classification", "multilabelclassification"):
        assert cfg.get("test_datasets_list") and "test_dataset" not in cfg
    for ds in ds_cfgs:
        get_dataset_class(ds["id"])
        if ds["id"].startswith("geobench."):
            sensors.load_ds_cfg(ds["id"].split(".", 1)[1])
        make_augmentation(ds.get("transform") or [])
    if tid in ("knn", "classification", "multilabelclassification"):  # dense/regression metrics are fixed
        assert build_metrics(cfg["task"]["metrics"] if tid == "knn" else cfg["task"]["val_metrics"])


def test_shipped_retrieval_demo_task(world, monkeypatch):
    """The shipped m-eurosat cross-band retrieval task on the GEO-Bench fixture (visible vs NIR/SWIR bands)."""
    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench"))
    res = main(str(world["run"]), str(ROOT / "dinov2/configs/eval/5min/m-eurosat_retrieval.yaml"),
               output_dir=str(world["root"] / "demo_out"), device="cpu",
               **{"test_dataset.transform": [{"id": "Resize", "size": 16}], "optim.dl.num_workers": 0})
    r = res["5min/m-eurosat_retrieval"]
    assert r["n_samples"] == 12 and 0.0 <= r["recall@1"] <= r["recall@5"] <= 100.0
    out = json.loads((world["root"] / "demo_out/5min/m-eurosat_retrieval/results_eval_retrieval.json").read_text())
    assert out["band_subsets"] == [{"query_chn_ids": [442, 492, 559, 664], "n_samples": 12,
                                    "key_chn_ids": [704, 740, 782, 827, 864, 945, 1373, 1613, 2203]}]


def test_wandb_summary_entries_without_wandb():
    """Averages for W&B are computed without importing wandb (it is optional)."""
    from dinov2.eval.wandb_upload import summary_entries, upload_results

    res = {"5min/resisc45_knn": {"acc_top-1_micro": 80.0}, "5min/m-eurosat-rgb_knn": {"acc_top-1_micro": 60.0},
           "5min/m-eurosat_knn": {"acc_top-1_micro": 90.0, "acc_top-1_macro": 70.0,
                                  "acc_top-1_macro_present_classes": 100.0}}  # corrected key: not in _avg
    out = summary_entries(res)
    assert out["_rgb"] == 70.0 and out["_avg"] == 75.0 and out["5min/m-eurosat_knn/acc_top-1_macro"] == 70.0
    assert "_sar" not in out  # no key of that group present
    assert set(summary_entries(res, only_avg=True)) == {"_avg", "_rgb", "_ms", "_rgb_ms", "_avg1", "_avg2", "_avg1_sim"}
    assert upload_results(None, res) is False  # no run folder with a wandb/ directory -> nothing to do


def test_mixed_sensor_dataset(world, monkeypatch, tmp_path):
    """A concatenation of sensors with different channel counts/ids runs: samples are grouped by channel ids."""
    monkeypatch.setenv("GEO_BENCH_DIR", str(world["root"] / "geobench"))
    write_resisc45(tmp_path / "r45", n_per_class=6)
    small = [{"id": "Resize", "size": 16}]
    mixed = {"id": "ConcatDataset", "datasets": [gb("test", transform=small),
                                                 {"id": "resisc45", "root": str(tmp_path / "r45"), "split": "test",
                                                  "transform": small}]}
    cfg = tmp_path / "cfg" / "mixed"
    write_task(cfg, "retrieval", {"task": {"id": "retrieval", "query_bands": {"channels": [0]},
                                           "key_bands": {"channels": [1]}},
                                  "test_dataset": mixed, "optim": {"dl": DL}})
    res = main(str(world["run"]), str(cfg), output_dir=str(tmp_path / "out"), device="cpu")
    assert res["mixed/retrieval"]["n_samples"] == 12 + 3
    subsets = json.loads((tmp_path / "out/mixed/retrieval/results_eval_retrieval.json").read_text())["band_subsets"]
    assert sorted((s["query_chn_ids"], s["key_chn_ids"], s["n_samples"]) for s in subsets) == [
        ([442], [492], 12), ([664], [559], 3)]
