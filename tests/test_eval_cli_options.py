"""Eval CLI options: --log-file, --distribute=runs|models (the rank assignment as a pure
function), --barrier (wait for every results.csv)."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ROOT
from eval_fixtures import write_resisc45
from test_eval_engine import knn_task, make_run, write_task

from dinov2.eval.eval import assign_pairs, main, wait_for_results


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("mode", ["runs", "models"])
def test_assign_pairs_partition(world, mode):
    n_models, n_tasks = 3, 4
    per_rank = assign_pairs(n_models, n_tasks, world, mode)
    assert len(per_rank) == world
    flat = [p for r in per_rank for p in r]
    assert sorted(flat) == [(m, t) for m in range(n_models) for t in range(n_tasks)]  # each pair exactly once
    if mode == "models":  # a model's tasks never leave its rank
        assert all(len({r for r, pairs in enumerate(per_rank) if any(m == mm for mm, _ in pairs)}) == 1
                   for m in range(n_models))


def test_assign_pairs_hand_checked():
    # runs: pairs in model-major order (m0t0, m0t1, m1t0, m1t1, m2t0, m2t1) dealt round-robin
    assert assign_pairs(3, 2, 2, "runs") == [[(0, 0), (1, 0), (2, 0)], [(0, 1), (1, 1), (2, 1)]]
    assert assign_pairs(3, 2, 3, "runs") == [[(0, 0), (1, 1)], [(0, 1), (2, 0)], [(1, 0), (2, 1)]]
    # models: model m -> rank m % world
    assert assign_pairs(3, 2, 2, "models") == [[(0, 0), (0, 1), (2, 0), (2, 1)], [(1, 0), (1, 1)]]
    assert assign_pairs(1, 3, 3, "models") == [[(0, 0), (0, 1), (0, 2)], [], []]
    assert assign_pairs(2, 2, 1, "models") == assign_pairs(2, 2, 1, "runs") == [[(0, 0), (0, 1), (1, 0), (1, 1)]]
    with pytest.raises(ValueError, match="distribute must be one of runs, models; got 'tasks'"):
        assign_pairs(1, 1, 1, "tasks")
    with pytest.raises(ValueError, match="world size 0"):
        assign_pairs(1, 1, 0)


def test_wait_for_results(tmp_path):
    present, late = tmp_path / "a" / "results.csv", tmp_path / "b" / "results.csv"
    present.parent.mkdir()
    present.write_text("metric,value\n")
    wait_for_results([present], poll_s=0.01, timeout_s=0.0)
    with pytest.raises(TimeoutError, match=r"1 results.csv still missing .*b/results.csv"):
        wait_for_results([present, late], poll_s=0.01, timeout_s=0.05)

    def finish():
        late.parent.mkdir()
        late.write_text("metric,value\n")
    t = threading.Timer(0.1, finish)
    t.start()
    wait_for_results([present, late], poll_s=0.02, timeout_s=30)  # returns once the other "rank" finished
    t.join()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_opts")
    write_resisc45(root / "r45", n_per_class=6)
    small = [{"id": "Resize", "size": 16}]
    ds = {"id": "resisc45", "root": str(root / "r45"), "transform": small}
    cfg = write_task(root / "cfg" / "opts", "r45_knn", knn_task(dict(ds, split="train"), dict(ds, split="test")))
    return {"root": root, "cfg": cfg, "run": make_run(root / "run")}


def test_log_file_distribute_and_barrier_in_process(tiny, tmp_path):
    log = tmp_path / "logs" / "eval.log"
    res = main(str(tiny["run"]), str(tiny["cfg"]), output_dir=str(tmp_path / "out"), device="cpu",
               log_file=str(log), distribute="models", barrier=True, barrier_timeout=5)
    assert res["opts/r45_knn"]["acc_top-1_micro"] == 100.0
    first = log.read_text()
    assert "running task opts/r45_knn" in first and "distribute=models" in first
    # a second call appends (the finished task is skipped) instead of truncating
    main(str(tiny["run"]), str(tiny["cfg"]), output_dir=str(tmp_path / "out"), device="cpu", log_file=str(log))
    second = log.read_text()
    assert second.startswith(first) and "skipping finished task opts/r45_knn" in second[len(first):]
    with pytest.raises(ValueError, match="distribute must be one of"):
        main(str(tiny["run"]), str(tiny["cfg"]), distribute="gpus")


def test_cli_flags(tiny, tmp_path):
    log = tmp_path / "cli.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PANOPTICON_NO_TQDM="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "dinov2/eval/eval.py", "main", f"--model-obj={tiny['run']}",
           f"--config-obj={tiny['cfg']}", f"--output-dir={tmp_path / 'o'}", "--device=cpu",
           f"--log-file={log}", "--distribute=runs", "--barrier"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(tmp_path / "o" / "opts" / "r45_knn" / "results.csv").is_file()
    assert "rank 0/1 runs 1 of 1 (model, task) pairs (distribute=runs)" in log.read_text()


def _worker(out: str, cfg: str, run_a: str, run_b: str) -> None:
    """Runs under torchrun (2 ranks, gloo): both models x both tasks with --distribute=models and --barrier."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = main(f"{run_a};{run_b}", cfg, device="cpu", distribute="models", barrier=True, barrier_timeout=120,
               log_file=os.path.join(out, f"rank{rank}.log"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(res, fh)
    dist.destroy_process_group()


def test_two_ranks_distribute_models_with_barrier(tiny, tmp_path):
    cfg = tmp_path / "cfg" / "two"
    ds = {"id": "resisc45", "root": str(tiny["root"] / "r45"), "transform": [{"id": "Resize", "size": 16}]}
    for k in (1, 3):
        task = knn_task(dict(ds, split="train"), dict(ds, split="test"))
        write_task(cfg, f"knn{k}", dict(task, heads={"nb_knn": [k]}))
    runs = [make_run(tmp_path / "runs" / n, seed=i) for i, n in enumerate("ab")]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PANOPTICON_NO_TQDM="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(out), str(cfg), *map(str, runs)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank, run in enumerate(runs):  # model m ran on rank m only, both of its tasks
        log = (out / f"rank{rank}.log").read_text()
        ran = [ln for ln in log.splitlines() if "running task" in ln]
        assert len(ran) == 2 and all(str(run / "eval_model_final") in ln for ln in ran), ran
        assert f"rank {rank}/2 runs 2 of 4 (model, task) pairs (distribute=models)" in log
    merged = json.loads((out / "rank0.json").read_text())  # rank 0 collects every model after the barrier
    assert {k: sorted(v) for k, v in merged.items()} == {
        str(r / "eval_model_final"): ["two/knn1", "two/knn3"] for r in runs}


if __name__ == "__main__":
    _worker(*sys.argv[1:])
