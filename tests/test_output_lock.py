"""One writer per output folder: `panopticon embed` runs on one folder, as real processes in several
interleavings (a second run while the first holds the lock before/while embedding, both started at once, the
first killed and its stale lock taken over), always end with the folder equal to one clean run; `predict` obeys
the same lock; training's `RunLock` is the same class."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env, _same_outputs  # noqa: E402

LOCK = ".panopticon.lock"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run folder, a 30-strip scene and the folder of one clean embed run of it."""
    root = tmp_path_factory.mktemp("lock_world")
    run = write_run(root / "run")
    data = smooth_scene(1260, 140, seed=5)
    data[:, 400:500, :] = 0
    tif = write_tif(root / "long.tif", data, nodata=0)
    clean = root / "clean"
    from dinov2.run.embed import main

    assert main(_args(tif, run, clean)) == 0
    return {"run": run, "tif": tif, "clean": clean}


def _args(tif, run, out):
    return [tif, "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", run, "--chip-size", "56",
            "--overlap", "14", "--batch-size", "2", "-o", str(out), "--no-progress"]


def _start(world, out):
    return subprocess.Popen([sys.executable, "-m", "dinov2.run.embed", *_args(world["tif"], world["run"], out)],
                            env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def _holder(out):
    try:
        return json.loads((out / LOCK).read_text() or "null")
    except (OSError, ValueError):
        return None


def _strips_done(out):
    try:
        return json.loads((out / ".embed" / "long" / "state.json").read_text())["strips_done"]
    except (OSError, ValueError, KeyError):
        return 0


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _equal_to_clean(out, clean):
    assert _files(out) == _files(clean)
    assert (out / LOCK).read_text() == ""  # released
    _same_outputs(out, clean, "long")


def _refused(world, out, holder_pid):
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK}
    second = subprocess.run([sys.executable, "-m", "dinov2.run.embed", *_args(world["tif"], world["run"], out)],
                            env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    err = second.stderr.strip().splitlines()
    assert "Traceback" not in second.stderr and len([ln for ln in err if "error:" in ln]) == 1
    assert f'"pid": {holder_pid}' in err[-1] and "in use by another panopticon embed" in err[-1]
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != LOCK}
    assert after == before or set(after) >= set(before)  # the refused run wrote nothing of its own
    return second


@pytest.mark.parametrize("pause_at", ["lock", "mid-scene"])
def test_second_run_is_refused_while_the_first_holds_the_folder(world, tmp_path, pause_at):
    out = tmp_path / "out"
    first = _start(world, out)
    try:
        if pause_at == "lock":
            _wait_for(lambda: (_holder(out) or {}).get("pid") == first.pid, first, "the lock was taken")
        else:
            _wait_for(lambda: _strips_done(out) >= 2, first, "two strips were done")
        first.send_signal(signal.SIGSTOP)  # holds the lock, writes nothing while the second run tries
        snapshot = _files(out)
        _refused(world, out, first.pid)
        assert _files(out) == snapshot
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        first.kill()
    _equal_to_clean(out, world["clean"])


def test_runs_started_together_leave_one_clean_result(world, tmp_path):
    out = tmp_path / "out"
    procs = [_start(world, out) for _ in range(2)]
    codes = [p.wait(timeout=300) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(codes) in ([0, 2], [0, 0]), errs  # [0, 0]: the second started after the first had finished
    for code, err in zip(codes, errs):
        if code == 2:
            assert "in use by another panopticon embed" in err and "Traceback" not in err
    _equal_to_clean(out, world["clean"])


def test_stale_lock_of_a_killed_run_is_taken_over_and_the_result_is_clean(world, tmp_path):
    out = tmp_path / "out"
    first = _start(world, out)
    _wait_for(lambda: _strips_done(out) >= 3, first, "three strips were done")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert _holder(out)["pid"] == first.pid  # the kernel dropped the lock, the file still names the dead run
    second = subprocess.run([sys.executable, "-m", "dinov2.run.embed", *_args(world["tif"], world["run"], out)],
                            env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"took over a stale lock {out / LOCK}" in second.stderr and f"pid {first.pid}" in second.stderr
    _equal_to_clean(out, world["clean"])
    # a third run over the finished folder reuses everything
    mtime = (out / "long_patches.tif").stat().st_mtime_ns
    from dinov2.run.embed import main

    assert main(_args(world["tif"], world["run"], out)) == 0
    assert (out / "long_patches.tif").stat().st_mtime_ns == mtime
    _equal_to_clean(out, world["clean"])


_HOLD = """
import sys, time
from dinov2.utils.folder_lock import FolderLock
FolderLock(sys.argv[1], sys.argv[2], "panopticon embed").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_predict_and_the_python_api_obey_the_same_lock(world, tmp_path):
    from dinov2.inference.embed import EmbedSettings, embed_scenes
    from dinov2.inference.sources import collect_scenes
    from dinov2.run.cli import run_command
    from dinov2.run.predict import main as predict_main
    from dinov2.utils.folder_lock import FolderLockedError

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out), LOCK], env=_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        head = tmp_path / "model_final.pth"
        head.write_bytes(b"")  # never read: the lock is checked first
        assert run_command("predict", predict_main, [str(head), world["tif"], "--sensor", "sentinel2", "--bands",
                                                     ",".join(S2_BANDS), "-o", str(out)]) == 2
        from dinov2 import load_model

        scenes = collect_scenes([world["tif"]], "sentinel2", S2_BANDS)
        with pytest.raises(FolderLockedError, match=rf'"pid": {holder.pid}'):
            embed_scenes(scenes, load_model(world["run"]), str(out), EmbedSettings(chip_size="56", progress=False))
        assert sorted(os.listdir(out)) == [LOCK]
    finally:
        holder.kill()
        holder.wait()


def test_training_run_lock_is_the_folder_lock(tmp_path):
    from dinov2.train.run_lock import RunFolderLockedError, RunLock
    from dinov2.utils.folder_lock import FolderLock, FolderLockedError

    assert issubclass(RunLock, FolderLock) and RunFolderLockedError is FolderLockedError
    lock = RunLock(str(tmp_path)).acquire()
    try:
        assert json.loads((tmp_path / "run.lock").read_text())["job"] == "training job"
    finally:
        lock.release()
    assert (tmp_path / "run.lock").read_text() == ""
