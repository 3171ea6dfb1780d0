"""Distributed helpers without a process group, launcher environment parsing, a 2-process gloo training run
under torchrun in which both ranks keep identical weights, and a torchrun job killed with SIGKILL (ranks die
with their launcher, the run folder stays untouched, resume is bit-exact with data-loader workers and a corrupt
sample file)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinov2 import distributed

ROOT = Path(__file__).resolve().parents[1]


def test_helpers_work_without_process_group():
    assert not distributed.is_enabled()
    assert (distributed.get_rank(), distributed.get_world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    t = torch.tensor([2.0])
    assert torch.equal(distributed.all_reduce_mean(t), t)
    distributed.barrier()
    assert distributed.get_device().type in ("cpu", "cuda")


def test_launcher_environment_parsing(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
              "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_LOCALID", "SLURM_JOB_NUM_NODES", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(k, raising=False)
    assert distributed._read_launcher_env() is None
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[007-008],cpu1")
    spec = distributed._read_launcher_env()
    assert spec["rank"] == 5 and spec["world_size"] == 8 and spec["local_rank"] == 1
    assert spec["local_world_size"] == 4 and spec["master_addr"] == "gpu007"
    assert spec["master_port"] == str(20000 + 12345 % 20000)
    monkeypatch.setenv("RANK", "1")  # torchrun variables take precedence
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed._read_launcher_env()["world_size"] == 2
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        distributed._read_launcher_env()


def test_fsdp_mode_is_guarded():
    from dinov2 import fsdp

    assert fsdp.check_mode("DDP") == "ddp"
    with pytest.raises(ValueError, match="ddp"):
        fsdp.check_mode("zero3")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            fsdp.check_mode("fsdp")
    m = torch.nn.Linear(2, 2)
    assert fsdp.wrap_ddp(m, torch.device("cpu")) is m  # no process group: nothing to wrap
    assert not fsdp.is_sharded(m) and fsdp.full_state_dict(m).keys() == m.state_dict().keys()


def _worker(out_dir: str, config_file: str, opts: list) -> None:
    """Runs under torchrun: the CLI set-up path, DDP over gloo, then each rank dumps its own weights."""
    from dinov2.train.train import build_model, do_train, get_args_parser, setup

    args = get_args_parser().parse_args([f"--config-file={config_file}", f"--output-dir={out_dir}", *opts])
    cfg = setup(args)
    assert distributed.is_enabled() and distributed.get_world_size() == 2
    assert torch.distributed.get_backend() == "gloo"
    model = build_model(cfg)
    do_train(cfg, model, resume=False)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{distributed.get_rank()}.pth"))
    distributed.barrier()
    distributed.disable()


def test_torchrun_two_ranks_gloo_keep_identical_weights(tmp_path):
    from test_train_common import TINY, write_geotiff_run

    run_yaml = write_geotiff_run(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("PANOPTICON_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(out), run_yaml, *TINY, "optim.epochs=2", "train.batch_size_per_gpu=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(out / "rank0.pth", weights_only=True)
    r1 = torch.load(out / "rank1.pth", weights_only=True)
    mid = torch.load(out / "model_0000001.pth", weights_only=True)["model"]
    assert set(r0) == set(r1)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["world_size"] == 2 and len(final["rng_states"]) == 2
    assert all(torch.equal(final["model"][k], r0[k]) for k in r0)
    assert not torch.equal(mid["student.backbone.blocks.0.attn.qkv.weight"], r0["student.backbone.blocks.0.attn.qkv.weight"])
    assert (out / "logs" / "log.txt").exists() and (out / "logs" / "log.txt.rank1").exists()
    # the sqrt rule saw the total batch of both ranks: 2 per rank x 2 ranks
    saved = (out / "config.yaml").read_text()
    assert f"lr: {0.01 * (4 / 1024) ** 0.5}" in saved


def _fsdp_worker(out_dir: str) -> None:
    """FSDP2 over gloo on CPU (the CUDA guard lifted for the test): training, EMA on shards, full checkpoints."""
    from test_train_common import tiny_cfg, tiny_dataset

    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import do_train
    from dinov2.utils.utils import fix_random_seeds

    distributed.enable()
    cfg = tiny_cfg(Path(out_dir))
    fix_random_seeds(0)
    model = SSLMetaArch(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.configure_precision(torch.device("cpu"))
    model.prepare_for_distributed_training("fsdp", allow_cpu_fsdp=True)
    from dinov2 import fsdp

    assert fsdp.is_sharded(model.student) and fsdp.is_sharded(model.teacher)
    res = do_train(cfg, model, dataset=tiny_dataset(n=16))
    full = fsdp.full_state_dict(model)
    if distributed.is_main_process():
        torch.save({"init": init, "full": full, "loss": res["last_record"]["total_loss"]},
                   os.path.join(out_dir, "fsdp_result.pth"))
    distributed.barrier()
    distributed.disable()


def test_fsdp2_sharded_training_over_gloo(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--fsdp",
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(tmp_path / "fsdp_result.pth", weights_only=True)
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)["model"]
    assert set(final) == set(r["init"])
    for k, v in r["full"].items():
        assert v.shape == r["init"][k].shape and torch.equal(final[k], v), k  # unsharded, full-size tensors
    q = "student.backbone.blocks.0.attn.qkv.weight"
    t = "teacher.backbone.blocks.0.attn.qkv.weight"
    assert torch.isfinite(torch.tensor(r["loss"]))
    assert 0 < (final[t] - r["init"][t]).abs().sum() < (final[q] - r["init"][q]).abs().sum()  # EMA on shards


def _faults_worker(out_dir: str, delay_s: str, config_file: str, opts: list) -> None:
    """Runs under torchrun: CLI set-up (lock, parent-death guard), training on the configured dataset, each sample
    delayed by `delay_s` seconds so that the test can kill the job mid-run."""
    from test_train_common import SlowSamples

    from dinov2.train.train import build_dataset, build_model, do_train, get_args_parser, release_run_folder, setup

    cfg = setup(get_args_parser().parse_args([f"--config-file={config_file}", f"--output-dir={out_dir}", *opts]))
    ds = build_dataset(cfg)
    do_train(cfg, build_model(cfg), dataset=SlowSamples(ds, float(delay_s)) if float(delay_s) > 0 else ds)
    release_run_folder()
    distributed.barrier()
    distributed.disable()


def _descendants(pid: int) -> set:
    """Pids of all live descendants of `pid` (from /proc)."""
    children: dict = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and the Linux parent-death signal")
def test_killed_torchrun_job_ranks_exit_and_resume_is_exact_with_workers_and_a_corrupt_file(tmp_path):
    from test_train_common import TINY, write_spectral_earth_run

    from dinov2.train.run_lock import RunFolderLockedError
    from dinov2.train.train import main

    run_yaml, (bad_file,) = write_spectral_earth_run(tmp_path, n=40, corrupt=(7,))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("PANOPTICON_DEVICE", None)
    # 12 iterations, 2 ranks x 2 samples (48 draws: the whole first pass of 40, so the corrupt file is drawn),
    # 2 loader workers per rank, a checkpoint every iteration
    opts = [*TINY, "optim.epochs=6", "train.batch_size_per_gpu=2", "train.num_workers=2", "train.saveckp_freq=0.5"]

    def torchrun(out, delay, **kw):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--faults", str(out), str(delay), run_yaml, *opts]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

    a, b = tmp_path / "a", tmp_path / "b"
    ref = torchrun(a, 0)
    log_a = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, log_a[-4000:]

    job = torchrun(b, 0.15, start_new_session=True)
    deadline = time.time() + 240
    while not (b / "model_0000003.pth").exists():
        assert job.poll() is None and time.time() < deadline, "job ended before it could be killed"
        time.sleep(0.05)
    ranks = _descendants(job.pid)
    assert len(ranks) >= 2 and json.loads((b / "run.lock").read_text())["pid"] in ranks
    # a second job on the same folder is refused before it writes anything
    with pytest.raises(RunFolderLockedError, match=r"in use by another training job.*\"pid\""):
        main([f"--config-file={run_yaml}", f"--output-dir={b}", *opts, "train.seed=99"])
    assert "seed: 3" in (b / "config.yaml").read_text()

    os.kill(job.pid, signal.SIGKILL)  # the launcher only: its ranks must follow on their own
    job.communicate(timeout=30)
    t0 = time.time()
    while any(_alive(p) for p in ranks) and time.time() - t0 < 20:
        time.sleep(0.05)
    exited_after = time.time() - t0
    assert not any(_alive(p) for p in ranks), f"ranks still running {exited_after:.1f} s after the launcher died"
    assert exited_after < 10
    before = _snapshot(b)
    time.sleep(1.5)
    assert _snapshot(b) == before, "something wrote into the run folder after the job was killed"
    assert not (b / "model_final.pth").exists()

    res = torchrun(b, 0)
    log_b = res.communicate(timeout=300)[0]
    assert res.returncode == 0, log_b[-4000:]
    assert "took over a stale lock" in (b / "logs" / "log.txt").read_text()
    assert (b / "run.lock").read_text() == ""  # released at the end

    fa = torch.load(a / "model_final.pth", weights_only=True)
    fb = torch.load(b / "model_final.pth", weights_only=True)
    assert fa["iteration"] == fb["iteration"] == 11 and set(fa["model"]) == set(fb["model"])
    for k in fa["model"]:
        assert torch.equal(fa["model"][k], fb["model"][k]), f"resumed run differs from the uninterrupted one in {k}"
    # the corrupt file was skipped, recorded with its path, and replaced identically in both runs
    rec_a = [json.loads(x) for x in (a / "bad_samples.jsonl").read_text().splitlines()]
    rec_b = [json.loads(x) for x in (b / "bad_samples.jsonl").read_text().splitlines()]
    assert rec_a and all(r["file"] == bad_file for r in rec_a)
    assert {r["index"] for r in rec_a} == {7}
    key = lambda r: (r["iteration"], r["rank"], r["position"])  # noqa: E731
    assert sorted(rec_a, key=key) == sorted(rec_b, key=key)


if __name__ == "__main__":
    if sys.argv[1] == "--fsdp":
        _fsdp_worker(sys.argv[2])
    elif sys.argv[1] == "--faults":
        _faults_worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:])
    else:
        _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
