"""`panopticon embed` on real-format files written here: GeoTIFFs with a known CRS/transform, a STAC item, a tiny
Panopticon run folder. Expected values come from running the backbone directly on the chip pixels."""
import json
import math
import os

import numpy as np
import pytest
import shapely
import torch
import yaml

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from rasterio.transform import from_origin  # noqa: E402

ORIGIN = (500000.0, 5000000.0)  # UTM 32N, 10 m pixels
CRS = "EPSG:32632"
STUDENT = {"arch": "vit_small", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 14,
           "pos_emb_img_size": 56, "embed_layer": "PanopticonPE", "layerscale": 0.1,
           "pe_args": {"attn_dim": 16, "chnfus_cfg": {"layer_norm": False, "attn_cfg": {"num_heads": 2}}}}
S2_BANDS = ["B02", "B03", "B04", "B08"]
S2_IDS = [492, 559, 664, 827]  # int(mu) of the registry's Sentinel-2 bands


def write_run(folder, seed=0):
    """A tiny training run folder (config.yaml + model_final.pth with teacher.backbone.* keys)."""
    from dinov2.models import build_model

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"student": STUDENT}, f)
    torch.manual_seed(seed)
    model, _ = build_model(STUDENT, only_teacher=True, img_size=56)
    state = {"teacher.backbone." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "iteration": 9}, os.path.join(folder, "model_final.pth"))
    return str(folder)


def write_tif(path, data, nodata=None, res=10.0, origin=ORIGIN, crs=CRS, tags=None):
    """A GeoTIFF of (C, H, W) `data` with a north-up transform at `origin`."""
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, crs=crs,
                       transform=from_origin(origin[0], origin[1], res, res), nodata=nodata) as dst:
        dst.write(data)
        if tags:
            dst.update_tags(**tags)
    return str(path)


def smooth_scene(h, w, c=4, seed=0):
    """uint16 imagery with spatial structure (so that neighbouring chips differ)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    bands = [1000 + 400 * np.sin(xx / (7 + 3 * i)) * np.cos(yy / (11 + i)) + rng.normal(0, 30, (h, w))
             for i in range(c)]
    return np.clip(np.stack(bands), 1, 60000).astype("uint16")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest on one thread (and the shared test machine is oversubscribed)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def model(run_dir):
    from dinov2 import load_model

    return load_model(run_dir)


def stats_file(tmp_path, mean, std):
    p = tmp_path / "stats.yaml"
    p.write_text(yaml.safe_dump({"mean": [float(v) for v in mean], "std": [float(v) for v in std]}))
    return str(p)


def run_embed(args):
    from dinov2.run.embed import main

    assert main([*args, "--no-progress"]) == 0


def direct_tokens(model, chip, mean, std, ids):
    """(cls, patch tokens (n, n, D)) of a raw (C, S, S) chip, normalised here."""
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    x = (chip.astype(np.float32) - m) / s
    with torch.no_grad():
        out = model.forward_features({"imgs": torch.from_numpy(x)[None], "chn_ids": torch.tensor([ids])})
    n = chip.shape[-1] // 14
    return out["x_norm_clstoken"][0].numpy(), out["x_norm_patchtokens"][0].numpy().reshape(n, n, -1)


def test_georeferencing_and_chip_values(tmp_path, run_dir, model):
    data = smooth_scene(112, 168)  # 8 x 12 patches, 2 x 3 chips of 56 px without overlap
    tif = write_tif(tmp_path / "scene.tif", data)
    mean, std = [1000.0, 1010.0, 990.0, 1005.0], [300.0, 310.0, 290.0, 305.0]
    out = tmp_path / "out"
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size",
               "560m", "--overlap", "0", "--norm-stats", stats_file(tmp_path, mean, std), "-o", str(out)])
    with rasterio.open(out / "scene_patches.tif") as src:
        assert src.count == 32 and src.dtypes[0] == "float32"
        assert src.crs.to_string() == CRS
        assert src.transform == from_origin(ORIGIN[0], ORIGIN[1], 140.0, 140.0)
        assert (src.width, src.height) == (12, 8)
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        emb = src.read()
        chips = gpd.read_parquet(out / "chips.parquet")
        assert len(chips) == 6 and chips.crs.equals("OGC:CRS84") and set(chips["crs"]) == {CRS}
        for _, row in chips.iterrows():
            r0, c0 = int(row.row_px), int(row.col_px)
            cls, tok = direct_tokens(model, data[:, r0:r0 + 56, c0:c0 + 56], mean, std, S2_IDS)
            footprint = shapely.from_wkb(row.footprint_wkb)  # the footprint in the scene's CRS
            cx, cy = footprint.centroid.x, footprint.centroid.y
            pr, pc = src.index(cx + 1.0, cy - 1.0)  # the embedding pixel just south-east of the chip centre
            np.testing.assert_allclose(emb[:, pr, pc], tok[2, 2], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(emb[:, r0 // 14:r0 // 14 + 4, c0 // 14:c0 // 14 + 4].transpose(1, 2, 0), tok,
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(row.cls_embedding), cls, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(np.asarray(row.mean_embedding), tok.reshape(16, -1).mean(0), rtol=1e-4,
                                       atol=1e-4)
            assert list(row.bands) == S2_BANDS and list(row.chn_ids) == S2_IDS and row.sensor == "sentinel2"
            b = row.bbox_wgs84
            assert b["xmin"] < row.lon < b["xmax"] and b["ymin"] < row.lat < b["ymax"]
    assert abs(chips.lon.min() - 9.0) < 0.05 and abs(chips.lat.mean() - 45.1) < 0.05  # UTM 32N near 9 E, 45 N


def test_full_coverage_edges_and_blending(tmp_path, run_dir, model):
    # 61 x 89 px: neither a multiple of the patch nor of the chip stride; the last row/column is padding
    data = smooth_scene(61, 89, seed=1)
    tif = write_tif(tmp_path / "edge.tif", data)
    mean, std = [1000.0] * 4, [300.0] * 4
    out = tmp_path / "out"
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
               "--overlap", "28", "--norm-stats", stats_file(tmp_path, mean, std), "-o", str(out)])
    with rasterio.open(out / "edge_patches.tif") as src:
        emb = src.read()
        assert (src.height, src.width) == (math.ceil(61 / 14), math.ceil(89 / 14))
        ib = rasterio.open(tif).bounds
        assert src.bounds.left == ib.left and src.bounds.top == ib.top
        assert 0 <= src.bounds.right - ib.right < 140 and 0 <= ib.bottom - src.bounds.bottom < 140
        assert np.isfinite(emb).all() and (src.read_masks(1) == 255).all()
    # independent check of the cross-fade: chips start every 2 patches; patch column 2 of the first strip is
    # covered by chip 0 (its column 2, ramp weight 2/3) and chip 1 (its column 0, weight 1/3); rows likewise
    pad = np.pad(data, ((0, 0), (0, 84 - 61), (0, 0)), mode="reflect")  # the second strip reaches row 84
    _, a = direct_tokens(model, pad[:, 0:56, 0:56], mean, std, S2_IDS)
    _, b = direct_tokens(model, pad[:, 0:56, 28:84], mean, std, S2_IDS)
    _, c = direct_tokens(model, pad[:, 28:84, 0:56], mean, std, S2_IDS)
    _, d = direct_tokens(model, pad[:, 28:84, 28:84], mean, std, S2_IDS)
    # patch (0, 2): chips a (weights row 1/3, col 2/3) and b (row 1/3, col 1/3)
    expected = (a[0, 2] * (1 / 3) * (2 / 3) + b[0, 0] * (1 / 3) * (1 / 3)) / ((1 / 3) * (2 / 3) + (1 / 3) * (1 / 3))
    np.testing.assert_allclose(emb[:, 0, 2], expected, rtol=1e-4, atol=1e-4)
    # patch (2, 2): four chips, weights row x col: a (2/3, 2/3), b (2/3, 1/3), c (1/3, 2/3), d (1/3, 1/3)
    w = np.array([4, 2, 2, 1]) / 9
    expected = (a[2, 2] * w[0] + b[2, 0] * w[1] + c[0, 2] * w[2] + d[0, 0] * w[3]) / w.sum()
    np.testing.assert_allclose(emb[:, 2, 2], expected, rtol=1e-4, atol=1e-4)


def test_blending_with_overlap_wider_than_the_stride(tmp_path, run_dir, model):
    """Chips of 4 patches every patch (overlap 3): each patch of the 6 x 7 map is the weighted mean of up to
    3 x 3 chips; checked for every patch against a brute-force blend of the chips' own tokens."""
    data = smooth_scene(84, 98, seed=2)
    tif = write_tif(tmp_path / "dense.tif", data)
    mean, std = [1000.0] * 4, [300.0] * 4
    out = tmp_path / "out"
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
               "--overlap", "42", "--batch-size", "5", "--norm-stats", stats_file(tmp_path, mean, std), "-o",
               str(out)])
    with rasterio.open(out / "dense_patches.tif") as src:
        emb = src.read()
    ramp = np.array([1.0, 2.0, 2.0, 1.0]) / 4  # linear cross-fade over the 3 overlapping patches, never zero
    num, den = np.zeros((6, 7, emb.shape[0])), np.zeros((6, 7))
    for r in range(3):
        for c in range(4):
            _, tok = direct_tokens(model, data[:, 14 * r:14 * r + 56, 14 * c:14 * c + 56], mean, std, S2_IDS)
            w = np.outer(ramp, ramp)
            num[r:r + 4, c:c + 4] += tok * w[..., None]
            den[r:r + 4, c:c + 4] += w
    np.testing.assert_allclose(emb.transpose(1, 2, 0), num / den[..., None], rtol=1e-4, atol=1e-4)


def test_nodata_masked_not_embedded(tmp_path, run_dir, model):
    data = smooth_scene(112, 112, seed=2)
    data[:, :56, :56] = 0  # a whole chip of no-data
    data[:, 56:70, 56:63] = 0  # patch (4, 4): 7 of 14 columns valid = 50 % -> kept at the default --min-valid 0.5
    data[:, 70:84, 56:66] = 0  # patch (5, 4): 4/14 valid -> masked
    tif = write_tif(tmp_path / "nd.tif", data, nodata=0)
    out = tmp_path / "out"
    mean, std = [1000.0] * 4, [300.0] * 4
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
               "--overlap", "0", "--norm-stats", stats_file(tmp_path, mean, std), "-o", str(out)])
    with rasterio.open(out / "nd_patches.tif") as src:
        emb, mask = src.read(), src.read_masks(1)
    invalid = np.isnan(emb).all(0)
    assert np.isnan(emb).any(0).sum() == invalid.sum()  # masked in every band or in none
    expected = np.zeros((8, 8), bool)
    expected[:4, :4] = True
    expected[5, 4] = True
    np.testing.assert_array_equal(invalid, expected)
    np.testing.assert_array_equal(mask == 0, expected)
    chips = gpd.read_parquet(out / "chips.parquet")
    assert sorted(chips.chip_id) == ["nd:r0c1", "nd:r1c0", "nd:r1c1"]  # the all-no-data chip is not embedded
    row = chips.set_index("chip_id").loc["nd:r1c1"]
    raw = data[:, 56:112, 56:112].astype(np.float32)
    filled = np.where(raw == 0, np.asarray(mean, np.float32)[:, None, None], raw)  # no-data -> mean, not zero
    _, tok = direct_tokens(model, filled, mean, std, S2_IDS)
    np.testing.assert_allclose(emb[:, 4:8, 4:8].transpose(1, 2, 0)[~expected[4:, 4:]], tok[~expected[4:, 4:]],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(row.mean_embedding), tok[~expected[4:, 4:]].mean(0), rtol=1e-4, atol=1e-4)
    assert row.n_valid_patches == 15 and row.valid_fraction == pytest.approx(1 - (7 * 14 + 10 * 14) / 56 ** 2)


def test_inline_wavelengths_yaml_and_stac_item(tmp_path, run_dir):
    pystac = pytest.importorskip("pystac")
    from dinov2.inference.sources import collect_scenes

    data = smooth_scene(56, 70, c=3, seed=3)
    write_tif(tmp_path / "hyper.tif", data, tags={"TIFFTAG_DATETIME": "2021:06:01 10:30:00"})
    (tmp_path / "scenes.yaml").write_text(yaml.safe_dump(
        {"scenes": [{"file": "hyper.tif", "wavelengths_nm": [450.5, 551, 1650], "name": "hyper"}]}))
    [scene] = collect_scenes([str(tmp_path / "scenes.yaml")])
    assert scene.chn_ids == [450, 551, 1650] and scene.sensor == "custom"
    assert scene.datetime == "2021-06-01T10:30:00"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"scenes": [{"file": "hyper.tif", "wavelengths_nm": [1, 2]}]}))
    with pytest.raises(ValueError, match="hyper.tif: 2 wavelengths_nm given for 3 bands"):
        collect_scenes([str(tmp_path / "bad.yaml")])

    # STAC item: a red band named as Sentinel-2 knows it (registry id) and a custom band by centre wavelength
    import datetime as dt

    for i in range(2):
        write_tif(tmp_path / f"band{i}.tif", data[i:i + 1])
    item = pystac.Item("stac_scene", geometry=None, bbox=None, datetime=dt.datetime(2022, 5, 3, 11, 0, 0),
                       properties={"platform": "sentinel-2a"})
    item.add_asset("red", pystac.Asset("./band0.tif", media_type=pystac.MediaType.GEOTIFF,
                                       extra_fields={"eo:bands": [{"name": "B04", "common_name": "red",
                                                                    "center_wavelength": 0.665}]}))
    item.add_asset("nir", pystac.Asset("./band1.tif", media_type=pystac.MediaType.GEOTIFF,
                                       extra_fields={"eo:bands": [{"name": "special", "center_wavelength": 0.9131}]}))
    item_path = tmp_path / "item.json"
    item_path.write_text(json.dumps(item.to_dict(include_self_link=False)))
    [stac] = collect_scenes([str(item_path)])
    assert stac.chn_ids == [664, 913] and stac.bands == ["B04", "special"] and stac.sensor == "sentinel2"
    out = tmp_path / "out"
    run_embed([str(item_path), str(tmp_path / "scenes.yaml"), "--model", run_dir, "--chip-size", "56",
               "--overlap", "14", "-o", str(out)])
    chips = gpd.read_parquet(out / "chips.parquet")
    by_scene = chips.groupby("scene").first()
    assert str(by_scene.loc["stac_scene", "datetime"]).startswith("2022-05-03T11:00:00")
    assert list(by_scene.loc["hyper", "chn_ids"]) == [450, 551, 1650]
    assert (out / "stac_scene_patches.tif").is_file() and (out / "hyper_patches.tif").is_file()


def test_rerun_skips_and_bad_inputs(tmp_path, run_dir):
    tif = write_tif(tmp_path / "s.tif", smooth_scene(56, 56, seed=4))
    args = [tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
            "--overlap", "0", "-o", str(tmp_path / "out")]
    run_embed(args)
    first = os.stat(tmp_path / "out" / "s_patches.tif").st_mtime_ns
    run_embed(args)
    assert os.stat(tmp_path / "out" / "s_patches.tif").st_mtime_ns == first  # finished scene not redone
    with pytest.raises(ValueError, match="multiple of the model's patch size 14"):
        run_embed([*args[:-4], "--chip-size", "50", "--overlap", "0", "-o", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="Unknown band 'B99'"):
        run_embed([tif, "--sensor", "sentinel2", "--bands", "B02,B03,B04,B99", "--model", run_dir, "-o",
                   str(tmp_path / "o3")])
    with pytest.raises(ValueError, match="cannot tell which bands"):
        run_embed([tif, "--model", run_dir, "-o", str(tmp_path / "o4")])


def test_search_by_chip_and_point(tmp_path, run_dir, capsys):
    from dinov2.inference.search import search_chips
    from dinov2.run.search import main as search_main

    tif = write_tif(tmp_path / "q.tif", smooth_scene(112, 168, seed=8))
    out = tmp_path / "out"
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
               "--overlap", "0", "-o", str(out)])
    chips = gpd.read_parquet(out / "chips.parquet").set_index("chip_id")
    res = search_chips(str(out / "chips.parquet"), k=4, chip_id="q:r1c2", embedding="cls")
    assert len(res) == 4 and res.chip_id[0] == "q:r1c2" and res.similarity[0] == pytest.approx(1.0)
    q = torch.tensor(np.asarray(chips.loc["q:r1c2", "cls_embedding"]))
    sims = {cid: float(torch.nn.functional.cosine_similarity(q, torch.tensor(np.asarray(v)), dim=0))
            for cid, v in chips["cls_embedding"].items()}
    expected = sorted(sims, key=lambda c: -sims[c])[:4]
    assert list(res.chip_id) == expected
    np.testing.assert_allclose(res.similarity, [sims[c] for c in expected], rtol=1e-5)
    lon, lat = chips.loc["q:r0c1", "lon"], chips.loc["q:r0c1", "lat"]
    assert search_chips(str(out / "chips.parquet"), k=1, lonlat=(lon, lat)).chip_id[0] == "q:r0c1"
    assert search_main([str(out / "chips.parquet"), "--lonlat", str(lon), str(lat), "-k", "2"]) == 0
    assert "q:r0c1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no chip .* contains lon=0.0"):
        search_chips(str(out / "chips.parquet"), lonlat=(0.0, 0.0))
    with pytest.raises(ValueError, match="chip id 'nope' is not in"):
        search_chips(str(out / "chips.parquet"), chip_id="nope")


def test_bf16_autocast_close_to_fp32(tmp_path, run_dir):
    tif = write_tif(tmp_path / "b.tif", smooth_scene(56, 56, seed=9))
    outs = {}
    for prec in ("fp32", "bf16"):
        run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size",
                   "56", "--overlap", "0", "--precision", prec, "-o", str(tmp_path / prec)])
        with rasterio.open(tmp_path / prec / "b_patches.tif") as src:
            outs[prec] = src.read()
    assert not np.array_equal(outs["fp32"], outs["bf16"])  # autocast really ran in bf16
    a, b = (outs[p].reshape(outs[p].shape[0], -1).astype(np.float64) for p in ("bf16", "fp32"))
    rel = np.linalg.norm(a - b, axis=0) / np.linalg.norm(b, axis=0)  # per patch embedding
    assert rel.max() < 0.03  # bf16 rounding (8 mantissa bits); a wrong cast or channel order gives O(1)


def test_scenes_in_different_crs_share_a_wgs84_table(tmp_path, run_dir):
    import pyarrow.parquet as pq

    a = write_tif(tmp_path / "a.tif", smooth_scene(56, 56, seed=10))
    b = write_tif(tmp_path / "b.tif", smooth_scene(56, 112, seed=11), crs="EPSG:32633", origin=(300000.0, 5000000.0))
    run_embed([a, b, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
               "--overlap", "0", "-o", str(tmp_path / "out")])
    chips = gpd.read_parquet(tmp_path / "out" / "chips.parquet")
    assert chips.crs.equals("OGC:CRS84")
    assert sorted(chips["crs"]) == ["EPSG:32632", "EPSG:32633", "EPSG:32633"]
    for _, row in chips.iterrows():  # footprints reprojected to degrees, inside each chip's WGS84 bbox
        minx, miny, maxx, maxy = row.geometry.bounds
        bb = row.bbox_wgs84
        assert bb["xmin"] - 1e-9 <= minx and maxx <= bb["xmax"] + 1e-9 and 40 < miny < maxy < 50
    parts = sorted(p.name for p in (tmp_path / "out" / "chips.parquet").iterdir())
    assert parts == ["a.parquet", "b.parquet"]  # one GeoParquet part per scene, with equal schemas
    schemas = [pq.read_schema(tmp_path / "out" / "chips.parquet" / p) for p in parts]
    assert b"geo" in schemas[0].metadata and schemas[0].equals(schemas[1], check_metadata=False)


def test_cog_layout_small_tiles_without_overviews_for_wide_maps(tmp_path):
    """A many-band map gets small tiles and no overviews (GDAL builds overviews band by band over
    pixel-interleaved tiles); a class map (one band) keeps 256 px tiles and overviews. Values round-trip."""
    from dinov2.inference.writers import cog_layout, create_partial_raster, finalize_cog, write_rows

    assert cog_layout(768) == (32, False) and cog_layout(384) == (32, False) and cog_layout(1) == (256, True)
    rng = np.random.default_rng(0)
    wide = rng.normal(size=(300, 40, 40)).astype(np.float32)
    create_partial_raster(str(tmp_path / "wide.bin"), 40, 40, 300, CRS, from_origin(*ORIGIN, 140.0, 140.0))
    write_rows(str(tmp_path / "wide.bin"), 0, wide)
    finalize_cog(str(tmp_path / "wide.bin"), str(tmp_path / "wide_cog.tif"))
    with rasterio.open(tmp_path / "wide_cog.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG" and src.crs.to_string() == CRS
        assert src.transform == from_origin(*ORIGIN, 140.0, 140.0) and not set(src.tags()) - {"AREA_OR_POINT"}
        assert src.block_shapes[0] == (32, 32) and src.overviews(1) == []
        np.testing.assert_array_equal(src.read(), wide)
    one = rng.integers(0, 5, size=(1, 600, 600)).astype(np.float32)
    create_partial_raster(str(tmp_path / "one.bin"), 600, 600, 1, CRS, from_origin(*ORIGIN, 10.0, 10.0))
    write_rows(str(tmp_path / "one.bin"), 0, one)
    finalize_cog(str(tmp_path / "one.bin"), str(tmp_path / "one_cog.tif"))
    with rasterio.open(tmp_path / "one_cog.tif") as src:
        assert src.block_shapes[0] == (256, 256) and src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(), one)
