"""Result files of an evaluation: per-task ``results.csv`` / JSON / plot, and ``collect_csv`` aggregation.

A task folder holds ``results.csv`` with columns ``metric, value, best_classifier`` (value in %, except
cosine similarities and counts). ``collect_csv(root)`` finds every task-level ``results.csv`` below ``root``
and writes, at ``root`` and at every folder between it and the tasks, an aggregated ``results.csv`` (columns
``metric, value, best_classifier, relpath``; ``relpath`` = task folder relative to that level) plus a
human-readable ``results.txt``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

TASK_COLUMNS = ("metric", "value", "best_classifier")
AGG_COLUMNS = TASK_COLUMNS + ("relpath",)


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
    """Aggregate every task ``results.csv`` below ``root`` at every folder level; returns the root's rows."""
    root = Path(root)
    leaves = sorted(p for p in root.rglob("results.csv") if p.parent != root and _is_task_csv(p))
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
            with open(leaf, newline="") as f:
                for r in csv.DictReader(f):
                    rows.append({"metric": r["metric"], "value": r["value"],
                                 "best_classifier": r.get("best_classifier", ""), "relpath": rel})
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
