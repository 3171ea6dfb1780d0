"""Model builders. Imports torch only (safe for `hubconf` and light inference)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Mapping

from . import vision_transformer as vits
from .panopticon import PanopticonPE
from .vision_transformer import ARCHS, DinoVisionTransformer

logger = logging.getLogger("dinov2")

# student-config key -> (constructor kwarg, default); defaults follow configs/defaults/pretrain_default.yaml
_STUDENT_KEYS = {
    "patch_size": ("patch_size", 14),
    "layerscale": ("init_values", 1e-5),
    "ffn_layer": ("ffn_layer", "mlp"),
    "block_chunks": ("block_chunks", 0),
    "qkv_bias": ("qkv_bias", True),
    "proj_bias": ("proj_bias", True),
    "ffn_bias": ("ffn_bias", True),
    "num_register_tokens": ("num_register_tokens", 0),
    "interpolate_offset": ("interpolate_offset", 0.1),
    "interpolate_antialias": ("interpolate_antialias", False),
    "in_chans": ("in_chans", 3),
    "embed_layer": ("embed_layer", "PatchEmbed"),
}
_PRESET_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio")


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain Python (resolved); plain objects pass through."""
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if type(obj).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf  # only reached when the caller already uses OmegaConf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def backbone_kwargs(args: Mapping, img_size: int = 224) -> Dict[str, Any]:
    """Constructor kwargs of `DinoVisionTransformer` from a `student` config section."""
    args = _plain(args)
    kwargs: Dict[str, Any] = {"img_size": img_size}
    for key, (name, default) in _STUDENT_KEYS.items():
        value = args.get(key, default)
        kwargs[name] = default if value is None else value
    kwargs["pe_args"] = dict(args.get("pe_args") or {})
    kwargs["pe_args"].pop("rgb_pe_distil", None)  # published-run leftover, not a PanopticonPE argument
    for key in _PRESET_OVERRIDES:
        if args.get(key) is not None:
            kwargs[key] = args[key]
    return kwargs


def _arch(args: Mapping) -> str:
    arch = str(args.get("arch", "vit_base")).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    return arch


def build_model(args: Mapping, only_teacher: bool = False, img_size: int = 224):
    """Build (student, teacher, embed_dim), or (teacher, embed_dim) with `only_teacher`, from a student config."""
    args = _plain(args)
    arch = _arch(args)
    kwargs = backbone_kwargs(args, img_size=img_size)
    teacher = ARCHS[arch](**kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = ARCHS[arch](
        **kwargs,
        drop_path_rate=float(args.get("drop_path_rate", 0.0) or 0.0),
        drop_path_uniform=bool(args.get("drop_path_uniform", False)),
    )
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg, only_teacher: bool = False):
    """Build from a full training config (uses `cfg.student`, img_size = `student.pos_emb_img_size`)."""
    student_cfg = _plain(cfg["student"])
    return build_model(student_cfg, only_teacher=only_teacher, img_size=int(student_cfg.get("pos_emb_img_size", 224)))


__all__ = ["build_model", "build_model_from_cfg", "backbone_kwargs", "DinoVisionTransformer", "PanopticonPE", "vits"]
