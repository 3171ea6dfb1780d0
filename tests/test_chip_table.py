"""The chip table as a partitioned GeoParquet dataset: one part per scene, WGS84 geometry with a bbox covering
column, Hilbert-ordered row groups, ZSTD; conformant as an outside validator checks it; one table for geopandas,
pyarrow and DuckDB; float16/int8 embeddings; one model per table."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
pa = pytest.importorskip("pyarrow")

import pyarrow.parquet as pq  # noqa: E402

from test_embed import S2_BANDS, _one_thread, run_embed, smooth_scene, write_run, write_tif  # noqa: E402,F401

from dinov2.inference import chips_table  # noqa: E402
from dinov2.inference.chips_table import decode_embeddings, encode_embeddings, hilbert_order  # noqa: E402



def _validator() -> str:
    exe = shutil.which("geoparquet-validator") or os.path.join(os.path.dirname(sys.executable),
                                                               "geoparquet-validator")
    if not os.path.exists(exe):
        pytest.fail("geoparquet-validator (the dev extra) is not installed")
    return exe


def _embed(tmp_path, out, seed=0, name="s", size=(140, 140), chip="14", extra=(), run=None, origin=None):
    run = run or write_run(tmp_path / f"run{seed}", seed=seed)
    kw = {"origin": origin} if origin else {}
    tif = write_tif(tmp_path / f"{name}.tif", smooth_scene(*size, seed=seed), **kw)
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run, "--chip-size", chip,
               "--overlap", "0", "-o", str(out), *extra])
    return run


def test_hilbert_order_visits_neighbours():
    """Along a Hilbert curve over a full 2^b grid, consecutive cells are edge neighbours."""
    yy, xx = np.mgrid[0:16, 0:16]
    x, y = xx.ravel().astype(float), yy.ravel().astype(float)
    order = hilbert_order(x, y, bits=4)
    assert sorted(order.tolist()) == list(range(256))
    steps = np.abs(np.diff(x[order])) + np.abs(np.diff(y[order]))
    assert (steps == 1).all()


@pytest.mark.parametrize("dtype,min_cos", [("float32", 1 - 1e-7), ("float16", 0.99999), ("int8", 0.9998)])
def test_embedding_encodings_round_trip(dtype, min_cos):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 768)).astype(np.float32) * rng.uniform(0.1, 10, (50, 1)).astype(np.float32)
    arr, scale = encode_embeddings(x, dtype)
    cols = {"e": arr} if scale is None else {"e": arr, "e_scale": scale}
    y = decode_embeddings(pa.table(cols), "e")
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert y.dtype == np.float32 and cos.min() >= min_cos
    with pytest.raises(ValueError, match="embedding dtype must be one of"):
        encode_embeddings(x, "float64")


def test_parts_conformant_and_one_table_for_every_reader(tmp_path, monkeypatch):
    duckdb = pytest.importorskip("duckdb")
    monkeypatch.setattr(chips_table, "ROW_GROUP_BYTES", 1)  # 64 rows per group: the spatial order can be judged
    out = tmp_path / "out"
    run = _embed(tmp_path, out, name="a", size=(280, 280))  # 20 x 20 chips of 14 px
    _embed(tmp_path, out, name="b", size=(140, 140), run=run, origin=(300000.0, 5000000.0))
    parts = sorted((out / "chips.parquet").iterdir())
    assert [p.name for p in parts] == ["a.parquet", "b.parquet"]
    for p in parts:
        res = subprocess.run([_validator(), "check", "--json", str(p)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        status = {o["id"]: o["status"] for o in json.loads(res.stdout)["outcomes"]}
        assert not [k for k, v in status.items() if v == "fail"], status
        for test in ("core/wkb", "covering/bbox-column-structure", "distribution/geospatial-statistics"):
            assert status[f"/conf/{test}"] == "pass", test
        if p.name == "a.parquet":  # 400 chips in 7 row groups: enough for the validator to judge the order
            assert status["/conf/distribution/spatial-order"] == "pass"
    first = pq.ParquetFile(parts[0])
    assert first.num_row_groups >= 5 and first.metadata.row_group(0).column(0).compression == "ZSTD"
    a = gpd.read_parquet(out / "chips.parquet")
    assert len(a) == 400 + 100 and a.crs.equals("OGC:CRS84")
    t = pq.read_table(out / "chips.parquet")
    d = duckdb.sql(f"SELECT chip_id, mean_embedding FROM '{out}/chips.parquet/*.parquet'").arrow()
    if hasattr(d, "read_all"):
        d = d.read_all()
    ids = sorted(a.chip_id)
    assert sorted(t.column("chip_id").to_pylist()) == ids == sorted(d.column("chip_id").to_pylist())
    by_id = dict(zip(d.column("chip_id").to_pylist(), decode_embeddings(d, "mean_embedding")))
    np.testing.assert_array_equal(np.stack(a.set_index("chip_id").loc[ids, "mean_embedding"].to_list()),
                                  np.stack([by_id[i] for i in ids]))
    inside = gpd.read_parquet(out / "chips.parquet", bbox=tuple(a[a.chip_id == "a:r3c4"].total_bounds))
    assert "a:r3c4" in set(inside.chip_id) and len(inside) < 20  # the covering column filters by area


def test_embedding_dtype_option_shrinks_the_table(tmp_path):
    run = write_run(tmp_path / "run")
    sizes, tables = {}, {}
    for dtype in ("float32", "float16", "int8"):
        out = tmp_path / dtype
        _embed(tmp_path, out, run=run, extra=["--embedding-dtype", dtype] if dtype != "float32" else [])
        part = out / "chips.parquet" / "s.parquet"
        sizes[dtype] = part.stat().st_size
        tables[dtype] = pq.read_table(part).sort_by("chip_id")
        assert chips_table.part_info(str(part))["embedding_dtype"] == dtype
    ref = decode_embeddings(tables["float32"], "mean_embedding")
    for dtype, bound in (("float16", 1e-5), ("int8", 1e-3)):
        got = decode_embeddings(tables[dtype], "mean_embedding")
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert 1 - cos.min() < bound
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]


def test_one_model_per_table_and_old_single_file_moved_aside(tmp_path):
    out = tmp_path / "out"
    _embed(tmp_path, out, seed=0, name="a")
    with pytest.raises(ValueError, match=r"a\.parquet was written with other settings \(model_digest"):
        _embed(tmp_path, out, seed=1, name="b")  # another model's weights into the same table
    assert not (out / "chips.parquet" / "b.parquet").exists()
    # an output folder of the single-file layout: the old table is kept under another name, parts are written
    old = tmp_path / "old"
    _embed(tmp_path, old, seed=0, name="a")
    shutil.rmtree(old / "chips.parquet")
    pq.write_table(pa.table({"chip_id": ["x"]}), old / "chips.parquet")
    _embed(tmp_path, old, seed=0, name="a", run=str(tmp_path / "run0"))
    assert (old / "chips_v2.parquet").is_file() and (old / "chips.parquet" / "a.parquet").is_file()
