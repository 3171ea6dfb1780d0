"""Result files of an evaluation: per-task ``results.csv`` / JSON / plot, and ``collect_csv`` aggregation.

A task folder holds ``results.csv`` with columns ``metric, value, best_classifier`` (value in %, except
cosine similarities and counts), or, when the task failed, ``error.txt`` (first line ``<type>: <message>``, then
the traceback). ``collect_csv(root)`` finds every task-level ``results.csv`` / ``error.txt`` below ``root`` and
writes, at ``root`` and at every folder between it and the tasks, an aggregated ``results.csv`` (columns
``metric, value, best_classifier, relpath, error``; ``relpath`` = task folder relative to that level; a failed
task has one row with metric ``error``, an empty value and the error) plus a human-readable ``results.txt``.
"""
from __future__ import annotations

import csv
import json
import os
import traceback
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

TASK_COLUMNS = ("metric", "value", "best_classifier")
AGG_COLUMNS = TASK_COLUMNS + ("relpath", "error")
ERROR_FILE = "error.txt"


def write_task_csv(task_dir: Path, rows: Sequence[Tuple[str, float, str]]) -> Path:
    """Write a task's ``results.csv`` atomically (so an interrupted run never looks finished)."""
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / "results.csv"
    tmp = task_dir / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TASK_COLUMNS)
        for metric, value, best in rows:
            w.writerow([metric, value, best])
    os.replace(tmp, path)
    return path


def read_task_csv(path: Path) -> Dict[str, float]:
    """``{metric: value}`` of a task-level ``results.csv``."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "relpath" in rows[0]:
        raise ValueError(f"{path} is an aggregated results file, not a task result")
    try:
        return {r["metric"]: float(r["value"]) for r in rows}
    except (KeyError, ValueError) as e:
        raise ValueError(f"Malformed task results file {path}: {e}") from e


def write_task_error(task_dir: Path, error: BaseException) -> Path:
    """Record a failed task: ``error.txt`` with ``<type>: <message>`` on the first line, then the traceback."""
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / ERROR_FILE
    tmp = task_dir / f".{ERROR_FILE}.tmp"
    summary = f"{type(error).__name__}: {error}".replace("\n", " ")
    tmp.write_text(summary + "\n\n" + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    os.replace(tmp, path)
    return path


def read_task_error(task_dir: Path) -> str:
    """First line of a failed task's ``error.txt``."""
    with open(Path(task_dir) / ERROR_FILE) as f:
        return f.readline().rstrip("\n")


def clear_task_outputs(task_dir: Path) -> None:
    """Remove a task's ``results.csv`` and ``error.txt`` before it is (re-)run, so that neither describes a run
    with other settings."""
    for name in ("results.csv", ERROR_FILE):
        try:
            (Path(task_dir) / name).unlink()
        except FileNotFoundError:
            pass


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def _is_task_csv(path: Path) -> bool:
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    return "relpath" not in header


def collect_csv(root: os.PathLike) -> List[Dict[str, str]]:
    """Aggregate every task ``results.csv`` (and every failed task's ``error.txt``) below ``root`` at every folder
    level; returns the root's rows."""
    root = Path(root)
    leaves = sorted(p for p in root.rglob("results.csv") if p.parent != root and _is_task_csv(p))
    done = {p.parent for p in leaves}
    leaves += [p for p in root.rglob(ERROR_FILE) if p.parent != root and p.parent not in done]
    leaves.sort()
    levels = {root}
    for leaf in leaves:
        d = leaf.parent.parent
        while d != root and root in d.parents:
            levels.add(d)
            d = d.parent
    root_rows: List[Dict[str, str]] = []
    for level in sorted(levels, key=lambda p: len(p.parts), reverse=True):
        rows = []
        for leaf in leaves:
            if level not in leaf.parents:
                continue
            rel = leaf.parent.relative_to(level).as_posix()
            if leaf.name == ERROR_FILE:
                rows.append({"metric": "error", "value": "", "best_classifier": "", "relpath": rel,
                             "error": read_task_error(leaf.parent)})
                continue
            with open(leaf, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({"metric": r["metric"], "value": r["value"],
                                 "best_classifier": r.get("best_classifier", ""), "relpath": rel, "error": ""})
        if not rows:
            continue
        with open(level / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=AGG_COLUMNS)
            w.writeheader()
            w.writerows(rows)
        _write_txt(level / "results.txt", rows)
        if level == root:
            root_rows = rows
    return root_rows


def _write_txt(path: Path, rows: Sequence[Mapping[str, str]]) -> None:
    width = max(len(f"{r['relpath']}  {r['metric']}") for r in rows)
    lines = [f"{'task  metric':<{width}}  {'value':>8}  best_classifier"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['relpath'] + '  ' + r['metric']:<{width}}  {'FAILED':>8}  {r['error']}")
            continue
        lines.append(f"{r['relpath'] + '  ' + r['metric']:<{width}}  {float(r['value']):>8.2f}  "
                     f"{r['best_classifier']}")
    path.write_text("\n".join(lines) + "\n")


def plot_task(path: Path, title: str, bars: Optional[Mapping[str, float]] = None,
              curves: Optional[Mapping[str, Sequence[Tuple[float, float]]]] = None) -> Path:
    """Save a PNG: bar chart of final metrics and/or line plots of training curves (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (bars, *(curves or {}).values()) if p]
    names = (["results"] if bars else []) + [k for k, v in (curves or {}).items() if v]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 4), squeeze=False)
    for ax, name, data in zip(axes[0], names, panels):
        if name == "results":
            ax.barh(list(data.keys()), list(data.values()))
            ax.set_xlabel("value")
        else:
            xs, ys = zip(*data)
            ax.plot(xs, ys)
            ax.set_xlabel("iteration")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
