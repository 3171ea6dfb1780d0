"""Training-step throughput and peak memory of the pretraining engine, fused vs reference patch embedding.

    python benchmarks/train_throughput.py [--config-file=dinov2/configs/quick_check.yaml] [--batch-size 2]
        [--steps 3] [--devices cpu,cuda] [--impls fused,reference] [key=value ...]

One step = teacher forward on the global crops, student forward/backward on global + local crops (one multi-crop
call), gradient clipping, AdamW step and the EMA teacher update — exactly `do_train`'s body. The batch is built
once by `PanopticonAugmentation` + the iBOT collate from synthetic 2-view samples (S2-like 13 bands at the
global crop size, an 8-band view at half resolution) and reused, so data loading is excluded. Each (device, impl)
runs in a fresh subprocess so peak memory is its own: CPU = peak RSS of the process, CUDA =
`torch.cuda.max_memory_allocated`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def _sample(size: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    s2 = {"imgs": [torch.randn(13, size, size, generator=g)],
          "chn_ids": [torch.tensor([442, 492, 559, 664, 704, 740, 782, 832, 864, 945, 1373, 1613, 2202])]}
    ms = {"imgs": [torch.randn(8, size // 2, size // 2, generator=g)],
          "chn_ids": [torch.tensor([427, 478, 546, 608, 659, 724, 831, 908])]}
    return [s2, ms]


def _measure(cfg_file: str, overrides: list, batch_size: int, steps: int, device_name: str) -> dict:
    import torch

    from dinov2.data.augmentations import make_augmentation
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import apply_scaling_rules, load_config

    if device_name == "cpu":
        os.environ["PANOPTICON_DEVICE"] = "cpu"
    cfg = load_config(cfg_file, overrides)
    apply_scaling_rules(cfg, 1)
    torch.manual_seed(0)
    device = torch.device(device_name)
    model = SSLMetaArch(cfg).to(device)
    model.configure_precision(device)
    model.prepare_for_distributed_training("ddp")
    model.train()
    augm = make_augmentation([dict(cfg.train.pretrain_augm)])
    size = int(cfg.train.pretrain_augm.global_crops_size)
    patch = int(cfg.student.patch_size)
    batch = collate_data_and_cast([augm(_sample(size + size // 4, i)) for i in range(batch_size)],
                                  tuple(cfg.ibot.mask_ratio_min_max), float(cfg.ibot.mask_sample_probability),
                                  torch.float32, n_tokens=(size // patch) ** 2)
    opt = torch.optim.AdamW(model.get_params_groups(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, teacher_temp=0.07)
        if model.fp16_scaler is not None:
            model.fp16_scaler.unscale_(opt)
        model.clip_gradients(3.0)
        if model.fp16_scaler is not None:
            model.fp16_scaler.step(opt)
            model.fp16_scaler.update()
        else:
            opt.step()
        model.update_teacher(0.994)
        return float(losses["total_loss"])

    step()  # warm-up (allocations, autotuning)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    g = batch["collated_global_crops"]["imgs"].shape
    loc = batch["collated_local_crops"]["imgs"].shape
    return {"device": device_name, "impl": str(cfg.student.pe_args.get("impl", "fused")), "s_per_step": dt,
            "images_per_s": batch_size / dt, "peak_mib": peak / 2**20, "loss": loss,
            "global": list(g), "local": list(loc), "dtype": str(model.precision.autocast_dtype or "fp32 (none)").replace("torch.", ""),
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(ROOT, "dinov2/configs/quick_check.yaml"))
    p.add_argument("--batch-size", type=int, default=2, help="samples per step (each = 2 global + N local crops)")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--devices", default="cpu,cuda", help="comma list; cuda is skipped when unavailable")
    p.add_argument("--impls", default="fused,reference")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs="*", help="config overrides key=value")
    a = p.parse_args()
    if a.worker:  # child process: one measurement, JSON on the last stdout line
        dev, impl = a.worker.split(":")
        print(json.dumps(_measure(a.config_file, a.opts + [f"student.pe_args.impl={impl}"], a.batch_size,
                                  a.steps, dev)))
        return
    import torch

    devices = [d for d in a.devices.split(",") if d and (d != "cuda" or torch.cuda.is_available())]
    rows = []
    for dev in devices:
        for impl in a.impls.split(","):
            cmd = [sys.executable, __file__, f"--worker={dev}:{impl}", f"--config-file={a.config_file}",
                   f"--batch-size={a.batch_size}", f"--steps={a.steps}", *a.opts]
            env = dict(os.environ, RDIR=os.environ.get("RDIR", "/nonexistent"), ODIR=os.environ.get("ODIR", "/tmp"))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"measurement {dev}/{impl} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"done {dev}/{impl}: {r['s_per_step']:.2f} s/step", file=sys.stderr)
    r0 = rows[0]
    print(f"config {os.path.relpath(a.config_file, ROOT)} {' '.join(a.opts)}; batch {a.batch_size}: global "
          f"{tuple(r0['global'])}, local {tuple(r0['local'])}; {a.steps} timed steps after 1 warm-up")
    print("| device | PE impl   | autocast       | s/step | images/s | peak memory (MiB) |")
    print("|--------|-----------|----------------|--------|----------|-------------------|")
    for r in rows:
        print(f"| {r['device']:6s} | {r['impl']:9s} | {r['dtype']:14s} | {r['s_per_step']:6.2f} | "
              f"{r['images_per_s']:8.3f} | {r['peak_mib']:17.0f} |")


if __name__ == "__main__":
    main()
