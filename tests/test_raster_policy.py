"""Read only what the user named: VRTs need --allow-vrt and may reference local GeoTIFF/JP2 files only; GDAL
fetches nothing (a local HTTP server sees no request); side files (.aux.xml) are not read; FIFOs, devices and
folders given as rasters are refused without blocking; complex, empty and foreign files are refused."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env, _same_outputs  # noqa: E402


@pytest.fixture()
def server(tmp_path):
    """A local HTTP server serving a GeoTIFF at every path, in its own process (GDAL calls hold the GIL), and
    the list of requests it saw."""
    tif = write_tif(tmp_path / "served.tif", smooth_scene(56, 56))
    log = tmp_path / "requests.log"
    log.write_text("")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from trust_world import SERVER  # the request-recording server of the adversarial harness

    proc = subprocess.Popen([sys.executable, "-c", SERVER, tif, str(log)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}", lambda: log.read_text().splitlines()
    finally:
        proc.kill()
        proc.wait()


def _vrt(path, source, relative=True, size=56, count=4):
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename relativeToVRT="'
        f'{int(relative)}">{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>'
        for b in range(1, count + 1))
    with rasterio.open(source if not relative else os.path.join(os.path.dirname(path), source)) as src:
        srs, gt = src.crs.to_wkt(), ", ".join(str(v) for v in src.transform.to_gdal())
    path.write_text(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>{srs}</SRS>'
                    f"<GeoTransform>{gt}</GeoTransform>{bands}</VRTDataset>")
    return str(path)


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dinov2", *args], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _embed_args(src, run, out, *extra):
    return ["embed", str(src), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run,
            "--chip-size", "56", "--overlap", "0", "-o", str(out), "--no-progress", *extra]


def _one_line_error(res, *needles):
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [ln for ln in res.stderr.splitlines() if re.match(r"^(panopticon \w+|python -m \S+): error: ", ln)]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr[-2000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_vrt_needs_opt_in_and_then_equals_its_source(tmp_path):
    run = write_run(tmp_path / "run")
    real = write_tif(tmp_path / "real.tif", smooth_scene(56, 56, seed=3))
    vrt = _vrt(tmp_path / "disguised.tif", "real.tif")  # a VRT under a .tif name
    _one_line_error(_cli(*_embed_args(vrt, run, tmp_path / "o1")), "disguised.tif is a GDAL VRT", "--allow-vrt")
    assert not (tmp_path / "o1" / "disguised_patches.tif").exists()
    from dinov2.run.embed import main

    assert main(_embed_args(vrt, run, tmp_path / "o2", "--allow-vrt")[1:]) == 0
    assert main(_embed_args(real, run, tmp_path / "o3")[1:]) == 0
    os.rename(tmp_path / "o3" / "real_patches.tif", tmp_path / "o3" / "disguised_patches.tif")
    with rasterio.open(tmp_path / "o2" / "disguised_patches.tif") as a, \
            rasterio.open(tmp_path / "o3" / "disguised_patches.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_vrt_pointing_at_a_url_is_refused_and_nothing_is_fetched(tmp_path, server):
    url, requests = server
    run = write_run(tmp_path / "run")
    for name, source in (("remote.tif", f"/vsicurl/{url}/served.tif"), ("http.tif", f"{url}/served.tif"),
                         ("wms.tif", f"WMS:{url}/wms")):
        bands = (f'<VRTRasterBand dataType="UInt16" band="1"><SimpleSource><SourceFilename>{source}'
                 "</SourceFilename><SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>")
        (tmp_path / name).write_text(f'<VRTDataset rasterXSize="56" rasterYSize="56">{bands}</VRTDataset>')
        for extra in ((), ("--allow-vrt",)):
            err = _one_line_error(_cli(*_embed_args(tmp_path / name, run, tmp_path / "o", *extra)), name)
            assert ("--allow-vrt" in err) if not extra else ("not a local file" in err)
    # nested: a local VRT whose source is the remote one
    (tmp_path / "outer.vrt").write_text((tmp_path / "remote.tif").read_text().replace(
        f"/vsicurl/{url}/served.tif", str(tmp_path / "remote.tif")))
    _one_line_error(_cli(*_embed_args(tmp_path / "outer.vrt", run, tmp_path / "o", "--allow-vrt")), "not a local")
    # a remote path given directly, and GDAL itself under the policy (defence in depth)
    _one_line_error(_cli(*_embed_args(f"/vsicurl/{url}/served.tif", run, tmp_path / "o")), "not found")
    from dinov2.data.raster_open import RasterPolicy

    with RasterPolicy().env(), pytest.raises(rasterio.errors.RasterioIOError):
        rasterio.open(f"/vsicurl/{url}/served.tif")
    assert requests() == []
    with rasterio.open(f"/vsicurl/{url}/served.tif") as src:  # the server works: GDAL would have fetched it
        assert src.count == 4
    assert requests()


def test_stac_item_names_its_remote_asset_and_nothing_else_is_fetched(tmp_path, server):
    """Naming a STAC item names its asset URLs: they are read (and equal the local file); an href that is a GDAL
    /vsi path, not a URL, is refused before any request."""
    pystac = pytest.importorskip("pystac")
    import datetime as dt

    url, requests = server
    run = write_run(tmp_path / "run")

    def item_file(href, name):
        item = pystac.Item(name, geometry=None, bbox=None, datetime=dt.datetime(2022, 5, 3),
                           properties={"platform": "sentinel-2a"})
        item.add_asset("stack", pystac.Asset(href, media_type=pystac.MediaType.GEOTIFF, extra_fields={
            "eo:bands": [{"name": b} for b in S2_BANDS]}))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(item.to_dict(include_self_link=False)))
        return str(path)

    _one_line_error(_cli("embed", item_file(f"/vsicurl/{url}/served.tif", "vsi"), "--model", run, "-o",
                         str(tmp_path / "o")), "vsi.json", "neither a local file nor")
    assert requests() == []
    from dinov2.run.embed import main

    assert main([item_file(f"{url}/served.tif", "served"), "--model", run, "--chip-size", "56",
                 "--overlap", "0", "-o", str(tmp_path / "remote"), "--no-progress"]) == 0
    assert requests() and all(r.split()[1] == "/served.tif" for r in requests())
    local = tmp_path / "local"
    local.mkdir()
    os.link(tmp_path / "served.tif", local / "served.tif")
    assert main(_embed_args(local / "served.tif", run, tmp_path / "o_local")[1:]) == 0
    with rasterio.open(tmp_path / "remote" / "served_patches.tif") as a, \
            rasterio.open(tmp_path / "o_local" / "served_patches.tif") as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_side_files_are_not_read(tmp_path):
    """A PAM .aux.xml beside the input would declare 1000 no-data and a scale: neither is applied."""
    run = write_run(tmp_path / "run")
    data = smooth_scene(56, 56, seed=4)
    data[:, :14, :14] = 1000
    (tmp_path / "clean").mkdir()
    (tmp_path / "dirty").mkdir()
    clean, dirty = (write_tif(tmp_path / d / "s.tif", data) for d in ("clean", "dirty"))
    bands = "".join(f'<PAMRasterBand band="{b}"><NoDataValue>1000</NoDataValue><Scale>10</Scale></PAMRasterBand>'
                    for b in range(1, 5))
    (tmp_path / "dirty" / "s.tif.aux.xml").write_text(f"<PAMDataset>{bands}</PAMDataset>")
    from dinov2.run.embed import main

    for src, out in ((clean, "o_clean"), (dirty, "o_dirty")):
        assert main(_embed_args(src, run, tmp_path / out)[1:]) == 0
    _same_outputs(tmp_path / "o_clean", tmp_path / "o_dirty", "s")
    with rasterio.open(dirty) as src:  # GDAL would have applied it without the policy
        assert src.nodata == 1000


@pytest.mark.parametrize("kind", ["fifo", "device", "folder", "complex", "empty", "text", "truncated"])
def test_files_that_are_not_rasters_are_refused_without_blocking(tmp_path, kind):
    run = write_run(tmp_path / "run")
    path = tmp_path / "in.tif"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    elif kind == "complex":
        with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=4, dtype="complex64", crs="EPSG:32632",
                           transform=rasterio.transform.from_origin(0, 0, 10, 10)) as dst:
            dst.write(np.ones((4, 8, 8), np.complex64))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not a raster at all")
    else:
        full = write_tif(tmp_path / "full.tif", smooth_scene(56, 56))
        path.write_bytes(open(full, "rb").read()[:2000])
    want = {"fifo": "FIFO", "device": "device", "folder": "folder", "complex": "complex-valued", "empty": "empty",
            "text": "not a GeoTIFF/COG or JPEG 2000", "truncated": "in.tif"}[kind]
    yaml_in = tmp_path / "scenes.yaml"
    yaml_in.write_text(f"scenes: [{{sensor: sentinel2, file: {path}, bands: [B02, B03, B04, B08]}}]\n")
    cases = [[str(yaml_in)]]
    if kind != "folder":  # a folder given on the command line is a folder of scenes
        cases.append([str(path), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS)])
    for args in cases:
        res = _cli("embed", *args, "--model", run, "--chip-size", "56", "-o", str(tmp_path / "o"), timeout=60)
        _one_line_error(res, want)


def test_side_file_sentinels_are_never_opened(tmp_path):
    """FIFOs where GDAL looks for side files: any reader would be seen (plain GDAL opens all of them)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from trust_world import Sentinels

    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(56, 56, seed=5))
    sentinels = Sentinels()
    try:
        for ext in (".tif.aux.xml", ".aux.xml", ".tif.ovr", ".tif.msk", ".tfw", ".wld", ".imd"):
            sentinels.add(str(tmp_path / "s") + ext)
        res = _cli(*_embed_args(tif, run, tmp_path / "o"), timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert sentinels.opened == []
        probe = subprocess.run([sys.executable, "-c", f"import rasterio; rasterio.open({tif!r}).overviews(1)"],
                               env=_env(), capture_output=True, timeout=60)
        assert probe.returncode == 0 and sentinels.opened  # the sentinels work: plain GDAL opens them
    finally:
        sentinels.close()
