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
The architecture comes from the ``student`` section of the run's ``config.yaml``. Loading itself is
``dinov2.hub`` (the public ``load_model``); this module adds the evaluation wrapper and the multi-model lists.
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

from dinov2.hub import (HUB_STUDENT_CFG, ModelSpec, _find_config, _load_yaml, _student_cfg,  # noqa: F401
                        build_backbone, spec_from_checkpoint)

logger = logging.getLogger("dinov2")


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
    """Build the backbone of ``spec`` (``dinov2.hub.build_backbone``; a ``baseline:...`` object through
    ``dinov2.eval.baselines``) and freeze it for evaluation."""
    if spec.kind == "baseline":
        from dinov2.eval.baselines import build_baseline

        return EvalBackbone(build_baseline(spec.ckpt_path))
    return EvalBackbone(build_backbone(spec))
