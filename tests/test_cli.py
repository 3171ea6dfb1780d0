"""The `panopticon` command: help for every command and flag without optional imports, dispatch, launcher errors."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from dinov2.run import cli
from dinov2.run.eval import parse_value, split_overrides

OPTIONAL = ["wandb", "rasterio", "pandas", "onnx", "onnxruntime", "onnxscript", "submitit", "fire", "geopandas",
            "pyarrow", "h5py", "tifffile", "torchvision", "matplotlib", "pystac", "shapely", "torchmetrics",
            "dotenv", "timm", "torchgeo"]

# Runs in a fresh interpreter: every parser that parses arguments is recorded, then each command's --help runs.
_HELP_PROBE = r"""
import argparse, contextlib, io, json, sys
parsers = []
_orig = argparse.ArgumentParser.parse_known_args
def _record(self, *a, **k):
    parsers.append(self)
    return _orig(self, *a, **k)
argparse.ArgumentParser.parse_known_args = _record
from dinov2.run import cli
out = {}
for name in [None] + list(cli.COMMANDS):
    argv = ["--help"] if name is None else [name, "--help"]
    buf = io.StringIO()
    del parsers[:]
    with contextlib.redirect_stdout(buf):
        try:
            cli.main(argv)
            code = None
        except SystemExit as e:
            code = e.code
    undocumented = [a.option_strings or [a.dest] for p in parsers for a in p._actions
                    if not a.help or not a.help.strip()]
    out[name or ""] = dict(code=code, text=buf.getvalue(), undocumented=undocumented,
                           epilogs=[p.epilog or "" for p in parsers])
out["modules"] = sorted(m for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def help_probe():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_top_level_help_lists_every_command(help_probe):
    top = help_probe[""]
    assert top["code"] == 0
    for name, (module, desc) in cli.COMMANDS.items():
        assert module == f"dinov2.run.{name}"
        assert name in top["text"] and desc in top["text"]
    assert "examples:" in top["text"] and "panopticon <command> --help" in top["text"]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_help_explains_every_flag(help_probe, name):
    res = help_probe[name]
    assert res["code"] == 0, res
    assert res["text"].startswith(f"usage: panopticon {name}"), res["text"][:200]
    assert res["undocumented"] == [], f"flags without help in `panopticon {name}`: {res['undocumented']}"
    assert any("example" in e for e in res["epilogs"]), f"`panopticon {name} --help` shows no example"


def test_help_imports_no_optional_dependency(help_probe):
    top_level = {m.split(".")[0] for m in help_probe["modules"]}
    assert not top_level & set(OPTIONAL), sorted(top_level & set(OPTIONAL))


def test_python_m_dinov2_and_unknown_command():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "dinov2", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    import dinov2

    assert proc.returncode == 0 and proc.stdout.strip() == f"panopticon {dinov2.__version__}"
    proc = subprocess.run([sys.executable, "-m", "dinov2", "fly"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "unknown command 'fly'" in proc.stderr and "train" in proc.stderr


def test_slurm_requested_without_slurm_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch on this PATH
    out = tmp_path / "run"
    rc = cli.main(["train", "--cluster", "slurm", "--config-file", "dinov2/configs/demo.yaml", "--output-dir",
                   str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "SLURM is not available" in err and "--cluster local" in err
    assert not out.exists()  # nothing ran locally
    # launcher options without --cluster would silently be ignored: refused
    rc = cli.main(["train", "--nodes", "2", "--config-file", "dinov2/configs/demo.yaml"])
    assert rc == 2 and "--nodes only apply to a submitted job" in capsys.readouterr().err


def test_dinov2_style_launcher_defaults_to_slurm(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=os.path.dirname(sys.executable))
    proc = subprocess.run([sys.executable, "dinov2/run/train.py", "--config-file=dinov2/configs/demo.yaml",
                           f"--output-dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("dinov2/run/train.py: error: --cluster slurm: SLURM is not available")
    assert not (tmp_path / "run").exists()


def test_eval_overrides_split_and_typed():
    rest, ov = split_overrides(["--model-obj=runs/a", "--optim.dl.batch_size=64", "--overwrite",
                                "--test_dataset.scenes", "/data/s.yaml", "--optim.lr=1e-3", "--heads.nb_knn=[1, 5]",
                                "--task.flag=false"])
    assert rest == ["--model-obj=runs/a", "--overwrite"]
    assert ov == {"optim.dl.batch_size": 64, "test_dataset.scenes": "/data/s.yaml", "optim.lr": 0.001,
                  "heads.nb_knn": [1, 5], "task.flag": False}
    assert parse_value("abc") == "abc" and parse_value("2.5") == 2.5
    with pytest.raises(ValueError, match="--optim.epochs needs a value"):
        split_overrides(["--optim.epochs"])


def test_eval_unknown_plain_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["eval", "--model-obj", "x", "--not-a-flag", "1"])
    assert exc.value.code == 2 and "unrecognized argument '--not-a-flag'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_help_lists_each_flag_once(help_probe, name):
    """Aliases (`--model_obj` for `--model-obj`, `--gpus` for `--ngpus`) work but are not listed beside the flag."""
    import re

    text = help_probe[name]["text"]
    repeated = re.findall(r"^\s+(?:-\w[^,\n]*, )?(--[\w-]+)[^,\n]*, (--[\w-]+)", text, re.M)
    assert repeated == [], f"`panopticon {name} --help` lists aliases: {repeated}"


def test_underscore_aliases_still_parse():
    from dinov2.eval.cli import build_parser
    from dinov2.run.submit import get_args_parser
    from dinov2.train.train import get_args_parser as train_args_parser

    args = build_parser().parse_args(["--model_obj", "runs/a", "--config_obj", "demo", "--output_dir", "o",
                                      "--use_wandb", "false"])
    assert (args.model_obj, args.config_obj, args.output_dir, args.use_wandb) == ("runs/a", "demo", "o", False)
    parser = get_args_parser("train", parents=[train_args_parser(add_help=False)])
    args = parser.parse_args(["--config_file", "debug", "--output_dir", "o", "--gpus", "2"])
    assert (args.config_file, args.output_dir, args.ngpus) == ("debug", "o", 2)
