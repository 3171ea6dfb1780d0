"""Faults injected for real into tiny CPU training runs: lr=inf, runaway weights, truncated checkpoints and
leftover temp files, corrupt sample files, a second job on a locked run folder, a launcher killed with SIGKILL.
(The 2-rank torchrun kill-and-resume test is in test_distributed.py.)"""
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from test_train_common import SimulatedKill, tiny_cfg, tiny_dataset, write_geotiff_run, write_spectral_earth_run

from dinov2.train.bad_samples import TooManyBadSamplesError
from dinov2.train.checkpointer import Checkpointer
from dinov2.train.divergence import DivergenceGuard, TrainingDivergedError
from dinov2.train.train import build_model, do_train
from dinov2.utils.utils import fix_random_seeds

ROOT = Path(__file__).resolve().parents[1]
EVERY_ITER = ("optim.epochs=2", "train.saveckp_freq=0.5")  # 4 iterations, a checkpoint after each


def _model(cfg, seed=None):
    fix_random_seeds(int(cfg.train.seed) if seed is None else seed)
    return build_model(cfg)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ in {k}"


@pytest.fixture(scope="module")
def reference_final(tmp_path_factory):
    """Final weights of the uninterrupted 4-iteration run."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("ref"), *EVERY_ITER)
    return _load(do_train(cfg, _model(cfg), dataset=tiny_dataset())["final_checkpoint"])["model"]


def _eq(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_eq(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_eq(p, q) for p, q in zip(x, y))
    return torch.equal(x, y) if torch.is_tensor(x) else x == y


def test_training_stream_is_independent_of_workers_and_resumes_at_its_position():
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.loaders import make_data_loader

    collate = partial(collate_data_and_cast, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5,
                      dtype=torch.float32, n_tokens=16)

    def batches(workers, advance, k, **kw):
        it = iter(make_data_loader(tiny_dataset(), 4, workers, seed=3, sampler_advance=advance, collate_fn=collate,
                                   **kw))
        return [next(it) for _ in range(k)]

    torch.manual_seed(0)
    single = batches(0, 0, 4, per_sample_seeding=True)
    torch.manual_seed(1)  # the training process's RNG plays no part
    two_workers = batches(2, 0, 4, per_sample_seeding=True)
    resumed = batches(2, 8, 2, per_sample_seeding=True)  # stream restarted after 2 batches of 4
    assert all(_eq(a, b) for a, b in zip(single, two_workers))
    assert _eq(single[2:], resumed)
    assert not _eq(single[0]["collated_global_crops"], single[1]["collated_global_crops"])
    assert single[0]["bad_samples"] == []
    # the DataLoader default (worker seeds from the global RNG) is not resumable: the check above can fail
    torch.manual_seed(0)
    default = batches(2, 0, 4)
    torch.manual_seed(0)
    default_resumed = batches(2, 8, 2)
    assert not _eq(default[2:], default_resumed)


def test_lr_inf_stops_before_saving_and_resume_with_lower_lr_is_exact(tmp_path, reference_final):
    cfg = tiny_cfg(tmp_path, *EVERY_ITER)
    with pytest.raises(SimulatedKill):  # job ends while loading iteration 2: checkpoints 0, 1
        do_train(cfg, _model(cfg), dataset=tiny_dataset(kill_after=2 * 4))
    # resumed with lr = inf: the step of iteration 2 turns the weights non-finite; nothing of it is saved
    with pytest.raises(ValueError, match="optim.base_lr"):  # the config check refuses it as an override...
        tiny_cfg(tmp_path, *EVERY_ITER, "optim.base_lr=inf")
    cfg_inf = tiny_cfg(tmp_path, *EVERY_ITER)  # ...so an overflowing schedule is simulated after loading
    cfg_inf.optim.lr = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"non-finite weights in .* at iteration 2 .*stopped before "
                                                    r"saving\. Last good checkpoint: .*model_0000001\.pth"):
        do_train(cfg_inf, _model(cfg_inf), dataset=tiny_dataset())
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    assert not (tmp_path / "model_0000002.pth").exists() and not (tmp_path / "model_final.pth").exists()
    for f in tmp_path.glob("model_*.pth"):
        assert all(torch.isfinite(v).all() for v in _load(f)["model"].values() if v.is_floating_point()), f
    # resumed with the original lr: accepted, and identical to the run that never failed
    cfg_ok = tiny_cfg(tmp_path, *EVERY_ITER)
    res = do_train(cfg_ok, _model(cfg_ok, seed=999), dataset=tiny_dataset())
    assert res["iteration"] == 3
    _assert_same_weights(_load(res["final_checkpoint"])["model"], reference_final)


def test_truncated_latest_checkpoint_falls_back_and_temp_files_are_removed(tmp_path, reference_final, caplog):
    cfg = tiny_cfg(tmp_path, *EVERY_ITER, "train.max_to_keep=2")
    with pytest.raises(SimulatedKill):  # checkpoints 0..2 written, keep-2 leaves 1, 2
        do_train(cfg, _model(cfg), dataset=tiny_dataset(kill_after=3 * 4))
    assert sorted(p.name for p in tmp_path.glob("model_*.pth")) == ["model_0000001.pth", "model_0000002.pth"]
    latest = tmp_path / "model_0000002.pth"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # a save cut off by a full disk
    leftovers = [tmp_path / ".tmp_k1ll3d.pth", tmp_path / "eval" / "2" / ".tmp_abcd.pth", tmp_path / ".tmp_x9"]
    for p in leftovers:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\x80\x02partial")
    caplog.set_level("WARNING", logger="dinov2")
    res = do_train(cfg, _model(cfg, seed=5), dataset=tiny_dataset())
    assert "cannot resume from" in caplog.text and "model_0000002.pth" in caplog.text
    assert not any(p.exists() for p in leftovers)
    _assert_same_weights(_load(res["final_checkpoint"])["model"], reference_final)

    # every candidate unreadable: a clear error, not a silent restart from scratch
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_0000001.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    (broken / "last_checkpoint").write_text("model_0000001.pth")
    with pytest.raises(RuntimeError, match=r"no usable checkpoint in .*broken.*--no-resume"):
        Checkpointer(_model(cfg), str(broken)).resume_or_load()


def test_runaway_weights_stop_before_the_first_save(tmp_path):
    cfg = tiny_cfg(tmp_path, *EVERY_ITER, "train.divergence.max_abs_weight=0.5")
    with pytest.raises(TrainingDivergedError, match=r"diverged weights: \|w\| = .* exceeds "
                                                    r"train.divergence.max_abs_weight=0.5 at iteration 0 .*none "
                                                    r"written yet"):
        do_train(cfg, _model(cfg), dataset=tiny_dataset())
    assert not list(tmp_path.glob("model_*.pth")) and not (tmp_path / "last_checkpoint").exists()


def test_loss_spike_rule_by_hand():
    g = DivergenceGuard(loss_spike_factor=2.0, loss_window=3)
    assert [g.check_loss(x) for x in (10.0, 12.0, 11.0)] == [None, None, None]
    # median 11, bound 11 + 2 * 11 = 33
    assert g.check_loss(32.9) is None  # window now 12, 11, 32.9 -> median 12, bound 36
    assert "loss spike: 36.5 > 36" in g.check_loss(36.5)
    assert "non-finite loss nan" in g.check_loss(float("nan"))
    small = DivergenceGuard(loss_spike_factor=1.0, loss_window=2, history=[0.1, -0.1])
    assert "> 1 " in small.check_loss(1.5)  # median 0, bound 0 + 1 * max(0, 1) = 1
    off = DivergenceGuard(loss_spike_factor=0.0, loss_window=1, history=[1.0])
    assert off.check_loss(1e9) is None
    with pytest.raises(ValueError, match="loss_window"):
        DivergenceGuard(loss_window=0)


def _spectral_cfg(tmp_path, corrupt, *extra):
    run_yaml, bad = write_spectral_earth_run(tmp_path, n=40, corrupt=corrupt)
    import yaml

    cfg = tiny_cfg(tmp_path / "run", "train.OFFICIAL_EPOCH_LENGTH=5", "train.batch_size_per_gpu=8", "optim.epochs=1",
                   *extra)
    cfg.train.dataset = yaml.safe_load(open(run_yaml))["train"]["dataset"]
    return cfg, bad


def test_one_corrupt_file_in_forty_is_skipped_and_recorded(tmp_path):
    cfg, (bad,) = _spectral_cfg(tmp_path, (7,))  # 5 iterations x 8 samples: the whole pass of 40, file 7 included
    res = do_train(cfg, _model(cfg))
    assert res["iteration"] == 4 and torch.isfinite(torch.tensor(res["last_record"]["total_loss"]))
    recs = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["index"] == 7 and recs[0]["file"] == bad
    assert "could not be loaded" in recs[0]["error"] and recs[0]["rank"] == 0 and 0 <= recs[0]["iteration"] <= 4


def test_too_many_corrupt_files_stop_the_run(tmp_path):
    # 3 of 40 corrupt, at most 5% = 2 distinct samples allowed
    cfg, bad = _spectral_cfg(tmp_path, (3, 20, 33), "train.max_bad_sample_fraction=0.05")
    with pytest.raises(TooManyBadSamplesError, match=r"3 of 40 distinct samples could not be read \(7.5%\), more "
                                                      r"than train.max_bad_sample_fraction=0.05.*bad_samples.jsonl"):
        do_train(cfg, _model(cfg))
    recs = [json.loads(x) for x in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert {r["file"] for r in recs} == set(bad)  # a replacement may draw a corrupt file again


_HOLD_LOCK = """
import sys, time
from dinov2.train.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_job_is_refused_and_stale_lock_is_taken_over(tmp_path):
    from dinov2.train.run_lock import RunFolderLockedError
    from dinov2.train.train import get_args_parser, release_run_folder, setup

    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = get_args_parser().parse_args([f"--config-file={write_geotiff_run(tmp_path)}", f"--output-dir={out}"])
        with pytest.raises(RunFolderLockedError, match=rf"in use by another training job .*\"pid\": {holder.pid}"):
            setup(args)
        assert sorted(os.listdir(out)) == ["run.lock"]  # no config, no logs: nothing written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    setup(args)  # the holder died without releasing: its lock is stale
    try:
        log = (out / "logs" / "log.txt").read_text()
        assert f"took over a stale lock {out / 'run.lock'}" in log and f"pid {holder.pid}" in log
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        release_run_folder()
    assert (out / "run.lock").read_text() == ""


_CHILD = """
import os, sys, time
from dinov2 import distributed
if sys.argv[2] == "watchdog-only":
    distributed.set_parent_death_signal = lambda *a: False
distributed.exit_with_parent(poll_s=0.2)
with open(sys.argv[1], "a") as fh:
    fh.write(f"{os.getpid()}\\n")
    fh.flush()
    while True:
        time.sleep(0.05)
        fh.write("x\\n")
        fh.flush()
"""
_PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]])
time.sleep(600)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux parent-death signal and /proc")
@pytest.mark.parametrize("mode", ["pdeathsig", "watchdog-only"])
def test_process_exits_when_its_launcher_is_killed(tmp_path, mode):
    out = tmp_path / "writes.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(out), mode], env=env)
    try:
        deadline = time.time() + 60
        while not (out.exists() and out.read_text().count("x") >= 2):
            assert time.time() < deadline, "child never started writing"
            time.sleep(0.05)
        child = int(out.read_text().splitlines()[0])
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    t0 = time.time()
    while os.path.exists(f"/proc/{child}") and time.time() - t0 < 10:
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] if os.path.exists(
            f"/proc/{child}/stat") else "gone"
        if state == "Z":
            break
        time.sleep(0.02)
    assert time.time() - t0 < 5, f"child still alive {time.time() - t0:.1f} s after its launcher was killed"
    size = out.stat().st_size
    time.sleep(0.5)
    assert out.stat().st_size == size
