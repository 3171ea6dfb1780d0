"""Linear probes: many linear heads trained at once on CACHED frozen features.

The published engine runs the frozen backbone on every training batch. Because the backbone is frozen, we
extract the features of every (n_last_blocks, pooling) combination once (one pass over the train set with its
configured transform, i.e. one augmented view per sample) and train all heads on those tensors. This is orders
of magnitude faster and gives the same heads whenever the train transform is deterministic; with random train
augmentations the heads see one fixed view per sample instead of a fresh one each epoch.

All heads (feature key x learning rate) see the same shuffled mini-batches; loss = sum of the heads' losses;
SGD (momentum 0.9, wd 0) with lr = base_lr * batch_size / 256 and a per-iteration cosine schedule to 0;
``max_iter = ceil(N * epochs / batch_size)``. Validation runs every ``eval_period_iter`` iterations and at the
end; the head that is best on the FIRST validation metric at the end is reported on the test sets.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dinov2.eval.metrics import Metric, compute_metrics

FeatKey = Tuple[int, str]  # (n_last_blocks, pooling)


def head_name(n_blocks: int, pooling: str, lr: float) -> str:
    """Published head naming: ``classifier_{n}_blocks_pooling_{pool}_lr_{lr:.5f}`` with '.' -> '_'."""
    return f"classifier_{n_blocks}_blocks_pooling_{pooling}_lr_{lr:.5f}".replace(".", "_")


class LinearHeads(nn.Module):
    """One ``nn.Linear(feat_dim, num_classes)`` per (feature key, lr); weight ~ N(0, 0.01), bias 0."""

    def __init__(self, feat_dims: Mapping[FeatKey, int], lrs: Sequence[float], num_classes: int):
        super().__init__()
        self.specs: Dict[str, Tuple[FeatKey, float]] = {}
        self.heads = nn.ModuleDict()
        for key, dim in feat_dims.items():
            for lr in lrs:
                name = head_name(key[0], key[1], lr)
                lin = nn.Linear(dim, num_classes)
                nn.init.normal_(lin.weight, std=0.01)
                nn.init.zeros_(lin.bias)
                self.heads[name] = lin
                self.specs[name] = (key, float(lr))

    def forward(self, feats: Mapping[FeatKey, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: self.heads[name](feats[key]) for name, (key, _) in self.specs.items()}


def _loss_fn(multilabel: bool, criterion: Optional[str]):
    crit = criterion or ("MultiLabelSoftMarginLoss" if multilabel else "CrossEntropyLoss")
    if crit == "CrossEntropyLoss":
        return lambda logits, y: nn.functional.cross_entropy(logits, y.long())
    if crit == "MultiLabelSoftMarginLoss":
        return lambda logits, y: nn.functional.multilabel_soft_margin_loss(logits, y.float())
    if crit == "BCEWithLogitsLoss":
        return lambda logits, y: nn.functional.binary_cross_entropy_with_logits(logits, y.float())
    raise ValueError(f"Unknown criterion {crit!r}; use CrossEntropyLoss, MultiLabelSoftMarginLoss or "
                     "BCEWithLogitsLoss")


@torch.no_grad()
def _predict(heads: LinearHeads, feats: Mapping[FeatKey, torch.Tensor], names: Sequence[str],
             chunk: int = 4096) -> Dict[str, torch.Tensor]:
    n = next(iter(feats.values())).shape[0]
    outs: Dict[str, List[torch.Tensor]] = {name: [] for name in names}
    for s in range(0, n, chunk):
        for name in names:
            key = heads.specs[name][0]
            outs[name].append(heads.heads[name](feats[key][s:s + chunk]).float().cpu())
    return {name: torch.cat(v) for name, v in outs.items()}


def evaluate_heads(heads: LinearHeads, feats: Mapping[FeatKey, torch.Tensor], labels: torch.Tensor,
                   metrics: Sequence[Metric], names: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, float]]:
    """Metrics of every (or the named) head: ``{head: {metric: fraction}}``."""
    preds = _predict(heads, feats, list(names or heads.specs))
    return {name: compute_metrics(metrics, p, labels.cpu()) for name, p in preds.items()}


def _check_feats(feats: Mapping[FeatKey, torch.Tensor], labels: torch.Tensor, what: str) -> int:
    sizes = {k: v.shape[0] for k, v in feats.items()}
    if len(set(sizes.values())) != 1 or next(iter(sizes.values())) != labels.shape[0]:
        raise ValueError(f"{what}: feature rows {sizes} do not match {labels.shape[0]} labels")
    return labels.shape[0]


def train_linear_probes(train: Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor],
                        val: Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor],
                        tests: Mapping[str, Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor]],
                        num_classes: int, metrics: Sequence[Metric], learning_rates: Sequence[float],
                        epochs: float = 2, batch_size: int = 256, multilabel: bool = False,
                        criterion: Optional[str] = None, eval_period_iter: Optional[int] = None,
                        seed: int = 42, device: str = "cpu") -> Dict:
    """Train all heads; returns ``{'best_classifier', 'val': {metric}, 'test': {name: {metric}},
    'train_loss': [(iter, loss)], 'val_curve': [(iter, best_first_metric)], 'max_iter'}``."""
    if not metrics:
        raise ValueError("Linear probing needs at least one validation metric")
    train_feats, train_y = train
    expected = 2 if multilabel else 1
    if train_y.ndim != expected or (multilabel and train_y.shape[1] != num_classes):
        raise ValueError(f"{'multilabel' if multilabel else 'multiclass'} linear probing needs labels of shape "
                         f"{'(N, %d)' % num_classes if multilabel else '(N,)'}, got {tuple(train_y.shape)}")
    n_train = _check_feats(train_feats, train_y, "train set")
    _check_feats(val[0], val[1], "val set")
    if n_train == 0:
        raise ValueError("Linear probing needs a non-empty train set")
    torch.manual_seed(seed)
    dims = {k: v.shape[1] for k, v in train_feats.items()}
    heads = LinearHeads(dims, learning_rates, num_classes).to(device)
    groups = [{"params": heads.heads[n].parameters(), "lr": lr * batch_size / 256.0}
              for n, (_, lr) in heads.specs.items()]
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    max_iter = max(1, math.ceil(n_train * epochs / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max_iter, eta_min=0)
    loss_fn = _loss_fn(multilabel, criterion)
    tf = {k: v.to(device).float() for k, v in train_feats.items()}
    ty = train_y.to(device)
    vf = {k: v.to(device).float() for k, v in val[0].items()}
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n_train, generator=gen), 0
    first = metrics[0].name
    history: Dict = {"train_loss": [], "val_curve": [], "max_iter": max_iter}
    for it in range(1, max_iter + 1):
        if pos + batch_size > n_train and pos > 0:  # infinite sampler: reshuffle when an epoch is used up
            perm, pos = torch.randperm(n_train, generator=gen), 0
        idx = perm[pos:pos + batch_size].to(device)
        pos += batch_size
        logits = heads({k: v[idx] for k, v in tf.items()})
        loss = sum(loss_fn(out, ty[idx]) for out in logits.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Linear probe loss became {float(loss)} at iteration {it}")
        history["train_loss"].append((it, float(loss.detach()) / len(logits)))
        if (eval_period_iter and it % eval_period_iter == 0) or it == max_iter:
            val_res = evaluate_heads(heads, vf, val[1], metrics)
            best = max(val_res, key=lambda n: val_res[n][first])
            history["val_curve"].append((it, val_res[best][first]))
    history["best_classifier"] = best
    history["val"] = val_res[best]
    history["all_val"] = val_res
    history["test"] = {name: evaluate_heads(heads, {k: v.to(device).float() for k, v in f.items()}, y, metrics,
                                            [best])[best] for name, (f, y) in tests.items()}
    history["heads"] = heads
    return history
