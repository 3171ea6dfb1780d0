"""Fine-tuning a classification task: the backbone's weights change, the evaluated checkpoint does not, results
have the linear probe's format (GEO-Bench fixture, tiny Panopticon)."""
import json

import pytest
import torch

from eval_fixtures import write_geobench_task
from test_eval_engine import gb, linear_task, make_run, read_csv, write_task

from dinov2.eval.eval import EvalTaskError, main


@pytest.fixture(scope="module")
def ft_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft_world")
    write_geobench_task(root / "geobench", "m-eurosat", {"train": 16, "valid": 6, "test": 6})
    return {"root": root, "run": make_run(root / "run")}


def _task(tmp_path, **ft):
    cfg = linear_task(gb("train"), gb("val"), gb("test", display_name="m-eurosat"), epochs=3)
    cfg["heads"] = {"n_last_blocks_list": [1], "pooling": ["cls"], "learning_rates": [1e-2]}
    cfg["optim"].update(warmup_epochs=1, finetune={"enabled": True, "backbone_lr": 1e-3, "drop_path": 0.1, **ft})
    cfg["optim"]["dl"] = {"batch_size": 4, "num_workers": 0}
    return write_task(tmp_path / "cfg", "ft", cfg)


def test_classification_finetuning_trains_a_copy_of_the_backbone(ft_world, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(ft_world["root"] / "geobench"))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    before = torch.load(ft_world["run"] / "model_final.pth", weights_only=True)["model"]
    res = main(str(ft_world["run"]), str(_task(tmp_path)), output_dir=str(tmp_path / "out"), device="cpu")
    vals = res["cfg/ft"]
    assert 0.0 <= vals["acc_top-1_micro"] <= 100.0
    task = tmp_path / "out" / "cfg" / "ft"
    detail = json.loads((task / "results_eval_linear.json").read_text())
    assert detail["protocol"].startswith("fine-tuning") and detail["max_iter"] == 12  # 16 images x 3 epochs / 4
    assert read_csv(task / "results.csv")[0]["best_classifier"] == detail["best_classifier"]
    state = torch.load(task / "model_final.pth", weights_only=True)
    changed = [k for k, v in state["backbone"].items() if not torch.equal(v, before[f"teacher.backbone.{k}"])]
    assert any(k.startswith("blocks.") for k in changed) and any(k.startswith("patch_embed.") for k in changed)
    after = torch.load(ft_world["run"] / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetuning_needs_one_head(ft_world, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(ft_world["root"] / "geobench"))
    path = _task(tmp_path)
    cfg = path.read_text().replace("learning_rates:\n  - 0.01", "learning_rates:\n  - 0.01\n  - 0.1")
    path.write_text(cfg)
    with pytest.raises(EvalTaskError, match="one head"):
        main(str(ft_world["run"]), str(path), output_dir=str(tmp_path / "o"), device="cpu")
