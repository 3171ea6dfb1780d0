"""Sensor registry: ids of the reference tables, lookup by key/name, dataset band lists, errors."""
import pytest
import torch

from dinov2.data import sensors

S2_IDS = [442, 492, 559, 664, 704, 740, 782, 827, 864, 945, 1373, 1613, 2203]
LANDSAT_IDS = [442, 482, 560, 654, 864, 1608, 2203, 596, 1374, 10847, 12017]


@pytest.mark.parametrize("sensor,expected", [
    ("sentinel2", S2_IDS),
    ("sentinel1", list(range(-1, -13, -1))),
    ("landsat9", LANDSAT_IDS),
    ("landsat8", LANDSAT_IDS),
    ("wv23", [427, 482, 545, 604, 660, 723, 823, 906]),
    ("qb2_ge1", [482, 547, 665, 840]),
    ("superdove", [443, 490, 532, 565, 611, 665, 706, 864]),
    ("drone", [840, 650, 560, 450]),
    ("debug", [1, 2, 3, 4, 5]),
])
def test_sensor_ids_match_reference(sensor, expected):
    ids = sensors.band_chn_ids(sensor, sensors.sensor_bands(sensor))
    assert ids.dtype == torch.int16
    assert ids.tolist() == expected


def test_hyperspectral_tables():
    enmap = sensors.band_chn_ids("enmap", sensors.sensor_bands("enmap")).tolist()
    assert len(enmap) == 224 and enmap[:3] == [418, 424, 429] and enmap[-2:] == [2437, 2445]
    assert enmap.count(911) == 2 and enmap.count(993) == 2
    sig = sensors.band_chn_ids("enmap", sensors.sensor_bands("enmap"), full_spectra=True)[:, 1]
    assert sig.min().item() == pytest.approx(2.46) and sig.max().item() == pytest.approx(4.85)
    aviris = sensors.band_chn_ids("aviris", sensors.sensor_bands("aviris")).tolist()
    assert aviris[:5] == [404, 414, 423, 432, 442] and aviris[-2:] == [2485, 2495]
    intu = sensors.band_chn_ids("intuition", sensors.sensor_bands("intuition")).tolist()
    assert len(intu) == 150 and intu[:3] == [462, 465, 468] and intu[-2:] == [935, 938]
    neon = sensors.band_chn_ids("neon_aop", sensors.sensor_bands("neon_aop")).tolist()
    assert len(neon) == 429 and neon[:6] == [664, 559, 492, 382, 387, 392] and neon[-2:] == [2506, 2511]


def test_lookup_by_key_or_name_case_insensitive():
    by_key = sensors.band_chn_ids("sentinel2", ["B04", "b8a", "B8", "b01"])
    by_name = sensors.band_chn_ids("Sentinel2", ["RED", "nir_narrow", "nir", "coastal"])
    assert by_key.tolist() == by_name.tolist() == [664, 864, 827, 442]
    assert sensors.resolve_band("landsat8", "B1") == "B01"
    assert sensors.resolve_band("aviris", "b007") == "B7"
    assert sensors.band_chn_ids("sentinel1", ["vv_desc", "VH"]).tolist() == [-9, -2]


def test_full_spectra_pairs():
    ids = sensors.band_chn_ids("sentinel2", ["B01", "B02"], full_spectra=True)
    assert ids.shape == (2, 2) and ids.dtype == torch.float32
    assert ids[0].tolist() == pytest.approx([442.92, 7.2])
    sar = sensors.band_chn_ids("sentinel1", ["B05"], full_spectra=True)
    assert sar.tolist() == [[-5.0, -1.0]]


def test_band_info_gsd():
    assert sensors.band_info("sentinel2", "B05")["gsd"] == 20
    assert sensors.band_info("landsat8", "pan")["gsd"] == 15
    assert sensors.band_info("enmap", "B010")["gsd"] == 30  # sensor-wide GSD
    assert sensors.band_info("neon_aop", "B000")["gsd"] == 1.0  # lower-case gsd key


@pytest.mark.parametrize("ds,n,head", [
    ("fmow_s2", 13, S2_IDS[:3]), ("mmearth_s1", 8, [-5, -6, -7]), ("fmow_rgb", 3, [665, 547, 482]),
    ("satlas_s2", 9, [664, 559, 492]), ("satlas_landsat", 11, LANDSAT_IDS[:3]), ("spectral_earth", 202, [418]),
    ("ben-s1s2", 14, [-1, -2, 442]), ("m-so2sat", 18, [-2, -2, -1, -1, -2, -1, -7, -8, 492]),
    ("treesat-s2", 12, [492, 559, 664, 827, 704]), ("indian_pines", 201, [404]), ("m-NeonTree", 372, [664, 559, 492]),
    ("hyperview", 150, [462]), ("m-forestnet", 6, [664, 559, 492, 704, 740, 782]), ("resisc45", 3, [664, 559, 492]),
])
def test_dataset_band_lists(ds, n, head):
    ids = sensors.ds_chn_ids(ds)
    assert len(ids) == n and ids[: len(head)].tolist() == head


def test_corrected_published_faults():
    # MMEarth h5 order is B8A before B8: the ids must follow the data
    assert sensors.ds_chn_ids("mmearth_s2").tolist()[7:9] == [864, 827]
    assert sensors.ds_band_names("mmearth_s2")[7:9] == ["nir_narrow", "nir"]
    # BigEarthNet-v2 S1: VV then VH, and the channel order is stated in the config
    cfg = sensors.load_ds_cfg("ben-s1")
    assert [b["name"] for b in cfg["bands"]] == ["vv", "vh"] and cfg["metainfo"]["s1_channel_order"] == ["vv", "vh"]
    assert sensors.load_ds_cfg("treesat-s1")["metainfo"]["num_classes"] == 15
    se = sensors.ds_chn_ids("spectral_earth").tolist()
    for dropped in (1294, 1518, 1738, 1967):
        assert dropped not in se


def test_ds_cfg_metainfo_and_copy():
    cfg = sensors.load_ds_cfg("m-eurosat")
    assert cfg["ds_name"] == "m-eurosat" and cfg["metainfo"]["num_classes"] == 10
    assert cfg["bands"][0]["id"] == "sentinel2/B01"
    cfg["bands"].clear()
    assert len(sensors.load_ds_cfg("m-eurosat")["bands"]) == 13  # callers get copies


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown sensor 'sentinel3'.*sentinel2"):
        sensors.band_chn_ids("sentinel3", ["B01"])
    with pytest.raises(ValueError, match="Unknown band 'B13' for sensor 'sentinel2'.*B8A"):
        sensors.band_chn_ids("sentinel2", ["B13"])
    with pytest.raises(ValueError, match="Unknown dataset 'nope'"):
        sensors.load_ds_cfg("nope")
    with pytest.raises(ValueError, match="sensor>/<band"):
        sensors.split_band_id("B04")


def test_cdir_override(tmp_path, monkeypatch):
    sat = tmp_path / "data" / "satellites"
    sat.mkdir(parents=True)
    (sat / "mysensor.yaml").write_text("bands:\n  B1: {name: red, gaussian: {mu: 650.7, sigma: 10}}\n")
    (tmp_path / "data" / "eval").mkdir()
    (tmp_path / "data" / "eval" / "myds.yaml").write_text("bands:\n- {id: mysensor/red}\nnum_classes: 3\n")
    monkeypatch.setenv("CDIR", str(tmp_path))
    assert sensors.list_sensors() == ["mysensor"]
    assert sensors.ds_chn_ids("myds").tolist() == [650]
    monkeypatch.delenv("CDIR")
    assert "sentinel2" in sensors.list_sensors()


def test_rgb_indices_from_band_names():
    assert sensors.ds_rgb_indices("fmow_s2") == [3, 2, 1]
    assert sensors.ds_rgb_indices("fmow_wv23") == [4, 2, 1]
    assert sensors.ds_rgb_indices("fmow_rgb") == [0, 1, 2]
    assert sensors.ds_rgb_indices("satlas_landsat") == [3, 2, 1]
    with pytest.raises(ValueError, match="no band named"):
        sensors.ds_rgb_indices("mmearth_s1")
