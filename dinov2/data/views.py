"""Building and sampling the views of a pretraining sample (the contract of interfaces.md).

A view is `{'imgs': [Tensor(c_g,H_g,W_g) float32, ...], 'chn_ids': [Tensor(c_g,), ...]}`; a sample is a list
of views. Random choices use torch's global RNG only, so `torch.manual_seed` makes them reproducible.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

View = Dict[str, List[torch.Tensor]]


def make_view(imgs: Sequence[torch.Tensor], chn_ids: Sequence[torch.Tensor]) -> View:
    """Assemble one view, checking that groups and ids line up."""
    imgs, chn_ids = list(imgs), list(chn_ids)
    if len(imgs) != len(chn_ids) or not imgs:
        raise ValueError(f"a view needs as many chn_id tensors as image groups (>0), got {len(imgs)} groups and "
                         f"{len(chn_ids)} id tensors")
    for i, (x, c) in enumerate(zip(imgs, chn_ids)):
        if x.ndim != 3 or c.shape[0] != x.shape[0]:
            raise ValueError(f"group {i}: image shape {tuple(x.shape)} does not match chn_ids shape "
                             f"{tuple(c.shape)}")
    return {"imgs": imgs, "chn_ids": chn_ids}


def group_by_shape(bands: Sequence[torch.Tensor], ids: Sequence[torch.Tensor]) -> View:
    """Single bands `(1,H,W)` (or `(c,H,W)`) with their ids -> a view with one group per distinct (H,W), in
    order of first appearance and preserving band order within a group."""
    order: Dict[tuple, List[int]] = {}
    for i, b in enumerate(bands):
        order.setdefault(tuple(b.shape[-2:]), []).append(i)
    imgs = [torch.cat([bands[i] for i in idx], 0) for idx in order.values()]
    cids = [torch.cat([ids[i].reshape(bands[i].shape[0], *ids[i].shape[1:]) for i in idx], 0)
            for idx in order.values()]
    return make_view(imgs, cids)


def choose_indices(n: int, k: int, replace: bool = False) -> List[int]:
    """k indices in [0, n) drawn uniformly (without replacement unless `replace`)."""
    if n <= 0 or (not replace and k > n):
        raise ValueError(f"cannot choose {k} of {n} items without replacement")
    if replace:
        return torch.randint(n, (k,)).tolist()
    return torch.randperm(n)[:k].tolist()


def choose_large_enough(sizes: Sequence[int], k: int, min_size: int) -> List[int]:
    """fMoW 'large_enough' rule: the first index is uniform among items with size >= min_size, the other k-1
    distinct indices uniform among the rest."""
    large = [i for i, s in enumerate(sizes) if s >= min_size]
    if not large:
        raise ValueError(f"no item with size >= {min_size} among sizes {list(sizes)}")
    first = large[int(torch.randint(len(large), (1,)))]
    rest = [i for i in range(len(sizes)) if i != first]
    return [first] + [rest[j] for j in choose_indices(len(rest), k - 1)] if k > 1 else [first]


def check_sample(sample: List[View]) -> None:
    """Validate a pretraining sample against the contract (used by tests and debugging tools)."""
    if not isinstance(sample, list) or not sample:
        raise ValueError(f"a pretraining sample is a non-empty list of views, got {type(sample).__name__}")
    for v, view in enumerate(sample):
        if set(view) != {"imgs", "chn_ids"}:
            raise ValueError(f"view {v} has keys {sorted(view)}, expected ['chn_ids', 'imgs']")
        make_view(view["imgs"], view["chn_ids"])
        for g, x in enumerate(view["imgs"]):
            if x.dtype != torch.float32:
                raise ValueError(f"view {v} group {g}: dtype {x.dtype}, expected torch.float32")
