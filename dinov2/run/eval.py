"""`panopticon eval`: evaluate frozen backbones on task configs (argparse front end of `dinov2.eval.eval.main`).

    panopticon eval --model-obj runs/mine --config-obj dinov2/configs/eval/5min --optim.dl.batch_size=64
    python dinov2/eval/eval.py main --model-obj=runs/mine --config-obj=dinov2/configs/eval/5min   # same parser

Any option with a dot in its name (`--optim.epochs=1`, `--test_dataset.scenes PATH`) is a config override merged
into every task; its value is read as YAML (`64` -> int, `1e-3` -> float, `true` -> bool, `[1, 2]` -> list).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

EPILOG = """examples:
  panopticon eval --model-obj runs/mine --config-obj dinov2/configs/eval/demo --test_dataset.scenes=scenes.yaml
  panopticon eval --model-obj "runs/a;runs/b" --config-obj "dinov2/configs/eval/5min;dinov2/configs/eval/1h" \\
      --device cuda --overwrite --optim.dl.batch_size=64
  panopticon eval --model-obj panopticon_vitb14_teacher.pth --config-obj dinov2/configs/eval/1h/geobench

results: <model output dir>/<task>/{config.yaml, results.csv, results_eval_<type>.json, plots.png}, aggregated into
results.csv / results.txt at every folder level. See docs/evaluation.md.
"""

_OVERRIDE = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[\w-]+)+)(?:=(.*))?$", re.S)


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_value(text: str) -> Any:
    """An override value as YAML scalar/list/dict; numbers such as `1e-3` become floats."""
    import yaml

    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_overrides(argv: Sequence[str]) -> Tuple[List[str], Dict[str, Any]]:
    """Separate dotted `--a.b=c` / `--a.b c` overrides from the other arguments."""
    rest: List[str] = []
    overrides: Dict[str, Any] = {}
    argv = list(argv)
    i = 0
    while i < len(argv):
        m = _OVERRIDE.match(argv[i])
        if m is None:
            rest.append(argv[i])
            i += 1
            continue
        key, value = m.group(1), m.group(2)
        if value is None:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(f"override --{key} has no value (write --{key}=VALUE)")
            value = argv[i + 1]
            i += 1
        overrides[key] = parse_value(value)
        i += 1
    return rest, overrides


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate models (frozen backbones) on evaluation tasks. Dotted options (--a.b=VALUE) override "
                    "that key in every task config.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-obj", "--model_obj", dest="model_obj", required=True,
                   help="what to evaluate: a run folder (its model_final.pth and config.yaml), a training "
                        "checkpoint, a hub-format teacher file, or ';'-separated lists / globs of these")
    p.add_argument("--config-obj", "--config_obj", dest="config_obj", default=None,
                   help="task YAML file(s) or folder(s) of them, ';'-separated (default: dinov2/configs/eval/5min)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="results folder for a single model (default: <run>/eval_<checkpoint name>)")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=_bool,
                   help="re-run tasks whose results.csv already exists (default: skip them)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--use-wandb", "--use_wandb", dest="use_wandb", nargs="?", const=True, default=False,
                   type=_bool, help="upload the results to Weights & Biases (needs the wandb extra)")
    p.add_argument("--wandb-mode", "--wandb_mode", dest="wandb_mode", default="api", choices=["api", "resume"],
                   help="how results reach the training run's W&B run (found in <run>/wandb): api (write its "
                        "summary through the W&B API) or resume (wandb.init with resume) (default: api)")
    p.add_argument("--only-avg", "--only_avg", dest="only_avg", nargs="?", const=True, default=False, type=_bool,
                   help="upload only the averaged metrics to W&B")
    p.add_argument("--log-file", "--log_file", dest="log_file", default=None,
                   help="also append the log of the whole call to this file")
    p.add_argument("--distribute", default="runs", choices=["runs", "models"],
                   help="under torch.distributed: deal (model, task) pairs round-robin (runs) or whole models "
                        "(models) over the ranks (default: runs)")
    p.add_argument("--barrier", nargs="?", const=True, default=False, type=_bool,
                   help="every rank waits until all results.csv files exist before returning")
    p.add_argument("--barrier-timeout", "--barrier_timeout", dest="barrier_timeout", type=float, default=None,
                   help="seconds to wait with --barrier before a TimeoutError (default: no limit)")
    return p


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse `argv` and evaluate; returns the results of `dinov2.eval.eval.main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["main"]:  # `python dinov2/eval/eval.py main ...` (the python-fire spelling of earlier versions)
        argv = argv[1:]
    rest, overrides = split_overrides(argv)
    args = get_args_parser().parse_args(rest)
    from dinov2.eval.eval import main as eval_main

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return eval_main(**vars(args), **overrides)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon eval` entry point."""
    run(argv)
    return 0
