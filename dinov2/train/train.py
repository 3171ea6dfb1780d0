"""Self-supervised pretraining entry point.

    python dinov2/train/train.py --config-file=<yaml> --output-dir=<dir> [key=value ...]

also under `torchrun --nproc_per_node=N` or a SLURM launcher (`dinov2/run/train.py`).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import uuid
from functools import partial
from typing import Optional, Sequence

if __package__ in (None, ""):  # `python dinov2/train/train.py` without PYTHONPATH=.
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import torch

from dinov2 import distributed
from dinov2.data.sample_stream import BAD_SAMPLES_KEY
from dinov2.logging import MetricLogger, SmoothedValue, setup_logging
from dinov2.train import reporting
from dinov2.train.bad_samples import BadSampleLog
from dinov2.train.checkpointer import Checkpointer, restore_rng
from dinov2.train.divergence import DivergenceGuard, TrainingDivergedError
from dinov2.train.run_lock import RunLock
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.checkpoint import load_pretrained_weights, save_atomic
from dinov2.utils.config import apply_scaling_rules, load_config, write_config
from dinov2.utils.cli_help import OneSpellingHelpFormatter
from dinov2.utils.config_names import resolve_config_file
from dinov2.utils.dtype import as_torch_dtype
from dinov2.utils.param_groups import apply_optim_schedule
from dinov2.utils.utils import CosineScheduler, fix_random_seeds

logger = logging.getLogger("dinov2")
_RUN_LOCK: Optional[RunLock] = None  # held by the main rank from setup() until main() ends (or the process dies)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Panopticon pretraining", add_help=add_help, formatter_class=OneSpellingHelpFormatter)
    p.add_argument("--config-file", "--config_file", dest="config_file", default="",
                   help="training config YAML, merged over the shipped defaults: a file, or the name of a "
                        "shipped config (debug, demo, quick_check, stage1, stage2; `panopticon configs` lists them)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="",
                   help="run folder: config.yaml, logs/, checkpoints, model_final.pth (default: train.output_dir)")
    p.add_argument("--env", default=None,
                   help="extra YAML merged after the config file, e.g. cluster paths or batch sizes")
    p.add_argument("--fastdevrun", action="store_true",
                   help="a tiny run (1 epoch of 10 iterations) in a throw-away sub-folder of the output dir")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from scratch even if the output dir holds a last_checkpoint")
    p.add_argument("opts", nargs=argparse.REMAINDER, metavar="key=value",
                   help="config overrides in dotted form, e.g. optim.epochs=10 train.batch_size_per_gpu=32")
    return p


def setup(args) -> "DictConfig":  # noqa: F821
    """Assemble the config, start distributed, logging and seeds, apply scaling rules, write config.yaml."""
    opts = [o for o in (args.opts or []) if o != "--"]
    config_file = resolve_config_file(args.config_file) if args.config_file else None  # a path or a shipped name
    cfg = load_config(config_file, opts, env_file=args.env, fastdevrun=args.fastdevrun)
    out = args.output_dir or str(cfg.train.get("output_dir") or ".")
    launcher = None
    if distributed.launched_by_torchrun() and bool(cfg.train.get("exit_with_launcher", True)):
        launcher = distributed.exit_with_parent()
    distributed.enable(overwrite=True)
    if args.fastdevrun:
        token = distributed.all_gather_object(uuid.uuid4().hex)[0]  # one folder name for all ranks
        out = os.path.join(out, token)
    out = os.path.abspath(out)
    cfg.train.output_dir = out
    os.makedirs(out, exist_ok=True)
    takeover = lock_run_folder(out)  # before anything is written into the folder
    setup_logging(out)
    if takeover:
        logger.warning(takeover)
    if launcher is not None:
        logger.info("this rank exits when its launcher (pid %d) dies (train.exit_with_launcher)", launcher)
    if "SLURM_JOB_ID" in os.environ:
        cfg.slurm_job_id = os.environ["SLURM_JOB_ID"]
    cfg.train.short_exp_name = reporting.run_name(out)
    fix_random_seeds(int(cfg.train.seed) + distributed.get_rank())
    if distributed.is_main_process():
        write_config(cfg, out, "pre_apply_rules_config.yaml")
    apply_scaling_rules(cfg, distributed.get_world_size())
    if distributed.is_main_process():
        write_config(cfg, out, "config.yaml")
    return cfg


def lock_run_folder(out: str) -> str:
    """The main rank locks `out` (`run.lock`); every rank raises `RunFolderLockedError` if another live job
    holds it. Returns the stale-lock takeover message ('' if none)."""
    global _RUN_LOCK
    error, takeover = None, ""
    if distributed.is_main_process():
        from dinov2.train.run_lock import RunFolderLockedError

        lock = RunLock(out)
        try:
            _RUN_LOCK = lock.acquire()
            takeover = lock.describe_previous()
        except RunFolderLockedError as e:
            error = str(e)
    error = distributed.all_gather_object(error)[0]
    if error is not None:
        from dinov2.train.run_lock import RunFolderLockedError

        raise RunFolderLockedError(error)
    return takeover


def release_run_folder() -> None:
    """Release the run-folder lock taken by `setup` (no-op if not held)."""
    global _RUN_LOCK
    if _RUN_LOCK is not None:
        _RUN_LOCK.release()
        _RUN_LOCK = None


def _loader_worker_init(worker_id: int, die_with_rank: bool) -> None:
    """Data-loader worker start: drop the inherited run-lock descriptor; optionally die with the rank."""
    if _RUN_LOCK is not None:
        _RUN_LOCK.close_in_child()
    if die_with_rank:
        distributed.worker_dies_with_parent(worker_id)


def build_schedulers(cfg, epoch_len: int) -> dict:
    """Per-iteration lr (warmup, hold, cosine), wd and teacher momentum (cosine), teacher temperature (linear
    warmup then constant)."""
    o, t = cfg.optim, cfg.teacher
    total = max(1, int(round(float(o.epochs) * epoch_len)))
    it = lambda epochs: int(round(float(epochs or 0) * epoch_len))  # noqa: E731
    return {
        "lr": CosineScheduler(float(o.lr), float(o.min_lr), total, warmup_iters=it(o.warmup_epochs),
                              hold_iters=it(o.get("hold_epochs", 0))),
        "wd": CosineScheduler(float(o.weight_decay), float(o.weight_decay_end), total),
        "mom": CosineScheduler(float(t.momentum_teacher), float(t.final_momentum_teacher), total),
        "teacher_temp": CosineScheduler(float(t.teacher_temp), float(t.teacher_temp), total,
                                        warmup_iters=it(t.warmup_teacher_temp_epochs),
                                        start_warmup_value=float(t.warmup_teacher_temp)),
    }


def build_dataset(cfg):
    from dinov2.data.loaders import make_dataset

    if cfg.train.get("dataset") is None:
        raise ValueError("train.dataset is not set: give a dataset config (e.g. {id: GeoTiffScenes, ...})")
    if cfg.train.get("pretrain_augm") is None:
        raise ValueError("train.pretrain_augm is not set: give the pretraining augmentation config")
    return make_dataset(cfg.train.dataset, pretrain_augm_cfg=cfg.train.pretrain_augm, seed=int(cfg.train.seed))


def build_loader(cfg, dataset, device: torch.device, sampler_advance: int):
    """Infinite, seeded, rank-sharded loader with the multi-crop collate and iBOT masks."""
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.loaders import make_data_loader
    from dinov2.data.masking import MaskingGenerator

    augm = cfg.train.get("pretrain_augm") or {}
    img_size = int(augm.get("global_crops_size", 224))
    patch = int(cfg.student.patch_size)
    if img_size % patch:
        raise ValueError(f"global_crops_size {img_size} is not a multiple of student.patch_size {patch}")
    grid = img_size // patch
    mask_gen = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    # on CPU the batch stays fp32 (autocast casts inside); on CUDA half-precision batches halve host->device copies
    dt = cfg.compute_precision.get("dtype", "fp16")
    collate_dtype = as_torch_dtype(dt) if device.type == "cuda" else torch.float32
    collate = partial(collate_data_and_cast, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                      mask_probability=float(cfg.ibot.mask_sample_probability), dtype=collate_dtype,
                      n_tokens=grid * grid, mask_generator=mask_gen)
    nw = int(cfg.train.num_workers)
    die_with_rank = distributed.launched_by_torchrun() and bool(cfg.train.get("exit_with_launcher", True))
    return make_data_loader(dataset, batch_size=int(cfg.train.batch_size_per_gpu), num_workers=nw,
                            sampler_type="infinite", shuffle=True, seed=int(cfg.train.seed),
                            sampler_advance=sampler_advance, drop_last=bool(cfg.train.drop_last),
                            pin_memory=bool(cfg.train.pin_memory) and device.type == "cuda",
                            persistent_workers=bool(cfg.train.persistent_workers) and nw > 0, collate_fn=collate,
                            per_sample_seeding=True,
                            max_sample_replacements=int(cfg.train.get("max_sample_replacements", 10)),
                            worker_init_fn=partial(_loader_worker_init, die_with_rank=die_with_rank))


def epoch_length(cfg, dataset) -> int:
    n = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    if n > 0:
        return n
    per_step = int(cfg.train.batch_size_per_gpu) * distributed.get_world_size() * int(cfg.get("gradient_accumulation_steps", 1) or 1)
    return max(1, math.ceil(len(dataset) / per_step))


def save_teacher(model: SSLMetaArch, output_dir: str, iteration: int) -> str:
    """`<out>/eval/<iteration>/teacher_checkpoint.pth` = {'teacher': teacher state dict} (main rank writes)."""
    from dinov2 import fsdp as dp

    sd = dp.full_state_dict(model.teacher)
    path = os.path.join(output_dir, "eval", str(iteration), "teacher_checkpoint.pth")
    if distributed.is_main_process():
        save_atomic({"teacher": sd}, path)
        logger.info("saved teacher checkpoint %s", path)
    distributed.barrier()
    return path


def _periods(cfg, epoch_len: int):
    ckpt_period = max(1, int(round(float(cfg.train.saveckp_freq) * epoch_len)))
    ev = cfg.get("eval") or {}
    if int(ev.get("eval_period_iterations", -1) or -1) > 0:
        eval_period = int(ev.eval_period_iterations)
    elif float(ev.get("eval_period_epoch", -1) or -1) > 0:
        eval_period = max(1, int(round(float(ev.eval_period_epoch) * epoch_len)))
    else:
        eval_period = 0
    return ckpt_period, eval_period


def do_train(cfg, model: SSLMetaArch, resume: bool = True, dataset=None) -> dict:
    """The training loop; returns `{'iteration', 'final_checkpoint', 'last_record'}`.

    `dataset` (a map-style pretraining dataset with its augmentation) replaces `cfg.train.dataset` if given."""
    out = cfg.train.output_dir
    device = model.device
    model.train()
    optimizer = torch.optim.AdamW(model.get_params_groups(), betas=(float(cfg.optim.adamw_beta1),
                                                                   float(cfg.optim.adamw_beta2)))
    ckpt = Checkpointer(model, out, optimizer, model.fp16_scaler, max_to_keep=int(cfg.train.get("max_to_keep", 20)))
    state = ckpt.resume_or_load(str(cfg.MODEL.get("WEIGHTS") or ""), resume=resume)
    start_iter = state["start_iter"]
    dataset = dataset if dataset is not None else build_dataset(cfg)
    epoch_len = epoch_length(cfg, dataset)
    scheds = build_schedulers(cfg, epoch_len)
    max_iter = len(scheds["lr"])
    if float(cfg.optim.get("break_at_epochs", -1)) > 0:
        max_iter = min(max_iter, int(round(float(cfg.optim.break_at_epochs) * epoch_len)))
    accum = model.grad_accum
    bsz = int(cfg.train.batch_size_per_gpu)
    loader = build_loader(cfg, dataset, device, sampler_advance=start_iter * bsz * accum)
    data_iter = iter(loader)
    restore_rng(state["rng_state"])  # after the iterator exists: creating it draws from the RNG
    bad_samples = BadSampleLog(out, len(dataset), float(cfg.train.get("max_bad_sample_fraction", 0.05)), start_iter)
    dv = cfg.train.get("divergence") or {}
    guard = DivergenceGuard(max_abs_weight=float(dv.get("max_abs_weight", 1e6)),
                            loss_spike_factor=float(dv.get("loss_spike_factor", 10.0)),
                            loss_window=int(dv.get("loss_window", 20)),
                            history=state["meta"].get("loss_history"))
    ckpt_period, eval_period = _periods(cfg, epoch_len)
    metrics_file = os.path.join(out, "training_metrics.json")
    wandb_run = reporting.init_wandb(cfg, out)
    total_bsz = bsz * distributed.get_world_size() * accum
    metric_logger = MetricLogger(output_file=metrics_file)
    for k in ("lr", "wd", "mom", "teacher_temp", "last_layer_lr", "current_batch_size"):
        metric_logger.add_meter(k, SmoothedValue(window_size=1, fmt="{value:.4g}"))  # schedules: current value
    on_log = partial(reporting.log_wandb, wandb_run, epoch_len=epoch_len, batch_size_total=total_bsz)
    clip = float(cfg.optim.get("clip_grad", 0) or 0)
    scaler = model.fp16_scaler
    last_good = state["checkpoint"]
    ev = cfg.get("eval") or {}
    logger.info("training iterations %d..%d (epoch length %d, total batch %d, device %s)", start_iter, max_iter,
                epoch_len, total_bsz, device)

    def stop(reason: str, it: int, epoch: float, when: str) -> None:
        msg = (f"{reason} at iteration {it} (epoch {epoch:.2f}); training stopped {when}. Last good checkpoint: "
               f"{last_good or 'none written yet'}. Resuming (same --output-dir, e.g. with a lower optim.base_lr) "
               f"continues from it.")
        logger.error(msg)
        raise TrainingDivergedError(msg)

    def batches():
        for it in range(start_iter, max_iter):
            micro = [next(data_iter) for _ in range(accum)]
            bad_samples.update(it, [f for b in micro for f in b.pop(BAD_SAMPLES_KEY, [])])
            yield it, micro

    it = start_iter - 1
    only_eval = bool(ev.get("only_eval", False))
    if only_eval:
        logger.info("eval.only_eval is set: no training iterations")
    steps = iter(()) if only_eval else batches()
    for it, micro in metric_logger.log_every(steps, int(cfg.train.log_every_n_steps), "Training", max_iter,
                                              start_iter, on_log=on_log):
        epoch = it / epoch_len  # recomputed every iteration, so head freezing really ends (published fault)
        lr, wd, mom, temp = (scheds[k][it] for k in ("lr", "wd", "mom", "teacher_temp"))
        apply_optim_schedule(optimizer, lr, wd, epoch)
        optimizer.zero_grad(set_to_none=True)
        sums: dict = {}
        for batch in micro:
            for k, v in model.forward_backward(batch, temp).items():
                sums[k] = sums.get(k, 0.0) + v / accum
        reduced = {k: distributed.all_reduce_mean(v) for k, v in sums.items()}
        reason = guard.check_loss(float(reduced["total_loss"]))
        if reason:
            stop(reason, it, epoch, "before the optimizer step")
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip > 0:
            model.clip_gradients(clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        model.update_teacher(mom)
        frozen_lr = [g["lr"] for g in optimizer.param_groups if g.get("freeze_epochs", 0) > 0]
        metric_logger.update(lr=lr, wd=wd, mom=mom, teacher_temp=temp, current_batch_size=total_bsz,
                             **({"last_layer_lr": max(frozen_lr)} if frozen_lr else {}),
                             **{k: float(v) for k, v in reduced.items()})
        save_ckpt = (it + 1) % ckpt_period == 0 and it + 1 < max_iter
        save_eval = (eval_period and (it + 1) % eval_period == 0) or (
            it == max_iter - 1 and ev.get("include_final_ckpt", True) and reporting.eval_configured(cfg))
        if save_ckpt or save_eval or it == max_iter - 1:  # nothing is saved from a failed step
            reason = guard.check_weights(model)
            if reason:
                stop(reason, it, epoch, "before saving")
        if save_ckpt:
            last_good = ckpt.save_periodic(it, {"loss_history": list(guard.history)})
        if save_eval:
            save_teacher(model, out, it)

    final = None
    if it >= start_iter or (only_eval and not os.path.isfile(os.path.join(out, "model_final.pth"))):
        final = ckpt.save("model_final", max(it, 0), {"loss_history": list(guard.history)})
    elif os.path.isfile(os.path.join(out, "model_final.pth")):
        final = os.path.join(out, "model_final.pth")
    if distributed.is_main_process():
        png = reporting.plot_training_curve(metrics_file, os.path.join(out, "training_curve.png"))
        if png:
            logger.info("training curve: %s", png)
    return {"iteration": it, "final_checkpoint": final, "last_record": metric_logger.last_record,
            "wandb_run": wandb_run}


def build_model(cfg) -> SSLMetaArch:
    """SSLMetaArch on this process's device with `MODEL.pretrained_weights` applied and DDP/FSDP set up."""
    device = distributed.get_device()
    model = SSLMetaArch(cfg)
    weights = cfg.MODEL.get("pretrained_weights") or []
    if len(weights):
        from omegaconf import OmegaConf

        entries = OmegaConf.to_container(weights, resolve=True) if OmegaConf.is_config(weights) else list(weights)
        missing, unexpected = load_pretrained_weights(model, entries)
        logger.info("MODEL.pretrained_weights: %d missing, %d unexpected keys", len(missing), len(unexpected))
        # the teacher starts as a copy of the (partly pretrained) student
    model.to(device)
    model.configure_precision(device)
    model.prepare_for_distributed_training(str(cfg.compute_precision.get("distributed", "ddp")))
    return model


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    cfg = setup(args)
    try:
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        model = build_model(cfg)
        result = do_train(cfg, model, resume=args.resume)
        del model  # free the training state before evaluation
        result["eval"] = reporting.run_evaluations(cfg, cfg.train.output_dir, result["wandb_run"])
        if result.pop("wandb_run") is not None and distributed.is_main_process():
            import wandb

            wandb.finish()
        if args.fastdevrun and distributed.is_main_process():
            shutil.rmtree(cfg.train.output_dir, ignore_errors=True)
        distributed.barrier()
    finally:
        release_run_folder()
    distributed.disable()
    return result


if __name__ == "__main__":
    main()
