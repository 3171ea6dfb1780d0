"""Frozen-backbone feature extraction for evaluation.

``backbone_to_features`` turns the raw outputs of the last blocks into one feature vector per image (the published
poolings); ``extract_features`` runs a frozen backbone over a dataset in batches (progress bar,
device from the environment, optional autocast) and returns CPU float32 features for several
(n_last_blocks, pooling) combinations at once, so every linear head / kNN classifier shares one pass.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.utils.progress import progress_bar

POOLINGS = ("avgpool", "cls", "knn", "lin", "DOFA_globalpool", "DOFA_no_globalpool")
BlockOut = Tuple[torch.Tensor, torch.Tensor]  # (raw patch tokens (B,N,D), raw cls token (B,D))


def resolve_device(device: Optional[str] = None) -> torch.device:
    """Explicit ``device`` > ``$PANOPTICON_DEVICE`` > CUDA when available > CPU."""
    name = device or os.environ.get("PANOPTICON_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_autocast(dtype: Optional[str], device: torch.device) -> Optional[torch.dtype]:
    """``fp16``/``bf16``/``fp32``/None -> torch dtype (None = no autocast). ``auto``: fp16 on CUDA, off on CPU."""
    table = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp32": None, "float32": None, None: None, "none": None}
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else None
    if dtype not in table:
        raise ValueError(f"Unknown autocast dtype {dtype!r}; use fp16, bf16, fp32, auto or none")
    return table[dtype]


def backbone_to_features(blocks: Sequence[BlockOut], use_n_blocks: int, pooling: str,
                         norm: nn.Module) -> torch.Tensor:
    """Pool the last ``use_n_blocks`` of ``blocks`` (ordered first to last) into ``(B, F)`` float features.

    avgpool: normed cls of each block ⊕ mean of the last block's normed patch tokens ((n+1)·D);
    cls: normed cls of each block (n·D); knn: normed last cls, L2-normalised; lin: normed last cls;
    DOFA_globalpool: norm(mean of raw last patch tokens); DOFA_no_globalpool: norm(raw last cls).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")
    if not 1 <= use_n_blocks <= len(blocks):
        raise ValueError(f"use_n_blocks={use_n_blocks} but {len(blocks)} block outputs were extracted")
    last = blocks[-use_n_blocks:]
    patch_last, cls_last = blocks[-1]
    if pooling == "avgpool":
        feats = [norm(c) for _, c in last] + [norm(patch_last).mean(dim=1)]
        out = torch.cat(feats, dim=-1)
    elif pooling == "cls":
        out = torch.cat([norm(c) for _, c in last], dim=-1)
    elif pooling == "knn":
        out = F.normalize(norm(cls_last).float(), dim=-1)
    elif pooling == "lin":
        out = norm(cls_last)
    elif pooling == "DOFA_globalpool":
        out = norm(patch_last.mean(dim=1))
    else:
        out = norm(cls_last)
    return out.float()


def _collate(samples: List) -> Tuple[List[Tuple[List[int], Dict[str, torch.Tensor]]], torch.Tensor]:
    """Group a batch by image shape and channel ids, so datasets mixing sensors (different channel counts or ids)
    or image sizes still run; returns ``([(positions in batch, stacked x_dict)], labels)``."""
    xs, ys = zip(*samples)
    groups: Dict[tuple, List[int]] = {}
    for i, x in enumerate(xs):
        ids = torch.as_tensor(x["chn_ids"])
        key = (tuple(x["imgs"].shape), tuple(ids.shape), tuple(ids.reshape(-1).tolist()), tuple(sorted(x)))
        groups.setdefault(key, []).append(i)
    batches = [(idx, {k: torch.stack([torch.as_tensor(xs[i][k]) for i in idx]) for k in xs[idx[0]]})
               for idx in groups.values()]
    label_list = [torch.as_tensor(-1 if y is None else y) for y in ys]  # label-free samples -> -1
    shapes = {tuple(t.shape) for t in label_list}
    if len(shapes) > 1:
        raise ValueError(f"Labels of one batch differ in shape {sorted(shapes)}")
    return batches, torch.stack(label_list)


collate_eval = _collate  # public name: the linear probe's on-the-fly loader batches the same way


def select_channels(x: Dict[str, torch.Tensor], idx: Sequence[int]) -> Dict[str, torch.Tensor]:
    """New batch dict holding only channels ``idx`` (imgs, chn_ids and spec_masks); the input is untouched."""
    idx_t = torch.as_tensor(list(idx), dtype=torch.long)
    n_ch = x["imgs"].shape[1]
    if idx_t.numel() == 0 or idx_t.min() < 0 or idx_t.max() >= n_ch:
        raise ValueError(f"Channel indices {list(idx)} invalid for {n_ch} channels")
    out = dict(x)
    out["imgs"] = x["imgs"][:, idx_t]
    out["chn_ids"] = x["chn_ids"][:, idx_t]
    if "spec_masks" in x:
        out["spec_masks"] = x["spec_masks"][:, idx_t]
    return out


def batch_features(backbone, groups: Sequence[Tuple[List[int], Dict[str, torch.Tensor]]], batch_size: int,
                   feat_specs: Sequence[Tuple[int, str]], device: torch.device, amp: Optional[torch.dtype] = None,
                   x_transform: Optional[Callable[[Dict], Dict]] = None,
                   desc: str = "features") -> Dict[Tuple[int, str], torch.Tensor]:
    """Features of one collated batch (``groups`` as made by the eval collate) on ``device``, rows in batch
    order: ``{(n_blocks, pooling): (batch_size, F) float32}``. One backbone forward per group serves every
    (n_blocks, pooling) spec. The caller chooses the grad mode (no_grad / inference_mode)."""
    n_max = max(n for n, _ in feat_specs)
    parts: Dict[Tuple[int, str], List[Tuple[List[int], torch.Tensor]]] = {tuple(s): [] for s in feat_specs}
    for idx, x in groups:
        if x_transform is not None:
            x = x_transform(x)
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
        with torch.autocast(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None):
            blocks = backbone.last_blocks(x, n_max)
            for n, pool in feat_specs:
                f = backbone_to_features(blocks, n, pool, backbone.norm)
                if not torch.isfinite(f).all():
                    raise FloatingPointError(f"Non-finite features ({desc}, {n} blocks, {pool}); check the "
                                             "input normalisation or disable autocast")
                parts[(n, pool)].append((idx, f.float()))
    out: Dict[Tuple[int, str], torch.Tensor] = {}
    for key, pieces in parts.items():
        dims = {p.shape[1] for _, p in pieces}
        if len(dims) > 1:
            raise ValueError(f"Feature sizes differ within a batch ({sorted(dims)})")
        if len(pieces) == 1 and pieces[0][0] == list(range(batch_size)):
            out[key] = pieces[0][1]
            continue
        full = torch.empty(batch_size, dims.pop(), device=device)
        for idx, piece in pieces:
            full[torch.as_tensor(idx, device=device)] = piece
        out[key] = full
    return out


@torch.inference_mode()
def extract_features(backbone, dataset, feat_specs: Sequence[Tuple[int, str]], batch_size: int = 64,
                     num_workers: int = 0, device: Optional[str] = None, autocast_dtype: Optional[str] = "auto",
                     x_transform: Optional[Callable[[Dict], Dict]] = None, desc: str = "features",
                     progress: bool = True) -> Tuple[Dict[Tuple[int, str], torch.Tensor], torch.Tensor]:
    """Run ``backbone`` (an ``EvalBackbone``) over ``dataset`` without shuffling.

    Returns ``({(n_blocks, pooling): (N, F) float32 CPU}, labels (N,) or (N, C))``. ``x_transform`` may edit a
    batched x_dict (e.g. channel selection) before the forward pass; it is called once per group of samples that
    share image shape and channel ids.
    """
    if len(dataset) == 0:
        raise ValueError(f"Cannot extract features ({desc}): the dataset is empty")
    dev = resolve_device(device)
    amp = resolve_autocast(autocast_dtype, dev)
    backbone.to(dev)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                                         num_workers=num_workers, collate_fn=_collate,
                                         pin_memory=dev.type == "cuda")
    feats: Dict[Tuple[int, str], List[torch.Tensor]] = {tuple(s): [] for s in feat_specs}
    labels: List[torch.Tensor] = []
    for groups, y in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        for key, f in batch_features(backbone, groups, len(y), feat_specs, dev, amp, x_transform, desc).items():
            feats[key].append(f.cpu())
        labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)
