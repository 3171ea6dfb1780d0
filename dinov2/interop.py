"""State-dict conversion between this project's backbones and torchgeo's Panopticon (a timm ViT).

torchgeo's `panopticon_vitb14` is timm's `vit_base_patch14_dinov2` with the spectral patch embedding in place of
the convolutional one, kept under the attribute `model` (so its keys start with `model.`) and built for one image
size (224 px by default). The block, norm, token and patch-embedding parameter names are the same as here; the
differences are:

- the `model.` prefix;
- `pos_embed` covers the model's own grid, `(1, 1 + (img_size / 14)^2, dim)`, instead of the 37 x 37 grid (518 px)
  of the released checkpoint; resizing uses bicubic interpolation with antialiasing (what torchgeo does when it
  loads the released file);
- no `mask_token` (only the iBOT masked-token objective uses it; converting back fills zeros unless given).

Chunked block names (`blocks.<chunk>.<i>.`, `block_chunks > 0`) are flattened to `blocks.<i>.`. Backbones with
register tokens or a SwiGLU feed-forward have no counterpart in that layout and are refused.
"""
from __future__ import annotations

import functools
import json
import math
import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

TORCHGEO_PREFIX = "model."
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def pos_embed_grid(pos_embed: torch.Tensor) -> int:
    """Side of the square patch grid of a `(1, 1 + g*g, dim)` position embedding (class token first)."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, 1 + g*g, dim), got {tuple(pos_embed.shape)}")
    g = math.isqrt(pos_embed.shape[1] - 1)
    if g * g != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed has {pos_embed.shape[1] - 1} patch positions, not a square grid")
    return g


RESAMPLE = ("antialias", "forward")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int, resample: str = "antialias",
                     offset: float = 0.1) -> torch.Tensor:
    """Resize the patch part of `pos_embed` to `grid x grid`; the class token is kept. `resample`: "antialias"
    (bicubic with antialiasing, what torchgeo does when it loads the released file) or "forward" (what this
    project's forward pass does at that grid: bicubic, no antialiasing, DINOv2's +`offset`)."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample {resample!r} must be one of {RESAMPLE}")
    old = pos_embed_grid(pos_embed)
    if old == grid:
        return pos_embed.clone()
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    img = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    if resample == "forward" and offset:
        scale = (grid + offset) / old
        img = F.interpolate(img, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:
        img = F.interpolate(img, size=(grid, grid), mode="bicubic", antialias=resample == "antialias",
                            align_corners=False)
    patches = img.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)
    return torch.cat([cls, patches], dim=1)


def _grid_for(img_size: int, patch_size: int) -> int:
    if img_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of the patch size {patch_size}")
    return img_size // patch_size


def _check_backbone(sd: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in ("cls_token", "pos_embed", "norm.weight") if k not in sd]
    if missing:
        raise ValueError(f"not a ViT backbone state dict: missing {missing} (keys start with {sorted(sd)[:3]})")
    if "register_tokens" in sd:
        raise ValueError("backbones with register tokens have no counterpart in torchgeo's Panopticon layout")
    swiglu = [k for k in sd if ".mlp.w12." in k]
    if swiglu:
        raise ValueError(f"SwiGLU feed-forward ({swiglu[0]}) has no counterpart in timm's vit_base_patch14_dinov2")


def to_torchgeo(state_dict: Mapping[str, torch.Tensor], img_size: int = 224, patch_size: int = 14,
                resample: str = "antialias") -> Dict[str, torch.Tensor]:
    """This project's backbone state dict (hub teacher file, or `backbone_state_dict` of a training checkpoint)
    -> torchgeo's Panopticon state dict for a model built with `img_size`. `resample="forward"` resizes the position
    table as this project's forward pass does at that size (torchgeo's outputs then equal this project's there)."""
    _check_backbone(state_dict)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "mask_token":
            continue
        key = _CHUNKED.sub(r"blocks.\1.", key)
        if key == "pos_embed":
            value = resize_pos_embed(value, _grid_for(img_size, patch_size), resample)
        out[TORCHGEO_PREFIX + key] = value
    return out


def from_torchgeo(state_dict: Mapping[str, torch.Tensor], img_size: int = 518, patch_size: int = 14,
                  mask_token: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """torchgeo's Panopticon state dict -> this project's backbone state dict with `pos_embed` on the grid of
    `img_size` (518 px: the released layout that `torch.hub.load(..., 'panopticon_vitb14', weights=...)` loads).
    `mask_token` (shape `(1, dim)`) defaults to zeros."""
    stripped = {(k[len(TORCHGEO_PREFIX):] if k.startswith(TORCHGEO_PREFIX) else k): v for k, v in state_dict.items()}
    _check_backbone(stripped)
    extra = [k for k in stripped if k.startswith(("head.", "fc_norm.", "reg_token"))]
    if extra:
        raise ValueError(f"keys without a counterpart in this project's backbone: {extra}")
    out = dict(stripped)
    out["pos_embed"] = resize_pos_embed(stripped["pos_embed"], _grid_for(img_size, patch_size))
    dim = stripped["cls_token"].shape[-1]
    if mask_token is None:
        mask_token = torch.zeros(1, dim, dtype=stripped["cls_token"].dtype)
    if tuple(mask_token.shape) != (1, dim):
        raise ValueError(f"mask_token must have shape (1, {dim}), got {tuple(mask_token.shape)}")
    out["mask_token"] = mask_token
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'torchgeo' when every key carries the `model.` prefix, else 'panopticon'."""
    keys = list(state_dict)
    return "torchgeo" if keys and all(k.startswith(TORCHGEO_PREFIX) for k in keys) else "panopticon"


@functools.lru_cache(maxsize=8)
def _layout(student_json: str, img_size: int) -> Tuple[Tuple[str, tuple], ...]:
    from dinov2.models import build_model

    cfg = dict(json.loads(student_json), block_chunks=0)  # converted state dicts have flat block names
    model, _ = build_model(cfg, only_teacher=True, img_size=img_size)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_layout(student_cfg: Mapping, img_size: int, layout: str = "panopticon") -> Dict[str, tuple]:
    """Key -> shape of a backbone built from a `student` config section with its position table on the grid of
    `img_size`, in this project's layout or torchgeo's (prefix `model.`, no `mask_token`)."""
    shapes = dict(_layout(json.dumps(student_cfg, sort_keys=True, default=str), int(img_size)))
    if layout == "torchgeo":
        return {TORCHGEO_PREFIX + k: s for k, s in shapes.items() if k != "mask_token"}
    return shapes


def layout_problems(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple],
                    limit: int = 5) -> List[str]:
    """What keeps `state_dict` from being exactly the `expected` layout: missing and unexpected keys, wrong
    shapes, non-finite values (at most `limit` of each kind; empty list: it fits)."""
    problems: List[str] = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k} has shape {tuple(state_dict[k].shape)}, expected {expected[k]}" for k in expected
              if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    nonfinite = [k for k, v in state_dict.items()
                 if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes),
                        ("NaN or infinite values in", nonfinite)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{what}: {', '.join(items[:limit])}{more}")
    return problems


def torchgeo_table_difference(state_dict: Mapping[str, torch.Tensor], x: Mapping[str, torch.Tensor],
                              student_cfg: Optional[Mapping] = None) -> float:
    """Max |difference| of the normed class tokens of `x` between this project's model (the stored position table,
    interpolated to the input's grid in every forward pass) and torchgeo's (the table resampled once, at
    conversion, to the input's grid), both built from the same `state_dict` in this project's layout through the
    conversion code (`to_torchgeo` / `from_torchgeo`). Zero when the input's grid is the stored one."""
    from dinov2.hub import HUB_STUDENT_CFG
    from dinov2.models import build_model

    cfg = dict(student_cfg or HUB_STUDENT_CFG, block_chunks=0)
    patch = int(cfg.get("patch_size", 14))
    height, width = x["imgs"].shape[-2:]
    if height != width:
        raise ValueError(f"torchgeo's model is built for square images; got {height}x{width}")
    stored = pos_embed_grid(state_dict["pos_embed"]) * patch
    ours, _ = build_model(cfg, only_teacher=True, img_size=stored)
    ours.load_state_dict(state_dict, strict=True)
    theirs, _ = build_model(cfg, only_teacher=True, img_size=int(height))
    theirs.load_state_dict(from_torchgeo(to_torchgeo(state_dict, img_size=int(height), patch_size=patch),
                                         img_size=int(height), patch_size=patch,
                                         mask_token=state_dict.get("mask_token")), strict=True)
    with torch.no_grad():
        return float((ours.eval()(dict(x)) - theirs.eval()(dict(x))).abs().max())
