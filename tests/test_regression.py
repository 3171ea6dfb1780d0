"""Regression task type: HYPERVIEW in its released layout, torchmetrics-based metrics against independent
formulas, and the eval CLI end to end on a tiny Panopticon."""
import json

import numpy as np
import pytest
import torch

from dense_fixtures import write_hyperview
from test_eval_engine import make_run, read_csv, write_task

from dinov2.eval.eval import main
from dinov2.eval.regression import regression_metrics


def test_metrics_equal_independent_formulas():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(20, 3)) * [1, 10, 100]
    p = y + rng.normal(size=(20, 3))
    out = regression_metrics(torch.tensor(p), torch.tensor(y))
    mse = ((p - y) ** 2).mean(0)
    r2 = 1 - ((p - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert out["MSE"] == pytest.approx(mse.mean(), rel=1e-5)
    assert out["RMSE"] == pytest.approx(np.sqrt(mse).mean(), rel=1e-5)
    assert out["MAE"] == pytest.approx(np.abs(p - y).mean(), rel=1e-5)
    assert out["R2"] == pytest.approx(r2.mean(), rel=1e-5)
    assert out["per_variable"]["R2"] == pytest.approx(list(r2), rel=1e-5)


def test_challenge_score_against_its_definition():
    """HYPERVIEW's score: per parameter MSE / MSE of predicting the training mean, averaged over the parameters."""
    y = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    p = torch.tensor([[2.0, 10.0], [3.0, 20.0], [4.0, 20.0]])
    train_mean = torch.tensor([2.0, 25.0])
    out = regression_metrics(p, y, train_mean=train_mean)
    # variable 0: MSE (1 + 0 + 1) / 3, baseline (1 + 1 + 9) / 3 -> 2/11; variable 1: 100/3 vs (225+25+25)/3 -> 4/11
    assert out["per_variable"]["relative_MSE"] == pytest.approx([2 / 11, 4 / 11])
    assert out["relative_MSE"] == pytest.approx(3 / 11) and out["MSE"] == pytest.approx((2 / 3 + 100 / 3) / 2)
    assert regression_metrics(y, y, train_mean=train_mean)["relative_MSE"] == 0.0
    assert "relative_MSE" not in regression_metrics(p, y)


def test_hand_computed_r2():
    # y = [1, 2, 3], p = [1, 2, 4]: SSE = 1, SST = 2 -> R2 = 0.5; MSE = 1/3; MAE = 1/3
    out = regression_metrics(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert out["R2"] == pytest.approx(0.5) and out["MSE"] == pytest.approx(1 / 3) and out["MAE"] == pytest.approx(1 / 3)


def test_hyperview_reader(tmp_path):
    from dinov2.data.datasets.hyperview import Hyperview

    root = write_hyperview(tmp_path / "hv", n=20)
    splits = {s: Hyperview(str(root), split=s, img_size=16) for s in ("train", "val", "test")}
    ids = [set(d.ids) for d in splits.values()]
    assert sum(len(i) for i in ids) == 20 and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    x, y = splits["val"][0]
    assert x["imgs"].shape == (150, 16, 16) and x["chn_ids"].shape == (150,) and y.shape == (4,)
    assert torch.isfinite(x["imgs"]).all()
    z = np.load(root / "train_data" / f"{splits['val'].ids[0]}.npz")
    import pandas as pd
    gt = pd.read_csv(root / "train_gt.csv").set_index("sample_index")
    assert y.tolist() == pytest.approx(gt.loc[splits["val"].ids[0], ["P", "K", "Mg", "pH"]].tolist(), rel=1e-6)
    assert z["data"].shape[0] == 150
    stats = list(root.glob("band_stats_*.json"))
    assert len(stats) == 1  # train statistics cached atomically beside the data
    (root / "train_data" / f"{splits['test'].ids[0]}.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=f"{splits['test'].ids[0]}.npz"):
        splits["test"][0]


def test_regression_task_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    root = write_hyperview(tmp_path / "hv", n=40)
    ds = {"id": "hyperview", "root": str(root), "img_size": 16}
    cfg = {"task": {"id": "regression", "target_names": ["P", "K", "Mg", "pH"], "select_on": "relative_MSE"},
           "train_dataset": {**ds, "split": "train"}, "val_dataset": {**ds, "split": "val"},
           "test_datasets_list": [{**ds, "split": "test", "display_name": "hv"}],
           "heads": {"n_last_blocks_list": [1], "pooling": ["avgpool"], "learning_rates": [1e-2, 1e-1]},
           "optim": {"epochs": 150, "dl": {"batch_size": 8, "num_workers": 0}}}
    write_task(tmp_path / "cfg", "hv", cfg)
    run = make_run(tmp_path / "run")
    res = main(str(run), str(tmp_path / "cfg" / "hv.yaml"), output_dir=str(tmp_path / "out"), device="cpu")
    vals = res["cfg/hv"]
    assert set(vals) == {"relative_MSE", "MSE", "RMSE", "MAE", "R2"}
    assert vals["R2"] > 0.5  # targets are affine in the field brightness; a predict-the-mean model gives ~0
    assert vals["relative_MSE"] < 0.5  # far better than predicting the training mean (1.0)
    detail = json.loads((tmp_path / "out/cfg/hv/results_eval_regression.json").read_text())
    assert detail["target_names"] == ["P", "K", "Mg", "pH"] and len(detail["val_mse"]) == 2
    scores = detail["val_relative_mse"]  # the head is the one best on the challenge score, not on the raw MSE
    assert detail["selected_on"] == "relative_MSE" and detail["best_regressor"] == min(scores, key=scores.get)
    # the reported score is the test MSE of each parameter over that of predicting the training mean
    per = detail["test"]["hv"]["per_variable"]
    assert vals["relative_MSE"] == pytest.approx(np.mean(np.array(per["MSE"]) / np.array(per["baseline_MSE"])),
                                                 abs=1e-5)
    assert read_csv(tmp_path / "out/cfg/hv/results.csv")[0]["best_classifier"] == detail["best_regressor"]
