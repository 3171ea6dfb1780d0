"""The user's own labels: GeoTIFF chips + CSV (classification, multi-label, regression, segmentation) and a label
raster aligned with a scene, with spatial block splits; through the eval CLI like the benchmark datasets."""
import numpy as np
import pytest
import rasterio
import torch

from dense_fixtures import write_chips, write_label_scene
from test_eval_engine import make_run, write_task

from dinov2.data.loaders import make_dataset
from dinov2.data.spatial_split import block_split, random_split

CHIP_BANDS = {"sensor": "sentinel2", "bands": ["B02", "B03", "B04", "B08"]}


def test_block_split_keeps_blocks_whole_and_is_proportional():
    xs = np.repeat(np.arange(20) * 100.0 + 50, 20)
    ys = np.tile(np.arange(20) * 100.0 + 50, 20)
    names = block_split(xs, ys, 500.0, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    blocks = {}
    for x, y, s in zip(xs, ys, names):
        blocks.setdefault((x // 500, y // 500), set()).add(s)
    assert all(len(v) == 1 for v in blocks.values())  # a block never spans two splits
    counts = {s: sum(1 for v in blocks.values() if s in v) for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 4, "test": 4}
    assert names == block_split(xs, ys, 500.0, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=1)
    assert names != block_split(xs, ys, 500.0, {"train": 0.5, "val": 0.25, "test": 0.25}, seed=2)
    with pytest.raises(ValueError, match="sum to 1"):
        random_split(5, {"train": 0.5, "val": 0.2})


@pytest.mark.parametrize("task", ["classification", "multilabel", "regression", "segmentation"])
def test_chips_dataset_reads_labels_and_splits(tmp_path, task):
    csv = write_chips(tmp_path / "d", task)
    extra = {"target_columns": ["value"]} if task == "regression" else {}
    sets = {s: make_dataset({"id": "chips", "csv": str(csv), "task": task, "split": s, "block_size_m": 640.0,
                             **CHIP_BANDS, **extra}) for s in ("train", "val", "test")}
    rows = [set(d.rows) for d in sets.values()]
    assert sum(map(len, rows)) == 36 and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    # spatial blocks of 640 m = 2 x 2 chips: each block lies in one split
    ds = sets["train"]
    x, y = ds[0]
    assert x["imgs"].shape == (4, 16, 16) and x["chn_ids"].tolist() == [492, 559, 664, 827]
    import pandas as pd
    df = pd.read_csv(csv)
    row = df.iloc[ds.rows[0]]
    if task == "classification":
        assert ds.classes == ["class_0", "class_1", "class_2"] and y == ds.classes.index(row["label"])
    elif task == "multilabel":
        expected = torch.zeros(3)
        expected[[ds.classes.index(t) for t in row["labels"].split(";")]] = 1
        assert torch.equal(y, expected)
    elif task == "regression":
        assert y.tolist() == pytest.approx([row["value"]])
    else:
        with rasterio.open(tmp_path / "d" / row["mask"]) as src:
            m = src.read(1).astype(np.int64)
        assert y[0, 0] == 255 and torch.equal(y, torch.from_numpy(m)) and ds.num_classes == 3


def test_chips_split_column_and_errors(tmp_path):
    csv = write_chips(tmp_path / "d", "classification", split_column=True)
    ds = make_dataset({"id": "chips", "csv": str(csv), "split": "val", **CHIP_BANDS})
    import pandas as pd
    assert all(pd.read_csv(csv)["split"][i] == "valid" for i in ds.rows)
    with pytest.raises(ValueError, match="either sensor"):
        make_dataset({"id": "chips", "csv": str(csv)})
    with pytest.raises(ValueError, match=r"4 bands, but 3 band ids"):
        make_dataset({"id": "chips", "csv": str(csv), "wavelengths_nm": [490, 560, 665]})[0]
    with pytest.raises(ValueError, match="missing columns"):
        make_dataset({"id": "chips", "csv": str(csv), "task": "regression", "target_columns": ["nope"],
                      **CHIP_BANDS})


@pytest.mark.parametrize("label_res", [10.0, 20.0])
def test_label_raster_masks_align_with_the_scene(tmp_path, label_res):
    scene = write_label_scene(tmp_path / "s", label_res=label_res)
    sets = {s: make_dataset({"id": "LabelRasterScenes", "scenes": [scene], "patch_size_m": 160,
                             "block_size_m": 320, "split": s, "min_valid_fraction": 0.0,
                             "split_fractions": {"train": 0.5, "val": 0.25, "test": 0.25}})
            for s in ("train", "val", "test")}
    patches = [set(d.patches) for d in sets.values()]
    assert sum(map(len, patches)) == 64 and not (patches[0] & patches[1])
    ds = sets["train"]
    with rasterio.open(scene["labels"]) as src:
        lab = src.read(1)
        tr = src.transform
    for i in range(len(ds)):
        x, m = ds[i]
        _, px, py = ds.patches[i]
        col, row = int(round((px - tr.c) / tr.a)), int(round((tr.f - py) / -tr.e))
        n = int(round(160 / tr.a))
        expected = torch.from_numpy(lab[row:row + n, col:col + n].astype(np.int64))
        expected = expected.repeat_interleave(16 // n, 0).repeat_interleave(16 // n, 1)
        assert x["imgs"].shape == (4, 16, 16) and torch.equal(m, expected)
    assert ds.num_classes == 3


def test_own_labels_through_the_eval_cli(tmp_path, monkeypatch):
    from dinov2.eval.eval import main

    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    scene = write_label_scene(tmp_path / "s", size=128)
    ds = {"id": "LabelRasterScenes", "scenes": [scene], "patch_size_m": 160, "block_size_m": 320,
          "min_valid_fraction": 0.0}
    cfg = {"task": {"id": "segmentation"}, "train_dataset": {**ds, "split": "train"},
           "val_dataset": {**ds, "split": "val"}, "test_datasets_list": [{**ds, "split": "test"}],
           "heads": {"n_last_blocks": 2, "decoders": ["linear"], "learning_rates": [1e-2]},
           "optim": {"epochs": 3, "warmup_epochs": 0, "dl": {"batch_size": 8, "num_workers": 0}}}
    write_task(tmp_path / "cfg", "mine", cfg)
    res = main(str(make_run(tmp_path / "run")), str(tmp_path / "cfg" / "mine.yaml"),
               output_dir=str(tmp_path / "out"), device="cpu")
    assert 0.0 <= res["cfg/mine"]["mIoU"] <= 100.0 and res["cfg/mine"]["pixel_acc"] > 0
