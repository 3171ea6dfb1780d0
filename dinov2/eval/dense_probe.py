"""Training and scoring of dense heads on backbone feature maps (the engine of ``dinov2.eval.segmentation``).

``DenseProbe`` builds one head per (decoder in ``heads.decoders``) x (lr in ``heads.learning_rates``) on the maps
of the selected blocks (``heads.blocks``: 0-based indices, or else the last ``heads.n_last_blocks``), trains them
together (AdamW; warm-up + cosine or multi-step lr schedule; pixel cross-entropy with the ignore index) and scores
them with ``dinov2.eval.dense_metrics``. Logits are scored either at the batch's size (``inference: resize``) or at
the native label size: ``whole`` resizes the image once to ``img_size`` and the logits back; ``sliding`` runs
``img_size`` windows at native resolution on the grid ``round(linspace(0, H - img_size, ceil(H / img_size)))``
per axis and averages the logits where windows overlap.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.eval.dense_heads import build_dense_head
from dinov2.eval.dense_metrics import SegMetrics
from dinov2.eval.features import resolve_autocast, resolve_device
from dinov2.utils.progress import progress_bar

logger = logging.getLogger("dinov2")
INFERENCE_MODES = ("resize", "whole", "sliding")
SCHEDULES = ("cosine", "multistep")
Blocks = Union[int, List[int]]


def backbone_maps(vit: nn.Module, x: Dict[str, torch.Tensor], blocks: Blocks) -> List[torch.Tensor]:
    """Normalised patch-grid maps ``(B, D, h, w)`` of the last ``blocks`` blocks (int) or of the listed ones."""
    depth = int(vit.n_blocks)
    if isinstance(blocks, int) and blocks > depth:
        raise ValueError(f"heads.n_last_blocks={blocks} but the backbone has {depth} blocks")
    if not isinstance(blocks, int) and any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"heads.blocks={list(blocks)} but the backbone has {depth} blocks (0-based indices "
                         f"0..{depth - 1}); set heads.blocks for this backbone")
    return list(vit.get_intermediate_layers(x, n=blocks, reshape=True, norm=True))


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """Stochastic depth for fine-tuning: linearly increasing to ``rate`` over the blocks."""
    from dinov2.layers.drop_path import DropPath

    if not hasattr(vit, "_flat_blocks"):
        logger.warning("%s has no ViT blocks: fine-tuning without stochastic depth", type(vit).__name__)
        return
    blocks = vit._flat_blocks()
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(blk, name):
                setattr(blk, name, DropPath(p) if p > 0 else nn.Identity())


def backbone_param_groups(vit: nn.Module, base_lr: float, layer_decay: float, weight_decay: float) -> List[Dict]:
    """Optimizer groups of a backbone being fine-tuned: layer-wise lr decay (the last block at ``base_lr``, each
    earlier block ``layer_decay`` times less, embeddings least), no weight decay on biases / norms / gammas;
    each group carries ``base_lr`` for the schedule."""
    from dinov2.utils.param_groups import get_param_groups

    named = [(f"backbone.{n}", p) for n, p in vit.named_parameters()]
    out = []
    for g in get_param_groups(named, int(vit.n_blocks), layer_decay):
        lr = base_lr * g["lr_multiplier"]
        out.append({"params": g["params"], "lr": lr, "base_lr": lr, "weight_decay": weight_decay * g["wd_multiplier"]})
    return out


def warmup_cosine(it: int, total: int, warmup: int) -> float:
    """lr factor: linear warm-up over ``warmup`` iterations, then cosine to 0 at ``total``."""
    if it < warmup:
        return (it + 1) / warmup
    prog = (it - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


def multistep(it: int, total: int, milestones: Sequence[float], gamma: float) -> float:
    """lr factor of a step schedule: ``gamma`` ** (milestones passed), milestones given as fractions of ``total``
    (iteration ``int(f * total)`` starts the next step, as ``MultiStepLR`` stepped once per iteration)."""
    return gamma ** sum(it >= int(f * total) for f in milestones)


def head_key(decoder: str, lr: float) -> str:
    return f"{decoder}_lr_{lr:.5f}".replace(".", "_")


def window_starts(size: int, win: int) -> List[int]:
    """Window origins along one axis: ``round(linspace(0, size - win, ceil(size / win)))`` (one window when the
    side fits)."""
    n = math.ceil(size / win)
    if n <= 1:
        return [0]
    return [int(round(v)) for v in torch.linspace(0, size - win, n).tolist()]


def sliding_logits(fn: Callable[[torch.Tensor], Dict[str, torch.Tensor]], imgs: torch.Tensor, win: int
                   ) -> Dict[str, torch.Tensor]:
    """Logits ``(B, K, H, W)`` per head of ``fn`` (``imgs (B, C, win, win)`` -> ``{head: (B, K, win, win)}``) over
    ``win`` windows of ``imgs`` at native resolution, averaged where windows overlap. Sides shorter than ``win``
    are handled by resizing the whole image once."""
    H, W = imgs.shape[-2:]
    if H < win or W < win:
        out = fn(F.interpolate(imgs, size=(win, win), mode="bilinear", align_corners=False))
        return {k: F.interpolate(v, size=(H, W), mode="bilinear", align_corners=False) for k, v in out.items()}
    acc: Dict[str, torch.Tensor] = {}
    count = torch.zeros(1, 1, H, W, device=imgs.device)
    for top in window_starts(H, win):
        for left in window_starts(W, win):
            out = fn(imgs[..., top:top + win, left:left + win])
            for k, v in out.items():
                if k not in acc:
                    acc[k] = torch.zeros(v.shape[0], v.shape[1], H, W, device=v.device, dtype=v.dtype)
                acc[k][..., top:top + win, left:left + win] += v
            count[..., top:top + win, left:left + win] += 1
    return {k: v / count for k, v in acc.items()}


class DenseProbe:
    """Trains and scores the heads of one segmentation task (see the module docstring)."""

    def __init__(self, cfg, vit: nn.Module, num_classes: int, device: Optional[str]):
        self.cfg, self.vit, self.num_classes = cfg, vit, num_classes
        self.dev = resolve_device(device)
        self.amp = resolve_autocast(cfg.get("autocast_dtype", "auto"), self.dev)
        heads_cfg, optim, task = cfg.heads, cfg.optim, cfg.task
        blocks = heads_cfg.get("blocks")
        if blocks is not None:
            if not hasattr(vit, "_flat_blocks"):
                raise ValueError(f"heads.blocks selects ViT blocks by index; {type(vit).__name__} has none (use "
                                 "heads.n_last_blocks)")
            self.blocks: Blocks = [int(b) for b in blocks]
        else:
            self.blocks = min(int(heads_cfg.n_last_blocks), int(vit.n_blocks))
        self.n_maps = self.blocks if isinstance(self.blocks, int) else len(self.blocks)
        self.ignore_index = int(task.get("ignore_index", 255))
        self.inference = str(task.get("inference") or "resize")
        if self.inference not in INFERENCE_MODES:
            raise ValueError(f"task.inference must be one of {INFERENCE_MODES}, got {self.inference!r}")
        self.win = task.get("img_size")
        if self.inference != "resize" and not self.win:
            raise ValueError(f"task.inference={self.inference} needs task.img_size (the encoder's input size)")
        if self.win and int(self.win) % int(vit.patch_size):
            raise ValueError(f"task.img_size={self.win} is not a multiple of the patch size {vit.patch_size}")
        self.schedule = str(optim.get("schedule") or "cosine")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        ft = optim.get("finetune") or {}
        self.finetune = bool(ft.get("enabled", False))
        decoders = [str(d) for d in heads_cfg.decoders]
        lrs = [float(lr) for lr in heads_cfg.learning_rates]
        if self.finetune and len(decoders) * len(lrs) != 1:
            raise ValueError(f"Fine-tuning trains the backbone with one head: set one decoder and one learning rate "
                             f"(got decoders={decoders}, learning_rates={lrs})")
        # baselines with stage-wise widths (CNNs) tell theirs; ViT blocks all have embed_dim channels
        dims_of = getattr(vit, "feature_dims", None)
        dims = list(dims_of(self.n_maps)) if dims_of else [int(vit.embed_dim)] * self.n_maps
        pyramid = not getattr(vit, "is_pyramid", False)
        channels = int(heads_cfg.get("channels", 128))
        self.heads = nn.ModuleDict({head_key(d, lr): build_dense_head(d, dims, num_classes, channels, pyramid)
                                    for d in decoders for lr in lrs})
        self.lrs = {head_key(d, lr): lr for d in decoders for lr in lrs}
        self.ft_cfg = ft

    def _optimizer(self) -> torch.optim.Optimizer:
        wd = float(self.cfg.optim.get("weight_decay", 1e-4))
        groups = [{"params": list(h.parameters()), "lr": self.lrs[k], "base_lr": self.lrs[k], "weight_decay": wd}
                  for k, h in self.heads.items()]
        if self.finetune:
            groups += backbone_param_groups(self.vit, float(self.ft_cfg.get("backbone_lr", 1e-4)),
                                            float(self.ft_cfg.get("layer_decay", 0.75)), wd)
        return torch.optim.AdamW(groups, betas=(0.9, 0.999))

    def lr_factor(self, it: int, total: int, warmup: int) -> float:
        """The schedule's lr multiplier at iteration ``it`` of ``total``."""
        if self.schedule == "multistep":
            optim = self.cfg.optim
            return multistep(it, total, [float(m) for m in optim.get("milestones") or (0.6, 0.9)],
                             float(optim.get("gamma", 0.1)))
        return warmup_cosine(it, total, warmup)

    def _heads_forward(self, x: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Logits of every head, upsampled bilinearly to ``size``."""
        with torch.autocast(device_type=self.dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if self.finetune and self.vit.training:
                maps = backbone_maps(self.vit, x, self.blocks)
            else:
                with torch.no_grad():
                    maps = backbone_maps(self.vit, x, self.blocks)
            maps = [m.float() for m in maps]
            return {k: F.interpolate(head(maps), size=size, mode="bilinear", align_corners=False)
                    for k, head in self.heads.items()}

    def _forward(self, x: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Logits at the label size ``size``: of the batch as it is (training, ``resize``) or by whole-image /
        sliding-window inference at native resolution (``self.inference`` when not training)."""
        if self.heads.training or self.inference == "resize":
            return self._heads_forward(x, size)
        imgs, win = x["imgs"], int(self.win)
        run = lambda im: self._heads_forward({**x, "imgs": im}, (win, win))  # noqa: E731
        if self.inference == "whole":
            out = run(F.interpolate(imgs, size=(win, win), mode="bilinear", align_corners=False))
            return {k: F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in out.items()}
        out = sliding_logits(run, imgs, win)
        return {k: v if tuple(v.shape[-2:]) == tuple(size) else
                F.interpolate(v, size=size, mode="bilinear", align_corners=False) for k, v in out.items()}

    def train(self, loader, epochs: float) -> List[float]:
        """Train all heads (and the backbone when fine-tuning); returns the per-iteration summed loss."""
        total = max(1, int(math.ceil(len(loader) * epochs)))
        warmup = int(round(float(self.cfg.optim.get("warmup_epochs", 0) or 0) * len(loader)))
        self.vit.to(self.dev)
        self.heads.to(self.dev)
        if self.finetune:
            for p in self.vit.parameters():
                p.requires_grad_(True)
            set_drop_path(self.vit, float(self.ft_cfg.get("drop_path", 0.1)))
        opt = self._optimizer()
        losses: List[float] = []
        it = 0
        bar = progress_bar(total=total, desc="segmentation train")
        while it < total:
            for x, y in loader:
                if it >= total:
                    break
                self.vit.train(self.finetune)
                self.heads.train()
                scale = self.lr_factor(it, total, warmup)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * scale
                x = {k: v.to(self.dev) for k, v in x.items()}
                y = y.to(self.dev)
                logits = self._forward(x, tuple(y.shape[-2:]))
                loss = sum(F.cross_entropy(lg, y, ignore_index=self.ignore_index) for lg in logits.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"Non-finite segmentation loss at iteration {it}; lower the learning "
                                             "rates or check the input normalisation")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()) / len(logits))
                it += 1
                bar.update(1)
        bar.close()
        self.vit.eval()
        self.heads.eval()
        return losses

    @torch.no_grad()
    def score(self, loader, names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
        """Metrics of every (or the named) head on ``loader``, at the labels' size in the batches."""
        self.vit.eval()
        self.heads.eval()
        keys = list(names or self.heads.keys())
        mets = {k: SegMetrics(self.num_classes, self.ignore_index) for k in keys}
        for x, y in loader:
            x = {k: v.to(self.dev) for k, v in x.items()}
            logits = self._forward(x, tuple(y.shape[-2:]))
            for k in keys:
                mets[k].update(logits[k].argmax(1), y)
        return {k: m.compute() for k, m in mets.items()}
