"""Command-line front end of the evaluation (``panopticon eval``, ``python dinov2/eval/eval.py [main] ...``,
``python dinov2/eval/main.py main ...``): evaluate models on a suite of tasks.

Flags are strict: an unknown flag is an error naming it and the closest valid one. Any ``--a.b.c=value`` (or
``--a.b.c value``) is a dotted override merged into every task config (it must name an existing task-config key,
see ``dinov2.eval.eval.check_overrides``); values are Python/YAML literals (``64``, ``1e-3``, ``[1, 3]``, ``true``)
or else plain strings. Exit status: 0 when every task succeeded, 1 when some task failed (the others still ran;
see the summary and each task's ``error.txt``), 2 for invalid arguments.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import logging
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from dinov2.utils.cli_help import OneSpellingHelpFormatter

EPILOG = """example:
  python dinov2/eval/eval.py main --model-obj=runs/my_run --config-obj=dinov2/configs/eval/5min \\
      --device=cpu --optim.dl.batch_size=64
  panopticon eval --model-obj="runs/a;runs/b" --config-obj=dinov2/configs/eval/1h --distribute=models --barrier
"""
TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low not in TRUE + FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return low in TRUE


def parse_value(text: str) -> Any:
    """A dotted override's value: a Python literal (``64``, ``1e-3``, ``[1, 3]``, ``'x'``), ``true``/``false``/
    ``null``, a YAML list or mapping, or else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if text.strip()[:1] in ("[", "{"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse override value {text!r}: {e}") from e
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="panopticon eval", description="Evaluate one or more models on evaluation tasks (kNN, linear probes, "
        "retrieval, segmentation, regression); extra --dotted.key=value flags override task-config keys. Each "
        "--flag-name is also accepted as --flag_name.", epilog=EPILOG,
        formatter_class=OneSpellingHelpFormatter, allow_abbrev=False)

    def add(name: str, **kw: Any) -> None:
        if kw.get("nargs") == "?":
            kw.setdefault("metavar", "true|false")
        dest = name.replace("-", "_")
        p.add_argument(*dict.fromkeys((f"--{name}", f"--{dest}")), dest=dest, **kw)  # help shows the first only

    add("model-obj", default=None,
        help="(required) ;-separated run folders, .pth files or globs of the models to evaluate")
    add("config-obj", default=None, help="';'-separated task yaml files / folders / globs, or shipped suite / task "
        "names (demo, 5min, 1h/geobench/so2sat; `panopticon configs` lists them) (default: 5min)")
    add("output-dir", default=None, help="output folder (only with a single model; default <run>/eval_model_final)")
    add("overwrite", type=_bool, nargs="?", const=True, default=False,
        help="re-run tasks whose results.csv exists even when their settings did not change")
    add("device", default=None, help="cpu or cuda (default: cuda when available)")
    add("use-wandb", type=_bool, nargs="?", const=True, default=False, help="upload results to Weights & Biases")
    add("wandb-mode", default="api", choices=("api", "resume"),
        help="how results reach the training run's W&B run (found in <run>/wandb): api (write its summary through "
             "the W&B API) or resume (wandb.init with resume) (default: api)")
    add("only-avg", type=_bool, nargs="?", const=True, default=False, help="upload only suite averages to W&B")
    add("log-file", default=None, help="also append the evaluation log to this file")
    add("distribute", default="runs", choices=("runs", "models"),
        help="with several ranks: deal (model, task) pairs round-robin (runs) or whole models (models)")
    add("barrier", type=_bool, nargs="?", const=True, default=False,
        help="every rank waits until all (model, task) pairs are finished before returning")
    add("barrier-timeout", type=float, default=None, help="seconds after which --barrier gives up (default: never)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars or lines (the same as PANOPTICON_NO_PROGRESS=1)")
    return p


def _dotted(tok: str) -> Optional[Tuple[str, str, str]]:
    key, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
    return (key, eq, value) if key and "." in key and all(key.split(".")) else None


def split_overrides(argv: Sequence[str]) -> Tuple[list, Dict[str, Any]]:
    """Separate dotted ``--a.b=c`` / ``--a.b c`` overrides (values parsed by ``parse_value``) from the other
    arguments; an override without a value is a ``ValueError``."""
    argv, rest, overrides = list(argv), [], {}
    i = 0
    while i < len(argv):
        dotted = _dotted(argv[i])
        if dotted is None:
            rest.append(argv[i])
        else:
            key, eq, value = dotted
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise ValueError(f"override --{key} needs a value (--{key}=VALUE)")
                value, i = argv[i + 1], i + 1
            overrides[key] = parse_value(value)
        i += 1
    return rest, overrides


def split_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> Tuple[argparse.Namespace, Dict[str, Any]]:
    """Known flags -> namespace; ``--dotted.key[=value]`` -> overrides; anything else is an error naming the
    closest valid flag."""
    argv = list(argv)
    if argv and argv[0] == "main":  # the python-fire era command name stays accepted
        argv = argv[1:]
    try:
        argv, overrides = split_overrides(argv)
    except ValueError as e:
        parser.error(str(e))
    args, rest = parser.parse_known_args(argv)
    flags = [s for a in parser._actions for s in a.option_strings]
    for tok in rest:
        name = tok.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.5)
        parser.error(f"unrecognized argument {tok!r}" + (f"; did you mean {close[0]}?" if close else
                                                         " (task-config overrides look like --optim.epochs=1)"))
    if args.model_obj is None:  # checked after the unknown flags, so that a misspelt --model-obj is named
        parser.error("the following argument is required: --model-obj")
    return args, overrides


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse ``argv`` and run the evaluation; returns the exit status (1 when some task failed, 2 for invalid
    arguments). ``prog``: the command name in usage and error lines."""
    parser = build_parser()
    if prog:
        parser.prog = prog
    args, overrides = split_argv(sys.argv[1:] if argv is None else argv, parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if vars(args).pop("no_progress"):  # a display option, not an argument of the evaluation
        from dinov2.utils.progress import disable_progress

        disable_progress()  # an environment variable, so that data-loader workers and ranks see it too
    from dinov2.eval.eval import EvalTaskError
    from dinov2.eval.eval import main as eval_main

    try:
        eval_main(**vars(args), **overrides)
    except EvalTaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad --model-obj/--config-obj/override: nothing ran
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
