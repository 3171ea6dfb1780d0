"""make_dataset builds every pretraining dataset and their concatenation from config dicts; subsets; samplers;
DataLoader workers (lazy per-worker handles)."""
import itertools

import pytest
import torch

import data_fixtures as fx
from dinov2.data.loaders import make_data_loader, make_dataset, subset_indices
from dinov2.data.samplers import EpochSampler, InfiniteSampler
from dinov2.data.views import check_sample

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")]


@pytest.fixture(scope="module")
def rdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rdir_loaders")
    fx.write_all_pretrain(str(root))
    return str(root), fx.write_s2_scene(str(root / "scene"))


CFGS = {
    "FmowDataset": {"id": "FmowDataset", "split": "train", "max_crop": 20},
    "MMEarth": {"id": "MMEarth", "base_path": "${RDIR}/datasets/mmearth/data_1M_v001"},
    "SatlasDataset": {"id": "SatlasDataset", "root": "${RDIR}/datasets/satlas",
                      "metadata_path": "${RDIR}/datasets/" + fx.SATLAS_META},
    "SpectralEarth": {"id": "SpectralEarth", "split": "train"},
}


@pytest.fixture
def env(rdir, monkeypatch):
    monkeypatch.setenv("RDIR", rdir[0])
    return rdir[1]


def _scene_cfg(s2, **kw):
    return {"id": "GeoTiffScenes", "scenes": [{"sensor": "sentinel2", "files": s2["files"]}],
            "patch_size_m": 240, "split": "all", **kw}


@pytest.mark.parametrize("name", sorted(CFGS))
def test_make_dataset_builds_each_dataset(env, name):
    ds = make_dataset(dict(CFGS[name]))
    assert len(ds) > 0 and ds.is_webdataset is False
    check_sample(ds[0])


def test_make_dataset_concat_subset_and_omegaconf(env):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"id": "ConcatDataset", "datasets": [CFGS["FmowDataset"], CFGS["SpectralEarth"],
                                                               _scene_cfg(env, subset=4)]})
    ds = make_dataset(cfg)
    assert len(ds) == 3 + 3 + 4
    for i in (0, 3, 9):
        check_sample(ds[i])
    assert ds[4][0]["imgs"][0].shape[0] == 202
    sup = make_dataset({**CFGS["SpectralEarth"], "subset": 7})
    assert len(sup) == 7 and sup.indices == [0, 1, 2, 0, 1, 2, 0]
    frac = make_dataset(_scene_cfg(env, subset=0.5), seed=3)
    assert len(frac) == 12 and frac.indices == make_dataset(_scene_cfg(env, subset=0.5), seed=3).indices
    with pytest.raises(ValueError, match="Unknown dataset id 'Nope'"):
        make_dataset({"id": "Nope"})
    with pytest.raises(TypeError, match="FmowDataset.*rejected its config keys.*bogus"):
        make_dataset({**CFGS["FmowDataset"], "bogus": 1})


def test_subset_rules():
    assert subset_indices(10, -1, 0) is None and subset_indices(10, 1.0, 0) is None
    a = subset_indices(10, 4, 0)
    assert len(set(a.tolist())) == 4 and a.tolist() == subset_indices(10, 4, 0).tolist()
    assert subset_indices(3, 5, 0).tolist() == [0, 1, 2, 0, 1]
    assert len(subset_indices(10, 0.25, 0)) == 2 and len(subset_indices(10, 0.01, 0)) == 1
    with pytest.raises(ValueError, match="subset"):
        subset_indices(10, 0, 0)


AUGM = {"id": "PanopticonAugmentation", "global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2}


# the sensors (band YAMLs) whose channels each pretraining dataset's views carry
SENSOR_CFGS = {"FmowDataset": ["fmow_s2", "fmow_wv23", "fmow_rgb"], "MMEarth": ["mmearth_s1", "mmearth_s2"],
               "SatlasDataset": ["satlas_s1", "satlas_s2", "satlas_landsat"], "SpectralEarth": ["spectral_earth"]}


def _check_crop(crop, allowed_ids):
    """A padded crop: real channels carry ids of the dataset's sensors, padded ones are zero images."""
    real = ~crop["spec_masks"]
    assert real.any() and set(crop["chn_ids"][real].tolist()) <= allowed_ids
    assert (crop["imgs"][crop["spec_masks"]] == 0).all() and torch.isfinite(crop["imgs"]).all()
    assert crop["imgs"][real].std() > 0  # real pixels, not a constant fill


@pytest.mark.parametrize("name", sorted(CFGS))
def test_every_dataset_feeds_the_pretrain_augmentation(env, name):
    from dinov2.data.sensors import ds_chn_ids

    allowed = {int(i) for ds_name in SENSOR_CFGS[name] for i in ds_chn_ids(ds_name)}
    ds = make_dataset({**CFGS[name], "pretrain_augm_overwrites": {"local_crops_number": 3}}, pretrain_augm_cfg=AUGM)
    out = ds[1]
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3
    for crop in out["global_crops"]:
        assert crop["imgs"].shape == (13, 32, 32) and crop["imgs"].dtype == torch.float32
        assert crop["chn_ids"].shape[0] == 13 and crop["spec_masks"].shape == (13,)
        _check_crop(crop, allowed)
    for crop in out["local_crops"]:
        assert crop["imgs"].shape[-2:] == (16, 16)
        _check_crop(crop, allowed)


def test_make_dataset_with_pretrain_augmentation(env):
    from dinov2.data.sensors import ds_chn_ids

    scenes = make_dataset(_scene_cfg(env), pretrain_augm_cfg=AUGM)
    crop = scenes[0]["global_crops"][1]
    assert crop["imgs"].shape == (13, 32, 32)
    _check_crop(crop, {int(i) for i in ds_chn_ids("fmow_s2")})  # the scene's Sentinel-2 bands
    concat = make_dataset({"id": "ConcatDataset", "datasets": [_scene_cfg(env)],
                           "pretrain_augm_overwrites": {"global_crops_size": 16}}, pretrain_augm_cfg=AUGM)
    assert concat[0]["global_crops"][0]["imgs"].shape[-1] == 16


def test_data_loader_workers_open_their_own_handles(env):
    ds = make_dataset({**CFGS["MMEarth"], "num_sens": 1, "remove_nans": False})
    ds[1]  # opens the HDF5 file in the main process first
    collate = lambda batch: batch  # noqa: E731 - samples are lists of views
    loader = make_data_loader(ds, batch_size=2, num_workers=2, sampler_type="epoch", shuffle=False,
                              drop_last=False, collate_fn=collate)
    batches = list(loader)
    assert sum(len(b) for b in batches) == len(ds)
    for b in batches:
        for s in b:
            check_sample(s)
    scenes = make_dataset(_scene_cfg(env, mode="eval", img_size=8))
    loader = make_data_loader(scenes, batch_size=5, num_workers=2, sampler_type="infinite", seed=1)
    x, y = next(iter(loader))
    assert x["imgs"].shape == (5, 9, 8, 8) and y.tolist() == [0] * 5


def test_infinite_sampler_determinism_sharding_and_advance():
    take = lambda s, k: list(itertools.islice(iter(s), k))  # noqa: E731
    full = take(InfiniteSampler(7, seed=3, start=0, step=1), 30)
    assert full == take(InfiniteSampler(7, seed=3, start=0, step=1), 30)
    assert full != take(InfiniteSampler(7, seed=4, start=0, step=1), 30)
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert take(InfiniteSampler(7, seed=3, start=1, step=3), 8) == full[1::3][:8]
    assert take(InfiniteSampler(7, seed=3, start=1, step=3, advance=5), 4) == full[1::3][5:9]
    assert take(InfiniteSampler(4, shuffle=False, start=0, step=1), 6) == [0, 1, 2, 3, 0, 1]
    with pytest.raises(ValueError, match="non-empty"):
        InfiniteSampler(0)


def test_epoch_sampler():
    s = EpochSampler(5, size=7, shuffle=False, start=0, step=1)
    assert list(s) == [0, 1, 2, 3, 4, 0, 1] and len(s) == 7
    r0 = EpochSampler(5, shuffle=True, seed=2, start=0, step=2)
    r1 = EpochSampler(5, shuffle=True, seed=2, start=1, step=2)
    assert sorted(list(r0) + list(r1)) == list(range(5)) and len(r0) == 3 and len(r1) == 2
    r0.set_epoch(1)  # epoch e shuffles with seed + e
    assert list(r0) == list(EpochSampler(5, shuffle=True, seed=3, start=0, step=2))
