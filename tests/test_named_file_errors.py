"""Damaged input files raise errors that name the file: truncated GeoTIFFs during scene statistics and patch
reads, malformed JSON metadata, empty or damaged GEO-Bench pickles, HDF5 samples with external storage."""
import os

import numpy as np
import pytest

import data_fixtures as fx
from eval_fixtures import write_geobench_task

from dinov2.data.io import UnreadableFileError, read_json


def _truncate(path, fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.truncate(int(size * fraction))


def test_truncated_geotiff_during_scene_statistics(tmp_path):
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes

    s2 = fx.write_s2_scene(str(tmp_path / "s2"))
    _truncate(s2["files"]["B04"])
    with pytest.raises(UnreadableFileError) as err:
        GeoTiffScenes([{"sensor": "sentinel2", "nodata": 0, "files": s2["files"]}], patch_size_m=240)
    assert err.value.path == s2["files"]["B04"] and s2["files"]["B04"] in str(err.value)
    assert "TIFFRead" in str(err.value)  # GDAL's own reason is kept, not only "see previous exception"


def test_damaged_scene_statistics_cache_is_recomputed(tmp_path):
    """A statistics cache left damaged (e.g. by a killed write) is recomputed instead of failing."""
    from dinov2.data.datasets import geotiff_scenes

    s2 = fx.write_s2_scene(str(tmp_path / "s2"))
    spec = [{"sensor": "sentinel2", "nodata": 0, "files": s2["files"]}]
    cache = tmp_path / "cache"
    first = geotiff_scenes.GeoTiffScenes(spec, patch_size_m=240, cache_dir=str(cache))
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(cache_file.read_bytes()[:40])
    geotiff_scenes._SCENE_CACHE.clear()
    again = geotiff_scenes.GeoTiffScenes(spec, patch_size_m=240, cache_dir=str(cache))
    assert [m.tolist() for m in again.scenes[0]["mean"]] == [m.tolist() for m in first.scenes[0]["mean"]]
    assert [m.tolist() for m in first.scenes[0]["mean"]][0][0] > 999  # B02 values are 1000 + x/60 m


def test_read_json_names_file_and_position(tmp_path):
    bad = tmp_path / "meta.json"
    bad.write_text('{"train": ["a", "b"],\n "test": [')
    with pytest.raises(ValueError, match=r"meta.json is not valid JSON: Expecting value at line 2 column 11"):
        read_json(str(bad), "metadata")
    bad.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ValueError, match="meta.json is not valid JSON: UnicodeDecodeError"):
        read_json(str(bad))
    bad.write_text('{"a": [1, 2.5]}')
    assert read_json(str(bad)) == {"a": [1, 2.5]}


@pytest.fixture
def geobench_task(tmp_path, monkeypatch):
    tdir = write_geobench_task(tmp_path, "m-eurosat", {"train": 2, "valid": 1, "test": 1})
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path))
    return tdir


@pytest.mark.parametrize("name", ["default_partition.json", "band_stats.json"])
def test_geobench_malformed_json(geobench_task, name):
    from dinov2.data.datasets.geobench import GeobenchDataset

    path = geobench_task / name
    path.write_text(path.read_text()[:-7])
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        GeobenchDataset("m-eurosat", split="train")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path} holds a list, expected a JSON object"):
        GeobenchDataset("m-eurosat", split="train")


def test_geobench_empty_and_truncated_task_specs(geobench_task):
    from dinov2.data.datasets.geobench import GeobenchDataset, GeobenchPickleError

    path = geobench_task / "task_specs.pkl"
    good = path.read_bytes()
    path.write_bytes(b"")
    with pytest.raises(GeobenchPickleError, match=f"{path} is empty"):
        GeobenchDataset("m-eurosat", split="train")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"Cannot unpickle {path}"):
        GeobenchDataset("m-eurosat", split="train")
    path.write_bytes(b"\x80\x04K\x07.")  # a valid pickle of the wrong thing
    with pytest.raises(ValueError, match=f"{path} holds a int, not a TaskSpecifications"):
        GeobenchDataset("m-eurosat", split="train")


def test_geobench_sample_with_external_storage_is_refused(geobench_task, tmp_path):
    import h5py

    from dinov2.data.datasets.geobench import GeobenchDataset

    ds = GeobenchDataset("m-eurosat", split="train", normalize=False)
    path = geobench_task / f"{ds.samples[0]}.hdf5"
    band = ds.band_names[0]
    before = ds.read_sample(ds.samples[0])[0]
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(256, dtype=np.float32).tobytes())
    with h5py.File(path, "a") as fp:
        del fp[band]
        fp.create_dataset(band, shape=(16, 16), dtype="f4", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
    with pytest.raises(ValueError, match=f"{path}: dataset '{band}' uses external storage"):
        ds.read_sample(ds.samples[0])
    with h5py.File(path, "a") as fp:  # the same pixels stored in the file are read as before
        del fp[band]
        fp.create_dataset(band, data=before[0].numpy())
    assert np.array_equal(ds.read_sample(ds.samples[0])[0].numpy(), before.numpy())
