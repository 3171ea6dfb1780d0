"""ONNX export parity: onnxruntime against eager PyTorch for the dense export of panopticon_vitb14.

For each graph (fixed size: one export per image size, the position table resampled once; dynamic size: one
export whose graph interpolates the table), prints the max |difference| of `embedding` (B, 768) and `patch_tokens`
(B, N, 768) per image size and band count (random z-scored images, channel ids spread over 450-2200 nm). The
project requires <= 1e-4 everywhere; a non-finite value prints as nan and fails. Random weights unless --weights.

    python benchmarks/export_parity.py                                        # 224 and 448 px x 3, 13, 202 bands
    python benchmarks/export_parity.py --weights panopticon_vitb14_teacher.pth
    python benchmarks/export_parity.py --tiny --sizes 28 56                    # a 2-block model, a quick check
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dinov2.export import export_onnx, onnx_parity  # noqa: E402
from dinov2.hub_entries import build_entry, load_weights  # noqa: E402

OUTPUTS = ("embedding", "patch_tokens")
TOLERANCE = 1e-4


def _model(args):
    torch.manual_seed(0)
    if args.tiny:
        return build_entry("panopticon_vitb14", embed_dim=48, depth=2, num_heads=3,
                           pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 4}}}).eval()
    model = build_entry("panopticon_vitb14")
    if args.weights:
        load_weights(model, args.weights, default_url="")
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="released teacher file (default: random weights, seed 0)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 448], help="image sizes (multiples of 14)")
    p.add_argument("--bands", type=int, nargs="+", default=[3, 13, 202], help="band counts")
    p.add_argument("--modes", nargs="+", choices=("fixed", "dynamic"), default=["fixed", "dynamic"])
    p.add_argument("--tiny", action="store_true", help="a 2-block, 48-wide model (quick check of the script)")
    args = p.parse_args()
    model = _model(args)
    rows, worst = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            graphs = [(s, s) for s in args.sizes] if mode == "fixed" else [(args.sizes[0], None)]
            for export_size, only in graphs:
                path = os.path.join(tmp, f"{mode}_{export_size}.onnx")
                t0 = time.time()
                export_onnx(model, path, img_size=export_size, outputs=OUTPUTS, dynamic_size=mode == "dynamic")
                print(f"[{mode}] exported at {export_size} px in {time.time() - t0:.0f} s", file=sys.stderr)
                for size in ([only] if only else args.sizes):
                    for c in args.bands:
                        diffs = [onnx_parity(model, path, (size,), (c,), batch=1, outputs=(o,))[(size, c)]
                                 for o in OUTPUTS]
                        worst = max(worst, *diffs) if all(d == d for d in diffs) else float("nan")
                        rows.append((mode, size, c, *diffs))
    print(f"weights: {args.weights or 'random (seed 0)'}{' (tiny model)' if args.tiny else ''}")
    print("| graph | image size | bands | embedding max abs diff | patch_tokens max abs diff |")
    print("|---|---|---|---|---|")
    for mode, size, c, emb, patches in rows:
        print(f"| {mode} | {size} px | {c} | {emb:.2e} | {patches:.2e} |")
    ok = worst <= TOLERANCE  # False for nan
    print(f"worst: {worst:.2e} ({'within' if ok else 'ABOVE'} {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
