"""Provenance of stored results: a signature over everything that decides a scene's values, so that a finished
scene (or a finished strip of an interrupted one) is reused only when it provably matches this run.

A signature is a JSON-able dict: the weights' content digest (never their path; random-init weights are seeded,
so their digest is fixed too), tiling and validity settings, the normalisation statistics' values, precision,
model input size, the input files' identity (absolute path, size, modification time; for URLs size and ETag or
Last-Modified), the mask and clip box when given, and a format version;
`predict` adds its head file's digest. `changes` names what differs, for the log line of a recomputed scene.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

FORMAT_VERSION = 3  # 3: signatures over content digests and statistics values; absurd pixels are no-data
STATS_VERSION = 1  # version of the scene statistics algorithm (robust mean/std of a decimated read)


def input_identity(paths: Sequence[str]) -> List[List[Any]]:
    """[absolute path, size, mtime in ns] of each local input file; [URL, size, ETag or Last-Modified] of each
    remote one (one HEAD request each, no pixel read)."""
    from dinov2.data.remote import is_url, remote_identity

    urls = [p for p in paths if is_url(p)]
    remote = {}
    if urls:  # all HEAD requests at once: one round trip, whatever the number of files
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
            remote = dict(zip(urls, pool.map(remote_identity, urls)))
    out = []
    for p in paths:
        if is_url(p):
            out.append(remote[p])
            continue
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def norm_identity(mode: str, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> Dict[str, Any]:
    """The normalisation as it enters a signature: the values when they are given (scenes YAML, a stats file,
    a dataset's statistics); for per-scene statistics the algorithm version (the values follow from the input
    files and no-data values, which the signature holds too)."""
    if mean is not None and std is not None:
        return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return {"scene_stats": STATS_VERSION} if mode == "scene" else {"mode": str(mode)}


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def changes(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> str:
    """What differs between two signatures, one clause per key ('' when equal)."""
    if old is None:
        return ""
    if not isinstance(old, dict):
        return "unreadable stored signature"
    keys = sorted(set(old) | set(new))
    diffs = [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in keys if old.get(k) != new.get(k)]
    return "; ".join(diffs)


def checked_digest(model, what: str) -> str:
    """Content digest of `model`'s weights (`dinov2.utils.digest.state_dict_digest`); weights that are not finite
    are refused, naming the tensors (such a model can only produce NaN maps)."""
    import torch

    from dinov2.utils.digest import state_dict_digest

    state = model.state_dict()
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{what} has non-finite weights in {len(bad)} tensor(s), e.g. {bad[:3]}")
    return state_dict_digest(state)
