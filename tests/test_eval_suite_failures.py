"""Evaluation suites survive failing tasks; changed overrides re-run tasks; the eval command line is strict."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml

import geobench_attacks as ga
from conftest import ROOT
from eval_fixtures import write_geobench_task, write_resisc45
from test_eval_engine import gb, knn_task, make_run, read_csv, write_task

from dinov2.eval.eval import EvalTaskError, main, wait_for_results
from dinov2.run.eval import build_parser, split_argv

SMALL = [{"id": "Resize", "size": 16}]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """Four tasks: one good kNN task, one whose dataset folder is missing, one with an invalid task.id and one
    whose GEO-Bench test split holds a crafted pickle (the dtype state that crashed numpy's reconstruction)."""
    root = tmp_path_factory.mktemp("suite")
    write_resisc45(root / "r45", n_per_class=6)
    ds = {"id": "resisc45", "root": str(root / "r45"), "transform": SMALL}
    cfg = root / "cfg" / "suite"
    write_task(cfg, "a_ok", knn_task(dict(ds, split="train"), dict(ds, split="test")))
    missing = dict(ds, root=str(root / "no_such_dataset"))
    write_task(cfg, "b_missing", knn_task(dict(missing, split="train"), dict(missing, split="test")))
    write_task(cfg, "c_badcfg", {"task": {"id": "segmentaton"}})
    tdir = write_geobench_task(root / "geobench", "m-eurosat", {"train": 4, "valid": 1, "test": 2})
    attack = dict(ga.attack_pickles())["numpy.dtype('M8[s]')"]
    test_sample = yaml.safe_load((tdir / "default_partition.json").read_text())["test"][0]
    with h5py.File(tdir / f"{test_sample}.hdf5", "a") as fp:
        fp.attrs["pickle"] = str(attack)
    write_task(cfg, "d_crafted", knn_task(gb("train", transform=SMALL), gb("test", transform=SMALL)))
    return {"root": root, "cfg": cfg, "run": make_run(root / "run"), "geobench": root / "geobench",
            "crafted": tdir / f"{test_sample}.hdf5"}


def test_cli_suite_with_failing_tasks(suite, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PANOPTICON_NO_TQDM="1", PYTHONPATH=str(ROOT),
               GEO_BENCH_DIR=str(suite["geobench"]))
    cmd = [sys.executable, "dinov2/eval/eval.py", "main", f"--model-obj={suite['run']}",
           f"--config-obj={suite['cfg']}", f"--output-dir={out}", "--device=cpu", "--optim.dl.batch_size=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]  # not a crash: a clean exit naming the failures
    assert "3 evaluation task(s) failed" in proc.stderr
    assert "1 (model, task) pairs succeeded, 3 failed" in proc.stderr
    ok = out / "suite" / "a_ok"
    assert read_csv(ok / "results.csv")[0]["metric"] == "acc_top-1_micro" and not (ok / "error.txt").exists()
    errors = {t: (out / "suite" / t / "error.txt").read_text() for t in ("b_missing", "c_badcfg", "d_crafted")}
    assert errors["b_missing"].startswith("FileNotFoundError: ") and "no_such_dataset" in errors["b_missing"]
    assert errors["c_badcfg"].startswith("ValueError: ") and "'segmentaton'" in errors["c_badcfg"]
    assert errors["d_crafted"].startswith("GeobenchPickleError: ") and str(suite["crafted"]) in errors["d_crafted"]
    assert all("Traceback (most recent call last)" in e for e in errors.values())
    assert not any((out / "suite" / t / "results.csv").exists() for t in errors)
    rows = read_csv(out / "results.csv")  # aggregated: the good task's metrics and one error row per failure
    failed = {r["relpath"]: r["error"] for r in rows if r["metric"] == "error"}
    assert sorted(failed) == ["suite/b_missing", "suite/c_badcfg", "suite/d_crafted"]
    assert failed["suite/c_badcfg"].startswith("ValueError:") and "segmentaton" in failed["suite/c_badcfg"]
    assert {r["relpath"] for r in rows if not r["error"]} == {"suite/a_ok"}
    assert "FAILED" in (out / "results.txt").read_text()


def test_python_main_raises_after_running_the_rest(suite, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(suite["geobench"]))
    with pytest.raises(EvalTaskError) as err:
        main(str(suite["run"]), str(suite["cfg"]), output_dir=str(tmp_path / "o"), device="cpu")
    assert set(err.value.results) == {"suite/a_ok"} and err.value.results["suite/a_ok"]["acc_top-1_micro"] > 0
    assert sorted(Path(k).name for k in err.value.failures) == ["b_missing", "c_badcfg", "d_crafted"]
    # a failed task counts as finished for --barrier (it would otherwise wait forever)
    wait_for_results([tmp_path / "o" / "suite" / t / "results.csv" for t in ("a_ok", "b_missing")], poll_s=0.01,
                     timeout_s=0.0)
    # once the dataset exists, the failed task runs and its error.txt goes away
    write_resisc45(suite["root"] / "no_such_dataset", n_per_class=6)
    try:
        with pytest.raises(EvalTaskError) as err:
            main(str(suite["run"]), str(suite["cfg"]), output_dir=str(tmp_path / "o"), device="cpu")
    finally:  # the module's other tests expect the dataset to be missing
        shutil.rmtree(suite["root"] / "no_such_dataset")
    assert sorted(Path(k).name for k in err.value.failures) == ["c_badcfg", "d_crafted"]
    assert not (tmp_path / "o" / "suite" / "b_missing" / "error.txt").exists()
    assert (tmp_path / "o" / "suite" / "b_missing" / "results.csv").is_file()


def test_changed_overrides_rerun_the_task(suite, tmp_path):
    cfg = suite["cfg"] / "a_ok.yaml"
    out = tmp_path / "o"
    log = tmp_path / "eval.log"
    main(str(suite["run"]), str(cfg), output_dir=str(out), device="cpu", log_file=str(log))
    task = out / "suite" / "a_ok"
    first = (task / "results.csv").stat().st_mtime_ns
    main(str(suite["run"]), str(cfg), output_dir=str(out), device="cpu", log_file=str(log))
    assert (task / "results.csv").stat().st_mtime_ns == first  # same settings: reused
    res = main(str(suite["run"]), str(cfg), output_dir=str(out), device="cpu", log_file=str(log),
               **{"heads.nb_knn": [3]})
    assert yaml.safe_load((task / "config.yaml").read_text())["heads"]["nb_knn"] == [3]
    assert "('full', 3)" in (task / "results.csv").read_text() and "acc_top-1_micro" in res["suite/a_ok"]
    assert "re-running task suite/a_ok: its results were computed with other settings (heads.nb_knn)" in \
        log.read_text()
    (task / "config.yaml").unlink()  # results of unknown settings are not trusted either
    main(str(suite["run"]), str(cfg), output_dir=str(out), device="cpu", log_file=str(log), **{"heads.nb_knn": [3]})
    assert "(config.yaml)" in log.read_text() and (task / "config.yaml").is_file()


def test_unknown_dotted_override_is_refused_before_any_work(suite, tmp_path):
    cfg = suite["cfg"] / "a_ok.yaml"
    with pytest.raises(ValueError, match=r"--optim.dl.batch_sze.*did you mean --optim.dl.batch_size\?"):
        main(str(suite["run"]), str(cfg), output_dir=str(tmp_path / "o"), **{"optim.dl.batch_sze": 4})
    with pytest.raises(ValueError, match=r"--overwirte.*did you mean --overwrite\?"):
        main(str(suite["run"]), str(cfg), output_dir=str(tmp_path / "o"), overwirte=True)
    assert not (tmp_path / "o").exists()
    # a new constructor argument of a dataset section is allowed (the dataset validates it)
    res = main(str(suite["run"]), str(cfg), output_dir=str(tmp_path / "o2"), device="cpu",
               **{"test_dataset.normalize": False, "optim.dl.batch_size": 4})
    assert "acc_top-1_micro" in res["suite/a_ok"]


def test_cli_parsing():
    parser = build_parser()
    args, ov = split_argv(["main", "--model-obj=runs/a", "--config_obj", "cfg", "--overwrite", "--device=cpu",
                           "--optim.dl.batch_size=64", "--heads.nb_knn", "[1, 3]", "--optim.lr=1e-3",
                           "--test_dataset.scenes=/data/scenes.yaml", "--x.flag=false", "--x.none=null",
                           "--barrier=no"], parser)
    assert (args.model_obj, args.config_obj, args.overwrite, args.device, args.barrier) == \
        ("runs/a", "cfg", True, "cpu", False)
    assert ov == {"optim.dl.batch_size": 64, "heads.nb_knn": [1, 3], "optim.lr": 0.001,
                  "test_dataset.scenes": "/data/scenes.yaml", "x.flag": False, "x.none": None}
    assert split_argv(["--model_obj=m", "--overwrite=false"], parser)[0].overwrite is False


@pytest.mark.parametrize("argv, message", [
    (["--model-obj=m", "--overwirte"], "unrecognized argument '--overwirte'; did you mean --overwrite?"),
    (["--model-ob=m"], "unrecognized argument '--model-ob=m'; did you mean --model-obj?"),
    (["--model-obj=m", "stray"], "unrecognized argument 'stray'"),
    (["--model-obj=m", "--optim.epochs"], "override --optim.epochs needs a value"),
    (["--model-obj=m", "--distribute=gpus"], "invalid choice: 'gpus'"),
    (["--model-obj=m", "--overwrite=maybe"], "expected true or false, got 'maybe'"),
    (["--config-obj=c"], "required: --model-obj"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as ex:
        split_argv(argv, build_parser())
    assert ex.value.code == 2 and message in capsys.readouterr().err
