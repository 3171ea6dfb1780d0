"""MMEarth in the layout of its public download (h5 + tile_info + splits + band_stats, no parquet): metadata built
on first use (atomically, once under concurrent starts, or ahead of time by the CLI), correct values and channel
ids (B8A before B8 in the h5), and the shipped recipes building on it."""
import json
import multiprocessing as mp
import os
import shutil

import numpy as np
import pytest
import torch
from data_fixtures import FMOW_SPLIT_FILE, write_fmow, write_mmearth, write_satlas, write_spectral_earth

from dinov2.utils.config import CONFIG_DIR, load_config

# Sentinel-2 centre wavelengths (int nm) of the h5 channels B1..B7, B8A, B8, B9, B10, B11, B12, written out by hand
H5_S2_IDS = [442, 492, 559, 664, 704, 740, 782, 864, 827, 945, 1373, 1613, 2203]
S1_ASC_DESC_VV_VH = [-5, -6, -9, -10]


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setenv("RDIR", str(tmp_path))
    monkeypatch.setenv("ODIR", str(tmp_path / "out"))
    info = write_mmearth(str(tmp_path / "datasets"), n=5, layout="released")
    return info


def _row(ds, hf5_idx):
    return int(np.nonzero(ds.hf5_idx == hf5_idx)[0][0])


def test_fixture_is_the_released_layout(release):
    import h5py

    base = release["base"]
    assert sorted(os.listdir(base)) == ["data_1M_v001.h5", "data_1M_v001_band_stats.json",
                                        "data_1M_v001_splits.json", "data_1M_v001_tile_info.json"]
    with h5py.File(os.path.join(base, "data_1M_v001.h5")) as f:
        assert f["sentinel2"].dtype == np.uint16 and f["sentinel2"].shape == (5, 13, 16, 16)
        assert f["sentinel1"].shape == (5, 8, 16, 16) and f["metadata"].dtype.names == ("tile_id", "S2_type")
        tile_ids = [t.decode() for t in f["metadata"]["tile_id"]]
        s2_types = [t.decode() for t in f["metadata"]["S2_type"]]
        assert np.isneginf(f["sentinel1"][4]).all() and (f["sentinel2"][1, 10] == 0).all()  # no S1; l2a w/o B10
    tile_info = json.load(open(os.path.join(base, "data_1M_v001_tile_info.json")))
    assert list(tile_info) == tile_ids and [tile_info[t]["S2_type"] for t in tile_ids] == s2_types
    assert tile_info[tile_ids[4]]["BANDS"]["sentinel1_asc"] is None and "B10" not in tile_info[tile_ids[1]][
        "BANDS"]["sentinel2"]
    splits = json.load(open(os.path.join(base, "data_1M_v001_splits.json")))
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(5))  # a partition of the rows
    stats = json.load(open(os.path.join(base, "data_1M_v001_band_stats.json")))
    assert len(stats["sentinel2_l1c"]["mean"]) == 13 and len(stats["sentinel1"]["std"]) == 8


def test_values_and_channel_ids_from_the_release(release):
    from dinov2.data.datasets.mmearth import MMEarth

    base = release["base"]
    raw = MMEarth(base_path="${RDIR}/datasets/mmearth/data_1M_v001", normalize=False, remove_nans=False)
    assert os.path.isfile(os.path.join(base, "data_1M_v001.parquet"))  # built on first use
    assert sorted(raw.hf5_idx.tolist()) == [0, 1, 2, 3]  # tile 4 has no Sentinel-1 acquisition
    i2 = _row(raw, 2)
    s2 = raw.read_modality(i2, "sentinel2")
    assert torch.equal(s2, torch.from_numpy(release["s2"][2].astype(np.float32)))
    # h5 channel c holds ~100 (c+1): B8A (864 nm) is channel 7 (~800), B8 (827 nm) channel 8 (~900)
    view = next(v for v in raw[i2] if v["chn_ids"][0][0] > 0)
    ids, img = view["chn_ids"][0].tolist(), view["imgs"][0]
    assert ids == H5_S2_IDS
    for c in range(13):
        assert abs(img[c].mean().item() - 100 * (c + 1)) < 5, (c, ids[c])
    assert ids[7] == 864 and abs(img[7].mean().item() - 800) < 5 and ids[8] == 827

    ds = MMEarth(base_path=base)  # normalised, no-data channels removed
    l2a = ds.read_modality(_row(ds, 1), "sentinel2")  # l2a stats: mean 100(c+1) - 50, std 10 -> ~ +5
    assert abs(l2a[0].mean().item() - 5.0) < 0.3 and torch.isnan(l2a[10]).all()  # l2a B10 is 0 = no-data
    l1c = ds.read_modality(_row(ds, 2), "sentinel2")  # l1c stats: mean 100(c+1), std 5 -> ~ 0
    assert abs(l1c[3].mean().item()) < 0.2
    torch.manual_seed(0)
    views = ds[_row(ds, 1)]
    by_sign = {bool(v["chn_ids"][0][0] > 0): v for v in views}
    assert by_sign[True]["chn_ids"][0].tolist() == [i for i in H5_S2_IDS if i != 1373]  # B10 dropped
    assert by_sign[False]["chn_ids"][0].tolist() == S1_ASC_DESC_VV_VH  # HH/HV (-inf) dropped
    assert not torch.isnan(by_sign[False]["imgs"][0]).any()
    # corner no-data of tile 0 survives normalisation as NaN (detected on raw values)
    x0 = ds.read_modality(_row(ds, 0), "sentinel2")
    assert torch.isnan(x0[:, :4, :4]).all() and not torch.isnan(x0[:10, 4:, 4:]).any()


def test_splits_follow_the_splits_json(release):
    import pandas as pd

    from dinov2.data.datasets.mmearth import MMEarth

    base = release["base"]
    with open(os.path.join(base, "data_1M_v001_splits.json")) as fh:
        splits = json.load(fh)
    assert sorted(MMEarth(base, split="train").hf5_idx.tolist()) == sorted(splits["train"]) == [0, 1, 2]
    assert MMEarth(base, split="val").hf5_idx.tolist() == MMEarth(base, split="eval").hf5_idx.tolist() == [3]
    assert len(MMEarth(base, split="test")) == 0  # its only tile lacks Sentinel-1
    meta = pd.read_parquet(os.path.join(base, "data_1M_v001.parquet"))
    assert meta["tile_id"].tolist() == release["tile_ids"]
    assert meta["s2_type"].tolist() == release["s2_types"]
    assert list(meta["sensor"][4]) == ["aster", "canopy_height_eth", "dynamic_world", "esa_worldcover", "sentinel2"]
    with pytest.raises(ValueError, match="split must be one of"):
        MMEarth(base, split="validation")


def _build(base):
    from dinov2.data.datasets.mmearth import MMEarth

    return len(MMEarth(base_path=base))


def test_concurrent_first_use_builds_one_parquet(release):
    base = release["base"]
    with mp.get_context("fork").Pool(4) as pool:
        lengths = pool.map(_build, [base] * 4)
    assert lengths == [4, 4, 4, 4]
    left = sorted(os.listdir(base))
    assert "data_1M_v001.parquet" in left and not [f for f in left if f.startswith(".tmp_")]


def test_prepare_command_read_only_folder_and_errors(release, tmp_path, capsys, monkeypatch):
    import pandas as pd

    from dinov2.data.datasets import mmearth
    from dinov2.run.prepare_data import main

    base = release["base"]
    with pytest.raises(SystemExit) as e:
        main(["mmearth", "--help"])
    assert e.value.code == 0 and "tile_info" in capsys.readouterr().out
    assert main(["mmearth", base]) == 0
    parquet = os.path.join(base, "data_1M_v001.parquet")
    first = pd.read_parquet(parquet)
    assert len(first) == 5 and set(first["split"]) == {"train", "val", "test"}
    assert main(["mmearth", base, "--overwrite"]) == 0
    assert pd.read_parquet(parquet).equals(first)

    # a read-only copy of the download gets its metadata in the user cache
    ro = tmp_path / "ro" / "data_1M_v001"
    shutil.copytree(base, ro)
    os.remove(ro / "data_1M_v001.parquet")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.path.abspath(p) == str(ro) else real_access(p, mode))
    os.chmod(ro, 0o555)  # (root ignores the mode, hence the patched os.access)
    try:
        assert len(mmearth.MMEarth(base_path=str(ro))) == 4
    finally:
        os.chmod(ro, 0o755)
    assert not (ro / "data_1M_v001.parquet").exists()
    cached = list((tmp_path / "home" / ".cache" / "panopticon" / "mmearth").glob("data_1M_v001_*.parquet"))
    assert len(cached) == 1 and pd.read_parquet(cached[0]).equals(first)
    stamp = os.path.getmtime(cached[0])
    assert len(mmearth.MMEarth(base_path=str(ro))) == 4 and os.path.getmtime(cached[0]) == stamp  # not rebuilt

    # broken release files are named
    os.remove(parquet)
    with open(os.path.join(base, "data_1M_v001_tile_info.json")) as fh:
        info = json.load(fh)
    info.pop(release["tile_ids"][2])
    with open(os.path.join(base, "data_1M_v001_tile_info.json"), "w") as fh:
        json.dump(info, fh)
    with pytest.raises(ValueError, match=r"tile_info.json: no entry for tile '0002_tile"):
        mmearth.MMEarth(base_path=base)
    with open(os.path.join(base, "data_1M_v001_splits.json"), "w") as fh:
        json.dump({"train": [0, 7]}, fh)
    with pytest.raises(ValueError, match=r"splits.json: split 'train' has index 7 outside the 5 rows"):
        mmearth.prepare_metadata(base)
    os.remove(os.path.join(base, "data_1M_v001_splits.json"))
    with pytest.raises(FileNotFoundError, match="MMEarth splits file not found"):
        mmearth.MMEarth(base_path=base)


@pytest.mark.parametrize("recipe", ["quick_check.yaml", "stage2.yaml"])
def test_recipes_build_on_the_released_download(release, tmp_path, recipe):
    from dinov2.data.loaders import make_dataset

    ds_root = str(tmp_path / "datasets")
    if recipe == "stage2.yaml":  # the other pretraining datasets of the mix, in their layouts
        write_fmow(ds_root, n_footprints=1, entries=[("rgb", 256, 256), ("s2", 12, 12)])  # max_crop 256
        shutil.copy(os.path.join(ds_root, FMOW_SPLIT_FILE), os.path.join(
            ds_root, "fmow/metadata_v2/fmow_iwm_onid_train_val_savioclean_min42max1024.parquet"))
        write_satlas(ds_root)
        write_spectral_earth(ds_root)
    cfg = load_config(str(CONFIG_DIR / recipe), [])
    augm = dict(cfg.train.pretrain_augm, global_crops_size=28, local_crops_size=14)
    ds = make_dataset(cfg.train.dataset, pretrain_augm_cfg=augm, seed=0)
    if recipe == "stage2.yaml":
        from dinov2.data.datasets.mmearth import MMEarth

        parts = [type(d).__name__ for d in ds.datasets]
        k = next(i for i, d in enumerate(ds.datasets) if isinstance(d, MMEarth))
        assert len(ds.datasets[k]) == 3 and "MMEarth" in parts
        idx = sum(len(d) for d in ds.datasets[:k])
    else:
        assert len(ds) == 3  # train split, tiles with Sentinel-1
        idx = 0
    torch.manual_seed(0)
    out = ds[idx]
    crops = out["global_crops"]
    assert len(crops) == 2 and crops[0]["imgs"].shape == (13, 28, 28)
    assert all(torch.isfinite(c["imgs"]).all() for c in crops + out["local_crops"])
    used = torch.cat([c["chn_ids"][~c["spec_masks"]] for c in crops]).tolist()
    assert set(used) <= set(H5_S2_IDS) | set(S1_ASC_DESC_VV_VH)
