"""A segmentation task's saved head as `predict` uses it: loaded, checked against the backbone and the scenes.

A head file is the ``model_final.pth`` a segmentation task writes into its task folder: all heads, the name of
the head selected on validation, the decoder settings, after fine-tuning the tuned backbone, and (since format 1,
`dinov2.eval.head_metadata`) what prediction needs: band ids and names, normalisation statistics, chip and model
input sizes, class names and the backbone's content digest. Every check here runs before any scene is read;
files written by earlier versions, without that metadata, still load (with a warning).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from dinov2.inference.sources import SceneSource

logger = logging.getLogger("dinov2")
NODATA_CLASS = 255
NEEDED = ("heads", "best_head", "num_classes", "n_last_blocks")


def load_head_state(path: str) -> Dict[str, Any]:
    """The head file's dict; a missing, empty, truncated or foreign file raises naming it."""
    from dinov2.data.raster_open import check_regular_file

    check_regular_file(path, "head file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"head file {path} is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors, foreign formats: all mean "not a usable head file"
        raise ValueError(f"head file {path} cannot be read (truncated or not a torch file?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict) or any(k not in state for k in NEEDED):
        raise ValueError(f"{path} is not a segmentation task's model_final.pth (needs keys {list(NEEDED)})")
    return state


class SegmentationHead(nn.Module):
    """The selected head of a segmentation task file, with what it needs to run on a backbone."""

    def __init__(self, path: str, embed_dim: int, feature_dims=None):
        super().__init__()
        from dinov2.eval.dense_heads import build_dense_head

        state = load_head_state(path)
        self.path = path
        self.name = str(state["best_head"])
        self.decoder = self.name.split("_lr_")[0]
        self.num_classes, self.n_blocks = int(state["num_classes"]), int(state["n_last_blocks"])
        # the blocks the head was trained on: 0-based indices (e.g. the PANGAEA protocol's 3, 5, 7, 11) or the last n
        self.blocks = [int(b) for b in state["blocks"]] if state.get("blocks") is not None else self.n_blocks
        if not 1 <= self.num_classes < NODATA_CLASS:
            raise ValueError(f"{path}: {self.num_classes} classes do not fit a uint8 class map (1..254)")
        self.meta: Dict[str, Any] = {k: state.get(k) for k in (
            "format_version", "bands", "chn_ids", "sensor", "norm_mean", "norm_std", "norm_note", "img_size",
            "chip_size", "patch_size", "embed_dim", "backbone_digest")}
        if self.meta["format_version"] is None:
            logger.warning("head file %s was written by an earlier version: it records no bands, statistics, sizes "
                           "or backbone digest, so predict cannot check them (give --chip-size/--model-input/"
                           "--norm-stats as the task used them)", path)
        names = state.get("class_names")
        if names and len(names) != self.num_classes:
            raise ValueError(f"{path}: {len(names)} class names {list(names)[:5]}... for {self.num_classes} classes")
        self.class_names = [str(c) for c in names] if names else [f"class_{k}" for k in range(self.num_classes)]
        width = self.meta.get("embed_dim")
        if width is not None and int(width) != int(embed_dim):
            raise ValueError(f"{path}: the head was trained on {width}-dimensional features, the backbone gives "
                             f"{embed_dim}; give the backbone it was trained on (--model)")
        self.backbone_state = state.get("backbone")
        dims = list(feature_dims(self.n_blocks)) if feature_dims else [int(embed_dim)] * self.n_blocks
        self.head = build_dense_head(self.decoder, dims, self.num_classes, int(state.get("channels", 128)))
        prefix = f"{self.name}."
        sub = {k[len(prefix):]: v for k, v in state["heads"].items() if k.startswith(prefix)}
        try:
            missing, unexpected = self.head.load_state_dict(sub, strict=False)
        except RuntimeError as e:  # shape mismatches: another feature width or class count
            raise ValueError(f"{path}: head {self.name} does not fit a {self.decoder} decoder over {dims} channels "
                             f"and {self.num_classes} classes: {str(e).splitlines()[-1].strip()}") from None
        if missing or unexpected or not sub:
            raise ValueError(f"{path}: head {self.name} does not fit a {self.decoder} decoder over {dims} channels "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it trained on this backbone?")
        self.head.eval()

    def forward(self, backbone: nn.Module, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        maps = backbone.get_intermediate_layers(x, n=self.blocks, reshape=True, norm=True)
        return self.head([m.float() for m in maps])

    def check_backbone(self, digest: str, force: bool = False) -> None:
        """Refuse a backbone whose content digest differs from the one the head was trained on (`force`: warn)."""
        recorded = self.meta.get("backbone_digest")
        if recorded is None or recorded == digest:
            return
        msg = (f"{self.path}: the head was trained on backbone weights with digest {recorded}, the given backbone "
               f"has {digest}; give the backbone it was trained on (--model)")
        if not force:
            raise ValueError(msg + ", or --force to predict anyway")
        logger.warning("%s (--force: predicting anyway)", msg)

    def fit_scene(self, scene: SceneSource) -> SceneSource:
        """The scene with its channels in the head's order; refuses bands other than the head's (naming both)."""
        want = self.meta.get("chn_ids")
        if want is None:
            return scene
        want = [int(c) if not isinstance(c, (list, tuple)) else c for c in want]
        have = scene.chn_ids
        if sorted(map(str, want)) != sorted(map(str, have)):
            head_bands = self.meta.get("bands") or want
            raise ValueError(f"scene {scene.name} has bands {scene.bands} (channel ids {have}); the head {self.path} "
                             f"was trained on bands {head_bands} (channel ids {want})")
        order = [have.index(c) for c in want]
        channels = [scene.channels[i] for i in order]
        mean = [scene.mean[i] for i in order] if scene.mean is not None else None
        std = [scene.std[i] for i in order] if scene.std is not None else None
        return SceneSource(scene.name, scene.sensor, channels, scene.origin, scene.nodata, scene.datetime, mean, std,
                           dict(scene.extra))

    def default_stats(self) -> Optional[List[List[float]]]:
        """The training statistics (in the head's channel order), or None when the task normalised per scene."""
        mean, std = self.meta.get("norm_mean"), self.meta.get("norm_std")
        return [list(map(float, mean)), list(map(float, std))] if mean is not None and std is not None else None


def class_colors(n: int) -> List[Sequence[int]]:
    """`n` distinct RGB colours for a class map's colour table (hues spread by the golden ratio)."""
    import colorsys

    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65 if k % 2 else 0.9, 0.95 if k % 3 else 0.75)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out
