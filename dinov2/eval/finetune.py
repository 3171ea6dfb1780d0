"""Fine-tuning for classification tasks (``optim.finetune.enabled: true`` in a ``classification`` /
``multilabelclassification`` task): the backbone trains together with one linear head.

A copy of the evaluated backbone is trained (the evaluated checkpoint is never modified): every iteration draws a
fresh augmented batch, the head sees the configured (n_last_blocks, pooling) feature, and AdamW updates the head
(``heads.learning_rates``, exactly one) and the backbone with layer-wise lr decay (``optim.finetune.backbone_lr``
for the last block, ``layer_decay`` per block below), a linear warm-up of ``optim.warmup_epochs`` and a cosine
decay, stochastic depth ``optim.finetune.drop_path`` and the task's autocast (bf16/fp16 on GPU). Validation and
test features are extracted with the tuned backbone after training; results have the linear probe's format.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from dinov2.eval.features import backbone_to_features, collate_eval, resolve_autocast, resolve_device
from dinov2.eval.linear import LinearHeads, _BatchStream, _check_labels, _loss_fn, evaluate_heads
from dinov2.eval.metrics import Metric
from dinov2.eval.model_loading import EvalBackbone
from dinov2.eval.dense_probe import backbone_param_groups, set_drop_path, warmup_cosine
from dinov2.utils.progress import progress_bar

FeatKey = Tuple[int, str]


class TrainableBackbone(EvalBackbone):
    """``EvalBackbone``'s interface (``last_blocks``, ``norm``) on a backbone whose parameters train."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__(backbone)
        for p in self.backbone.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> "TrainableBackbone":
        torch.nn.Module.train(self, mode)
        return self


def finetune_classifier(backbone: EvalBackbone, train_dataset, spec: FeatKey, lr: float, num_classes: int,
                        multilabel: bool, criterion: Optional[str], epochs: float, batch_size: int,
                        ft_cfg: Mapping, warmup_epochs: float = 0.0, weight_decay: float = 0.05,
                        num_workers: int = 0, seed: int = 42, device: Optional[str] = None,
                        autocast_dtype: Optional[str] = "auto") -> Dict:
    """Train a copy of ``backbone`` and one linear head; returns ``{'backbone': TrainableBackbone (eval mode),
    'heads': LinearHeads, 'train_loss': [(iter, loss)], 'max_iter'}``."""
    n = len(train_dataset)
    if n == 0:
        raise ValueError("Fine-tuning needs a non-empty train set")
    dev = resolve_device(device)
    amp = resolve_autocast(autocast_dtype, dev)
    tuned = TrainableBackbone(copy.deepcopy(backbone.backbone)).to(dev)
    set_drop_path(tuned.backbone, float(ft_cfg.get("drop_path", 0.1)))
    torch.manual_seed(seed)
    bs = min(batch_size, n)
    total = max(1, math.ceil(n * epochs / batch_size))
    warmup = int(round(warmup_epochs * n / batch_size))
    loader = torch.utils.data.DataLoader(train_dataset, batch_sampler=_BatchStream(n, bs, seed),
                                         num_workers=num_workers, collate_fn=collate_eval,
                                         pin_memory=dev.type == "cuda")
    heads, opt, loss_fn = None, None, _loss_fn(multilabel, criterion)
    losses = []
    batches = iter(loader)
    for it in progress_bar(range(total), desc="fine-tuning"):
        groups, y = next(batches)
        _check_labels(y, num_classes, multilabel, "train batch")
        tuned.train(True)
        feats = []
        with torch.autocast(device_type=dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            for idx, x in groups:
                blocks = tuned.last_blocks({k: v.to(dev) for k, v in x.items()}, spec[0])
                feats.append((idx, backbone_to_features(blocks, spec[0], spec[1], tuned.norm).float()))
        f = torch.cat([t for _, t in feats])[torch.argsort(torch.tensor([i for idx, _ in feats for i in idx]))]
        if heads is None:  # the feature size is known after the first forward
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                heads = LinearHeads({spec: f.shape[1]}, [lr], num_classes).to(dev)
            opt = torch.optim.AdamW([{"params": heads.parameters(), "lr": lr, "base_lr": lr,
                                      "weight_decay": 0.0}] +
                                    backbone_param_groups(tuned.backbone, float(ft_cfg.get("backbone_lr", 1e-4)),
                                                          float(ft_cfg.get("layer_decay", 0.75)), weight_decay))
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * warmup_cosine(it, total, warmup)
        logits = next(iter(heads({spec: f}).values()))
        loss = loss_fn(logits, y.to(dev))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Fine-tuning loss became {float(loss)} at iteration {it}; lower the lrs")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append((it + 1, float(loss.detach())))
    del batches
    tuned.train(False)
    for p in tuned.parameters():
        p.requires_grad_(False)
    return {"backbone": tuned, "heads": heads, "train_loss": losses, "max_iter": total}


def evaluate_finetuned(out: Mapping, val: Tuple[Mapping, torch.Tensor],
                       tests: Mapping[str, Tuple[Mapping, torch.Tensor]], metrics: Sequence[Metric]) -> Dict:
    """Metrics of the fine-tuned head on features extracted with the tuned backbone (linear-probe format)."""
    heads = out["heads"].cpu()
    name = next(iter(heads.specs))
    val_res = evaluate_heads(heads, val[0], val[1], metrics)
    return {"best_classifier": name, "val": val_res[name], "all_val": val_res, "val_curve": [],
            "test": {t: evaluate_heads(heads, f, y, metrics, [name])[name] for t, (f, y) in tests.items()},
            "train_loss": out["train_loss"], "max_iter": out["max_iter"], "heads": heads}
