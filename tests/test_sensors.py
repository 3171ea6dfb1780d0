"""Sensor registry: ids of the reference tables, lookup by key/name, dataset band lists, errors."""
import pytest
import torch
from published_tables import ENMAP_PRODUCT_NM, ENMAP_PUBLISHED_IDS, INTUITION_IDS, NEON_HS_IDS, PUBLISHED_SRF

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


def _all_ids(sensor):
    return sensors.band_chn_ids(sensor, sensors.sensor_bands(sensor)).tolist()


def test_enmap_ids_follow_the_product_order_table():
    """Every EnMAP band: id = int(nominal centre of that product band), within 5 nm of the table."""
    ids = _all_ids("enmap")
    assert len(ids) == 224
    assert ids == [int(v) for v in ENMAP_PRODUCT_NM]
    assert all(abs(i - v) <= 5 for i, v in zip(ids, ENMAP_PRODUCT_NM))
    # the VNIR/SWIR overlap stays in product order: B091 (993.3 nm) is followed by B092 (902.0 nm)
    assert ids[90:92] == [993, 902]
    sig = sensors.band_chn_ids("enmap", sensors.sensor_bands("enmap"), full_spectra=True)
    assert sig[:, 0].tolist() == pytest.approx(ENMAP_PRODUCT_NM)
    assert sig[:, 1].min().item() == pytest.approx(2.46) and sig[:, 1].max().item() == pytest.approx(4.85)


def test_enmap_published_ids_for_replication():
    ids = _all_ids("enmap_published")
    assert ids == ENMAP_PUBLISHED_IDS
    # the published table is off by 9-50 nm for the 20 bands B081-B100 and by 1-2 nm for six others
    off = [i for i, (a, b) in enumerate(zip(ids, ENMAP_PRODUCT_NM)) if abs(a - b) > 5]
    assert off == list(range(80, 100))


def test_hyperspectral_tables_every_id():
    aviris = _all_ids("aviris")
    assert aviris == [int(404.6875 + 9.375 * i) for i in range(224)]  # mu = 404.6875 + 9.375 (i - 1), i = 1..224
    assert _all_ids("intuition") == INTUITION_IDS
    assert _all_ids("neon_aop") == [664, 559, 492] + NEON_HS_IDS
    dropped = set(range(104, 109)) | set(range(150, 164)) | set(range(221, 225))  # 1-based AVIRIS bands
    assert sensors.ds_chn_ids("indian_pines").tolist() == [aviris[i - 1] for i in range(1, 225) if i not in dropped]
    assert sensors.ds_chn_ids("hyperview").tolist() == INTUITION_IDS
    assert sensors.ds_chn_ids("m-NeonTree").tolist() == [664, 559, 492] + NEON_HS_IDS[:369]


def test_spectral_earth_band_lists():
    """202 bands: B001-B126, B142-B160, B168-B224 (water-vapour bands dropped), in both id tables."""
    keep = list(range(0, 126)) + list(range(141, 160)) + list(range(167, 224))
    assert sensors.ds_chn_ids("spectral_earth").tolist() == [int(ENMAP_PRODUCT_NM[i]) for i in keep]
    assert sensors.ds_chn_ids("spectral_earth_published").tolist() == [ENMAP_PUBLISHED_IDS[i] for i in keep]
    assert sensors.ds_chn_ids("hyspecnet").tolist() == [int(v) for v in ENMAP_PRODUCT_NM]
    stats = sensors.load_ds_cfg("spectral_earth")["metainfo"]["norm_stats"]
    assert len(stats["mean"]) == len(stats["std"]) == 202
    assert stats["mean"][:3] == [0.0803, 0.0789, 0.0808] and stats["mean"][-1] == 0.1355
    assert stats["std"][:3] == [0.1522, 0.1513, 0.1514] and stats["std"][-1] == 0.1121


def test_lookup_by_key_or_name_case_insensitive():
    by_key = sensors.band_chn_ids("sentinel2", ["B04", "b8a", "B8", "b01"])
    by_name = sensors.band_chn_ids("Sentinel2", ["RED", "nir_narrow", "nir", "coastal"])
    assert by_key.tolist() == by_name.tolist() == [664, 864, 827, 442]
    assert sensors.resolve_band("landsat8", "B1") == "B01"
    assert sensors.resolve_band("aviris", "b007") == "B7"
    assert sensors.band_chn_ids("sentinel1", ["vv_desc", "VH"]).tolist() == [-9, -2]


@pytest.mark.parametrize("sensor,table", [("sentinel2", "sentinel2"), ("landsat9", "landsat9"),
                                          ("landsat8", "landsat9"), ("qb2_ge1", "qb2_ge1"), ("wv23", "wv23"),
                                          ("superdove", "superdove"), ("drone", "drone")])
def test_spectral_responses_are_the_published_fits(sensor, table):
    """mu and sigma of every band: the published tables' values (Landsat 8 shares Landsat 9's)."""
    expected = PUBLISHED_SRF[table]
    assert list(sensors.sensor_bands(sensor)) == list(expected)
    pairs = sensors.band_chn_ids(sensor, list(expected), full_spectra=True)
    assert pairs.reshape(-1).tolist() == pytest.approx([x for v in expected.values() for x in v], rel=1e-6)


def test_full_spectra_pairs():
    ids = sensors.band_chn_ids("sentinel2", ["B01", "B02"], full_spectra=True)
    assert ids.shape == (2, 2) and ids.dtype == torch.float32
    assert ids[0].tolist() == pytest.approx(list(PUBLISHED_SRF["sentinel2"]["B01"]), rel=1e-6)
    sar = sensors.band_chn_ids("sentinel1", ["B05"], full_spectra=True)
    assert sar.tolist() == [[-5.0, -1.0]]


def test_band_info_gsd():
    assert sensors.band_info("sentinel2", "B05")["gsd"] == 20
    assert sensors.band_info("landsat8", "pan")["gsd"] == 15
    assert sensors.band_info("enmap", "B010")["gsd"] == 30  # sensor-wide GSD
    assert sensors.band_info("neon_aop", "B000")["gsd"] == 1.0  # lower-case gsd key


@pytest.mark.parametrize("ds,n,head", [
    ("fmow_s2", 13, S2_IDS[:3]), ("mmearth_s1", 8, [-5, -6, -7]), ("fmow_rgb", 3, [665, 547, 482]),
    ("satlas_s2", 9, [664, 559, 492]), ("satlas_landsat", 11, LANDSAT_IDS),
    ("ben-s1s2", 14, [-1, -2, 442]), ("m-so2sat", 18, [-2, -2, -1, -1, -2, -1, -7, -8, 492]),
    ("treesat-s2", 12, [492, 559, 664, 827, 704, 740, 782, 864, 1613, 2203, 442, 945]),
    ("m-forestnet", 6, [664, 559, 492, 704, 740, 782]), ("resisc45", 3, [664, 559, 492]),
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
