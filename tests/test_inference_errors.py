"""One-line errors, never tracebacks, for anticipated bad input to embed, predict and search (exit status 2,
naming the file, flag or value; --debug shows the traceback); absurd pixels become counted no-data; outputs
explain themselves (band descriptions) and a normal run logs no GDAL warning."""
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

rasterio = pytest.importorskip("rasterio")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env  # noqa: E402

from dinov2.run.cli import run_command  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    return {"root": root, "run": write_run(root / "run"), "tif": write_tif(root / "s.tif", smooth_scene(56, 112))}


def _embed(world, out, *args, inputs=None, band_flags=True):
    from dinov2.run.embed import main

    flags = ["--sensor", "sentinel2", "--bands", ",".join(S2_BANDS)] if band_flags else []
    return run_command("embed", main, [*(inputs or [world["tif"]]), *flags, "--model", world["run"], "-o", str(out),
                                       "--no-progress", *args])


def _err(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("panopticon ") and ": error: " in ln]
    assert len(errors) == 1, lines
    return errors[0]


@pytest.mark.parametrize("args,needle", [
    (["--chip-size", "nan"], "--chip-size 'nan' must be a finite"),
    (["--chip-size", "inf"], "--chip-size 'inf' must be a finite"),
    (["--chip-size", "-56"], "--chip-size '-56' must be a finite, non-negative"),
    (["--chip-size", "0"], "--chip-size must be positive"),
    (["--chip-size", "abc"], "--chip-size 'abc' is not a number"),
    (["--chip-size", "14000000"], "larger than scene s (56 x 112 px) allows; use at most 112 px"),
    (["--chip-size", "56", "--overlap", "56"], "--overlap (56 px) must be at least 0 and smaller than the chip"),
    (["--batch-size", "0"], "--batch-size must be an integer from 1"),
    (["--batch-size", "1000000"], "--batch-size must be an integer from 1"),
    (["--min-valid", "nan"], "--min-valid must be in (0, 1]"),
    (["--wavelengths", "490,560,665,842"], "give either --bands (with --sensor) or --wavelengths"),
])
def test_bad_flags_are_one_line_errors(world, tmp_path, capsys, args, needle):
    assert _embed(world, tmp_path / "o", *args) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "o" / "s_patches.tif").exists()


def test_bad_files_and_values_are_one_line_errors(world, tmp_path, capsys):
    root = tmp_path
    cases = []
    (root / "str.yaml").write_text(yaml.safe_dump({"scenes": [{"sensor": "sentinel2", "file": world["tif"],
                                                               "bands": S2_BANDS, "mean": ["1234"] * 4,
                                                               "std": [1.0] * 4}]}))
    cases.append(([str(root / "str.yaml")], False, ["str.yaml: scene 0 mean [0] must be a finite number, got '1234'"]))
    (root / "broken.yaml").write_text("scenes: [ {sensor: sentinel2, file: x.tif\n")
    cases.append(([str(root / "broken.yaml")], False, ["broken.yaml is not valid YAML"]))
    (root / "item.json").write_text('{"type": "Feature", "id": ')
    cases.append(([str(root / "item.json")], False, ["item.json is not valid JSON"]))
    (root / "notitem.json").write_text(json.dumps({"type": "Feature", "id": "x"}))
    cases.append(([str(root / "notitem.json")], False, ["notitem.json is not a STAC item"]))
    stats = root / "stats.yaml"
    stats.write_text(yaml.safe_dump({"mean": ["1000"] * 4, "std": [300] * 4}))
    cases.append(([world["tif"], "--norm-stats", str(stats)], True, ["stats.yaml: mean [0] must be a finite number"]))
    cases.append(([world["tif"], "--bands", "B02,B02,B03,B04"], None, ["same channel id 492"]))
    cases.append(([world["tif"]], True, [], "blocked"))
    for case in cases:
        inputs, flags, needles = case[:3]
        out = root / "o"
        if len(case) > 3:  # an output folder that cannot be created: a file is in its way
            (root / "blocked").write_text("x")
            out = root / "blocked" / "o"
        if flags is None:
            from dinov2.run.embed import main

            rc = run_command("embed", main, [*inputs, "--sensor", "sentinel2", "--model", world["run"], "-o",
                                             str(out)])
        else:
            rc = _embed(world, out, "--chip-size", "56", *inputs[1:], inputs=inputs[:1], band_flags=flags)
        assert rc == 2, inputs
        err = _err(capsys)
        for n in needles or ["cannot write output folder", "blocked"]:
            assert n in err, (n, err)


def test_debug_shows_the_traceback(world, tmp_path, capsys):
    from dinov2.run.embed import main

    with pytest.raises(ValueError, match="--chip-size must be positive"):
        run_command("embed", main, [world["tif"], "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model",
                                    world["run"], "--chip-size", "0", "-o", str(tmp_path / "o"), "--debug"])
    res = subprocess.run([sys.executable, "-m", "dinov2", "--debug", "embed", world["tif"], "--sensor", "sentinel2",
                          "--bands", ",".join(S2_BANDS), "--model", world["run"], "--chip-size", "0", "-o",
                          str(tmp_path / "o")], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr and "--chip-size must be positive" in res.stderr


@pytest.mark.parametrize("dtype,value", [("float32", 1e30), ("float64", 1e300), ("float32", float("inf"))])
def test_an_absurd_pixel_is_counted_no_data_and_leaves_its_neighbours_alone(world, tmp_path, dtype, value):
    data = smooth_scene(56, 112, seed=6).astype(dtype)
    bad = data.copy()
    bad[2, 30, 70] = value
    ref = data.copy()
    ref[:, 30, 70] = -1.0  # the same pixel as explicit no-data
    for name, arr, extra in (("bad", bad, []), ("ref", ref, ["--nodata", "-1"])):
        tif = write_tif(tmp_path / f"{name}.tif", arr)
        assert _embed(world, tmp_path / name, "--chip-size", "56", "--overlap", "14", *extra, inputs=[tif]) == 0
    marker = json.loads((tmp_path / "bad" / ".embed" / "bad.done.json").read_text())
    assert marker["report"] == {"absurd_pixels": 1}
    with rasterio.open(tmp_path / "bad" / "bad_patches.tif") as a, rasterio.open(tmp_path / "ref" / "ref_patches.tif") as b:
        x, y = a.read(), b.read()
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)  # same statistics, same neighbours


def test_search_errors(world, tmp_path, capsys):
    import pandas as pd

    from dinov2.run.search import main as search_main

    out = tmp_path / "o"
    assert _embed(world, out, "--chip-size", "56", "--overlap", "0") == 0
    chips = out / "chips.parquet"
    table = pd.read_parquet(chips)
    table.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    nan = table.copy()
    nan.at[0, "mean_embedding"] = np.full(len(nan.at[0, "mean_embedding"]), np.nan, np.float32)
    nan.to_parquet(tmp_path / "nan.parquet")
    os.mkfifo(tmp_path / "fifo.parquet")
    first, second = table.chip_id[0], table.chip_id[1]
    for path, query, needle in ((tmp_path / "empty.parquet", first, "holds no chips"),
                                (tmp_path / "garbage.parquet", first, "is not a chip table"),
                                (tmp_path / "nan.parquet", first, f"query chip '{first}'"),
                                (tmp_path / "fifo.parquet", first, "FIFO"),
                                (chips, "nope", "chip id 'nope' is not in")):
        assert run_command("search", search_main, [str(path), "--chip-id", query]) == 2
        err = _err(capsys)
        assert needle in err and str(path) in err, err
    assert run_command("search", search_main, [str(tmp_path / "nan.parquet"), "--chip-id", second, "-k", "5"]) == 0
    printed = capsys.readouterr().out
    assert first not in printed and second in printed  # the chip without a valid embedding is left out


def test_outputs_explain_themselves_and_gdal_stays_quiet(world, tmp_path, caplog):
    from dinov2.inference.writers import create_partial_raster, finalize_cog, write_rows

    with caplog.at_level(logging.WARNING, logger="rasterio"):
        assert _embed(world, tmp_path / "o", "--chip-size", "56", "--overlap", "14") == 0
        rng = np.random.default_rng(0)
        wide = rng.normal(size=(768, 6, 9)).astype(np.float32)  # a ViT-B map: 32 px tiles, below BLOCKSIZE's 128
        create_partial_raster(str(tmp_path / "w.bin"), 9, 6, 768, "EPSG:32632",
                              rasterio.transform.from_origin(500000, 5000000, 140, 140),
                              descriptions=[f"emb_{k:03d}" for k in range(768)])
        write_rows(str(tmp_path / "w.bin"), 0, wide)
        finalize_cog(str(tmp_path / "w.bin"), str(tmp_path / "w.tif"))
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    with rasterio.open(tmp_path / "o" / "s_patches.tif") as src:
        assert src.descriptions == tuple(f"emb_{k:03d}" for k in range(src.count))
        assert not set(src.tags()) - {"AREA_OR_POINT"}
    with rasterio.open(tmp_path / "w.tif") as src:
        assert src.descriptions[767] == "emb_767" and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.block_shapes[0] == (32, 32)
        np.testing.assert_array_equal(src.read(), wide)


def test_a_model_with_non_finite_weights_is_refused(world, tmp_path, capsys):
    import torch

    run = write_run(tmp_path / "run")
    ckpt = torch.load(f"{run}/model_final.pth", weights_only=True)
    key = next(k for k in ckpt["model"] if k.endswith("blocks.1.mlp.fc1.weight"))
    ckpt["model"][key][0, 0] = float("nan")
    torch.save(ckpt, f"{run}/model_final.pth")
    from dinov2.run.embed import main

    assert run_command("embed", main, [world["tif"], "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS),
                                       "--model", run, "--chip-size", "56", "-o", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert "has non-finite weights in 1 tensor(s)" in err and "blocks.1.mlp.fc1.weight" in err
    assert not (tmp_path / "o" / "s_patches.tif").exists()
