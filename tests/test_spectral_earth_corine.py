"""SpectralEarth CORINE downstream task: CLC label rasters -> BigEarthNet-19 multi-hot, eval samples, and the
shipped `15min/sim/corine-*` linear-probe tasks end to end on a tiny run folder."""
import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from data_fixtures import CORINE_DIR, _write_tiff_hwc, write_spectral_earth_corine
from published_tables import ENMAP_PRODUCT_NM, ENMAP_PUBLISHED_IDS
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
# EnMAP band (0-based, of 224) at each of the 202 SpectralEarth positions: B001-B126, B142-B160, B168-B224
SE_BANDS = list(range(0, 126)) + list(range(141, 160)) + list(range(167, 224))


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
    # default normalisation: the published SpectralEarth constants (first bands typed in: mean 0.0803, 0.0789;
    # std 0.1522, 0.1513), nothing computed or cached
    raw = np.clip(corine["written"]["val"][0][2].transpose(2, 0, 1).astype(np.float64), 0, 10000) / 10000
    full = SpectralEarthDataset(split="val", task_dir="corine", root=str(corine["ds_root"]))[0][0]["imgs"]
    assert np.allclose(full[0].numpy(), (raw[0] - 0.0803) / 0.1522, atol=1e-5)
    assert np.allclose(full[1].numpy(), (raw[1] - 0.0789) / 0.1513, atol=1e-5)
    assert np.allclose(full[201].numpy(), (raw[201] - 0.1355) / 0.1121, atol=1e-5)
    assert not (corine["ds_root"] / "spectral_earth/splits/corine/band_stats.json").exists()
    # a user-given band_stats overrides them; 'from_data' computes and caches robust statistics
    given = {"mean": [0.5] * 202, "std": [2.0] * 202}
    own = SpectralEarthDataset(split="val", task_dir="corine", root=str(corine["ds_root"]), band_stats=given)[0][0]
    assert np.allclose(own["imgs"].numpy(), (raw - 0.5) / 2.0, atol=1e-5)
    SpectralEarthDataset(split="val", task_dir="corine", root=str(corine["ds_root"]), band_stats="from_data")
    assert (corine["ds_root"] / "spectral_earth/splits/corine/band_stats.json").is_file()
    with pytest.raises(ValueError, match="band stats have 3 entries, expected 202"):
        SpectralEarthDataset(split="val", task_dir="corine", root=str(corine["ds_root"]),
                             band_stats={"mean": [0.0] * 3, "std": [1.0] * 3})
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


def test_channel_ids_product_order_and_published_option(corine):
    """Default ids: product-order EnMAP centres of the 202 bands; `published_ids` gives the published table."""
    root = str(corine["ds_root"])
    x, _ = SpectralEarthDataset(split="test", task_dir="corine", root=root, normalize=False)[0]
    assert x["chn_ids"].tolist() == [int(ENMAP_PRODUCT_NM[b]) for b in SE_BANDS]
    assert all(abs(i - ENMAP_PRODUCT_NM[b]) <= 5 for i, b in zip(x["chn_ids"].tolist(), SE_BANDS))
    xp, _ = SpectralEarthDataset(split="test", task_dir="corine", root=root, normalize=False, published_ids=True)[0]
    assert xp["chn_ids"].tolist() == [ENMAP_PUBLISHED_IDS[b] for b in SE_BANDS]
    assert torch.equal(xp["imgs"], x["imgs"])  # same channels, only the ids differ
    fs = SpectralEarthDataset(split="test", task_dir="corine", root=root, normalize=False, full_spectra=True)[0][0]
    assert fs["chn_ids"][:, 0].tolist() == pytest.approx([ENMAP_PRODUCT_NM[b] for b in SE_BANDS])


def test_224_band_files_refused_unless_asked(corine, tmp_path):
    """A full 224-band EnMAP cube is refused with a message naming the 202 expected bands; `from_224_bands`
    keeps exactly the SpectralEarth bands."""
    root = tmp_path / "ds"
    rel = "T0/full.tif"
    cube = (np.arange(224, dtype=np.int16)[None, None, :] * 10 + np.zeros((4, 4, 1), np.int16))
    _write_tiff_hwc(str(root / CORINE_DIR / "enmap" / rel), cube)
    _write_tiff_hwc(str(root / CORINE_DIR / "corine" / rel), np.full((4, 4), 111, np.uint16))
    (root / "spectral_earth/splits/corine").mkdir(parents=True)
    (root / "spectral_earth/splits/corine/train.txt").write_text(rel + "\n")
    ds = SpectralEarthDataset(task_dir="corine", root=str(root), normalize=False)
    with pytest.raises(ValueError, match="full.tif has 224 bands; 202 bands are expected.*from_224_bands"):
        ds[0]
    x, _ = SpectralEarthDataset(task_dir="corine", root=str(root), normalize=False, from_224_bands=True)[0]
    assert x["imgs"].shape == (202, 4, 4)
    assert (x["imgs"][:, 0, 0] * 10000 / 10).round().long().tolist() == SE_BANDS


def test_chnselect_refuses_ambiguous_wavelengths():
    """Two EnMAP bands have id 993 in both tables: a wavelength cannot choose between them."""
    from dinov2.data.augmentations import make_augmentation

    for name in ("spectral_earth", "spectral_earth_published"):
        x = {"imgs": torch.zeros(202, 2, 2), "chn_ids": ds_chn_ids(name)}
        with pytest.raises(ValueError, match="wavelength 993 is ambiguous"):
            make_augmentation([{"id": "ChnSelect", "wavelengths": [993]}])(x)


def test_shipped_corine_configs(corine):
    """The corine tasks select the published positions of the 202-band tensor; at those positions the published
    id table reads exactly the published wavelengths (4c 520 ... 2207, 12c 477 ... 2361). corine-s2 is the
    S2-matched set (a documented difference). The W&B `_sim` group names the three tasks."""
    from dinov2.data.augmentations import make_augmentation
    from dinov2.eval.tasks import build_task_cfg
    from omegaconf import OmegaConf

    published = {"corine-4c": [520, 1116, 2086, 2207],
                 "corine-12c": [477, 582, 686, 763, 921, 993, 1070, 1553, 1674, 2095, 2298, 2361]}
    # positions by hand: 12c band 6 is position 100 = EnMAP B101 (993.1 nm), not position 99 (B100, 982.5 nm)
    positions = {"corine-4c": [21, 111, 157, 171],
                 "corine-12c": [12, 33, 50, 61, 84, 100, 107, 128, 139, 158, 182, 190],
                 "corine-s2": [5, 15, 29, 47, 53, 58, 64, 69, 74, 84, 133, 171]}
    marker = torch.arange(202, dtype=torch.float32)[:, None, None].expand(202, 2, 2)
    for name in CORINE_TASKS:
        cfg = OmegaConf.to_container(build_task_cfg(ROOT / f"dinov2/configs/eval/15min/sim/{name}.yaml"))
        assert cfg["task"]["id"] == "multilabelclassification" and cfg["optim"]["epochs"] == 10
        for ds_cfg in [cfg["train_dataset"], cfg["val_dataset"], *cfg["test_datasets_list"]]:
            assert ds_cfg["id"] == "SpectralEarth" and ds_cfg["task_dir"] == "corine" and ds_cfg["return_multilabel"]
            assert ds_cfg["transform"][0] == cfg["train_dataset"]["transform"][0]
        select = make_augmentation(cfg["test_datasets_list"][0]["transform"][:1])
        out = select({"imgs": marker, "chn_ids": ds_chn_ids("spectral_earth")})
        assert out["imgs"][:, 0, 0].long().tolist() == positions[name]
        assert out["chn_ids"].tolist() == [int(ENMAP_PRODUCT_NM[SE_BANDS[p]]) for p in positions[name]]
        pub = select({"imgs": marker, "chn_ids": ds_chn_ids("spectral_earth_published")})["chn_ids"].tolist()
        if name in published:
            assert pub == published[name]
    s2 = [int(ENMAP_PRODUCT_NM[SE_BANDS[p]]) for p in positions["corine-s2"]]
    s2_nm = [442.9, 492, 559, 664, 704, 740, 782, 827, 864, 945, 1613, 2203]  # Sentinel-2 B1-B9, B11, B12
    assert all(abs(a - b) < 7 for a, b in zip(s2, s2_nm)), s2
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
