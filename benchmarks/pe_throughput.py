"""Throughput and peak memory of the spectral patch embedding: fused vs published (reference) computation.

Prints a table: images/s and peak memory for the embedding alone and for the whole `panopticon_vitb14`, at
several channel counts, plus a plain DINOv2 ViT-B/14 RGB forward as the floor. Every measurement runs in a fresh
subprocess so that peak memory (CUDA: max_memory_allocated; CPU: peak RSS growth) belongs to that case alone.

    python benchmarks/pe_throughput.py --batch-sizes 4 --channels 3 13 202 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

S2_IDS = [442, 492, 559, 664, 704, 740, 782, 827, 864, 945, 1373, 1613, 2203]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Samples the resident set size in a thread (torch ops release the GIL) and keeps the peak growth."""

    def __init__(self, interval: float = 0.0005) -> None:
        import threading

        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb() - self.base)
            time.sleep(self.interval)

    def __enter__(self) -> "RssPeak":
        self.base = _rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb() - self.base)


def worker(case: dict) -> dict:
    import torch

    import hubconf

    torch.manual_seed(0)
    device = torch.device(case["device"])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[case["dtype"]]
    B, C, S = case["batch"], case["channels"], case["size"]
    if case["target"] == "rgb_vit":
        model = hubconf.dinov2_vitb14(pretrained=False).to(device).eval()
        x = torch.randn(B, 3, S, S, device=device)
        fn = lambda: model(x)  # noqa: E731
    else:
        model = hubconf.panopticon_vitb14(pretrained=False).to(device).eval()
        model.patch_embed.impl = case["impl"]
        if case["impl"] == "fused" and case.get("fold_cache", True):
            model.patch_embed.freeze_fused_cache()  # inference opt-in: the folded weights are computed once
        ids = torch.linspace(400, 2500, C) if C > len(S2_IDS) else torch.tensor(S2_IDS[:C], dtype=torch.float32)
        x = {"imgs": torch.randn(B, C, S, S, device=device), "chn_ids": ids.repeat(B, 1).to(device)}
        target = model.patch_embed if case["target"] == "embedding" else model
        fn = lambda: target(x)  # noqa: E731

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        fn()  # warm-up (with --fold-cache also fills the frozen cache of folded weights)
        sync()
        if case.get("measure") == "memory":
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                sync()
                return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
            with RssPeak() as rss:
                fn()
            return {"peak_mb": rss.peak}
        times = []
        for _ in range(case["repeats"]):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    best = min(times)
    return {"ips": B / best, "sec": best}


def _subprocess(case: dict, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark case {case} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_case(case: dict) -> dict:
    """Timing in one fresh process (default allocator), peak memory in another."""
    timing = _subprocess({**case, "measure": "time"}, dict(os.environ))
    # Small mmap threshold: freed tensors go back to the OS, so RSS sampling sees this case's own peak (it also
    # slows allocation down, which is why timing runs without it).
    memory = _subprocess({**case, "measure": "memory"}, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    return {**timing, **memory}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--channels", type=int, nargs="+", default=[3, 13, 202])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--targets", nargs="+", default=["embedding", "model"], choices=["embedding", "model"])
    p.add_argument("--no-fold-cache", dest="fold_cache", action="store_false",
                   help="fused path without freeze_fused_cache(): the folded weights are recomputed every call "
                        "(the default outside an explicit inference opt-in)")
    p.add_argument("--json-out", default=None,
                   help="where to store the rows (default benchmarks/results/pe_throughput_<device>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    rows = []
    header = f"{'target':<10} {'B':>3} {'C':>4} {'fused img/s':>12} {'ref img/s':>10} {'speedup':>8} " \
             f"{'fused MB':>9} {'ref MB':>9} {'mem x':>6}"
    print(f"device={args.device} dtype={args.dtype} size={args.size} repeats={args.repeats} "
          f"fold_cache={args.fold_cache}")
    print(header)
    print("-" * len(header))
    for B in args.batch_sizes:
        base = dict(batch=B, size=args.size, device=args.device, dtype=args.dtype, repeats=args.repeats,
                    fold_cache=args.fold_cache)
        for target in args.targets:
            for C in args.channels:
                res = {impl: run_case({**base, "target": target, "channels": C, "impl": impl})
                       for impl in ("fused", "reference")}
                f, r = res["fused"], res["reference"]
                mem_ratio = r["peak_mb"] / max(f["peak_mb"], 1e-3)
                line = (f"{target:<10} {B:>3} {C:>4} {f['ips']:>12.2f} {r['ips']:>10.2f} "
                        f"{f['ips'] / r['ips']:>7.1f}x {f['peak_mb']:>9.1f} {r['peak_mb']:>9.1f} {mem_ratio:>5.1f}x")
                print(line, flush=True)
                rows.append({"target": target, "batch": B, "channels": C, **{f"{k}_{i}": v for i, d in res.items()
                                                                             for k, v in d.items()}})
        rgb = run_case({**base, "target": "rgb_vit", "channels": 3, "impl": "fused"})
        print(f"{'rgb ViT-B/14 (DINOv2, plain PatchEmbed)':<44} {B:>3} img/s {rgb['ips']:.2f}", flush=True)
        rows.append({"target": "rgb_vit", "batch": B, **rgb})
    out = args.json_out or os.path.join(ROOT, "benchmarks", "results", f"pe_throughput_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    title = f"{args.device}, {args.dtype}, {args.size}x{args.size}, batch {','.join(map(str, args.batch_sizes))}"
    with open(out, "w") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
    print(f"rows written to {out}; plot with: python figs/make_figures.py --bench {out}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
