"""`panopticon index` and `panopticon search`: the index answers as exact search does (on a table small enough for
HNSW to be exact), filters by area and time, is extended with new parts, is never used when stale, and bad
tables or queries get one-line errors."""
import logging

import numpy as np
import pytest

gpd = pytest.importorskip("geopandas")
pytest.importorskip("usearch")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from test_embed import S2_BANDS, _one_thread, run_embed, smooth_scene, write_run, write_tif  # noqa: E402,F401

from dinov2.inference.chips_table import decode_embeddings  # noqa: E402
from dinov2.inference.index import build_index, index_status  # noqa: E402
from dinov2.inference.search import search_chips  # noqa: E402
from dinov2.run.cli import main as cli  # noqa: E402



def _scene(tmp_path, out, run, name, seed, when, origin=(500000.0, 5000000.0)):
    tif = write_tif(tmp_path / f"{name}.tif", smooth_scene(84, 112, seed=seed), origin=origin,
                    tags={"ACQUISITION_DATETIME": when})
    run_embed([tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run, "--chip-size", "14",
               "--overlap", "0", "-o", str(out)])


@pytest.fixture()
def world(tmp_path):
    run = write_run(tmp_path / "run")
    out = tmp_path / "out"
    _scene(tmp_path, out, run, "june", 1, "2024-06-10T10:00:00")
    _scene(tmp_path, out, run, "may", 2, "2024-05-02T10:00:00", origin=(502000.0, 5000000.0))
    return {"out": out, "run": run, "tmp": tmp_path}


def _oracle(out, chip_id, k, column="mean_embedding", keep=None):
    t = pq.read_table(out / "chips.parquet")
    ids = t.column("chip_id").to_pylist()
    x = decode_embeddings(t, column).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x[ids.index(chip_id)]
    order = [i for i in np.argsort(-sim, kind="stable") if keep is None or keep(t, i)]
    return [ids[i] for i in order[:k]], sim[order[:k]]


def test_exact_search_matches_brute_force(world):
    out = world["out"]
    for emb, col in (("mean", "mean_embedding"), ("cls", "cls_embedding")):
        res = search_chips(str(out), k=7, chip_id="june:r2c3", embedding=emb, exact=True)
        ids, sims = _oracle(out, "june:r2c3", 7, col)
        assert list(res.chip_id) == ids and res.chip_id[0] == "june:r2c3"
        np.testing.assert_allclose(res.similarity, sims, rtol=1e-6)


def test_index_answers_like_exact_search(world):
    out = world["out"]
    assert index_status(str(out)) == "missing"
    assert cli(["index", str(out), "--embedding", "mean,cls", "--dtype", "f32", "--no-progress"]) == 0
    assert index_status(str(out)) == "current" and index_status(str(out), "cls") == "current"
    for emb, col in (("mean", "mean_embedding"), ("cls", "cls_embedding")):
        for q in ("june:r0c0", "may:r5c7", "june:r3c4"):
            res = search_chips(str(out / "chips.parquet"), k=10, chip_id=q, embedding=emb)
            ids, sims = _oracle(out, q, 10, col)
            assert list(res.chip_id) == ids
            np.testing.assert_allclose(res.similarity, sims, atol=1e-5)


def test_filters_by_area_and_time(world):
    out = world["out"]
    chips = gpd.read_parquet(out / "chips.parquet")
    may = chips[chips.scene == "may"]
    w, s, e, n = may.total_bounds
    box = (w + 0.3 * (e - w), s, e, n)  # the eastern part of the May scene only
    def in_box(t, i):  # noqa: E306
        b = t.column("bbox_wgs84")[int(i)].as_py()
        return b["xmin"] <= box[2] and b["xmax"] >= box[0] and b["ymin"] <= box[3] and b["ymax"] >= box[1]
    for built in (False, True):
        if built:
            build_index(str(out), progress=False)
        res = search_chips(str(out), k=5, chip_id="june:r1c1", bbox=box)
        ids, _ = _oracle(out, "june:r1c1", 5, keep=in_box)
        assert list(res.chip_id) == ids and set(res.scene) == {"may"}
        res = search_chips(str(out), k=4, chip_id="june:r1c1", datetime="2024-05-01/2024-05-31")
        assert list(res.chip_id) == _oracle(out, "june:r1c1", 4, keep=lambda t, i: t.column("scene")[int(i)]
                                            .as_py() == "may")[0]
        res = search_chips(str(out), k=3, chip_id="june:r1c1", datetime="2024-06-01/..")
        assert res.chip_id[0] == "june:r1c1" and set(res.scene) == {"june"}
    assert search_chips(str(out), k=3, chip_id="june:r1c1", datetime="2023-01-01/2023-12-31").empty


def test_stale_index_is_not_used_and_new_parts_are_added(world, caplog):
    out, run = world["out"], world["run"]
    build_index(str(out), progress=False)
    _scene(world["tmp"], out, run, "july", 3, "2024-07-01T10:00:00", origin=(504000.0, 5000000.0))
    assert index_status(str(out)).startswith("out of date: parts 1 new (july.parquet)")
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        res = search_chips(str(out), k=8, chip_id="july:r0c0")
    assert "searching exactly" in caplog.text
    assert list(res.chip_id) == _oracle(out, "july:r0c0", 8)[0]  # the new scene's chips are found
    summary = build_index(str(out), progress=False)
    assert summary["added_parts"] == 1 and not summary["rebuilt"] and summary["rows"] == 3 * 48
    assert index_status(str(out)) == "current"
    res = search_chips(str(out), k=8, chip_id="july:r0c0")
    assert list(res.chip_id) == _oracle(out, "july:r0c0", 8)[0]
    (out / "chips.parquet" / "may.parquet").unlink()
    assert "removed (may.parquet)" in index_status(str(out))
    assert build_index(str(out), progress=False)["rebuilt"]


def test_errors_name_the_problem(world, capsys, caplog):
    out = world["out"]
    with pytest.raises(ValueError, match="chip id 'nope' is not in .*chips.parquet"):
        search_chips(str(out), chip_id="nope")
    with pytest.raises(ValueError, match="no chip in .*chips.parquet contains lon=0.0"):
        search_chips(str(out), lonlat=(0.0, 0.0))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        search_chips(str(out), k=0, chip_id="june:r0c0")
    with pytest.raises(ValueError, match="--datetime 'last week'"):
        search_chips(str(out), chip_id="june:r0c0", datetime="last week")
    with pytest.raises(SystemExit) as exc:  # argparse's usage error: exit 2
        cli(["search", str(out), "--chip-id", "june:r0c0", "--bbox", "1,2,3"])
    assert exc.value.code == 2
    assert "expected 4 numbers" in capsys.readouterr().err
    garbage = world["tmp"] / "bad" / "chips.parquet"
    garbage.mkdir(parents=True)
    (garbage / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"x\.parquet is not a chip table part of `panopticon embed`"):
        search_chips(str(garbage.parent), chip_id="x:r0c0")
    (garbage / "x.parquet").unlink()
    with pytest.raises(ValueError, match="holds no chip parts"):
        search_chips(str(garbage.parent), chip_id="x:r0c0")
    pq.write_table(pa.table({"chip_id": pa.array([], pa.string())}), garbage / "x.parquet")
    with pytest.raises(ValueError, match="no column mean_embedding"):
        search_chips(str(garbage.parent), chip_id="x:r0c0")
    # a chip whose embedding is NaN can be neither a query nor a silent result
    t = pq.read_table(out / "chips.parquet" / "june.parquet")
    emb = decode_embeddings(t, "mean_embedding")
    emb[0] = np.nan
    bad = t.set_column(t.schema.get_field_index("mean_embedding"), "mean_embedding",
                       pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
    pq.write_table(bad, out / "chips.parquet" / "june.parquet")
    first = t.column("chip_id")[0].as_py()
    with pytest.raises(ValueError, match=f"query chip '{first}' in .* has no valid mean embedding"):
        search_chips(str(out), chip_id=first)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        res = search_chips(str(out), chip_id="may:r0c0", k=200)  # every chip: the invalid one is left out
        assert "1 chips have no valid mean_embedding" in caplog.text
        assert first not in set(res.chip_id) and len(res) == 2 * 48 - 1
        build_index(str(out), progress=False)
        assert "1 chips have no valid embedding" in caplog.text
    res = search_chips(str(out), chip_id="may:r0c0", k=200)  # through the index now
    assert index_status(str(out)) == "current" and first not in set(res.chip_id) and len(res) == 2 * 48 - 1
