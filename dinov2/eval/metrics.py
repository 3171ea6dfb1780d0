"""Evaluation metrics computed with ``torchmetrics`` (the library the published engine used, version 0.10.3).

Result keys follow the published engine:

- ``MulticlassAccuracy``         -> ``acc_top-{k}_{average}``
- ``MultilabelAccuracy``         -> ``MulLabAcc_top-{k}_{average}``
- ``MultiLabelAveragePrecision`` -> ``MulLabAvergPrec_{average}`` (mAP)
- ``MultiLabelF1Score``          -> ``MulLabF1ScoreMacro_{average}`` (the published name carries "Macro" for both
  averages; kept so result tables stay comparable)

Every metric takes ``preds`` = scores ``(N, C)`` and ``target`` = class indices ``(N,)`` (multiclass) or a
multi-hot ``(N, C)`` tensor (multilabel) and returns a fraction in [0, 1]. Multilabel scores outside [0, 1] are
treated as logits (sigmoid), scores inside as probabilities; a label is predicted when its probability is
``> threshold`` (0.5), as in torchmetrics.

Under each published key the value is the one torchmetrics 0.10.3 gives, so numbers sit next to the paper's.
Where that version behaves differently from what the key promises, the sound value is reported as well, under
its own key:

- ``MultilabelAccuracy`` with ``top_k > 1``: torchmetrics 0.10.3 ignored ``top_k`` for multilabel inputs, so the
  published ``MulLabAcc_top-5_micro`` is the plain thresholded accuracy (equal to ``MulLabAcc_top-1_micro``).
  ``MulLabAcc_top-{k}_{average}_topk_applied`` is the accuracy when the k best-scoring labels of every sample
  are the predicted positives.
- ``MulticlassAccuracy`` with ``average: macro``: torchmetrics 0.10.3 averages the per-class top-k recall over
  all ``num_classes`` classes, a class absent from the targets counting as 0 (newer torchmetrics versions drop
  some of those classes). ``acc_top-{k}_macro_present_classes`` averages over the classes that occur in the
  targets (balanced accuracy for k = 1). Both are equal whenever every class occurs.

Other version notes (no extra key needed): ``MulLabAvergPrec_macro`` averages the per-label AP over labels that
have at least one positive, as 0.10.3 did (torchmetrics >= 1 counts such labels as 0); macro F1 counts a label
with no positives and no predictions as 0 in every version. ``top_k`` larger than the number of classes is
clipped to it (a 2-class task with the default top-5 metric reports 1.0).

Dense (segmentation) metrics live with the segmentation probe (``dinov2.eval.segmentation.SegMetrics``:
torchmetrics' Jaccard index and accuracy, accumulated over batches).
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

_AVERAGES = ("micro", "macro")
CORRECTED_SUFFIXES = ("_topk_applied", "_present_classes")  # keys of corrected values (not published keys)


def is_corrected_key(key: str) -> bool:
    """True for a result key holding a corrected value that the published engine did not report."""
    return key.endswith(CORRECTED_SUFFIXES)


def _check_average(average: str) -> None:
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")


def _check_2d(preds: torch.Tensor, name: str = "preds") -> None:
    if preds.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {tuple(preds.shape)}")
    if preds.shape[0] == 0:
        raise ValueError(f"{name} is empty: a metric needs at least one sample")


def _multiclass_inputs(preds: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_2d(preds)
    target = target.long().reshape(-1)
    if target.shape[0] != preds.shape[0]:
        raise ValueError(f"preds has {preds.shape[0]} rows but target has {target.shape[0]} entries")
    n_cls = preds.shape[1]
    if target.min() < 0 or target.max() >= n_cls:
        raise ValueError(f"target class ids must lie in [0, {n_cls}); got range "
                         f"[{int(target.min())}, {int(target.max())}]")
    return preds.float(), target


def multiclass_accuracy(preds: torch.Tensor, target: torch.Tensor, top_k: int = 1, average: str = "micro",
                        present_classes_only: bool = False) -> float:
    """Top-k accuracy. micro: fraction of samples whose class is among the k best scores. macro: mean per-class
    top-k recall over all classes (published; absent classes count 0) or, with ``present_classes_only``, over
    the classes that occur in ``target``."""
    from torchmetrics.functional.classification import multiclass_accuracy as tm_accuracy

    _check_average(average)
    preds, target = _multiclass_inputs(preds, target)
    n_cls = preds.shape[1]
    k = max(1, min(int(top_k), n_cls))
    if average == "micro":
        return float(tm_accuracy(preds, target, num_classes=n_cls, top_k=k, average="micro"))
    per_class = tm_accuracy(preds, target, num_classes=n_cls, top_k=k, average="none")
    if present_classes_only:
        per_class = per_class[torch.bincount(target, minlength=n_cls) > 0]
    return float(per_class.mean())


def _multilabel_inputs(preds: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_2d(preds)
    if target.shape != preds.shape:
        raise ValueError(f"multilabel target must have the shape of preds {tuple(preds.shape)}, "
                         f"got {tuple(target.shape)}")
    return preds.float(), (target > 0.5).long()


def multilabel_accuracy(preds: torch.Tensor, target: torch.Tensor, top_k: int = 1, average: str = "micro",
                        threshold: float = 0.5, apply_top_k: bool = False) -> float:
    """Fraction of correct (sample, label) decisions; macro = mean over labels. Decisions come from the
    threshold (published, whatever ``top_k``) or, with ``apply_top_k`` and ``top_k > 1``, from the k best
    scores of every sample."""
    from torchmetrics.functional.classification import multilabel_accuracy as tm_accuracy
    from torchmetrics.utilities.data import select_topk

    _check_average(average)
    preds, target = _multilabel_inputs(preds, target)
    n = preds.shape[1]
    if apply_top_k and top_k > 1:
        preds = select_topk(preds, topk=min(int(top_k), n), dim=1).long()  # integer preds are used as they are
    return float(tm_accuracy(preds, target, num_labels=n, threshold=threshold, average=average))


def multilabel_average_precision(preds: torch.Tensor, target: torch.Tensor, average: str = "macro") -> float:
    """Mean average precision. macro: mean of per-label AP over labels with positives; micro: AP of all
    (sample, label) pairs pooled."""
    from torchmetrics.functional.classification import multilabel_average_precision as tm_ap

    _check_average(average)
    preds, target = _multilabel_inputs(preds, target)
    has_pos = target.sum(dim=0) > 0
    if not has_pos.any():
        raise ValueError("Average precision is undefined: no label has a positive sample in the targets")
    with warnings.catch_warnings():  # labels without positives are excluded below; their warning is noise
        warnings.simplefilter("ignore", UserWarning)
        if average == "micro":
            return float(tm_ap(preds, target, num_labels=preds.shape[1], average="micro"))
        per_label = tm_ap(preds, target, num_labels=preds.shape[1], average="none")
    return float(per_label[has_pos].mean())


def multilabel_f1(preds: torch.Tensor, target: torch.Tensor, average: str = "macro",
                  threshold: float = 0.5) -> float:
    """F1 of thresholded predictions. micro: pooled counts; macro: mean over all labels (a label without
    positives and predictions counts 0, as in torchmetrics)."""
    from torchmetrics.functional.classification import multilabel_f1_score

    _check_average(average)
    preds, target = _multilabel_inputs(preds, target)
    return float(multilabel_f1_score(preds, target, num_labels=preds.shape[1], threshold=threshold,
                                     average=average))


class Metric:
    """A configured metric. ``name`` is the published result key, calling it returns that value (a fraction);
    ``extra`` maps further keys (corrected variants) to their functions; ``compute`` returns every key."""

    def __init__(self, name: str, fn: Callable[..., float],
                 extra: Optional[Mapping[str, Callable[[torch.Tensor, torch.Tensor], float]]] = None, **kwargs):
        self.name = name
        self.fn = fn
        self.kwargs = kwargs
        self.extra = dict(extra or {})

    @property
    def keys(self) -> List[str]:
        return [self.name, *self.extra]

    def __call__(self, preds: torch.Tensor, target: torch.Tensor) -> float:
        return self.fn(preds, target, **self.kwargs)

    def compute(self, preds: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        out = {self.name: self(preds, target)}
        out.update({key: fn(preds, target) for key, fn in self.extra.items()})
        return out

    def __repr__(self) -> str:
        return f"Metric({', '.join(self.keys)})"


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
        _check_average(avg)
        extra = {}
        if avg == "macro":
            extra[f"acc_top-{top_k}_macro_present_classes"] = lambda p, t: multiclass_accuracy(
                p, t, top_k=top_k, average="macro", present_classes_only=True)
        return Metric(f"acc_top-{top_k}_{avg}", multiclass_accuracy, extra, top_k=top_k, average=avg)
    if mid == "MultilabelAccuracy":
        avg = cfg.get("average", "micro")
        _check_average(avg)
        extra = {}
        if top_k > 1:
            extra[f"MulLabAcc_top-{top_k}_{avg}_topk_applied"] = lambda p, t: multilabel_accuracy(
                p, t, top_k=top_k, average=avg, threshold=threshold, apply_top_k=True)
        return Metric(f"MulLabAcc_top-{top_k}_{avg}", multilabel_accuracy, extra, top_k=top_k, average=avg,
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
    names = [k for m in metrics for k in m.keys]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"Duplicate metric keys in config: {dup}")
    return metrics


def compute_metrics(metrics: Sequence[Metric], preds: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """Evaluate every metric; returns ``{key: fraction}`` (published keys and corrected variants)."""
    out: Dict[str, float] = {}
    for m in metrics:
        out.update(m.compute(preds, target))
    return out
