"""Many machines: with torchrun, scenes are split over ranks (each embedded exactly once, by one rank; the last
n mod world scenes by all ranks together) and equal a single-process run; resume skips finished scenes; the
SLURM launcher (submitit) runs `embed` like training."""
import os
import re
import subprocess
import sys

import pytest

rasterio = pytest.importorskip("rasterio")
gpd = pytest.importorskip("geopandas")

from test_embed import S2_BANDS, _one_thread, smooth_scene, write_run, write_tif  # noqa: E402,F401
from test_embed_resume_dist import ROOT, _env, _same_outputs  # noqa: E402


def _args(inputs, run, out, *extra):
    return [*map(str, inputs), "--sensor", "sentinel2", "--bands", ",".join(S2_BANDS), "--model", str(run),
            "--chip-size", "56", "--overlap", "14", "-o", str(out), "--no-progress", *extra]


def _torchrun(args, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "dinov2.run.embed", *args]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr + res.stdout


def test_scenes_are_split_over_ranks_and_resumed(tmp_path):
    run = write_run(tmp_path / "run")
    tifs = [write_tif(tmp_path / f"{n}.tif", smooth_scene(56 + 14 * i, 70, seed=i)) for i, n in enumerate("abc")]
    one, two = tmp_path / "one", tmp_path / "two"
    from dinov2.run.embed import main

    assert main(_args(tifs, run, one)) == 0
    port = 29500 + os.getpid() % 1000
    log = _torchrun(_args(tifs, run, two), port)
    done = re.findall(r"embed: (\w) done( on rank \d/2)?", log)
    # a on rank 0 and b on rank 1 alone; c (3 mod 2 = 1 scene left) by both ranks, written by rank 0
    assert sorted(done) == [("a", " on rank 0/2"), ("b", " on rank 1/2"), ("c", "")], log[-2000:]
    assert f"; {len(gpd.read_parquet(one / 'chips.parquet'))} chips in" in log  # counted over both ranks
    for name in "abc":
        _same_outputs(_only(one, name, tmp_path / f"one_{name}"), _only(two, name, tmp_path / f"two_{name}"), name)
    # resume: b's outputs were lost; only b is embedded again, by its rank
    os.remove(two / ".embed" / "b.done.json")
    log = _torchrun(_args(tifs, run, two), port + 1)
    assert re.findall(r"embed: (\w) done", log) == ["b"] and "a already finished" in log and "c already" in log
    _same_outputs(tmp_path / "one_b", _only(two, "b", tmp_path / "two_b2"), "b")


def _only(out, name, view):
    """A view of `out` with the map and chip-table part of one scene (hard links)."""
    (view / "chips.parquet").mkdir(parents=True)
    os.link(out / f"{name}_patches.tif", view / f"{name}_patches.tif")
    os.link(out / "chips.parquet" / f"{name}.parquet", view / "chips.parquet" / f"{name}.parquet")
    return view


def test_slurm_launcher_runs_embed(tmp_path, capsys):
    from dinov2.run.embed import launch
    from dinov2.run.submit import without_launcher_arguments

    assert without_launcher_arguments(["x.tif", "--cluster=debug", "--ngpus", "2", "--nodes=3", "-o", "o"]) == \
        ["x.tif", "-o", "o"]
    run = write_run(tmp_path / "run")
    tif = write_tif(tmp_path / "s.tif", smooth_scene(56, 56, seed=3))
    out = tmp_path / "out"
    job = launch(_args([tif], run, out, "--cluster", "debug", "--ngpus", "1"))
    assert job.result() == 0
    assert (out / "s_patches.tif").is_file() and (out / "chips.parquet" / "s.parquet").is_file()
    assert f"submitted job {job.job_id} (debug); logs: {out / 'slurm' / str(job.job_id)}/" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--nodes only apply to a submitted job"):
        launch(_args([tif], run, out, "--nodes", "2"))
    res = subprocess.run([sys.executable, "-m", "dinov2", "embed", *_args([tif], run, out, "--cluster", "slurm")],
                         env=dict(_env(), PATH=os.path.dirname(sys.executable)), cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "SLURM is not available" in res.stderr.strip().splitlines()[-1]
