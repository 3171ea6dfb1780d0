"""Segmentation metrics from one confusion matrix over the valid pixels (target != ignore index).

Per class c, with I_c = pixels of class c predicted as c, P_c = pixels predicted as c, T_c = pixels of class c,
U_c = P_c + T_c - I_c:

- ``IoU_c = I_c / (U_c + 1e-6)``; **``mIoU`` = mean of IoU_c over ALL classes**: a class absent from both the
  target and the prediction counts as 0, the convention of the PANGAEA benchmark's evaluator;
- ``mIoU_present_classes`` = mean of IoU_c over the classes present in the target;
- ``F1_c = 2 I_c / (P_c + T_c + 1e-6)``; ``mF1`` = mean over all classes;
- ``mAcc`` = overall pixel accuracy (sum of I_c over all valid pixels), as PANGAEA reports it; ``pixel_acc`` is
  the same number under this project's earlier key.

Values are fractions in [0, 1] (the task runner reports them in %); ``n_pixels`` counts the scored pixels. The
matrix is accumulated with torchmetrics.
"""
from __future__ import annotations

from typing import Any, Dict

import torch

EPS = 1e-6


def metrics_from_confusion(cm: torch.Tensor) -> Dict[str, Any]:
    """All metrics of a ``(K, K)`` confusion matrix (rows = target, columns = prediction)."""
    cm = cm.double()
    inter = cm.diag()
    target, pred = cm.sum(1), cm.sum(0)
    union = target + pred - inter
    iou = inter / (union + EPS)
    f1 = 2 * inter / (target + pred + EPS)
    present = target > 0
    total = cm.sum()
    acc = float(inter.sum() / total) if total > 0 else 0.0
    return {"mIoU": float(iou.mean()),
            "mIoU_present_classes": float(iou[present].mean()) if present.any() else 0.0,
            "mF1": float(f1.mean()), "mAcc": acc, "pixel_acc": acc,
            "IoU_per_class": [float(v) for v in iou.tolist()],
            "present_classes": [int(c) for c in present.nonzero().flatten().tolist()], "n_pixels": int(total)}


class SegMetrics:
    """Confusion matrix accumulated over batches of ``(pred, target)`` label maps; ``compute()`` gives the
    metrics of ``metrics_from_confusion``."""

    def __init__(self, num_classes: int, ignore_index: int):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.cm = MulticlassConfusionMatrix(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)
        self.num_classes, self.ignore_index = num_classes, ignore_index

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.cpu(), target.cpu()
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from the target's {tuple(target.shape)}")
        valid = target != self.ignore_index
        bad = target[valid][(target[valid] < 0) | (target[valid] >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"Label values {bad.unique().tolist()} outside [0, {self.num_classes}) and not the ignore "
                             f"index {self.ignore_index}; set task.num_classes or task.ignore_index")
        self.cm.update(pred, target)

    def compute(self) -> Dict[str, Any]:
        return metrics_from_confusion(self.cm.compute())
