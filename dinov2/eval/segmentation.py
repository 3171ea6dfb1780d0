"""Semantic segmentation: dense heads on a frozen (default) or fine-tuned backbone (task id ``segmentation``).

Protocol (frozen backbone, the default for benchmark suites): the backbone runs on every training batch (so
random flips are real augmentations); its last ``heads.n_last_blocks`` blocks are returned as patch-grid maps
(``get_intermediate_layers(..., reshape=True)``) and feed every head at once — one head per
(decoder in ``heads.decoders``) x (lr in ``heads.learning_rates``), each with its own AdamW optimiser and a
warm-up + cosine schedule. Logits are upsampled bilinearly to the label size; the loss is pixel cross-entropy
with ``task.ignore_index``. After training, every head is scored on the validation split; the head with the best
validation mIoU is reported on the test split(s).

Fine-tuning (``optim.finetune.enabled: true``): the backbone trains too, with layer-wise lr decay, stochastic
depth and warm-up; a single decoder and lr must then be configured (they share the backbone's gradients).

Images: datasets must give no ``transform`` (a transform of the image alone would misalign the mask). Images are
used at native size (padded to a multiple of the patch size; padded label pixels are ignored) or resized to
``task.img_size`` (image bilinear, mask nearest); ``task.augment`` flips image and mask together during training.

Metrics (torchmetrics): ``mIoU`` (macro Jaccard index over the classes present in the target or the
prediction), per-class IoU (in ``results_eval_segmentation.json``) and ``pixel_acc`` (micro accuracy), all
ignoring ``task.ignore_index``.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.eval.dense_heads import build_dense_head
from dinov2.eval.features import resolve_autocast, resolve_device

logger = logging.getLogger("dinov2")


# ----------------------------------------------------------------------------------------------- batching
class DenseCollate:
    """Stack ``(x_dict, mask)`` samples: optional joint resize, joint random flips (training), padding to a
    multiple of the patch size (image 0 = the normalised mean, mask = ``ignore_index``)."""

    def __init__(self, patch_size: int, ignore_index: int, img_size: Optional[int] = None, augment: bool = False,
                 seed: int = 0):
        self.patch_size, self.ignore_index, self.img_size, self.augment = patch_size, ignore_index, img_size, augment
        self.gen = torch.Generator().manual_seed(seed)

    def _one(self, x: Dict[str, torch.Tensor], mask: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        imgs = x["imgs"].float()
        mask = torch.as_tensor(mask).long()
        if mask.ndim != 2:
            raise ValueError(f"Segmentation label must be a (H, W) mask, got shape {tuple(mask.shape)}")
        if mask.shape != imgs.shape[-2:]:
            raise ValueError(f"Mask shape {tuple(mask.shape)} differs from image size {tuple(imgs.shape[-2:])}")
        if self.img_size:
            size = (int(self.img_size), int(self.img_size))
            imgs = F.interpolate(imgs[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        if self.augment:
            flips = torch.rand(2, generator=self.gen) < 0.5
            dims = [d for d, f in zip((-1, -2), flips.tolist()) if f]
            if dims:
                imgs, mask = imgs.flip(dims), mask.flip(dims)
        return imgs, mask

    def __call__(self, samples: List) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        ids = samples[0][0]["chn_ids"]
        if any(not torch.equal(s[0]["chn_ids"], ids) for s in samples):
            raise ValueError("Segmentation batches need one band set; the dataset mixes channel ids")
        pairs = [self._one(x, m) for x, m in samples]
        p = self.patch_size
        h = max(i.shape[-2] for i, _ in pairs)
        w = max(i.shape[-1] for i, _ in pairs)
        H, W = math.ceil(h / p) * p, math.ceil(w / p) * p
        imgs = torch.zeros(len(pairs), pairs[0][0].shape[0], H, W)
        masks = torch.full((len(pairs), H, W), self.ignore_index, dtype=torch.long)
        for k, (im, m) in enumerate(pairs):
            imgs[k, :, :im.shape[-2], :im.shape[-1]] = im
            masks[k, :m.shape[-2], :m.shape[-1]] = m
        return {"imgs": imgs, "chn_ids": ids.unsqueeze(0).expand(len(pairs), *ids.shape).clone()}, masks


def check_no_transform(ds_cfg, where: str) -> None:
    """Dataset transforms act on the image only; refuse them for dense tasks."""
    if ds_cfg is not None and ds_cfg.get("transform"):
        raise ValueError(f"{where}: segmentation datasets take no 'transform' (it would move the image but not the "
                         "mask); use task.img_size to resize and task.augment for joint flips")


# ----------------------------------------------------------------------------------------------- model parts
def backbone_maps(vit: nn.Module, x: Dict[str, torch.Tensor], n_blocks: int) -> List[torch.Tensor]:
    """Normalised patch-grid maps ``(B, D, h, w)`` of the last ``n_blocks`` blocks."""
    if n_blocks > vit.n_blocks:
        raise ValueError(f"heads.n_last_blocks={n_blocks} but the backbone has {vit.n_blocks} blocks")
    return list(vit.get_intermediate_layers(x, n=n_blocks, reshape=True, norm=True))


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
    each group carries ``base_lr`` for the warm-up + cosine schedule."""
    from dinov2.utils.param_groups import get_param_groups

    named = [(f"backbone.{n}", p) for n, p in vit.named_parameters()]
    out = []
    for g in get_param_groups(named, int(vit.n_blocks), layer_decay):
        lr = base_lr * g["lr_multiplier"]
        out.append({"params": g["params"], "lr": lr, "base_lr": lr, "weight_decay": weight_decay * g["wd_multiplier"]})
    return out


def warmup_cosine(it: int, total: int, warmup: int) -> float:
    """lr factor: linear warm-up over ``warmup`` iterations, then cosine to 0 at ``total``."""
    return _warmup_cosine(it, total, warmup)


def head_key(decoder: str, lr: float) -> str:
    return f"{decoder}_lr_{lr:.5f}".replace(".", "_")


def _warmup_cosine(it: int, total: int, warmup: int) -> float:
    if it < warmup:
        return (it + 1) / warmup
    prog = (it - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


# ----------------------------------------------------------------------------------------------- metrics
class SegMetrics:
    """torchmetrics mIoU / per-class IoU / pixel accuracy, accumulated over batches."""

    def __init__(self, num_classes: int, ignore_index: int):
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        kw = dict(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)
        self.miou = MulticlassJaccardIndex(average="macro", **kw)
        self.per_class = MulticlassJaccardIndex(average="none", **kw)
        self.acc = MulticlassAccuracy(average="micro", **kw)
        self.present = torch.zeros(num_classes, dtype=torch.bool)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.cpu(), target.cpu()
        valid = target != self.ignore_index
        if ((target[valid] < 0) | (target[valid] >= self.num_classes)).any():
            bad = target[valid][(target[valid] < 0) | (target[valid] >= self.num_classes)].unique().tolist()
            raise ValueError(f"Label values {bad} outside [0, {self.num_classes}) and not the ignore index "
                             f"{self.ignore_index}; set task.num_classes or task.ignore_index")
        for m in (self.miou, self.per_class, self.acc):
            m.update(pred, target)
        self.present[pred[valid].unique()] = True
        self.present[target[valid].unique()] = True

    def compute(self) -> Dict[str, Any]:
        per = self.per_class.compute()
        return {"mIoU": float(self.miou.compute()), "pixel_acc": float(self.acc.compute()),
                "IoU_per_class": [float(v) if p else None for v, p in zip(per.tolist(), self.present.tolist())]}


# ----------------------------------------------------------------------------------------------- training
class DenseProbe:
    """Trains and scores the heads of one segmentation task."""

    def __init__(self, cfg, vit: nn.Module, num_classes: int, device: Optional[str]):
        self.cfg, self.vit, self.num_classes = cfg, vit, num_classes
        self.dev = resolve_device(device)
        self.amp = resolve_autocast(cfg.get("autocast_dtype", "auto"), self.dev)
        heads_cfg, optim = cfg.heads, cfg.optim
        self.n_blocks = min(int(heads_cfg.n_last_blocks), int(vit.n_blocks))
        self.ignore_index = int(cfg.task.get("ignore_index", 255))
        ft = optim.get("finetune") or {}
        self.finetune = bool(ft.get("enabled", False))
        decoders = [str(d) for d in heads_cfg.decoders]
        lrs = [float(lr) for lr in heads_cfg.learning_rates]
        if self.finetune and len(decoders) * len(lrs) != 1:
            raise ValueError(f"Fine-tuning trains the backbone with one head: set one decoder and one learning rate "
                             f"(got decoders={decoders}, learning_rates={lrs})")
        # baselines with stage-wise widths (CNNs) tell theirs; ViT blocks all have embed_dim channels
        dims_of = getattr(vit, "feature_dims", None)
        dims = list(dims_of(self.n_blocks)) if dims_of else [int(vit.embed_dim)] * self.n_blocks
        pyramid = not getattr(vit, "is_pyramid", False)
        self.heads = nn.ModuleDict({head_key(d, lr): build_dense_head(d, dims, num_classes,
                                                                      int(heads_cfg.get("channels", 128)), pyramid)
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

    def _forward(self, x: Dict[str, torch.Tensor], size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        with torch.autocast(device_type=self.dev.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if self.finetune and self.vit.training:
                maps = backbone_maps(self.vit, x, self.n_blocks)
            else:
                with torch.no_grad():
                    maps = backbone_maps(self.vit, x, self.n_blocks)
            maps = [m.float() for m in maps]
            out = {}
            for k, head in self.heads.items():
                out[k] = F.interpolate(head(maps), size=size, mode="bilinear", align_corners=False)
        return out

    def train(self, loader, epochs: float) -> List[float]:
        """Train all heads (and the backbone when fine-tuning); returns the per-iteration summed loss."""
        from tqdm import tqdm

        total = max(1, int(math.ceil(len(loader) * epochs)))
        warmup = int(round(float(self.cfg.optim.get("warmup_epochs", 0)) * len(loader)))
        self.vit.to(self.dev)
        self.heads.to(self.dev)
        if self.finetune:
            for p in self.vit.parameters():
                p.requires_grad_(True)
            set_drop_path(self.vit, float(self.ft_cfg.get("drop_path", 0.1)))
        opt = self._optimizer()
        losses: List[float] = []
        it = 0
        bar = tqdm(total=total, desc="segmentation train", disable=os.environ.get("PANOPTICON_NO_TQDM") == "1")
        while it < total:
            for x, y in loader:
                if it >= total:
                    break
                self.vit.train(self.finetune)
                self.heads.train()
                scale = _warmup_cosine(it, total, warmup)
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
        return losses

    @torch.no_grad()
    def score(self, loader, names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, Any]]:
        """Metrics of every (or the named) head on ``loader``."""
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


# ----------------------------------------------------------------------------------------------- figure
def _display_rgb(x: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, H, W, 3)`` in [0, 1]: the bands nearest 664 / 559 / 492 nm (or the first band as grey), 2-98 %
    stretched per band."""
    ids = x["chn_ids"][0]
    ids = ids[..., 0] if ids.ndim == 2 else ids
    idx = [int((ids.float() - w).abs().argmin()) for w in (664.0, 559.0, 492.0)] if (ids > 0).any() else [0, 0, 0]
    rgb = x["imgs"][:, idx].float()
    lo = torch.quantile(rgb.flatten(2), 0.02, dim=-1)[..., None, None]
    hi = torch.quantile(rgb.flatten(2), 0.98, dim=-1)[..., None, None]
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1).permute(0, 2, 3, 1)


@torch.no_grad()
def plot_predictions(path: Path, probe: "DenseProbe", head: str, loader, n: int = 4,
                     class_names: Optional[Sequence[str]] = None) -> None:
    """Figure of the first ``n`` samples of ``loader``: image, target mask, predicted mask (head ``head``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    x, y = next(iter(loader))
    x, y = {k: v[:n] for k, v in x.items()}, y[:n]
    probe.heads.eval()
    pred = probe._forward({k: v.to(probe.dev) for k, v in x.items()}, tuple(y.shape[-2:]))[head].argmax(1).cpu()
    k = probe.num_classes
    colours = plt.get_cmap("tab10" if k <= 10 else "tab20")(range(k))
    cmap = ListedColormap(list(colours) + [(0.6, 0.6, 0.6, 1.0)])  # last colour: ignored pixels
    show = lambda m: torch.where(m == probe.ignore_index, torch.full_like(m, k), m)  # noqa: E731
    rgb = _display_rgb(x)
    fig, axes = plt.subplots(len(y), 3, figsize=(7.5, 2.5 * len(y)), squeeze=False)
    for i in range(len(y)):
        for ax, img, title in zip(axes[i], (rgb[i], show(y[i]), show(pred[i])), ("image", "target", "prediction")):
            ax.imshow(img, cmap=None if img.ndim == 3 else cmap, vmin=0, vmax=k, interpolation="nearest")
            ax.set_title(title if i == 0 else "")
            ax.axis("off")
    if class_names:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color=colours[c], label=str(nm)) for c, nm in enumerate(class_names)],
                   loc="lower center", ncol=min(len(class_names), 5))
    fig.suptitle(f"test samples, head {head}")
    fig.tight_layout(rect=(0, 0.05 if class_names else 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- task runner
def _loader(ds, cfg, collate: DenseCollate, shuffle: bool, seed: int):
    dl = (cfg.get("optim") or {}).get("dl") or {}
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=int(dl.get("batch_size", 8)), shuffle=shuffle,
                                       num_workers=int(dl.get("num_workers", 0)), collate_fn=collate,
                                       generator=gen, drop_last=False)


def run_segmentation_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Eval-CLI runner of ``task.id: segmentation``; writes results and the trained head(s) into ``task_dir``."""
    import copy

    from dinov2.eval import results as res
    from dinov2.eval.tasks import build_dataset, num_classes_of

    seed = int(cfg.get("seed", 42))
    tests_cfg = list(cfg.get("test_datasets_list") or [])
    if not tests_cfg:
        raise ValueError(f"Segmentation task {task_dir} has no test_datasets_list (results would be empty)")
    for key in ("train_dataset", "val_dataset"):
        check_no_transform(cfg.get(key), f"{task_dir.name}: {key}")
    for i, t in enumerate(tests_cfg):
        check_no_transform(t, f"{task_dir.name}: test_datasets_list[{i}]")
    train_ds, val_ds = build_dataset(cfg.train_dataset, seed), build_dataset(cfg.val_dataset, seed)
    ncls = num_classes_of(train_ds, cfg)
    vit = getattr(backbone, "backbone", backbone)
    finetune = bool(((cfg.optim.get("finetune") or {}).get("enabled", False)))
    if finetune:  # never alter the caller's backbone: later tasks evaluate the same model
        vit = copy.deepcopy(vit)
    probe = DenseProbe(cfg, vit, ncls, device)
    patch = int(vit.patch_size)
    img_size = cfg.task.get("img_size")
    coll = dict(patch_size=patch, ignore_index=probe.ignore_index, img_size=img_size)
    train_dl = _loader(train_ds, cfg, DenseCollate(**coll, augment=bool(cfg.task.get("augment", True)), seed=seed),
                       True, seed)
    losses = probe.train(train_dl, float(cfg.optim.get("epochs", 10)))
    val = probe.score(_loader(val_ds, cfg, DenseCollate(**coll), False, seed))
    best = max(val, key=lambda k: val[k]["mIoU"])
    tests = {}
    for i, tcfg in enumerate(tests_cfg):
        name = tcfg.get("display_name") or f"test{i}"
        ds = build_dataset(tcfg, seed)
        test_dl = _loader(ds, cfg, DenseCollate(**coll), False, seed)
        tests[name] = probe.score(test_dl, [best])[best]
        if i == 0:
            plot_predictions(task_dir / "predictions.png", probe, best, test_dl,
                             class_names=list(cfg.task.get("class_names") or []) or None)
    rows = []
    for name, vals in tests.items():
        for m in ("mIoU", "pixel_acc"):
            rows.append((m if len(tests) == 1 else f"{name}/{m}", round(vals[m] * 100, 2), best))
    pct = lambda d: {k: (round(v * 100, 2) if isinstance(v, float) else  # noqa: E731
                         [None if u is None else round(u * 100, 2) for u in v]) for k, v in d.items()}
    res.write_json(task_dir / "results_eval_segmentation.json", {
        "best_head": best, "finetune": finetune, "val": pct(val[best]),
        "test": {n: pct(v) for n, v in tests.items()}, "all_val": {k: pct(v) for k, v in val.items()}})
    res.write_json(task_dir / "training_metrics.json", {"train_loss": losses})
    state = {"heads": probe.heads.state_dict(), "best_head": best, "num_classes": ncls,
             "n_last_blocks": probe.n_blocks, "ignore_index": probe.ignore_index, "img_size": img_size,
             "decoders": [str(d) for d in cfg.heads.decoders], "learning_rates": list(probe.lrs.values()),
             "channels": int(cfg.heads.get("channels", 128)),
             "class_names": [str(c) for c in (cfg.task.get("class_names") or [])]}
    if finetune:
        state["backbone"] = vit.state_dict()
    from dinov2.eval.head_metadata import head_metadata  # what `panopticon predict` needs (bands, stats, sizes)
    state.update(head_metadata(cfg, train_ds, vit, ncls))
    torch.save(state, task_dir / "model_final.pth")
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"segmentation {task_dir.name} ({best})", bars={m: v for m, v, _ in rows},
                  curves={"train loss": list(enumerate(losses))})
    return {m: v for m, v, _ in rows}
