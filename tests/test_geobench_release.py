"""GEO-Bench segmentation files as the geobench package writes them (cloud-probability band included): read by
band name, equal to geobench's own loader, and the shipped task config (PANGAEA protocol) end to end."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from geobench_release import import_geobench, write_release_segmentation
from test_eval_engine import make_run, read_csv

from dinov2.data.datasets.geobench import GeobenchDataset
from dinov2.eval.eval import main
from dinov2.eval.tasks import eval_config_root

S2_12 = ["01 - Coastal aerosol", "02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge",
         "06 - Vegetation Red Edge", "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge",
         "09 - Water vapour", "11 - SWIR", "12 - SWIR"]
SPLITS = {"train": 6, "valid": 2, "test": 3}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("geobench_release")
    write_release_segmentation(root, "m-cashew-plant", SPLITS, n_classes=3, size=40)
    return root


def test_files_are_the_released_layout(release):
    import h5py

    tdir = release / "segmentation_v1.0" / "m-cashew-plant"
    assert (tdir / "default_partition.json").is_symlink()
    with h5py.File(tdir / "m-cashew-plant_train_0000.hdf5") as f:
        names = sorted(f.keys())
    assert len(names) == 14 and "label" in names and "Cloud Probability_2019-11-01" in names  # dated datasets
    stats = json.loads((tdir / "band_stats.json").read_text())
    assert set(stats) == set(S2_12) | {"Cloud Probability", "label"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_reader_equals_geobench_loader_without_the_cloud_band(release, monkeypatch, split):
    gb = import_geobench(release)
    monkeypatch.setenv("GEO_BENCH_DIR", str(release))
    ours = GeobenchDataset("m-cashew-plant", split=split, normalize=False)
    tdir = release / "segmentation_v1.0" / "m-cashew-plant"
    theirs = gb.GeobenchDataset(tdir, split="valid" if split == "val" else split, band_names=S2_12)
    assert len(ours) == len(theirs) == SPLITS[split]
    assert ours.band_names == S2_12 and ours.chn_ids.tolist() == [442, 492, 559, 664, 704, 740, 782, 827, 864,
                                                                  945, 1613, 2203]
    for i in range(len(ours)):
        x, mask = ours[i]
        sample = theirs[i]
        arr, names = sample.pack_to_3d(band_names=S2_12)
        assert names == S2_12 and torch.equal(x["imgs"], torch.from_numpy(arr.transpose(2, 0, 1)).float())
        assert torch.equal(mask, torch.from_numpy(sample.label.data.astype(np.int64)))
    # z-scored with the package's statistics of the selected bands
    normed = GeobenchDataset("m-cashew-plant", split=split)[0][0]["imgs"]
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in
                 gb.GeobenchDataset(tdir, split=split, band_names=S2_12).normalization_stats())
    assert torch.allclose(normed, (ours[0][0]["imgs"] - mean) / std, atol=1e-5)


def test_unknown_subselected_band_is_named(release, monkeypatch, tmp_path):
    import shutil

    import yaml

    from dinov2.data import sensors

    def band_yaml(folder: str, edit) -> None:  # a config folder ($CDIR) whose m-cashew-plant band list is edited
        cdir = tmp_path / folder
        shutil.copytree(Path(sensors.__file__).parent.parent / "configs" / "data", cdir / "data")
        path = cdir / "data" / "eval" / "m-cashew-plant.yaml"
        cfg = yaml.safe_load(path.read_text())
        edit(cfg)
        path.write_text(yaml.safe_dump(cfg))
        monkeypatch.setenv("CDIR", str(cdir))

    monkeypatch.setenv("GEO_BENCH_DIR", str(release))
    band_yaml("a", lambda cfg: cfg["band_subselect_by_geob_id"].__setitem__(-1, "12 - SWIR2"))
    with pytest.raises(ValueError, match=r"band_subselect_by_geob_id names \['12 - SWIR2'\]"):
        GeobenchDataset("m-cashew-plant", split="train")
    band_yaml("b", lambda cfg: cfg.pop("band_subselect_by_geob_id"))  # all 13 bands: 12 channel ids do not fit
    with pytest.raises(ValueError, match="gives 13 channels .* band YAML has 12 entries"):
        GeobenchDataset("m-cashew-plant", split="train")


def test_shipped_task_runs_end_to_end(release, monkeypatch, tmp_path):
    """The shipped cashew-plant-seg.yaml (PANGAEA protocol) on the released layout: tiny model (2 blocks, patch 8),
    16 px windows over the 40 px images, a few epochs; scored at the native 40 px label size."""
    monkeypatch.setenv("GEO_BENCH_DIR", str(release))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    run = make_run(tmp_path / "run")
    cfg = Path(eval_config_root()) / "1h" / "geobench" / "cashew-plant-seg.yaml"
    over = {"task.img_size": 16, "task.num_classes": 4, "optim.epochs": 3, "optim.dl.batch_size": 4,
            "optim.dl.num_workers": 0, "heads.learning_rates": [1e-2], "heads.channels": 8, "heads.blocks": [0, 1]}
    res = main(str(run), str(cfg), output_dir=str(tmp_path / "out"), device="cpu", **over)
    vals = res["1h/geobench/cashew-plant-seg"]
    task_dir = tmp_path / "out" / "1h" / "geobench" / "cashew-plant-seg"
    detail = json.loads((task_dir / "results_eval_segmentation.json").read_text())
    test = detail["test"]["m-cashew-plant"]
    assert detail["protocol"] == "pangaea" and detail["blocks"] == [0, 1] and detail["inference"] == "sliding"
    assert test["n_pixels"] == SPLITS["test"] * 40 * 40  # every pixel at the native label size
    # class 3 never occurs: it counts 0 in mIoU (all 4 classes) and not at all in mIoU_present_classes
    assert test["present_classes"] == [0, 1, 2] and test["IoU_per_class"][3] == 0.0
    assert test["mIoU"] == pytest.approx(sum(test["IoU_per_class"]) / 4, abs=0.02)
    assert test["mIoU_present_classes"] == pytest.approx(sum(test["IoU_per_class"][:3]) / 3, abs=0.02)
    assert vals["mIoU"] == test["mIoU"] and vals["mIoU_present_classes"] == test["mIoU_present_classes"]
    rows = read_csv(task_dir / "results.csv")
    assert [r["metric"] for r in rows] == ["mIoU", "mIoU_present_classes", "mF1", "mAcc", "pixel_acc"]
    state = torch.load(task_dir / "model_final.pth", weights_only=True)
    assert state["blocks"] == [0, 1] and state["best_head"] == "upernet_ppm_lr_0_01000" and state["channels"] == 8
