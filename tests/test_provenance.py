"""Reuse only what matches: a finished scene (or finished strips of an interrupted one) is reused only when
weights content, no-data, statistics values, settings and inputs are unchanged; otherwise it is recomputed, equal
to a fresh run with the new settings, and the log names what changed. Kill, swap checkpoint, resume never mixes
two models in one map. `--random-init` is seeded."""
import json
import logging
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

rasterio = pytest.importorskip("rasterio")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env, _same_outputs, kill_after_strips  # noqa: E402


def _args(src, run, out, *extra, chip="56", overlap="0"):
    sensor = [] if str(src).endswith(".yaml") else ["--sensor", "sentinel2", "--bands", ",".join(S2_BANDS)]
    return [str(src), *sensor, "--model", str(run), "--chip-size", chip, "--overlap", overlap, "-o", str(out),
            "--no-progress", *extra]


def _embed(*args):
    from dinov2.run.embed import main

    assert main(list(args)) == 0


def _patches(out, name):
    with rasterio.open(out / f"{name}_patches.tif") as src:
        return src.read()


def _swap_weights(run, seed):
    """New weights written over the same checkpoint path (its path and name unchanged)."""
    tmp = write_run(run.parent / f"tmp_{seed}", seed=seed)
    shutil.copy(f"{tmp}/model_final.pth", run / "model_final.pth")


def test_new_weights_at_the_same_path_are_recomputed(tmp_path, caplog):
    run = tmp_path / "run"
    write_run(run, seed=0)
    tif = write_tif(tmp_path / "s.tif", smooth_scene(56, 112, seed=1))
    out = tmp_path / "out"
    _embed(*_args(tif, run, out))
    old = _patches(out, "s")
    _swap_weights(run, seed=1)
    with caplog.at_level(logging.INFO, logger="dinov2"):
        _embed(*_args(tif, run, out))
    assert "embed: s is recomputed: weights" in caplog.text
    fresh = tmp_path / "fresh"
    _embed(*_args(tif, write_run(tmp_path / "run1", seed=1), fresh))
    assert not np.allclose(_patches(out, "s"), old)
    _same_outputs(out, fresh, "s")


def test_changed_nodata_and_statistics_are_recomputed(tmp_path, caplog):
    run = write_run(tmp_path / "run")
    data = smooth_scene(56, 112, seed=2)
    data[:, :20, :30] = 7
    write_tif(tmp_path / "s.tif", data)
    scenes = tmp_path / "scenes.yaml"

    def write_yaml(mean):
        scenes.write_text(yaml.safe_dump({"scenes": [{"name": "s", "sensor": "sentinel2", "file": "s.tif",
                                                      "bands": S2_BANDS, "mean": mean, "std": [300.0] * 4}]}))

    write_yaml([1000.0] * 4)
    out = tmp_path / "out"
    _embed(*_args(scenes, run, out))
    base = _patches(out, "s")
    cases = [("nodata", ["--nodata", "7"], None), ("norm", ["--nodata", "7"], [900.0, 1000.0, 1000.0, 1000.0])]
    for what, extra, mean in cases:
        if mean is not None:
            write_yaml(mean)  # same file name, new values
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dinov2"):
            _embed(*_args(scenes, run, out, *extra))
        assert f"embed: s is recomputed: {what}" in caplog.text, caplog.text
        fresh = tmp_path / f"fresh_{what}"
        _embed(*_args(scenes, run, fresh, *extra))
        _same_outputs(out, fresh, "s")
        assert not np.allclose(_patches(out, "s"), base, equal_nan=True)
        base = _patches(out, "s")
    # a stats file whose contents change under the same name
    stats = tmp_path / "stats.yaml"
    plain = tmp_path / "plain"
    for k, m in enumerate((1000.0, 1100.0)):
        stats.write_text(yaml.safe_dump({"mean": [m] * 4, "std": [300.0] * 4}))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dinov2"):
            _embed(*_args(tmp_path / "s.tif", run, plain, "--norm-stats", str(stats)))
        assert ("recomputed: norm" in caplog.text) == (k == 1)
    fresh = tmp_path / "fresh_stats"
    _embed(*_args(tmp_path / "s.tif", run, fresh, "--norm-stats", str(stats)))
    _same_outputs(plain, fresh, "s")


def test_kill_swap_checkpoint_resume_equals_a_fresh_run_with_the_new_weights(tmp_path):
    run = tmp_path / "run"
    write_run(run, seed=0)
    tif = write_tif(tmp_path / "long.tif", smooth_scene(1260, 140, seed=5))
    out = tmp_path / "out"
    args = _args(tif, run, out, "--batch-size", "2", overlap="14")
    state = out / ".embed" / "long" / "state.json"
    rc, done = kill_after_strips(args, state)
    assert rc == -signal.SIGKILL and 3 <= done < 30
    _swap_weights(run, seed=1)
    resumed = subprocess.run([sys.executable, "-m", "dinov2.run.embed", *args], env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "the unfinished work on long is discarded: weights" in resumed.stderr
    fresh = tmp_path / "fresh"
    _embed(*_args(tif, write_run(tmp_path / "run1", seed=1), fresh, "--batch-size", "2", overlap="14"))
    _same_outputs(out, fresh, "long")
    marker = json.loads((out / ".embed" / "long.done.json").read_text())
    assert marker["report"] == {"absurd_pixels": 0} and marker["signature"]["overlap"] == 1 and marker["n_chips"] == 90


def test_random_init_is_seeded(tmp_path):
    from dinov2.run.embed import load_backbone
    from dinov2.utils.digest import state_dict_digest

    a, b = (state_dict_digest(load_backbone("dinov2_vits14", True, seed=0)) for _ in range(2))
    c = state_dict_digest(load_backbone("dinov2_vits14", True, seed=1))
    assert a == b != c
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("dinov2_vits14", True, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is left as it was
