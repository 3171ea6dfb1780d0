"""`panopticon embed --no-patch-map`: the chip table alone, equal to a run with maps; switching the option
recomputes the scene and never leaves a map of other settings beside it."""
import json

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pq = pytest.importorskip("pyarrow.parquet")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_bucket import _objects, bucket  # noqa: E402,F401


def _embed(tif, run, out, *extra):
    from dinov2.run.embed import main

    assert main([str(tif), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", str(run),
                 "--chip-size", "56", "--overlap", "14", "--batch-size", "2", "-o", str(out), "--no-progress",
                 *map(str, extra)]) == 0


def _table(out, name):
    t = pq.read_table(out / "chips.parquet" / f"{name}.parquet").to_pydict()
    return {k: t[k] for k in ("chip_id", "cls_embedding", "mean_embedding", "valid_fraction")}


def test_chips_only_equals_the_chip_table_of_a_run_with_maps(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(98, 126, seed=3))
    _embed(tif, run, tmp_path / "maps")
    _embed(tif, run, tmp_path / "chips", "--no-patch-map")
    out = capsys.readouterr().out
    assert "no patch maps (--no-patch-map)" in out and "chips in" in out
    assert (tmp_path / "maps" / "s_patches.tif").is_file()
    assert not list((tmp_path / "chips").glob("*.tif")) and not list((tmp_path / "chips").rglob("*.bin"))
    a, b = _table(tmp_path / "maps", "s"), _table(tmp_path / "chips", "s")
    assert a["chip_id"] == b["chip_id"] and len(a["chip_id"]) > 4
    for key in ("cls_embedding", "mean_embedding", "valid_fraction"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    marker = json.loads((tmp_path / "chips" / ".embed" / "s.done.json").read_text())
    assert marker["signature"]["patch_map"] is False
    assert "patch_map" not in json.loads((tmp_path / "maps" / ".embed" / "s.done.json").read_text())["signature"]

    # the chips-only run is finished: a rerun skips it without a map
    _embed(tif, run, tmp_path / "chips", "--no-patch-map")
    assert "(1 already finished)" in capsys.readouterr().out


def test_switching_the_map_option_recomputes_and_removes_the_other_map(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(70, 84, seed=4))
    out = tmp_path / "out"
    _embed(tif, run, out)
    assert (out / "s_patches.tif").is_file()
    _embed(tif, run, out, "--no-patch-map")
    assert "(0 already finished)" in capsys.readouterr().out
    assert not (out / "s_patches.tif").exists()  # a map of other settings would look like this run's
    _embed(tif, run, out)
    assert "(0 already finished)" in capsys.readouterr().out and (out / "s_patches.tif").is_file()


def test_patch_map_must_be_a_bool():
    from dinov2.inference.embed import EmbedSettings, check_settings

    with pytest.raises(ValueError, match="patch_map must be True or False, got 'no'"):
        check_settings(EmbedSettings(patch_map="no"))


def test_chips_only_in_a_bucket(tmp_path, bucket, capsys):
    pytest.importorskip("boto3")
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(70, 84, seed=5))
    url = f"{bucket}/chips"
    _embed(tif, run, url, "--no-patch-map", "--work-dir", tmp_path / "work")
    assert set(_objects("chips")) == {"chips.parquet/s.parquet", ".embed/s.done.json", ".embed/s.chips.parquet"}
    _embed(tif, run, url, "--no-patch-map", "--work-dir", tmp_path / "work2")  # another machine: skipped
    assert "(1 already finished)" in capsys.readouterr().out
