"""Eager vs torch.compile vs ONNX Runtime throughput of the Panopticon backbone on CPU (prints a table).

    python benchmarks/compile_export.py                       # ViT-B/14 (random weights), 13 bands, batch 2
    python benchmarks/compile_export.py --model tiny --bands 3 13 202 --iters 10 --threads 1

Every variant sees the same inputs (B x C x 224 x 224, fp32, inference mode); images/s is the best of `--repeats`
timed runs of `--iters` forwards each, after one warm-up forward (compilation / session creation is reported
separately as setup seconds). `max |diff|` compares each variant's embedding with eager PyTorch.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from dinov2.export import example_inputs, export_onnx, prepare_for_export  # noqa: E402
from dinov2.models import build_model  # noqa: E402
from dinov2.eval.model_loading import HUB_STUDENT_CFG  # noqa: E402
from dinov2.models.channel_embedding import check_chn_ids  # noqa: E402
from dinov2.models.input_checks import prepare_images  # noqa: E402

TINY = {"arch": "vit_small", "patch_size": 14, "embed_dim": 192, "depth": 6, "num_heads": 3, "layerscale": 0.1,
        "embed_layer": "PanopticonPE", "pe_args": {"attn_dim": 96, "chnfus_cfg": {"attn_cfg": {"num_heads": 4}}}}


def _best_rate(fn: Callable[[], object], batch: int, iters: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, time.perf_counter() - t0)
    return batch * iters / best


def _checks_ms(imgs: torch.Tensor, ids: torch.Tensor, repeats: int = 5) -> float:
    """Milliseconds of the eager input checks of one batch (part of the eager time above)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        check_chn_ids(ids, *ids.shape)
        prepare_images(imgs, torch.float32)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run(model_name: str, bands: List[int], batch: int, img_size: int, iters: int, repeats: int) -> List[Dict]:
    import numpy as np
    import onnxruntime as ort

    cfg = dict(HUB_STUDENT_CFG) if model_name == "vitb14" else dict(TINY)
    model, _ = build_model(cfg, only_teacher=True, img_size=int(cfg.get("pos_emb_img_size", img_size)))
    model.eval()
    wrapper = prepare_for_export(model, img_size)  # position table at img_size: what every variant runs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = export_onnx(model, os.path.join(tmp, "model.onnx"), img_size=img_size)
        onnx_export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()  # same thread count as PyTorch
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ort_setup_s = time.perf_counter() - t0 + onnx_export_s
        compiled = torch.compile(wrapper)
        for c in bands:
            imgs, ids = example_inputs(batch, c, img_size)
            with torch.inference_mode():
                ref = wrapper(imgs, ids)
                eager = _best_rate(lambda: wrapper(imgs, ids), batch, iters, repeats)
                t0 = time.perf_counter()
                got_c = compiled(imgs, ids)
                compile_s = time.perf_counter() - t0
                comp = _best_rate(lambda: compiled(imgs, ids), batch, iters, repeats)
            feeds = {"imgs": imgs.numpy(), "chn_ids": ids.numpy()}
            got_o = sess.run(None, feeds)[0]
            onnx_rate = _best_rate(lambda: sess.run(None, feeds), batch, iters, repeats)
            rows += [
                {"bands": c, "variant": "eager", "setup_s": 0.0, "img_s": eager, "diff": 0.0,
                 "checks_ms": _checks_ms(imgs, ids)},
                {"bands": c, "variant": "torch.compile (inductor)", "setup_s": compile_s, "img_s": comp,
                 "diff": float((got_c - ref).abs().max())},
                {"bands": c, "variant": "onnxruntime (CPU EP)", "setup_s": ort_setup_s, "img_s": onnx_rate,
                 "diff": float(np.abs(got_o - ref.numpy()).max())},
            ]
            ort_setup_s = 0.0  # exported once for every channel count
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("vitb14", "tiny"), default="vitb14",
                   help="vitb14: the published ViT-B/14 architecture; tiny: width 192, 6 blocks")
    p.add_argument("--bands", type=int, nargs="+", default=[13], help="channel counts to time")
    p.add_argument("--batch", type=int, default=2, help="images per forward")
    p.add_argument("--img-size", type=int, default=224, help="image size (multiple of 14)")
    p.add_argument("--iters", type=int, default=3, help="forwards per timed run")
    p.add_argument("--repeats", type=int, default=2, help="timed runs; the best is reported")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads for PyTorch, compiled code and onnxruntime (0: PyTorch's default); on a "
                        "machine shared with other jobs 1 avoids OpenMP oversubscription collapsing the timings")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model}, batch {args.batch}, "
          f"{args.img_size} px", flush=True)
    rows = run(args.model, args.bands, args.batch, args.img_size, args.iters, args.repeats)
    eager = {r["bands"]: r["img_s"] for r in rows if r["variant"] == "eager"}
    print("\n| bands | variant | setup s | images/s | vs eager | max abs diff vs eager | input checks ms/batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        checks = f"{r['checks_ms']:.1f}" if "checks_ms" in r else ""
        print(f"| {r['bands']} | {r['variant']} | {r['setup_s']:.1f} | {r['img_s']:.2f} | "
              f"{r['img_s'] / eager[r['bands']]:.2f}x | {r['diff']:.1e} | {checks} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
