"""SpectralEarth CORINE downstream task: CLC label rasters -> BigEarthNet-19 multi-hot, eval samples, and the
shipped `15min/sim/corine-*` linear-probe tasks end to end on a tiny run folder."""
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from data_fixtures import write_spectral_earth_corine
from test_eval_engine import DL, make_run

from dinov2.data.datasets.corine_labels import load_corine_nomenclature, raster_codes
from dinov2.data.datasets.spectral_earth import SpectralEarthDataset
from dinov2.data.sensors import ds_chn_ids
from dinov2.eval.eval import main

# (codes written into the label raster, hand-looked-up 19-class indices; BigEarthNet-19, Sumbul et al.)
CASES = [
    ([111, 112, 311], {0, 8}),    # continuous + discontinuous urban fabric -> Urban fabric; broad-leaved forest
    ([122, 0], set()),            # roads (no 19-class counterpart) and no-data carry no label
    ([523, 335, 211], {18, 2}),   # sea -> Marine waters; glaciers (not in BigEarthNet) dropped; arable land
    ([241, 333, 423], {3, 11}),   # annual+permanent crops -> Permanent crops; sparse veg. -> grassland; flats dropped
    ([242, 412, 421], {5, 15, 16}),
]
CORINE_TASKS = ["corine-4c", "corine-12c", "corine-s2"]


@pytest.fixture(scope="module")
def corine(tmp_path_factory):
    root = tmp_path_factory.mktemp("se_corine")
    ds_root = root / "datasets"
    codes = [c for c, _ in CASES]
    written = write_spectral_earth_corine(str(ds_root), {"train": codes * 3, "val": codes, "test": codes})
    return {"rdir": root, "ds_root": ds_root, "written": written}


def test_nomenclature_table():
    nom = load_corine_nomenclature()
    assert nom.num_classes == 19 and len(nom.codes43) == 43
    assert sum(j is None for j in nom.to19) == 11
    assert nom.names19[nom.to19[nom.code_to_43[243]]] == \
        "Land principally occupied by agriculture, with significant areas of natural vegetation"
    assert nom.names19[nom.to19[nom.code_to_43[322]]] == nom.names19[nom.to19[nom.code_to_43[323]]] == \
        "Moors, heathland and sclerophyllous vegetation"
    assert nom.unknown_codes([335, 111, 999]) == {335, 999}
    with pytest.raises(ValueError, match="non-integer"):
        raster_codes(np.array([[111.5]]))


def test_corine_eval_samples_and_labels(corine):
    ds = SpectralEarthDataset(split="train", task_dir="corine", root=str(corine["ds_root"]), return_multilabel=True,
                              normalize=False)
    assert len(ds) == 3 * len(CASES) and ds.num_classes == 19
    for k, (codes, expected) in enumerate(CASES):
        x, y = ds[k]
        assert set(x) == {"imgs", "chn_ids"} and x["imgs"].shape == (202, 8, 8) and x["imgs"].dtype == torch.float32
        assert torch.equal(x["chn_ids"], ds_chn_ids("spectral_earth"))
        assert y.dtype == torch.int64 and y.shape == (19,)
        assert set(torch.nonzero(y).flatten().tolist()) == expected, codes
    img = corine["written"]["train"][0][2]
    ref = np.clip(img.transpose(2, 0, 1).astype(np.float32), 0, 10000) / 10000
    assert np.allclose(ds[0][0]["imgs"].numpy(), ref)
    raster = SpectralEarthDataset(split="test", task_dir="corine", root=str(corine["ds_root"]), normalize=False)
    _, lab = raster[2]
    assert lab.shape == (8, 8) and lab.dtype == torch.int64
    assert sorted(torch.unique(lab).tolist()) == [211, 335, 523]


def test_corine_normalisation_transform_and_errors(corine, tmp_path):
    from dinov2.data.augmentations import make_augmentation

    sel = make_augmentation([{"id": "ChnSelect", "wavelengths": [520, 1116, 2086, 2207]}])
    ds = SpectralEarthDataset(split="val", task_dir="corine", root=str(corine["ds_root"]), return_multilabel=True,
                              transform=sel)
    x, y = ds[0]
    assert x["chn_ids"].tolist() == [520, 1116, 2086, 2207] and x["imgs"].shape == (4, 8, 8)
    assert torch.isfinite(x["imgs"]).all() and y.sum() == 2
    assert (corine["ds_root"] / "spectral_earth/splits/corine/band_stats.json").is_file()
    with pytest.raises(ValueError, match="task_dir 'cdl' is unknown; valid: enmap, corine"):
        SpectralEarthDataset(task_dir="cdl", root=str(corine["ds_root"]))
    with pytest.raises(ValueError, match="return_multilabel needs a labelled task_dir"):
        SpectralEarthDataset(task_dir="enmap", return_multilabel=True, root=str(corine["ds_root"]))
    # a patch listed in the split whose label raster is missing is named
    rel = corine["written"]["val"][0][0]
    label = corine["ds_root"] / "spectral_earth/spectral_earth_downstream_datasets/enmap_corine/corine" / rel
    moved = tmp_path / "moved.tif"
    label.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match="corine label raster .*" + rel.split("/")[-1]):
            ds[0]
    finally:
        moved.rename(label)


def test_shipped_corine_configs(corine):
    """The published wavelength selections pick exactly those EnMAP channels; corine-s2 ends with the fixed
    B11/B12 pair (§9.8); the W&B `_sim` group names the three tasks."""
    from dinov2.data.augmentations import make_augmentation
    from dinov2.eval.tasks import build_task_cfg
    from omegaconf import OmegaConf

    ids = ds_chn_ids("spectral_earth")
    x = {"imgs": torch.zeros(202, 2, 2), "chn_ids": ids}
    picked = {}
    for name in CORINE_TASKS:
        cfg = OmegaConf.to_container(build_task_cfg(ROOT / f"dinov2/configs/eval/15min/sim/{name}.yaml"))
        assert cfg["task"]["id"] == "multilabelclassification" and cfg["optim"]["epochs"] == 10
        for ds_cfg in [cfg["train_dataset"], cfg["val_dataset"], *cfg["test_datasets_list"]]:
            assert ds_cfg["id"] == "SpectralEarth" and ds_cfg["task_dir"] == "corine" and ds_cfg["return_multilabel"]
        picked[name] = make_augmentation(cfg["test_datasets_list"][0]["transform"][:1])(x)["chn_ids"].tolist()
    assert picked["corine-4c"] == [520, 1116, 2086, 2207]
    assert picked["corine-12c"] == [477, 582, 686, 763, 921, 993, 1070, 1553, 1674, 2095, 2298, 2361]
    assert picked["corine-s2"][-2:] == [1609, 2207] and len(picked["corine-s2"]) == 12
    groups = yaml.safe_load((ROOT / "dinov2/configs/eval/defaults/wandb_averages.yaml").read_text())
    assert groups["_sim"] == [f"15min/sim/{n}/MulLabAvergPrec_micro" for n in CORINE_TASKS]


def test_corine_tasks_end_to_end(corine, tmp_path, monkeypatch):
    monkeypatch.setenv("RDIR", str(corine["rdir"]))
    run = make_run(tmp_path / "run")
    small = [{"id": "Resize", "size": 16}]
    cfgs = ";".join(str(ROOT / f"dinov2/configs/eval/15min/sim/{n}.yaml") for n in CORINE_TASKS)
    res = main(str(run), cfgs, device="cpu", **{
        "_default_augms.train_augm": small, "_default_augms.test_augm": small, "optim.epochs": 3, "optim.dl": DL,
        "heads.n_last_blocks_list": [1, 2], "heads.learning_rates": [0.01, 0.1]})
    keys = {"MulLabF1ScoreMacro_micro", "MulLabF1ScoreMacro_macro", "MulLabAvergPrec_micro", "MulLabAvergPrec_macro"}
    for name in CORINE_TASKS:
        r = res[f"15min/sim/{name}"]
        assert set(r) == keys and all(0.0 <= v <= 100.0 for v in r.values()), r
        out = run / "eval_model_final" / "15min/sim" / name
        for f in ("config.yaml", "results.csv", "results_eval_linear.json", "plots.png"):
            assert (out / f).is_file(), f"{name}/{f} missing"
    assert (run / "eval_model_final" / "15min" / "sim" / "results.csv").is_file()


def test_corine_labels_are_learnable(corine, tmp_path, monkeypatch):
    """Each CLC code adds its own spatial pattern: a longer probe (head picked by mAP) fits the multi-hot labels."""
    monkeypatch.setenv("RDIR", str(corine["rdir"]))
    small = [{"id": "Resize", "size": 16}]
    res = main(str(make_run(tmp_path / "run")), str(ROOT / "dinov2/configs/eval/15min/sim/corine-12c.yaml"),
               device="cpu", **{"_default_augms.train_augm": small, "_default_augms.test_augm": small,
                                "optim.epochs": 100, "optim.dl": DL, "heads.n_last_blocks_list": [1],
                                "optim.feature_cache": True,  # fixed train transform: same heads, one data pass
                                "heads.learning_rates": [0.1, 1.0, 5.0],
                                "task.val_metrics": [{"id": "MultiLabelAveragePrecision", "average": "micro"}]})
    assert res["15min/sim/corine-12c"]["MulLabAvergPrec_micro"] >= 90.0
