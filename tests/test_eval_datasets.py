"""Evaluation dataset readers on tiny fixtures written in the public on-disk layouts (tests/eval_fixtures.py)."""
import collections
import os
import pickle

import numpy as np
import pytest
import torch

from eval_fixtures import S2_12, fake_geobench, write_benv2, write_eurosat_sar, write_geobench_task, write_resisc45

from dinov2.data import sensors
from dinov2.data.datasets.geobench import GeobenchDataset, GeobenchPickleError, decode_attr_pickle, safe_loads

S2_IDS_12 = [442, 492, 559, 664, 704, 740, 782, 827, 864, 945, 1613, 2203]  # Sentinel-2 without B10


@pytest.fixture(scope="module")
def geobench_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("geobench")
    write_geobench_task(root, "m-eurosat", {"train": 8, "valid": 3, "test": 3}, bad_pickle_sample="evil_sample")
    write_geobench_task(root, "m-so2sat", {"train": 2, "valid": 1, "test": 1}, n_classes=17)
    write_geobench_task(root, "m-bigearthnet", {"train": 2, "valid": 1, "test": 1}, n_classes=43, kind="multilabel")
    write_geobench_task(root, "m-cashew-plant", {"train": 2, "valid": 1, "test": 1}, n_classes=7,
                        kind="segmentation")
    return root


@pytest.fixture
def geobench_env(geobench_dir, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(geobench_dir))
    return geobench_dir


def test_geobench_classification_sample(geobench_env):
    ds = GeobenchDataset("m-eurosat", split="train")
    assert len(ds) == 8 and ds.num_classes == 10
    x, y = ds[0]
    assert x["imgs"].shape == (13, 16, 16) and x["imgs"].dtype == torch.float32
    assert torch.equal(x["chn_ids"], sensors.ds_chn_ids("m-eurosat"))
    assert isinstance(y, int) and 0 <= y < 4
    # band_stats normalisation: the train split is ~zero-mean, unit-std per band
    stack = torch.stack([ds[i][0]["imgs"] for i in range(len(ds))])
    assert stack.mean(dim=(0, 2, 3)).abs().max() < 0.2
    assert (stack.std(dim=(0, 2, 3)) - 1).abs().max() < 0.2
    assert len(GeobenchDataset("m-eurosat", split="val")) == 3  # 'val' -> GEO-Bench 'valid'
    assert len(GeobenchDataset("m-eurosat", split="train", partition="0.10x_train")) == 1


def test_geobench_band_selection_by_name(geobench_env):
    full = GeobenchDataset("m-eurosat", split="train")
    sub = GeobenchDataset("m-eurosat", split="train", bands=["04 - Red", "03 - Green", "08 - NIR"])
    x_full, _ = full[1]
    x_sub, _ = sub[1]
    assert x_sub["chn_ids"].tolist() == [664, 559, 827]
    assert torch.allclose(x_sub["imgs"], x_full["imgs"][[3, 2, 7]])
    with pytest.raises(ValueError, match="unknown bands.*Purple"):
        GeobenchDataset("m-eurosat", split="train", bands=["Purple"])


def test_geobench_so2sat_band_subset(geobench_env):
    x, _ = GeobenchDataset("m-so2sat", split="train")[0]
    assert x["chn_ids"].tolist() == [-2, -1, 492, 559, 664, 704, 740, 782, 827, 864, 1613, 2203]
    assert x["imgs"].shape[0] == 12


def _file_oracle(task_dir, sample, bands):
    """Independent reading of one sample file: the named band datasets z-scored with band_stats.json, the label
    dataset, and the attribute pickle (decoded with the GEO-Bench stand-in classes)."""
    import ast
    import json

    import h5py

    stats = json.loads((task_dir / "band_stats.json").read_text())
    with h5py.File(task_dir / f"{sample}.hdf5") as f, fake_geobench():
        imgs = np.stack([(np.asarray(f[b], np.float64) - stats[b]["mean"]) / stats[b]["std"] for b in bands])
        mask = np.asarray(f["label"]) if "label" in f else None
        attrs = pickle.loads(ast.literal_eval(f.attrs["pickle"]))
    return torch.from_numpy(imgs).float(), mask, attrs


def test_geobench_multilabel_and_segmentation(geobench_env):
    ds = GeobenchDataset("m-bigearthnet", split="train")
    x, y = ds[0]
    imgs, _, attrs = _file_oracle(ds.task_dir, ds.samples[0], S2_12)
    assert torch.allclose(x["imgs"], imgs, atol=1e-5) and x["chn_ids"].tolist() == S2_IDS_12
    assert y.dtype == torch.float32 and y.tolist() == [float(v) for v in attrs["label"]] and y.sum() == 2
    # m-cashew-plant files hold the 12 spectral bands AND a cloud-probability band: the 12 are selected by name
    ds = GeobenchDataset("m-cashew-plant", split="train")
    assert [i.name for i in ds.task_specs.bands_info] == S2_12 + ["Cloud Probability"]
    x, mask = ds[1]
    imgs, file_mask, _ = _file_oracle(ds.task_dir, ds.samples[1], S2_12)
    assert x["chn_ids"].tolist() == S2_IDS_12 and torch.allclose(x["imgs"], imgs, atol=1e-5)
    assert mask.dtype == torch.int64 and torch.equal(mask, torch.from_numpy(file_mask.astype(np.int64)))


def test_geobench_so2sat_values(geobench_env):
    """m-so2sat keeps VH real, VV real and the 10 Sentinel-2 bands (file bands 0, 2, 8..17), z-scored."""
    ds = GeobenchDataset("m-so2sat", split="train")
    names = [i.name for i in ds.task_specs.bands_info]
    x, y = ds[0]
    imgs, _, attrs = _file_oracle(ds.task_dir, ds.samples[0], [names[i] for i in [0, 2, *range(8, 18)]])
    assert torch.allclose(x["imgs"], imgs, atol=1e-5) and y == attrs["label"]


def test_geobench_refuses_foreign_pickle_classes(geobench_env):
    ds = GeobenchDataset("m-eurosat", split="test")
    with pytest.raises(GeobenchPickleError) as err:
        ds[ds.samples.index("evil_sample")]
    assert "posix.system" in str(err.value) or "nt.system" in str(err.value)
    assert "evil_sample.hdf5" in str(err.value)
    with pytest.raises(GeobenchPickleError, match="collections.Counter.*attrs.h5"):
        decode_attr_pickle(str(pickle.dumps({"label": collections.Counter()})), "attrs.h5")
    # plain data, numpy arrays and datetimes are fine
    ok = decode_attr_pickle(str(pickle.dumps({"label": np.arange(3), "n": np.float32(2.5)})), "ok.h5")
    assert ok["label"].tolist() == [0, 1, 2] and float(ok["n"]) == 2.5
    with pytest.raises(GeobenchPickleError, match="geobench.dataset.Evil"):  # unknown class even inside geobench
        safe_loads(b"cgeobench.dataset\nEvil\n.", "task_specs.pkl")
    with pytest.raises(GeobenchPickleError, match="builtins.eval"):
        safe_loads(pickle.dumps(eval), "task_specs.pkl")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_geobench_unpickler_reads_real_metadata_types(protocol):
    """Sample attribute dicts hold rasterio CRS, affine transforms, dates and numpy values: all decode safely."""
    import datetime

    from affine import Affine
    from rasterio.crs import CRS

    d = {"crs": CRS.from_epsg(32633), "transform": Affine(10, 0, 5, 0, -10, 6), "date": datetime.date(2020, 1, 1),
         "arr": np.arange(4, dtype=np.int16).reshape(2, 2), "n": np.int64(3), "ids": {1, 2}}
    out = decode_attr_pickle(str(pickle.dumps(d, protocol=protocol)), "sample.hdf5")
    assert "32633" in out["crs"].value and tuple(out["transform"])[:6] == (10, 0, 5, 0, -10, 6)
    assert out["arr"].tolist() == [[0, 1], [2, 3]] and int(out["n"]) == 3 and out["ids"] == {1, 2}
    assert out["date"] == datetime.date(2020, 1, 1)


def test_geobench_missing_env_and_folders(geobench_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    with pytest.raises(EnvironmentError, match="GEO_BENCH_DIR"):
        GeobenchDataset("m-eurosat")
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="GEO_BENCH_DIR.*nope"):
        GeobenchDataset("m-eurosat")
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="classification_v1.0/m-eurosat"):
        GeobenchDataset("m-eurosat")


def test_resisc45(tmp_path, monkeypatch):
    from dinov2.data.datasets.resisc45 import CLASSES, RESISC45

    write_resisc45(tmp_path)
    ds = RESISC45(str(tmp_path), split="train")
    assert len(ds) == 12 and ds.num_classes == 45
    x, y = ds[0]
    assert x["imgs"].shape == (3, 32, 32) and x["chn_ids"].tolist() == [664, 559, 492]
    assert CLASSES[y] == "airplane"
    assert sorted({ds[i][1] for i in range(len(ds))}) == [CLASSES.index(c) for c in ("airplane", "beach", "forest")]
    raw = RESISC45(str(tmp_path), split="test", normalize=False)[0][0]["imgs"]
    assert 0 <= raw.min() and raw.max() <= 1
    with pytest.raises(FileNotFoundError, match="missing_root"):
        RESISC45(str(tmp_path / "missing_root"))
    monkeypatch.delenv("RDIR", raising=False)
    with pytest.raises(EnvironmentError, match="RDIR"):
        RESISC45()


def test_benv2_channel_order_and_labels(tmp_path):
    from dinov2.data.datasets.benv2 import LABELS_19, BigEarthNetv2

    write_benv2(tmp_path, {"train": 2, "validation": 1, "test": 1}, vv=-10.0, vh=-20.0)
    s1 = BigEarthNetv2(str(tmp_path), split="train", bands="s1")
    x, y = s1[0]
    assert x["chn_ids"].tolist() == [-1, -2]  # VV, VH — the published reader had the data as VH, VV (docs/differences.md)
    vv_norm = (-10.0 - (-12.6439)) / 5.1335
    vh_norm = (-20.0 - (-19.3526)) / 5.5905
    assert torch.allclose(x["imgs"][0], torch.full((120, 120), vv_norm), atol=1e-4)
    assert torch.allclose(x["imgs"][1], torch.full((120, 120), vh_norm), atol=1e-4)
    assert y.shape == (19,) and y.sum() == 2 and LABELS_19[int(y.nonzero()[0])] in LABELS_19[:3]
    s2 = BigEarthNetv2(str(tmp_path), split="val", bands="s2")
    assert len(s2) == 1 and s2[0][0]["imgs"].shape == (12, 120, 120)
    both = BigEarthNetv2(str(tmp_path), split="test", bands="all")[0][0]
    assert both["imgs"].shape == (14, 120, 120) and both["chn_ids"][:3].tolist() == [-1, -2, 442]
    with pytest.raises(ValueError, match="bands must be one of"):
        BigEarthNetv2(str(tmp_path), bands="rgb")
    os.remove(tmp_path / "metadata.parquet")
    with pytest.raises(FileNotFoundError, match="metadata.parquet"):
        BigEarthNetv2(str(tmp_path))


def test_eurosat_sar(tmp_path):
    from dinov2.data.datasets.eurosat_sar import CLASSES, EurosatSAR

    import pandas as pd
    import tifffile

    write_eurosat_sar(tmp_path, {"train": 4, "val": 2, "test": 2})
    ds = EurosatSAR(str(tmp_path), split="train,val")
    assert len(ds) == 6 and ds.num_classes == 10
    rows = pd.concat([pd.read_csv(tmp_path / "train.csv"), pd.read_csv(tmp_path / "val.csv")], ignore_index=True)
    for i in (0, 5):  # a train and a val sample: the file's VV, VH in dB z-scored with the published statistics
        x, y = ds[i]
        raw = tifffile.imread(tmp_path / rows.filepath[i]).astype(np.float64)  # (H, W, 2)
        ref = (raw - [-11.6568, -18.4975]) / [6.0908, 6.1924]
        assert x["chn_ids"].tolist() == [-1, -2]
        assert torch.allclose(x["imgs"], torch.from_numpy(ref.transpose(2, 0, 1)).float(), atol=1e-5)
        assert y == CLASSES.index(rows.class_name[i])
    with pytest.raises(FileNotFoundError, match="small_train.csv"):
        EurosatSAR(str(tmp_path), split="small_train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        EurosatSAR(str(tmp_path / "nowhere"))
