"""`panopticon embed` on remote inputs, against real servers on 127.0.0.1: COGs behind a range-capable HTTP server
and a minimal STAC API (items whose assets point at it), and moto's S3 server. The same bands from a local file,
a remote STAC item, an API search and S3 give equal embeddings; 503s are retried; a mask asset makes pixels
no-data; a local raster makes no request; a changed remote file is recomputed, an unchanged one reused without
reading it."""
import json
import logging

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")
pytest.importorskip("pystac_client")

from rasterio.transform import from_origin  # noqa: E402
from servers import LocalServer, StacApi, s3_server  # noqa: E402
from test_embed import CRS, ORIGIN, S2_BANDS, S2_IDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401

KEYS = ("blue", "green", "red", "nir")  # Earth Search's asset keys of B02, B03, B04, B08
WAVELENGTHS = (0.49, 0.56, 0.665, 0.842)
DATA = smooth_scene(112, 112, seed=11)
COMMON = ["--chip-size", "56", "--overlap", "14", "--no-progress"]


def write_cog(path, data, res=10.0):
    """A tiled GeoTIFF with the header first (64 px tiles, below the COG driver's smallest: a chip needs several
    range requests) of (C, H, W) `data`."""
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, crs=CRS,
                       transform=from_origin(*ORIGIN, res, res), TILED="YES", BLOCKXSIZE=64, BLOCKYSIZE=64) as dst:
        dst.write(data)
    return str(path)


def scl_mask():
    """A Sentinel-2 SCL-like layer at 20 m: vegetation (4), a cloud (9) and a shadow (3)."""
    scl = np.full((1, 56, 56), 4, np.uint8)
    scl[0, 10:20, 5:30] = 9
    scl[0, 40:46, 40:52] = 3
    return scl


def write_release(folder, data=DATA):
    """Band COGs named as the item's assets point at them, and the SCL layer."""
    folder.mkdir(exist_ok=True)
    for band, row in zip(S2_BANDS, data):
        write_cog(folder / f"{band}.tif", row[None])
    write_cog(folder / "scl.tif", scl_mask(), res=20.0)
    return folder


def wgs84_bbox():
    from rasterio.warp import transform_bounds

    return transform_bounds(CRS, "EPSG:4326", ORIGIN[0], ORIGIN[1] - 1120, ORIGIN[0] + 1120, ORIGIN[1])


def item_dict(base, item_id="S2A_32TMR_20240705", when="2024-07-05T10:30:00Z"):
    """A Sentinel-2 L2A item as Earth Search v1 writes it (asset keys, eo:bands, platform), hrefs under `base`."""
    w, s, e, n = wgs84_bbox()
    assets = {key: {"href": f"{base}/{band}.tif", "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                    "roles": ["data"], "eo:bands": [{"name": key, "common_name": key, "center_wavelength": cw}]}
              for key, band, cw in zip(KEYS, S2_BANDS, WAVELENGTHS)}
    assets["scl"] = {"href": f"{base}/scl.tif", "type": "image/tiff; application=geotiff", "roles": ["data"]}
    return {"type": "Feature", "stac_version": "1.0.0", "id": item_id, "collection": "sentinel-2-l2a",
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
            "bbox": [w, s, e, n], "links": [], "assets": assets,
            "geometry": {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]},
            "properties": {"datetime": when, "platform": "sentinel-2a", "constellation": "sentinel-2",
                           "eo:cloud_cover": 5.0}}


def embed(*args):
    from dinov2.run.embed import main

    assert main([*map(str, args), *COMMON]) == 0


def local_reference(tmp_path, run, data=DATA, name="ref", extra=()):
    """The same bands from one local 4-band file."""
    tif = write_tif(tmp_path / f"{name}.tif", data)
    out = tmp_path / f"out_{name}"
    embed(tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run, "-o", out, *extra)
    return out, name


def assert_same(out_a, name_a, out_b, name_b):
    """Equal patch-embedding maps and chip embeddings (chips matched by their place in the grid)."""
    with rasterio.open(out_a / f"{name_a}_patches.tif") as a, rasterio.open(out_b / f"{name_b}_patches.tif") as b:
        assert a.transform == b.transform and a.crs == b.crs
        np.testing.assert_allclose(a.read(), b.read(), rtol=1e-6, atol=1e-6, equal_nan=True)
    ca, cb = (gpd.read_parquet(o / "chips.parquet" / f"{n}.parquet").sort_values(["chip_row", "chip_col"])
              for o, n in ((out_a, name_a), (out_b, name_b)))
    assert len(ca) == len(cb) > 0
    np.testing.assert_allclose(ca.valid_fraction, cb.valid_fraction)
    for col in ("cls_embedding", "mean_embedding"):
        np.testing.assert_allclose(np.stack(ca[col]), np.stack(cb[col]), rtol=1e-6, atol=1e-6)
    return cb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("run") / "run")


def test_local_file_remote_item_and_api_search_give_equal_embeddings(tmp_path, run):
    release = write_release(tmp_path / "release")
    with StacApi(root=str(release)) as api:
        api.items = [item_dict(api.url), item_dict(api.url, "S2B_32TMR_20230105", "2023-01-05T10:30:00Z")]
        ref, name = local_reference(tmp_path, run)
        assert api.requests == []  # a local raster makes no request
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(api.url)))
        embed(item, "--model", run, "-o", tmp_path / "out_item")  # assets: every one with eo:bands
        served = {r.path for r in api.requests}
        assert served == {f"/{b}.tif" for b in S2_BANDS}, served  # the named assets, nothing beside them
        w, s, e, n = wgs84_bbox()
        embed("--stac-api", api.url, "--collections", "sentinel-2-l2a", "--bbox", f"{w},{s},{e},{n}", "--datetime",
              "2024-07-01/2024-07-31", "--assets", ",".join(KEYS), "--model", run, "-o", tmp_path / "out_search")
    chips = assert_same(ref, name, tmp_path / "out_item", "S2A_32TMR_20240705")
    assert list(chips.chn_ids.iloc[0]) == S2_IDS and chips.datetime.iloc[0].startswith("2024-07-05T10:30")
    assert chips.source_files.iloc[0][0].startswith("http://127.0.0.1")
    assert_same(ref, name, tmp_path / "out_search", "S2A_32TMR_20240705")
    # the 2023 item is outside --datetime
    assert [p.name for p in (tmp_path / "out_search").glob("*_patches.tif")] == ["S2A_32TMR_20240705_patches.tif"]


def test_query_and_filter_select_items_and_an_api_without_the_extension_is_refused(tmp_path, capsys, monkeypatch):
    from dinov2.inference.stac import Search, search_items

    monkeypatch.chdir(tmp_path)  # `_cli` names an output folder relative to the working directory

    items = []
    for k, cloud in enumerate((5.0, 50.0, 15.0)):
        d = item_dict("http://unused", f"S2A_32TMR_2024070{k + 1}", f"2024-07-0{k + 1}T10:30:00Z")
        d["properties"]["eo:cloud_cover"] = cloud
        items.append(d)
    clear = '{"eo:cloud_cover": {"lt": 10}}'
    between = json.dumps({"op": "and", "args": [{"op": "<", "args": [{"property": "eo:cloud_cover"}, 20]},
                                                {"op": ">", "args": [{"property": "eo:cloud_cover"}, 10]}]})
    with StacApi(items=items, extensions=("query", "filter")) as api:
        ids = lambda **kw: [d["id"] for d in search_items(Search(api.url, ["sentinel-2-l2a"], **kw))]  # noqa: E731
        assert ids() == [d["id"] for d in items]
        assert ids(query=clear) == ["S2A_32TMR_20240701"]
        assert ids(filter=between) == ["S2A_32TMR_20240703"]
        assert ids(query='{"eo:cloud_cover": {"gte": 10}}', filter=between) == ["S2A_32TMR_20240703"]
    # an API without the extensions would ignore the expression and return every item: refused, naming the flag
    with StacApi(items=items) as api:
        for flag, expr, name in (("--query", clear, "query"), ("--filter", between, "filter")):
            rc, err = _cli(capsys, "--stac-api", api.url, "--collections", "sentinel-2-l2a", flag, expr)
            assert rc == 2 and f"--stac-api {api.url} does not implement the STAC {name} extension" in err, err
            assert f"it would ignore {flag}" in err
        assert all(r.path in ("/", "/conformance") for r in api.requests)  # refused before searching


def test_assets_choose_and_order_bands(tmp_path):
    from dinov2.inference.scene_source import MaskFlags
    from dinov2.inference.sources import ItemOptions, collect_scenes

    release = write_release(tmp_path / "release")
    item = tmp_path / "item.json"
    item.write_text(json.dumps(item_dict(str(release))))
    [scene] = collect_scenes([str(item)], options=ItemOptions(("nir", "red")))
    assert scene.chn_ids == [S2_IDS[3], S2_IDS[2]] and scene.bands == ["B08", "B04"] and scene.sensor == "sentinel2"
    # Earth Search's keys for B8A and B11 are STAC common names: registry ids, not rounded centre wavelengths
    d = item_dict(str(release))
    d["assets"]["nir08"] = dict(d["assets"]["nir"], **{"eo:bands": [{"name": "nir08", "common_name": "nir08",
                                                                     "center_wavelength": 0.865}]})
    d["assets"]["swir16"] = dict(d["assets"]["nir"], **{"eo:bands": [{"name": "swir16", "common_name": "swir16",
                                                                      "center_wavelength": 1.61}]})
    (tmp_path / "more.json").write_text(json.dumps(d))
    [scene] = collect_scenes([str(tmp_path / "more.json")], options=ItemOptions(("nir08", "swir16")))
    assert scene.bands == ["B8A", "B11"] and scene.chn_ids == [864, 1613]
    with pytest.raises(ValueError, match=r"item.json: no asset 'B99' \(--assets\); the item's assets: blue, green"):
        collect_scenes([str(item)], options=ItemOptions(("blue", "B99")))
    d["assets"]["visual"] = dict(d["assets"]["red"], **{"eo:bands": [{"name": n, "common_name": n} for n in
                                                                     ("red", "green", "blue")]})
    (tmp_path / "visual.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"same channel id 664.*choose the assets with --assets \(used: blue, green"):
        collect_scenes([str(tmp_path / "visual.json")])  # an RGB composite repeats three bands
    with pytest.raises(ValueError, match="asset 'scl' has no eo:bands"):
        collect_scenes([str(item)], options=ItemOptions(("blue", "scl")))
    with pytest.raises(ValueError, match=r"no asset 'cloud' \(--mask-asset\)"):
        collect_scenes([str(item)], options=ItemOptions(mask=MaskFlags(asset="cloud", values=(9,))))


def _cli(capsys, *args):
    from dinov2.run.cli import main

    rc = main(["embed", *map(str, args), "-o", "unused_out"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def test_search_and_flag_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    release = write_release(tmp_path / "release")
    w, s, e, n = wgs84_bbox()
    box = f"{w},{s},{e},{n}"
    with StacApi(root=str(release)) as api, LocalServer() as plain:
        api.items = [item_dict(api.url)]
        plain.state.routes["/"] = lambda handler, params: (200, {"hello": "not a catalog"})
        search = ["--stac-api", api.url, "--collections", "sentinel-2-l2a"]
        cases = [
            ([*search, "--datetime", "2010-01-01/2010-02-01"], f"--stac-api {api.url}: no items match"),
            ([*search, "--assets", "blue,B99"], f"{api.url} item S2A_32TMR_20240705: no asset 'B99'"),
            (["--stac-api", plain.url, "--collections", "c"], f"--stac-api {plain.url} is not a STAC API"),
            (["--stac-api", "http://127.0.0.1:9", "--collections", "c"], "--stac-api http://127.0.0.1:9: not "
             "reachable"),
            ([*search, "--bbox", "1,2,3"], "--bbox must be 4 numbers"),
            ([*search, "--bbox", f"{e},{n},{w},{s}"], "-90 <= S < N <= 90"),
            ([*search, "--datetime", "2024-13-01/.."], "--datetime '2024-13-01' is not an ISO 8601"),
            ([*search, "--datetime", "2024-08-01/2024-07-01"], "the start is after the end"),
            ([*search, "--query", "{cloud"], "--query is not valid JSON"),
            (["--collections", "c", "--bbox", box], "--collections, --bbox describe a search: add --stac-api"),
            ([*search, "--clip"], "--clip needs --bbox"),
            ([*search, "--mask-values", "3,8"], "--mask-values/--mask-bits need a mask"),
            ([*search, "--mask-asset", "scl"], "a mask needs --mask-values"),
            ([*search, "--mask-asset", "scl", "--mask-values", "3", "--mask-bits", "1"], "not both"),
            ([*search, "--mask-asset", "scl", "--mask-values", "x"], "--mask-values must be comma-separated"),
            ([], "nothing to read"),
            ([*search, "--work-dir", "w"], "--work-dir is for outputs in object storage"),
        ]
        for args, want in cases:
            rc, err = _cli(capsys, *args)
            assert rc == 2 and "error: " in err and want in err, (args, err)
        assert not (tmp_path / "unused_out").exists() or not list((tmp_path / "unused_out").glob("*.tif"))


def test_503_answers_are_retried(tmp_path, run, monkeypatch):
    monkeypatch.setenv("GDAL_HTTP_RETRY_DELAY", "0.01")
    release = write_release(tmp_path / "release")
    ref, name = local_reference(tmp_path, run)
    with LocalServer(str(release)) as srv:
        srv.fail("B04.tif", 3)  # the first requests (open, identity)
        srv.fail_every("B02.tif", 3)  # and range reads in the middle of the run
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(srv.url)))
        embed(item, "--model", run, "-o", tmp_path / "out", "--read-workers", "3")  # each thread its own handles
        codes = [r.path for r in srv.requests]
    assert srv.state.failures["/B04.tif"] == 0 and codes.count("/B02.tif") >= 3
    assert_same(ref, name, tmp_path / "out", "S2A_32TMR_20240705")


def test_mask_asset_makes_masked_pixels_no_data(tmp_path, run):
    release = write_release(tmp_path / "release")
    masked = np.repeat(np.repeat(np.isin(scl_mask()[0], [3, 8, 9, 10]), 2, 0), 2, 1)  # 20 m -> 10 m, nearest
    oracle = DATA.copy()
    oracle[:, masked] = 0
    ref, name = local_reference(tmp_path, run, oracle, "clouded", ("--nodata", "0"))
    with LocalServer(str(release)) as srv:
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(srv.url)))
        embed(item, "--mask-asset", "scl", "--mask-values", "3,8,9,10", "--model", run, "-o", tmp_path / "out")
    chips = assert_same(ref, name, tmp_path / "out", "S2A_32TMR_20240705")
    assert chips.valid_fraction.min() < 0.9 and chips.valid_fraction.max() == 1.0
    marker = json.loads((tmp_path / "out" / ".embed" / "S2A_32TMR_20240705.done.json").read_text())
    assert marker["signature"]["mask"]["values"] == [3, 8, 9, 10]


def test_s3_inputs(tmp_path, run, monkeypatch):
    release = write_release(tmp_path / "release")
    write_cog(release / "stack.tif", DATA)
    ref, name = local_reference(tmp_path, run)
    with s3_server(release, "s2-cogs", monkeypatch) as bucket:
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(bucket)))
        embed(item, "--model", run, "-o", tmp_path / "out_item")
        embed(f"{bucket}/stack.tif", "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run, "-o",
              tmp_path / "out_url")
        # a scenes YAML naming a file and its mask in the bucket
        from dinov2.inference.reader import SceneReader
        from dinov2.inference.sources import collect_scenes

        (tmp_path / "scenes.yaml").write_text(json.dumps({"scenes": [
            {"sensor": "sentinel2", "file": f"{bucket}/stack.tif", "bands": S2_BANDS,
             "mask": {"file": f"{bucket}/scl.tif", "values": [9]}}]}))
        [scene] = collect_scenes([str(tmp_path / "scenes.yaml")])
        reader = SceneReader(scene)
        arr, valid, _ = reader.read(0, 0, 112, 112)
        reader.close()
    np.testing.assert_array_equal(arr, DATA.astype(np.float32))
    np.testing.assert_array_equal(valid, ~np.repeat(np.repeat(scl_mask()[0] == 9, 2, 0), 2, 1))
    assert_same(ref, name, tmp_path / "out_item", "S2A_32TMR_20240705")
    assert_same(ref, name, tmp_path / "out_url", "stack")


def test_url_schemes_map_to_gdal_file_systems():
    from dinov2.data.remote import gdal_path, is_url

    assert gdal_path("https://h/a/b.tif?sig=1") == "/vsicurl/https://h/a/b.tif?sig=1"
    assert [gdal_path(f"{s}://bucket/k/x.tif") for s in ("s3", "gs", "az")] == [
        "/vsis3/bucket/k/x.tif", "/vsigs/bucket/k/x.tif", "/vsiaz/bucket/k/x.tif"]
    assert not is_url("/vsicurl/http://h/x.tif") and not is_url("ftp://h/x.tif")


def test_unchanged_remote_inputs_are_reused_unread_and_changed_ones_recomputed(tmp_path, run, caplog):
    release = write_release(tmp_path / "release")
    with LocalServer(str(release)) as srv:
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(srv.url)))
        args = (item, "--model", run, "-o", tmp_path / "out")
        embed(*args)
        seen = len(srv.requests)
        embed(*args)
        again = srv.requests[seen:]
        assert again and {r.method for r in again} == {"HEAD"}  # identity only: no byte of any file read
        new = DATA.copy()
        new[2] = new[2][:, ::-1]  # the red band changes
        write_cog(release / "B04.tif", new[2:3])
        with caplog.at_level(logging.INFO, logger="dinov2"):
            embed(*args)
    assert "S2A_32TMR_20240705 is recomputed: inputs" in caplog.text
    ref, name = local_reference(tmp_path, run, new, "changed")
    assert_same(ref, name, tmp_path / "out", "S2A_32TMR_20240705")


def test_servers_that_refuse_head_requests(tmp_path, run, monkeypatch):
    """URLs signed for GET only (S3 presigned) refuse HEAD: GDAL is told to use GET (CPL_VSIL_CURL_USE_HEAD=NO)
    and the identity comes from a one-byte GET."""
    monkeypatch.setenv("CPL_VSIL_CURL_USE_HEAD", "NO")
    release = write_release(tmp_path / "release")
    ref, name = local_reference(tmp_path, run)
    with LocalServer(str(release)) as srv:
        srv.state.head_status = 403
        item = tmp_path / "item.json"
        item.write_text(json.dumps(item_dict(srv.url)))
        embed(item, "--model", run, "-o", tmp_path / "out")
        assert {r.method for r in srv.requests} == {"HEAD", "GET"}
    assert_same(ref, name, tmp_path / "out", "S2A_32TMR_20240705")
    marker = json.loads((tmp_path / "out" / ".embed" / "S2A_32TMR_20240705.done.json").read_text())
    sizes = {i[0].rsplit("/", 1)[1]: i[1] for i in marker["signature"]["inputs"]}
    assert sizes == {f"{b}.tif": (release / f"{b}.tif").stat().st_size for b in S2_BANDS}



def test_a_remote_file_is_read_as_a_geotiff_only(tmp_path, run):
    """A named URL opens as GeoTIFF/COG (JPEG 2000 by its name) only: a VRT served under a .tif name, which would
    make GDAL read the files it names, is refused."""
    release = write_release(tmp_path / "release")
    local = write_tif(tmp_path / "secret.tif", DATA)
    (release / "disguised.tif").write_text(
        '<VRTDataset rasterXSize="112" rasterYSize="112"><VRTRasterBand dataType="UInt16" band="1"><SimpleSource>'
        f"<SourceFilename>{local}</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
        "</VRTDataset>")
    from dinov2.run.embed import main

    with LocalServer(str(release)) as srv:
        url = f"{srv.url}/disguised.tif"
        with pytest.raises(OSError, match="disguised.tif: ValueError: GDAL cannot open it as GTiff"):
            main([url, "--wavelengths", "490", "--model", run, "-o", str(tmp_path / "out"), *COMMON])
    assert not (tmp_path / "out" / "disguised_patches.tif").exists()
