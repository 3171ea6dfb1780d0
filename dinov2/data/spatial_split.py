"""Train / val / test splits for the user's own labelled data.

``block_split`` is spatial: the ground is cut into square blocks of ``block_m`` map units, whole blocks are
assigned to splits (a seeded shuffle of the blocks, filled in split order until each split holds its fraction of
the blocks), and every sample takes the split of the block that holds its centre. Neighbouring samples inside a
block therefore never straddle two splits, which is what keeps spatially autocorrelated labels from leaking from
train into test. ``random_split`` is the non-spatial fallback for data without coordinates.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

import torch

DEFAULT_FRACTIONS: Dict[str, float] = {"train": 0.7, "val": 0.15, "test": 0.15}
SPLIT_ALIASES = {"valid": "val", "validation": "val"}


def check_fractions(fractions: Mapping[str, float]) -> Dict[str, float]:
    """Validated split fractions (positive, summing to 1)."""
    out = {SPLIT_ALIASES.get(str(k), str(k)): float(v) for k, v in fractions.items()}
    if not out or any(v < 0 for v in out.values()) or abs(sum(out.values()) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    return out


def _assign(n_units: int, fractions: Mapping[str, float], seed: int) -> List[str]:
    """Split name of each of ``n_units`` units after a seeded shuffle, proportional to ``fractions``."""
    order = torch.randperm(n_units, generator=torch.Generator().manual_seed(seed)).tolist()
    names = list(fractions)
    bounds, acc = [], 0.0
    for name in names:
        acc += fractions[name]
        bounds.append(int(round(acc * n_units)))
    out = [names[-1]] * n_units
    start = 0
    for name, end in zip(names, bounds):
        for pos in range(start, end):
            out[order[pos]] = name
        start = end
    return out


def block_split(xs: Sequence[float], ys: Sequence[float], block_m: float,
                fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0) -> List[str]:
    """Split name of every sample (centre ``(xs[i], ys[i])`` in map units) by spatial blocks of ``block_m``."""
    if block_m <= 0:
        raise ValueError(f"block size must be positive, got {block_m}")
    fr = check_fractions(fractions)
    keys = [(math.floor(x / block_m), math.floor(y / block_m)) for x, y in zip(xs, ys)]
    blocks = sorted(set(keys))
    names = dict(zip(blocks, _assign(len(blocks), fr, seed)))
    return [names[k] for k in keys]


def random_split(n: int, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0) -> List[str]:
    """Split name of each of ``n`` samples (seeded, proportional; no spatial structure)."""
    return _assign(n, check_fractions(fractions), seed)


def select_split(names: Sequence[str], split: str, what: str) -> List[int]:
    """Indices whose split is ``split`` (``valid``/``validation`` accepted for ``val``); clear error if empty."""
    want = SPLIT_ALIASES.get(split, split)
    idx = [i for i, s in enumerate(names) if s == want]
    if not idx:
        raise ValueError(f"{what}: split {split!r} is empty (splits present: {sorted(set(names))}); use more "
                         "samples, a smaller block size or other split fractions")
    return idx
