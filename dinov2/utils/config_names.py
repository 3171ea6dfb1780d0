"""Shipped configs by name, from any directory: `--config-file debug` (training) and `--config-obj demo`,
`--config-obj 1h/geobench/so2sat` (evaluation).

The configs are package data (`dinov2/configs/`). A name is resolved only when it is not an existing path (or, for
evaluation, a glob that matches), so paths keep working exactly as before. Training names are YAML files relative to
the configs folder (`debug` -> `debug.yaml`); evaluation names are folders (suites) or YAML files (tasks) relative
to its `eval/` folder, or globs there. With `$CDIR` set to another configs folder, names are looked up there
first. Imports the standard library only.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Dict, List

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_NOT_TRAINING = ("eval", "data", "defaults")  # folders whose YAMLs are not training configs


def config_roots() -> List[Path]:
    """Folders searched for names: `$CDIR` (when set and different), then the package's configs."""
    roots = []
    cdir = os.environ.get("CDIR")
    if cdir:
        path = Path(os.path.expanduser(os.path.expandvars(cdir)))
        if path.is_dir() and path.resolve() != CONFIG_DIR:
            roots.append(path)
    return roots + [CONFIG_DIR]


def _with_yaml(name: str) -> List[str]:
    return [name] if name.endswith((".yaml", ".yml")) else [name + ".yaml", name]


def training_configs() -> Dict[str, Path]:
    """Name -> file of every shipped training config (`debug`, `demo`, `stage1`, ...)."""
    out: Dict[str, Path] = {}
    for root in reversed(config_roots()):  # the first root wins
        for path in sorted(root.rglob("*.yaml")):
            rel = path.relative_to(root)
            if rel.parts[0] not in _NOT_TRAINING:
                out[rel.with_suffix("").as_posix()] = path
    return dict(sorted(out.items()))


def eval_configs() -> Dict[str, Path]:
    """Name -> folder or file of every shipped evaluation suite (folder) and task (YAML), `defaults/` excluded."""
    out: Dict[str, Path] = {}
    for root in reversed(config_roots()):
        base = root / "eval"
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(base)
            if rel.parts[0] == "defaults" or not (path.is_dir() or path.suffix == ".yaml"):
                continue
            out[rel.with_suffix("").as_posix() if path.is_file() else rel.as_posix()] = path
    return dict(sorted(out.items()))


def resolve_config_file(name: str) -> str:
    """`--config-file`: an existing file as given, else a shipped training config of that name."""
    text = os.path.expanduser(os.path.expandvars(str(name)))
    if os.path.isfile(text):
        return text
    for root in config_roots():
        for candidate in _with_yaml(text):
            path = root / candidate
            if path.is_file() and path.relative_to(root).parts[0] not in _NOT_TRAINING:
                return str(path)
    raise FileNotFoundError(f"--config-file {name!r} is neither a file nor a shipped training config; shipped: "
                            f"{', '.join(training_configs())} (`panopticon configs` lists them)")


def resolve_config_obj(part: str) -> List[str]:
    """One `--config-obj` entry: an existing path or a glob that matches, else shipped evaluation suites / tasks
    of that name (or glob) under `eval/`. Returns the paths (empty when nothing matches)."""
    text = os.path.expanduser(os.path.expandvars(str(part)))
    if os.path.exists(text):
        return [text]
    matches = sorted(glob.glob(text))
    if matches:
        return matches
    for root in config_roots():
        base = root / "eval"
        for candidate in _with_yaml(text):
            found = sorted(p for p in glob.glob(str(base / candidate))
                           if "defaults" not in Path(p).relative_to(base).parts)
            if found:
                return found
    return []
