"""Evaluation metrics implemented in plain torch (no torchmetrics).

Result key names follow the published engine:
- ``MulticlassAccuracy``        -> ``acc_top-{k}_{average}``
- ``MultilabelAccuracy``        -> ``MulLabAcc_top-{k}_{average}``
- ``MultiLabelAveragePrecision`` -> ``MulLabAvergPrec_{average}`` (mAP)
- ``MultiLabelF1Score``         -> ``MulLabF1ScoreMacro_{average}`` (the published name carries "Macro" for both
  averages; kept so result tables stay comparable)

Every metric takes ``preds`` = scores ``(N, C)`` (logits or probabilities) and ``target`` = class indices ``(N,)``
(multiclass) or a multi-hot ``(N, C)`` tensor (multilabel) and returns a fraction in [0, 1].
Macro averages run over the classes that occur in ``target`` (classes without support carry no information).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Sequence

import torch

_AVERAGES = ("micro", "macro")


def _check_average(average: str) -> None:
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")


def _check_2d(preds: torch.Tensor, name: str = "preds") -> None:
    if preds.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {tuple(preds.shape)}")


def multiclass_accuracy(preds: torch.Tensor, target: torch.Tensor, top_k: int = 1,
                        average: str = "micro") -> float:
    """Top-k accuracy. micro: fraction of samples whose class is among the k best scores;
    macro: mean over present classes of that fraction (balanced accuracy for k=1)."""
    _check_average(average)
    _check_2d(preds)
    target = target.long().reshape(-1)
    if target.shape[0] != preds.shape[0]:
        raise ValueError(f"preds has {preds.shape[0]} rows but target has {target.shape[0]} entries")
    n_cls = preds.shape[1]
    if target.numel() and (target.min() < 0 or target.max() >= n_cls):
        raise ValueError(f"target class ids must lie in [0, {n_cls}); got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    k = min(top_k, n_cls)
    topk = preds.float().topk(k, dim=1).indices
    hit = (topk == target[:, None]).any(dim=1).float()
    if average == "micro":
        return float(hit.mean()) if hit.numel() else float("nan")
    support = torch.bincount(target, minlength=n_cls).float()
    hits = torch.bincount(target, weights=hit, minlength=n_cls)
    present = support > 0
    return float((hits[present] / support[present]).mean())


def _as_probs(preds: torch.Tensor) -> torch.Tensor:
    """Treat scores outside [0, 1] (beyond float rounding) as logits (sigmoid), otherwise as probabilities."""
    preds = preds.float()
    if preds.numel() and (preds.min() < -1e-5 or preds.max() > 1 + 1e-5):
        return preds.sigmoid()
    return preds


def _check_multilabel(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_2d(preds)
    if target.shape != preds.shape:
        raise ValueError(f"multilabel target must have the shape of preds {tuple(preds.shape)}, "
                         f"got {tuple(target.shape)}")
    return (target > 0.5).float()


def _binarize(preds: torch.Tensor, top_k: int, threshold: float) -> torch.Tensor:
    """top_k == 1: threshold the probabilities; top_k > 1: the k best-scoring labels are the positives."""
    if top_k <= 1:
        return (_as_probs(preds) >= threshold).float()
    k = min(top_k, preds.shape[1])
    out = torch.zeros_like(preds, dtype=torch.float32)
    out.scatter_(1, preds.float().topk(k, dim=1).indices, 1.0)
    return out


def multilabel_accuracy(preds: torch.Tensor, target: torch.Tensor, top_k: int = 1, average: str = "micro",
                        threshold: float = 0.5) -> float:
    """Fraction of correct (sample, label) decisions; macro = mean over labels."""
    _check_average(average)
    target = _check_multilabel(preds, target)
    correct = (_binarize(preds, top_k, threshold) == target).float()
    if average == "micro":
        return float(correct.mean())
    return float(correct.mean(dim=0).mean())


def _average_precision_1d(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP = mean of the precision at the rank of every positive (ties broken by a stable sort)."""
    n_pos = target.sum()
    if n_pos <= 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    t = target[order]
    precision_at = t.cumsum(0) / torch.arange(1, t.numel() + 1, dtype=torch.float32)
    return float((precision_at * t).sum() / n_pos)


def multilabel_average_precision(preds: torch.Tensor, target: torch.Tensor, average: str = "macro") -> float:
    """Mean average precision. macro: mean of per-label AP over labels with positives; micro: AP of all
    (sample, label) pairs pooled."""
    _check_average(average)
    target = _check_multilabel(preds, target)
    preds = preds.float()
    if average == "micro":
        return _average_precision_1d(preds.reshape(-1), target.reshape(-1))
    aps = [_average_precision_1d(preds[:, c], target[:, c]) for c in range(preds.shape[1])
           if target[:, c].sum() > 0]
    return float(sum(aps) / len(aps)) if aps else float("nan")


def multilabel_f1(preds: torch.Tensor, target: torch.Tensor, average: str = "macro",
                  threshold: float = 0.5) -> float:
    """F1 of thresholded predictions. micro: pooled counts; macro: mean over labels with support or
    predictions."""
    _check_average(average)
    target = _check_multilabel(preds, target)
    pred = _binarize(preds, 1, threshold)
    tp = (pred * target).sum(0)
    fp = (pred * (1 - target)).sum(0)
    fn = ((1 - pred) * target).sum(0)
    if average == "micro":
        denom = 2 * tp.sum() + fp.sum() + fn.sum()
        return float(2 * tp.sum() / denom) if denom > 0 else 0.0
    denom = 2 * tp + fp + fn
    used = denom > 0
    return float((2 * tp[used] / denom[used]).mean()) if used.any() else 0.0


class Metric:
    """A configured metric: ``name`` is the result key, calling it returns a fraction in [0, 1]."""

    def __init__(self, name: str, fn: Callable[..., float], **kwargs):
        self.name = name
        self.fn = fn
        self.kwargs = kwargs

    def __call__(self, preds: torch.Tensor, target: torch.Tensor) -> float:
        return self.fn(preds, target, **self.kwargs)

    def __repr__(self) -> str:
        return f"Metric({self.name})"


_METRIC_IDS = ("MulticlassAccuracy", "MultilabelAccuracy", "MultiLabelAveragePrecision", "MultiLabelF1Score")


def build_metric(cfg: Mapping) -> Metric:
    """Build one metric from a config entry ``{id, top_k?, average?, threshold?}`` (other keys such as
    ``num_classes`` / ``num_labels`` are accepted and ignored: the class count comes from the scores)."""
    cfg = dict(cfg)
    mid = cfg.pop("id", None)
    top_k = int(cfg.get("top_k", 1) or 1)
    threshold = float(cfg.get("threshold", 0.5))
    if mid == "MulticlassAccuracy":
        avg = cfg.get("average", "micro")
        return Metric(f"acc_top-{top_k}_{avg}", multiclass_accuracy, top_k=top_k, average=avg)
    if mid == "MultilabelAccuracy":
        avg = cfg.get("average", "micro")
        return Metric(f"MulLabAcc_top-{top_k}_{avg}", multilabel_accuracy, top_k=top_k, average=avg,
                      threshold=threshold)
    if mid == "MultiLabelAveragePrecision":
        avg = cfg.get("average", "macro")
        return Metric(f"MulLabAvergPrec_{avg}", multilabel_average_precision, average=avg)
    if mid == "MultiLabelF1Score":
        avg = cfg.get("average", "macro")
        return Metric(f"MulLabF1ScoreMacro_{avg}", multilabel_f1, average=avg, threshold=threshold)
    raise ValueError(f"Unknown metric id {mid!r}; known ids: {', '.join(_METRIC_IDS)}")


def build_metrics(cfg_list: Sequence[Mapping]) -> List[Metric]:
    """Build a list of metrics; duplicate result keys are rejected (they would overwrite each other)."""
    metrics = [build_metric(c) for c in cfg_list]
    names = [m.name for m in metrics]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Duplicate metric keys in config: {dup}")
    return metrics


def compute_metrics(metrics: Sequence[Metric], preds: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """Evaluate every metric; returns ``{key: fraction}``."""
    return {m.name: m(preds, target) for m in metrics}
