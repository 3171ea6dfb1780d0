"""`load_model(source)`: one entry point that turns anything a user points at into a backbone ready for inference.

Accepted sources:
- a torch.hub entry name (``panopticon_vitb14``, ``dinov2_vitb14``, ...; ``dinov2.hub_entries``): the released
  weights, downloaded once into the weights cache (``dinov2.weights_cache``);
- ``hf-hub:ORG/NAME[@REVISION]``: a model on the Hugging Face Hub (``dinov2.integrations.hf_hub``);
- a released-format weights file, ``.pth`` or ``.safetensors`` (raw backbone state dict, keys ``blocks.*``,
  ``patch_embed.*``; the architecture comes from the config in a safetensors header, else a ``config.yaml``
  beside the file, else the published ViT-B/14 configuration);
- a training run folder (``config.yaml`` decides the architecture): ``model_final.pth``, else the checkpoint
  named by ``last_checkpoint``, else the newest ``eval/<iter>/teacher_checkpoint.pth``;
- a training checkpoint ``model_*.pth`` (teacher weights) or a teacher checkpoint ``teacher_checkpoint.pth``.

The returned module is the teacher ViT in eval mode without gradients; ``model.info`` (a ``ModelInfo``) says
what callers need: patch size, embedding width, number of blocks and the normalisation the model expects.
Imports torch only at module level (optional libraries are imported where used).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.nn as nn

from dinov2.hub_entries import STUDENT_CONFIGS

logger = logging.getLogger("dinov2")

# published torch.hub configuration of panopticon_vitb14, as a student config section
HUB_STUDENT_CFG: Dict[str, Any] = STUDENT_CONFIGS["panopticon_vitb14"]

# Panopticon was pretrained on per-band z-scored inputs ((x - mean) / std per dataset and band); there are no
# global constants, so statistics come from the data (the scene itself unless the user gives them).
NORMALIZATION = "per-band z-score (x - mean) / std"


@dataclass
class ModelInfo:
    """What inference code needs to know about a loaded backbone."""

    source: str
    kind: str  # 'hub' | 'hf-hub' | 'weights' | 'run' | 'teacher_checkpoint'
    patch_size: int
    embed_dim: int
    n_blocks: int
    any_sensor: bool  # True: PanopticonPE (needs chn_ids); False: an RGB DINOv2 patch embedding
    normalization: str = NORMALIZATION
    default_norm_stats: str = "scene"
    ckpt_path: Optional[str] = None
    config: Optional[Dict[str, Any]] = None  # the `student` config section that rebuilds the architecture


@dataclass
class ModelSpec:
    """Where a backbone comes from and where its (evaluation) results go."""

    ckpt_path: str
    student_cfg: Dict[str, Any]
    weights: List[Dict[str, Any]]
    output_dir: str
    run_dir: Optional[str] = None
    kind: str = "run"
    extra: Dict[str, Any] = field(default_factory=dict)


def _load_yaml(path: Path) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


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


def _embedded_student_cfg(path: Path) -> Optional[Dict[str, Any]]:
    """The student config stored in a `.safetensors` header by `panopticon export` / `convert` (None if absent)."""
    import json

    from dinov2.utils.checkpoint import STUDENT_METADATA_KEY, is_safetensors, read_safetensors

    if not is_safetensors(str(path)):
        return None

    _, meta = read_safetensors(str(path))
    if STUDENT_METADATA_KEY not in meta:
        return None
    try:
        student = json.loads(meta[STUDENT_METADATA_KEY])
    except ValueError as exc:
        raise ValueError(f"{path}: header entry {STUDENT_METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(student, dict):
        raise ValueError(f"{path}: header entry {STUDENT_METADATA_KEY!r} must be a mapping")
    return student


def spec_from_checkpoint(path: str, config_path: Optional[str] = None) -> ModelSpec:
    """Sniff a checkpoint file (training ckpt, teacher ckpt or raw backbone; `.pth` or `.safetensors`) and
    describe how to load it. `config_path`: the config.yaml of a raw backbone when it is not beside the file."""
    from dinov2.utils.checkpoint import load_checkpoint_file

    p = Path(os.path.abspath(path))  # symlinks kept: a Hugging Face snapshot's config sits beside the link
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
        cfg_path = Path(config_path) if config_path else p.parent / "config.yaml"
        student = _embedded_student_cfg(p)
        if student is None:
            student = _student_cfg(cfg_path, str(p)) if cfg_path.is_file() else dict(HUB_STUDENT_CFG)
        weights = [{"path": str(p), "checkpoint_key": None}]
        return ModelSpec(str(p), student, weights, str(p.parent / f"eval_{p.stem}"), str(p.parent), "hub")
    raise ValueError(f"Unrecognised checkpoint format in {p}: expected 'model' with teacher.backbone.* keys, "
                     f"'teacher' with backbone.* keys, or a raw backbone state dict; top-level keys: "
                     f"{list(ckpt)[:8]}")


def run_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint that represents a training run folder: ``model_final.pth``, else the one named by
    ``last_checkpoint``, else the newest ``eval/<iter>/teacher_checkpoint.pth``; None if there is none."""
    d = Path(run_dir)
    if (d / "model_final.pth").is_file():
        return str(d / "model_final.pth")
    marker = d / "last_checkpoint"
    if marker.is_file():
        target = d / marker.read_text().strip()
        if not target.is_file():
            raise FileNotFoundError(f"{marker} points to {target.name!r}, which does not exist in {d}")
        return str(target)
    teachers = [p for p in d.glob("eval/*/teacher_checkpoint.pth") if re.fullmatch(r"\d+", p.parent.name)]
    if teachers:
        return str(max(teachers, key=lambda p: int(p.parent.name)))
    return None


def build_backbone(spec: ModelSpec) -> nn.Module:
    """Build the teacher ViT of ``spec`` and load its weights; every backbone parameter must be loaded."""
    from dinov2.models import build_model
    from dinov2.utils.checkpoint import load_pretrained_weights

    img_size = int(spec.student_cfg.get("pos_emb_img_size", 518))
    model, _ = build_model(spec.student_cfg, only_teacher=True, img_size=img_size)
    missing, unexpected = load_pretrained_weights(model, spec.weights)
    if missing:
        from dinov2.weights_cache import WeightsError

        raise WeightsError(f"Checkpoint {spec.ckpt_path} does not fit the configured backbone: missing "
                           f"{len(missing)} keys, e.g. {missing[:5]}")
    if unexpected:
        logger.warning("ignored %d unexpected keys from %s, e.g. %s", len(unexpected), spec.ckpt_path,
                       unexpected[:5])
    return model


def hub_names() -> List[str]:
    """torch.hub entry points of this package (e.g. 'panopticon_vitb14')."""
    from dinov2.hub_entries import ENTRY_POINTS

    return sorted(ENTRY_POINTS)


def _finish(model: nn.Module, source: str, kind: str, ckpt_path: Optional[str],
            config: Optional[Dict[str, Any]]) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    any_sensor = type(model.patch_embed).__name__ == "PanopticonPE"
    model.info = ModelInfo(source=source, kind=kind, patch_size=int(model.patch_size),
                           embed_dim=int(model.embed_dim), n_blocks=int(model.n_blocks), any_sensor=any_sensor,
                           ckpt_path=ckpt_path, config=config)
    return model


def load_model(source: str, pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
               sha256: Optional[str] = None) -> nn.Module:
    """Backbone in eval mode from a hub name, ``hf-hub:ORG/NAME[@REVISION]``, weights file, training run folder or
    checkpoint.

    ``pretrained=False`` builds the architecture with random weights (hub names only; for tests/benchmarks);
    ``weights`` overrides the download of a hub entry with a local file or URL, and names the weights file of an
    ``hf-hub:`` repository; ``sha256`` (hub names) is a digest or prefix the weights file must have.
    ``model.info`` holds a ``ModelInfo``.
    """
    src = str(source)
    if src.startswith("hf-hub:"):
        from dinov2.integrations.hf_hub import fetch_model_files

        weights_path, config_path = fetch_model_files(src, weights)
        spec = spec_from_checkpoint(weights_path, config_path)
        return _finish(build_backbone(spec), src, "hf-hub", spec.ckpt_path, spec.student_cfg)
    path = Path(os.path.expanduser(os.path.expandvars(src)))
    if not path.exists() and re.fullmatch(r"[A-Za-z_]\w*", src):
        from dinov2.hub_entries import ENTRY_POINTS

        if src not in ENTRY_POINTS:
            raise ValueError(f"model {src!r} is neither an existing file/folder nor a hub entry; hub entries: "
                             f"{', '.join(hub_names())}")
        model = ENTRY_POINTS[src](pretrained=pretrained, weights=weights, progress=progress, sha256=sha256)
        return _finish(model, src, "hub", weights, STUDENT_CONFIGS[src])
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {src} (give a hub name such as 'panopticon_vitb14', "
                                "hf-hub:ORG/NAME, a weights .pth/.safetensors file, a training run folder or a "
                                "checkpoint)")
    if path.is_dir():
        ckpt = run_checkpoint(str(path))
        if ckpt is None:
            raise FileNotFoundError(f"run folder {path} holds no model_final.pth, last_checkpoint or "
                                    "eval/<iter>/teacher_checkpoint.pth")
    else:
        ckpt = str(path)
    spec = spec_from_checkpoint(ckpt)
    kind = {"hub": "weights"}.get(spec.kind, spec.kind)
    return _finish(build_backbone(spec), src, kind, spec.ckpt_path, spec.student_cfg)
