"""Common tail of every evaluation dataset: normalise, attach chn_ids, apply the eval transform."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch


class EvalDataset(torch.utils.data.Dataset):
    """Base of the eval readers. Subclasses set ``chn_ids``, ``normalizer`` (or None) and ``transform``."""

    chn_ids: torch.Tensor
    normalizer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    transform: Optional[Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None

    def make_sample(self, imgs: torch.Tensor, label: Any) -> Tuple[Dict[str, torch.Tensor], Any]:
        """``(x_dict, label)`` from raw ``(C,H,W)`` pixels: normalised, with a copy of the channel ids."""
        if self.normalizer is not None:
            imgs = self.normalizer(imgs)
        x_dict = {"imgs": imgs, "chn_ids": self.chn_ids.clone()}
        if self.transform is not None:
            x_dict = self.transform(x_dict)
        return x_dict, label
