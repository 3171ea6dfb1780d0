"""`panopticon embed` as users run it: killed mid-run and resumed, and sharded over 2 ranks with torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID"):
        env.pop(k, None)
    return env


def _args(tif, run_dir, out, extra=()):
    return [tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run_dir, "--chip-size", "56",
            "--overlap", "14", "--batch-size", "2", "-o", str(out), *extra]


def kill_after_strips(args, state, strips=3):
    """Run ``python -m dinov2.run.embed *args``, SIGKILL it once its `state` file records `strips` finished strips
    (or after 120 s); returns (exit status, strips done by the time the kill landed, None when unreadable)."""
    proc = subprocess.Popen([sys.executable, "-m", "dinov2.run.embed", *map(str, args)], env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # unread pipes could fill up
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and done < strips:
        try:
            done = json.loads(state.read_text())["strips_done"]
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:  # read again: another strip may have finished before the kill landed
        return proc.returncode, json.loads(state.read_text())["strips_done"]
    except (OSError, ValueError, KeyError):
        return proc.returncode, None


def _same_outputs(a, b, name):
    with rasterio.open(a / f"{name}_patches.tif") as x, rasterio.open(b / f"{name}_patches.tif") as y:
        assert x.transform == y.transform and x.crs == y.crs
        np.testing.assert_allclose(x.read(), y.read(), rtol=1e-5, atol=1e-5, equal_nan=True)
    ca = gpd.read_parquet(a / "chips.parquet").sort_values("chip_id").reset_index(drop=True)
    cb = gpd.read_parquet(b / "chips.parquet").sort_values("chip_id").reset_index(drop=True)
    assert list(ca.chip_id) == list(cb.chip_id)
    assert ca.geometry.equals(cb.geometry)
    for col in ("cls_embedding", "mean_embedding"):
        np.testing.assert_allclose(np.stack(ca[col]), np.stack(cb[col]), rtol=1e-5, atol=1e-5)


def test_resume_after_sigkill(tmp_path):
    run_dir = write_run(tmp_path / "run")
    data = smooth_scene(1260, 140, seed=5)  # 90 patch rows -> 30 strips of 3 chips
    data[:, 400:500, :] = 0
    tif = write_tif(tmp_path / "long.tif", data, nodata=0)
    out = tmp_path / "out"
    state = out / ".embed" / "long" / "state.json"
    rc, done = kill_after_strips(_args(tif, run_dir, out, ["--no-progress"]), state)
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    # nothing that looks complete was left behind
    assert not (out / "long_patches.tif").exists() and not (out / "chips.parquet" / "long.parquet").exists()
    assert 3 <= done < 30
    resumed = subprocess.run([sys.executable, "-m", "dinov2.run.embed", *_args(tif, run_dir, out)], env=_env(),
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{done * 3}/90" in resumed.stderr  # the progress bar starts where the killed run stopped
    fresh = tmp_path / "fresh"
    from dinov2.run.embed import main

    assert main(_args(tif, run_dir, fresh, ["--no-progress"])) == 0
    _same_outputs(out, fresh, "long")
    assert not (out / ".embed" / "long").exists()  # work folder removed once the scene is complete


def test_torchrun_two_ranks_equal_one(tmp_path):
    run_dir = write_run(tmp_path / "run")
    data = smooth_scene(150, 170, seed=6)
    data[:, :40, :60] = 0
    tif = write_tif(tmp_path / "scene.tif", data, nodata=0)
    one, two = tmp_path / "one", tmp_path / "two"
    from dinov2.run.embed import main

    assert main(_args(tif, run_dir, one, ["--no-progress"])) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), "-m", "dinov2.run.embed", *_args(tif, run_dir, two, ["--no-progress"])]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 1/2" in res.stderr  # really ran as two processes
    _same_outputs(one, two, "scene")
