"""Frozen backbones for evaluation, built from whatever a user points at.

Accepted model objects (``resolve_model_objs``):
- a training run folder holding ``model_final.pth`` (and ``config.yaml``; keys ``teacher.backbone.*``)
  -> outputs in ``<run>/eval_model_final``;
- a training checkpoint ``<run>/model_*.pth`` (``{'model': {...teacher.backbone.*}}``) -> ``<run>/eval_<stem>``;
- a periodic teacher checkpoint ``<run>/eval/<iter>/teacher_checkpoint.pth`` (``{'teacher': {backbone.*}}``)
  -> outputs in ``<run>/eval/<iter>``;
- a hub-format raw backbone state dict (e.g. ``panopticon_vitb14_teacher.pth``; keys ``blocks.*``,
  ``patch_embed.*``) -> published ViT-B/14 configuration unless a ``config.yaml`` sits beside it;
- ``;``-separated lists and globs of the above; other folders are searched recursively.
The architecture comes from the ``student`` section of the run's ``config.yaml``.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

logger = logging.getLogger("dinov2")

# published torch.hub configuration of panopticon_vitb14, as a student config section
HUB_STUDENT_CFG: Dict[str, Any] = {
    "arch": "vit_base", "patch_size": 14, "layerscale": 1e-5, "ffn_layer": "mlp", "block_chunks": 0,
    "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "num_register_tokens": 0,
    "interpolate_antialias": False, "interpolate_offset": 0.1, "embed_layer": "PanopticonPE",
    "pos_emb_img_size": 518,
    "pe_args": {"attn_dim": 2304, "chnfus_cfg": {"layer_norm": False, "attn_cfg": {"num_heads": 16}}},
}


@dataclass
class ModelSpec:
    """Where a backbone comes from and where its results go."""

    ckpt_path: str
    student_cfg: Dict[str, Any]
    weights: List[Dict[str, Any]]
    output_dir: str
    run_dir: Optional[str] = None
    kind: str = "run"
    extra: Dict[str, Any] = field(default_factory=dict)


class EvalBackbone(nn.Module):
    """A frozen ViT in eval mode. ``last_blocks(x, n)`` -> raw ``(patch tokens, cls)`` of the last n blocks;
    ``norm`` is the backbone's final LayerNorm (applied by the poolings)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    @property
    def norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    def train(self, mode: bool = True) -> "EvalBackbone":
        return super().train(False)  # stays frozen in eval mode

    @property
    def n_blocks(self) -> int:
        return int(self.backbone.n_blocks)

    def last_blocks(self, x: Dict[str, torch.Tensor], n: int):
        if n > self.n_blocks:
            raise ValueError(f"Features of the last {n} blocks requested but the backbone has {self.n_blocks} "
                             "blocks; lower heads.n_last_blocks_list / backbone_to_features.use_n_blocks")
        return list(self.backbone.get_intermediate_layers(x, n=n, return_class_token=True, norm=False))


def _load_yaml(path: Path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(path)
    return OmegaConf.to_container(cfg, resolve=False)


def _find_config(start: Path, levels: int = 3) -> Optional[Path]:
    d = start if start.is_dir() else start.parent
    for _ in range(levels + 1):
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
        d = d.parent
    return None


def _student_cfg(config_path: Optional[Path], what: str) -> Dict[str, Any]:
    if config_path is None:
        raise FileNotFoundError(f"No config.yaml found for {what}; a training run folder must hold config.yaml")
    cfg = _load_yaml(config_path)
    if "student" not in cfg:
        raise ValueError(f"{config_path} has no 'student' section")
    student = dict(cfg["student"])
    if isinstance(student.get("pe_args"), dict):
        student["pe_args"] = {k: v for k, v in student["pe_args"].items() if k != "rgb_pe_distil"}
    return student


def spec_from_checkpoint(path: str) -> ModelSpec:
    """Sniff a ``.pth`` file (training ckpt, teacher ckpt or raw backbone) and describe how to load it."""
    from dinov2.utils.checkpoint import load_checkpoint_file

    p = Path(path).resolve()
    ckpt = load_checkpoint_file(str(p))
    if not isinstance(ckpt, dict):
        raise ValueError(f"{p} does not hold a state dict (got {type(ckpt).__name__})")
    if isinstance(ckpt.get("model"), dict) and any(k.startswith("teacher.backbone.") for k in ckpt["model"]):
        student = _student_cfg(_find_config(p, 0), str(p))
        weights = [{"path": str(p), "checkpoint_key": "model", "prefix_map": {"teacher.backbone.": ""}}]
        return ModelSpec(str(p), student, weights, str(p.parent / f"eval_{p.stem}"), str(p.parent), "run")
    if isinstance(ckpt.get("teacher"), dict) and any(k.startswith("backbone.") for k in ckpt["teacher"]):
        student = _student_cfg(_find_config(p, 3), str(p))
        weights = [{"path": str(p), "checkpoint_key": "teacher", "prefix_map": {"backbone.": ""}}]
        return ModelSpec(str(p), student, weights, str(p.parent), str(p.parent), "teacher_checkpoint")
    if any(k.startswith(("blocks.", "patch_embed.")) for k in ckpt):
        cfg_path = p.parent / "config.yaml"
        student = _student_cfg(cfg_path, str(p)) if cfg_path.is_file() else dict(HUB_STUDENT_CFG)
        weights = [{"path": str(p), "checkpoint_key": None}]
        return ModelSpec(str(p), student, weights, str(p.parent / f"eval_{p.stem}"), str(p.parent), "hub")
    raise ValueError(f"Unrecognised checkpoint format in {p}: expected 'model' with teacher.backbone.* keys, "
                     f"'teacher' with backbone.* keys, or a raw backbone state dict; top-level keys: "
                     f"{list(ckpt)[:8]}")


def resolve_model_objs(model_obj: str) -> List[ModelSpec]:
    """Expand a model object string (``;`` list, globs, run folders, checkpoint files) into ModelSpecs."""
    from dinov2.eval.baselines import is_baseline, parse_baseline

    specs: List[ModelSpec] = []
    for part in [s.strip() for s in str(model_obj).split(";") if s.strip()]:
        if is_baseline(part):  # another backbone, evaluated under the same protocol
            _, name, _ = parse_baseline(part)
            out = Path("outputs") / "eval_baselines" / name.replace("/", "_")
            specs.append(ModelSpec(part, {}, [], str(out.resolve()), None, "baseline"))
            continue
        part = os.path.expanduser(os.path.expandvars(part))
        paths = [part] if os.path.exists(part) else sorted(glob.glob(part))
        if not paths:
            raise FileNotFoundError(f"Model object {part!r} matches no file or folder")
        for path in paths:
            specs.extend(_specs_for_path(Path(path)))
    if not specs:
        raise FileNotFoundError(f"No model (model_final.pth or .pth checkpoint) found in {model_obj!r}")
    return specs


def _specs_for_path(path: Path) -> List[ModelSpec]:
    if path.is_file():
        if path.suffix != ".pth":
            raise ValueError(f"Model file {path} is not a .pth checkpoint")
        return [spec_from_checkpoint(str(path))]
    if (path / "model_final.pth").is_file():
        return [spec_from_checkpoint(str(path / "model_final.pth"))]
    out: List[ModelSpec] = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(("eval_", "."))):
        out.extend(_specs_for_path(sub))
    return out


def build_eval_backbone(spec: ModelSpec) -> EvalBackbone:
    """Build the teacher ViT of ``spec`` and load its weights; every backbone parameter must be loaded."""
    from dinov2.models import build_model

    if spec.kind == "baseline":
        from dinov2.eval.baselines import build_baseline

        return EvalBackbone(build_baseline(spec.ckpt_path))
    from dinov2.utils.checkpoint import load_pretrained_weights

    img_size = int(spec.student_cfg.get("pos_emb_img_size", 518))
    model, _ = build_model(spec.student_cfg, only_teacher=True, img_size=img_size)
    missing, unexpected = load_pretrained_weights(model, spec.weights)
    if missing:
        raise RuntimeError(f"Checkpoint {spec.ckpt_path} does not fit the configured backbone: missing "
                           f"{len(missing)} keys, e.g. {missing[:5]}")
    if unexpected:
        logger.warning("ignored %d unexpected keys from %s, e.g. %s", len(unexpected), spec.ckpt_path,
                       unexpected[:5])
    return EvalBackbone(model)
