"""The demo's comparison of a trained model with its random initialisation: rows, chance levels, CSV, Markdown
and one figure (trained vs random init per task and metric, chance drawn)."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

Results = Dict[str, Dict[str, float]]  # task -> metric -> value
METRICS = ("recall@1", "recall@5", "median_rank", "mean_pair_cosine", "mIoU", "pixel_acc")
DENSE = ("mIoU", "pixel_acc")
COLUMNS = ("task", "metric", "n", "trained", "random_init", "chance")


def chance_level(metric: str, n: Optional[float]) -> Optional[float]:
    """Expected value of a retrieval metric when the ranking is random among `n` candidates: recall@k = 100·k/n %,
    median rank = (n + 1) / 2; None where no such level exists (cosine)."""
    if n is None or not n or (isinstance(n, float) and math.isnan(n)):
        return None
    if metric.startswith("recall@"):
        return min(100.0, 100.0 * int(metric.split("@", 1)[1]) / float(n))
    if metric == "median_rank":
        return (float(n) + 1.0) / 2.0
    return None


def comparison_rows(trained: Results, random: Results, metrics: Sequence[str] = METRICS) -> List[dict]:
    """One row per task and metric present in either result: N, both values (None if missing) and chance."""
    rows = []
    for task in sorted(set(trained) | set(random)):
        t, r = trained.get(task, {}), random.get(task, {})
        n = t.get("n_samples", r.get("n_samples"))
        for m in metrics:
            if m in t or m in r:
                rows.append(dict(task=task, metric=m, n=None if n is None else int(n), trained=t.get(m),
                                 random_init=r.get(m), chance=chance_level(m, n)))
    return rows


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_csv(rows: Sequence[dict], path: Path) -> Path:
    """Rows as CSV with the header `task,metric,n,trained,random_init,chance` (missing values left empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row[k] is None else row[k]) for k in COLUMNS})
    return path


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| task | metric | N | trained | random init | chance |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        n = "-" if row["n"] is None else str(row["n"])
        lines.append(f"| {row['task']} | {row['metric']} | {n} | {_fmt(row['trained'])} | "
                     f"{_fmt(row['random_init'])} | {_fmt(row['chance'])} |")
    return "\n".join(lines)


def write_markdown(rows: Sequence[dict], path: Path, title: str = "Demo: trained vs random initialisation") -> Path:
    note = ("recall@k in % (higher is better), median rank of the true pair (lower is better), mean cosine of the "
            "true pairs; chance = the value expected from a random ranking of the N held-out patches. Segmentation: "
            "mIoU and pixel accuracy in % on the test blocks (higher is better).")
    path.write_text(f"# {title}\n\n{markdown_table(rows)}\n\n{note}\n")
    return path


def plot_comparison(rows: Sequence[dict], path: Path) -> Path:
    """One row of panels per task: recall@k bars (left) and median rank bars (right), trained vs random init,
    with the chance level as a dashed black line over each metric's pair of bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    retrieval = [("recall", "recall@k (%) - higher is better"), ("median_rank", "median rank - lower is better")]
    dense = [("dense", "mIoU / pixel acc. (%) - higher is better"), (None, "")]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.0 * len(tasks)), squeeze=False)
    width = 0.38
    for i, task in enumerate(tasks):
        is_dense = any(r["task"] == task and r["metric"] in DENSE for r in rows)
        for j, (kind, ylabel) in enumerate(dense if is_dense else retrieval):
            ax = axes[i][j]
            if kind is None:
                ax.axis("off")
                continue
            sel = [r for r in rows if r["task"] == task and (
                r["metric"].startswith("recall@") if kind == "recall" else
                r["metric"] in DENSE if kind == "dense" else r["metric"] == kind)]
            for x, r in enumerate(sel):
                for dx, key, color, label in ((-width / 2, "trained", "tab:blue", "trained"),
                                              (width / 2, "random_init", "tab:gray", "random init")):
                    if r[key] is not None:
                        ax.bar(x + dx, r[key], width, color=color, label=label if x == 0 else None)
                        ax.annotate(f"{r[key]:.1f}", (x + dx, r[key]), ha="center", va="bottom", fontsize=8)
                if r["chance"] is not None:
                    ax.hlines(r["chance"], x - width, x + width, colors="black", linestyles="--",
                              label="chance" if x == 0 else None)
            ax.set_xticks(range(len(sel)), [r["metric"] for r in sel])
            n = sel[0]["n"] if sel else None
            title = task if n is None else f"{task} (N = {n})"
            ax.set_title(title if j == 0 else "", fontsize=9, loc="left")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.margins(y=0.15)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Demo: pretrained model vs the same architecture at random initialisation", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(trained: Results, random: Results, out_dir: Path) -> Dict[str, Path]:
    """Write `comparison.csv`, `comparison.md` and `comparison.png` into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    rows = comparison_rows(trained, random)
    return {"csv": write_csv(rows, out_dir / "comparison.csv"), "md": write_markdown(rows, out_dir / "comparison.md"),
            "png": plot_comparison(rows, out_dir / "comparison.png")}
