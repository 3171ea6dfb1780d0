"""Generate the figures in figs/: the architecture diagram and the fast-PE benchmark plot.

    python figs/make_figures.py                       # architecture.png (+ pe_throughput.png if results exist)
    python figs/make_figures.py --bench benchmarks/results/pe_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _box(ax, x, y, w, h, text, color, fontsize=9, edge="#333333", lw=1.0):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec=edge,
                                lw=lw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, wrap=True)


def _arrow(ax, x0, y0, x1, y1):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12, lw=1.2, color="#333333"))


def architecture(path: str) -> None:
    """Spectral patch embedding (per-channel projection + channel embedding + cross-attention) feeding a ViT."""
    fig, ax = plt.subplots(figsize=(13, 5.2))
    ax.set_xlim(0, 13)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    # inputs: channels of different sensors
    bands = [("B04  664 nm", "#e57373"), ("B08  827 nm", "#ba68c8"), ("B11 1613 nm", "#8d6e63"),
             ("VV  id -1", "#4db6ac")]
    for i, (name, col) in enumerate(bands):
        y = 4.1 - i * 1.0
        _box(ax, 0.2, y, 1.5, 0.7, name, col)
        _box(ax, 2.1, y, 1.7, 0.7, "P×P patch →\nlinear (shared)", "#fff3e0", fontsize=8)
        _arrow(ax, 1.7, y + 0.35, 2.1, y + 0.35)
        _box(ax, 4.2, y, 1.5, 0.7, "+ channel emb.\n(sin-cos λ / SAR)", "#fff3e0", fontsize=8)
        _arrow(ax, 3.8, y + 0.35, 4.2, y + 0.35)
        _arrow(ax, 5.7, y + 0.35, 6.3, 2.6)
    ax.text(0.95, 4.95, "any bands, any order\n(spec_masks for padding)", ha="center", fontsize=8)
    _box(ax, 6.3, 1.9, 1.9, 1.4, "cross-attention\nover channels\n(1 learned query,\nK/V projections)",
         "#ffe0b2", fontsize=8, edge="#ef6c00", lw=2)
    _box(ax, 8.5, 2.25, 1.0, 0.7, "proj →\nD", "#ffe0b2", fontsize=8, edge="#ef6c00", lw=2)
    _arrow(ax, 8.2, 2.6, 8.5, 2.6)
    ax.add_patch(FancyBboxPatch((1.95, 0.55), 7.7, 4.45, boxstyle="round,pad=0.05", fc="none", ec="#ef6c00",
                                lw=1.5, ls="--"))
    ax.text(5.8, 0.7, "PanopticonPE (one token per patch; fused exact computation by default)", ha="center",
            fontsize=8, color="#ef6c00")
    _box(ax, 9.9, 1.7, 1.4, 1.8, "ViT blocks\n(DINOv2)\n+ pos. emb.\n+ [CLS]", "#e3f2fd", fontsize=9)
    _arrow(ax, 9.5, 2.6, 9.9, 2.6)
    _box(ax, 11.7, 2.9, 1.2, 0.7, "normed CLS\n(B, D)", "#e8f5e9", fontsize=8)
    _box(ax, 11.7, 1.6, 1.2, 0.7, "patch tokens\n(B, N, D)", "#e8f5e9", fontsize=8)
    _arrow(ax, 11.3, 2.9, 11.7, 3.2)
    _arrow(ax, 11.3, 2.3, 11.7, 1.95)
    ax.text(6.5, 0.1, "Training: DINO (CLS) + iBOT (masked patches) student–teacher; crops sample views, bands and "
            "footprints; orange = deviation from DINOv2", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def pe_throughput(rows: list, path: str, title: str) -> None:
    """images/s vs channel count, fused vs reference, for the embedding and the whole model."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, target in zip(axes, ("embedding", "model")):
        sel = sorted((r for r in rows if r.get("target") == target), key=lambda r: r["channels"])
        if not sel:
            continue
        cs = [r["channels"] for r in sel]
        ax.plot(cs, [r["ips_fused"] for r in sel], "o-", label="fused (default)", color="#ef6c00")
        ax.plot(cs, [r["ips_reference"] for r in sel], "s--", label="reference (published)", color="#546e7a")
        rgb = [r for r in rows if r.get("target") == "rgb_vit"]
        if target == "model" and rgb:
            ax.axhline(rgb[0]["ips"], color="#1e88e5", ls=":", label="plain ViT-B/14 RGB")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("channels")
        ax.set_ylabel("images / s")
        ax.set_title(f"{'patch embedding' if target == 'embedding' else 'panopticon_vitb14'}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", default=os.path.join(ROOT, "benchmarks", "results", "pe_throughput_cpu.json"))
    p.add_argument("--out", default=HERE)
    args = p.parse_args()
    architecture(os.path.join(args.out, "architecture.png"))
    print("wrote", os.path.join(args.out, "architecture.png"))
    if os.path.isfile(args.bench):
        with open(args.bench) as f:
            data = json.load(f)
        pe_throughput(data["rows"], os.path.join(args.out, "pe_throughput.png"), data.get("title", ""))
        print("wrote", os.path.join(args.out, "pe_throughput.png"))


if __name__ == "__main__":
    main()
