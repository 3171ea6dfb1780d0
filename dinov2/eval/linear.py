"""Linear probes: many linear heads on a frozen backbone, trained at once.

Default (the published protocol, ``optim.feature_cache: false``): every training iteration draws a fresh batch
through the task's train transform (e.g. random resized crop + flips), so each epoch sees new augmentations of
every image, and the frozen backbone extracts the features on the fly. One backbone forward per batch (the last
``max(n_last_blocks_list)`` blocks) serves every head. Validation and test sets go through their deterministic
eval transform, so their features are extracted once and reused for every head and every validation.

Fast option (``optim.feature_cache: true``, NOT the published protocol): the train set is passed through the
backbone once (one augmented view per sample) and the heads train on those cached tensors. Much faster; equal to
the default only when the train transform is deterministic.

Common to both: one head ``Linear(feat_dim, num_classes)`` (weight ~ N(0, 0.01), bias 0) per
(n_last_blocks, pooling, learning rate); all heads see the same mini-batches, drawn from an endless stream of
seeded permutations of the train set (batches run across epoch boundaries); loss = sum of the heads' losses;
SGD (momentum 0.9, wd 0) with lr = base_lr * batch_size / 256 and a per-iteration cosine schedule to 0;
``max_iter = ceil(N * epochs / batch_size)``. Validation runs every ``eval_period_iter`` iterations and at the
end; the head best on the FIRST validation metric at the end is reported on every test set, with the
validation metric list (as published, whose ``test_metrics_list`` setting was ignored; it is not read here).

Intentional differences from the published code: the validation/test features are extracted once (the
published code re-runs the backbone at every validation; same numbers, less work); classifier checkpoints are
one ``model_final.pth`` (no periodic fvcore checkpoints / resume: a probe runs in minutes and fvcore is not a
dependency); CPU or CUDA with autocast only where configured (``autocast_dtype``;
the published code required CUDA fp16). Result keys with corrected metric values are added next to the
published ones (see ``dinov2.eval.metrics``).
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from dinov2.eval.metrics import Metric, compute_metrics
from dinov2.utils.progress import progress_bar

FeatKey = Tuple[int, str]  # (n_last_blocks, pooling)
FeatSet = Tuple[Mapping[FeatKey, torch.Tensor], torch.Tensor]  # (features per key, labels)


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


def _check_labels(y: torch.Tensor, num_classes: int, multilabel: bool, what: str) -> None:
    expected = 2 if multilabel else 1
    if y.ndim != expected or (multilabel and y.shape[1] != num_classes):
        raise ValueError(f"{what}: {'multilabel' if multilabel else 'multiclass'} linear probing needs labels of "
                         f"shape {'(N, %d)' % num_classes if multilabel else '(N,)'}, got {tuple(y.shape)}")
    if y.numel() and (y.min() < 0 or (not multilabel and y.max() >= num_classes)):
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}) (-1 marks a sample without label); got "
                         f"range [{int(y.min())}, {int(y.max())}]")


def batch_index_stream(n: int, batch_size: int, seed: int) -> Iterator[List[int]]:
    """Endless batches of indices from successive seeded permutations of ``range(n)`` (the published infinite
    sampler: batches run across epoch boundaries, every batch is full)."""
    gen = torch.Generator().manual_seed(seed)
    perm: List[int] = []
    while True:
        while len(perm) < batch_size:
            perm += torch.randperm(n, generator=gen).tolist()
        batch, perm = perm[:batch_size], perm[batch_size:]
        yield batch


def _passes(loader) -> Iterator:
    """Batches of an iterable dataset's loader, pass after pass (each pass shuffles anew)."""
    while True:
        n = 0
        for n, batch in enumerate(loader, 1):
            yield batch
        if n == 0:
            raise ValueError("the training stream yields no full batch (fewer samples than the batch size?)")


class _BatchStream(torch.utils.data.Sampler):
    """``batch_index_stream`` as a DataLoader batch sampler."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def __iter__(self) -> Iterator[List[int]]:
        return batch_index_stream(self.n, self.batch_size, self.seed)


class _ProbeTraining:
    """State of one run: heads, SGD, cosine schedule, validation history. Used by both protocols."""

    def __init__(self, dims: Mapping[FeatKey, int], learning_rates: Sequence[float], num_classes: int,
                 metrics: Sequence[Metric], max_iter: int, batch_size: int, multilabel: bool,
                 criterion: Optional[str], eval_period_iter: Optional[int], seed: int, device: torch.device):
        if not metrics:
            raise ValueError("Linear probing needs at least one validation metric")
        with torch.random.fork_rng(devices=[]):  # same initial heads in both modes, whatever ran before
            torch.manual_seed(seed)
            self.heads = LinearHeads(dims, learning_rates, num_classes).to(device)
        groups = [{"params": self.heads.heads[n].parameters(), "lr": lr * batch_size / 256.0}
                  for n, (_, lr) in self.heads.specs.items()]
        self.opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max_iter, eta_min=0)
        self.loss_fn = _loss_fn(multilabel, criterion)
        self.metrics, self.max_iter, self.period = list(metrics), max_iter, eval_period_iter
        self.history: Dict = {"train_loss": [], "val_curve": [], "max_iter": max_iter}

    def step(self, it: int, feats: Mapping[FeatKey, torch.Tensor], y: torch.Tensor) -> None:
        logits = self.heads(feats)
        loss = sum(self.loss_fn(out, y) for out in logits.values())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"Linear probe loss became {float(loss)} at iteration {it}")
        self.history["train_loss"].append((it, float(loss.detach()) / len(logits)))

    def validate_if_due(self, it: int, val: FeatSet) -> None:
        if (self.period and it % self.period == 0) or it == self.max_iter:
            res = evaluate_heads(self.heads, val[0], val[1], self.metrics)
            first = self.metrics[0].name
            best = max(res, key=lambda n: res[n][first])
            self.history["val_curve"].append((it, res[best][first]))
            self.history.update(best_classifier=best, val=res[best], all_val=res)

    def finish(self, tests: Mapping[str, FeatSet], device: torch.device) -> Dict:
        best = self.history["best_classifier"]
        self.history["test"] = {
            name: evaluate_heads(self.heads, {k: v.to(device).float() for k, v in f.items()}, y, self.metrics,
                                 [best])[best] for name, (f, y) in tests.items()}
        self.history["heads"] = self.heads
        return self.history


def _to(feats: Mapping[FeatKey, torch.Tensor], device: torch.device) -> Dict[FeatKey, torch.Tensor]:
    return {k: v.to(device).float() for k, v in feats.items()}


def train_linear_probes(train: FeatSet, val: FeatSet, tests: Mapping[str, FeatSet], num_classes: int,
                        metrics: Sequence[Metric], learning_rates: Sequence[float], epochs: float = 2,
                        batch_size: int = 256, multilabel: bool = False, criterion: Optional[str] = None,
                        eval_period_iter: Optional[int] = None, seed: int = 42, device: str = "cpu") -> Dict:
    """Feature-cache mode: train all heads on precomputed train features (NOT the published protocol).

    Returns ``{'best_classifier', 'val': {metric}, 'all_val': {head: {metric}}, 'test': {name: {metric}},
    'train_loss': [(iter, loss)], 'val_curve': [(iter, best_first_metric)], 'max_iter', 'heads'}``."""
    train_feats, train_y = train
    _check_labels(train_y, num_classes, multilabel, "train set")
    n_train = _check_feats(train_feats, train_y, "train set")
    _check_feats(val[0], val[1], "val set")
    if n_train == 0:
        raise ValueError("Linear probing needs a non-empty train set")
    dev = torch.device(device)
    max_iter = max(1, math.ceil(n_train * epochs / batch_size))
    run = _ProbeTraining({k: v.shape[1] for k, v in train_feats.items()}, learning_rates, num_classes, metrics,
                         max_iter, batch_size, multilabel, criterion, eval_period_iter, seed, dev)
    tf, ty, vf = _to(train_feats, dev), train_y.to(dev), _to(val[0], dev)
    batches = batch_index_stream(n_train, min(batch_size, n_train), seed)
    for it in range(1, max_iter + 1):
        idx = torch.as_tensor(next(batches), device=dev)
        run.step(it, {k: v[idx] for k, v in tf.items()}, ty[idx])
        run.validate_if_due(it, (vf, val[1]))
    return run.finish(tests, dev)


def train_linear_probes_online(backbone, train_dataset, val: FeatSet, tests: Mapping[str, FeatSet],
                               num_classes: int, metrics: Sequence[Metric], learning_rates: Sequence[float],
                               feat_specs: Sequence[FeatKey], epochs: float = 2, batch_size: int = 256,
                               num_workers: int = 0, multilabel: bool = False, criterion: Optional[str] = None,
                               eval_period_iter: Optional[int] = None, seed: int = 42,
                               device: Optional[str] = None, autocast_dtype: Optional[str] = "auto",
                               progress: bool = True) -> Dict:
    """Published protocol: every iteration loads a fresh batch of ``train_dataset`` (its transform draws new
    augmentations) and the frozen ``backbone`` (an ``EvalBackbone``) computes every head's features from one
    forward pass. ``val`` / ``tests`` are precomputed ``(features, labels)`` (deterministic eval transforms).
    Returns what ``train_linear_probes`` returns."""
    from dinov2.eval.features import batch_features, collate_eval, resolve_autocast, resolve_device

    n_train = len(train_dataset)
    if n_train == 0:
        raise ValueError("Linear probing needs a non-empty train set")
    _check_feats(val[0], val[1], "val set")
    dev = resolve_device(device)
    amp = resolve_autocast(autocast_dtype, dev)
    backbone.to(dev)
    torch.manual_seed(seed)  # reproducible augmentations (DataLoader workers derive their seeds from it)
    bs = min(batch_size, n_train)
    max_iter = max(1, math.ceil(n_train * epochs / batch_size))
    if isinstance(train_dataset, torch.utils.data.IterableDataset):  # streamed shards: pass after pass
        loader = torch.utils.data.DataLoader(train_dataset, batch_size=bs, drop_last=True, num_workers=num_workers,
                                             collate_fn=collate_eval, pin_memory=dev.type == "cuda")
        batches = _passes(loader)
    else:
        loader = torch.utils.data.DataLoader(train_dataset, batch_sampler=_BatchStream(n_train, bs, seed),
                                             num_workers=num_workers, collate_fn=collate_eval,
                                             pin_memory=dev.type == "cuda")
        batches = iter(loader)
    vf = _to(val[0], dev)
    run: Optional[_ProbeTraining] = None
    bar = progress_bar(range(1, max_iter + 1), desc="linear probe (on-the-fly features)", enabled=progress)
    for it in bar:
        groups, y = next(batches)
        _check_labels(y, num_classes, multilabel, "train batch")
        with torch.no_grad():  # frozen backbone; heads need normal (non-inference) tensors for autograd
            feats = batch_features(backbone, groups, len(y), feat_specs, dev, amp, desc="linear train")
        if run is None:  # feature sizes are known after the first forward
            run = _ProbeTraining({k: v.shape[1] for k, v in feats.items()}, learning_rates, num_classes,
                                 metrics, max_iter, batch_size, multilabel, criterion, eval_period_iter, seed, dev)
        run.step(it, feats, y.to(dev, non_blocking=True))
        run.validate_if_due(it, (vf, val[1]))
    del batches  # stops DataLoader workers of the endless sampler
    return run.finish(tests, dev)
