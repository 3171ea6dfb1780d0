"""Apply a trained segmentation head (and its backbone) to whole scenes: georeferenced class and probability
maps, streamed like embeddings (one tiling and blending core, `dinov2.inference.stream`, with a grid cell of one
scene pixel), resumable strip by strip, one run per output folder.

Chips of ``chip_size`` pixels (resized to ``model_input`` pixels, e.g. the size the head was trained at) are cut
from each scene every ``chip_size - overlap`` pixels; per-pixel class probabilities of overlapping chips are
blended with linear cross-fades chip by chip, and every finished part of the map goes straight into raw work
files (class ids and, unless disabled, probabilities), so memory stays flat in scene size and the work folder
holds nothing but the uncompressed outputs. Outputs per scene: ``<scene>_classes.tif`` (uint8 class ids, 255 =
no data, a colour table and the class names in the tags), ``<scene>_probs.tif`` (float32, one band per class,
NaN = no data) — Cloud-Optimised GeoTIFFs on the scene's reference grid and CRS — and ``<scene>_classes.json``
(classes, colours, head, report). Pixels that are no-data in any input band get no prediction.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.data.raster_open import RasterPolicy
from dinov2.inference.grid import ChipGrid, check_batch_size, check_tiling
from dinov2.inference.head import NODATA_CLASS, SegmentationHead, class_colors
from dinov2.inference.reader import SceneReader
from dinov2.inference.scene_job import SceneJob, output_lock
from dinov2.inference.sources import SceneSource
from dinov2.inference.writers import (PartialRaster, atomic_json, bounded_gdal_cache, create_partial_raster,
                                      finalize_cog)

logger = logging.getLogger("dinov2")


@dataclass
class PredictSettings:
    """Tiling and runtime options of `predict_scenes` (defaults are the CLI's; None = from the head file)."""

    chip_size: Optional[int] = None  # pixels of the scene grid per chip side (default: the head's, else 224)
    overlap: Optional[int] = None  # pixels (default: an eighth of the chip, 28 px for 224 px chips)
    model_input: Optional[int] = None  # chips are resized to this many pixels (default: the head's input size)
    batch_size: int = 8
    norm_stats: Optional[str] = None  # default: the head's training statistics, else 'scene'
    precision: str = "fp32"
    write_probs: bool = True
    compress: str = "deflate"
    progress: bool = True
    force: bool = False  # predict with a backbone other than the one the head was trained on (warned)


def resolve_sizes(s: PredictSettings, head: SegmentationHead, patch_size: int) -> Tuple[int, int, int]:
    """(chip size, overlap, model input size) in pixels: the settings, else the head's training chip (an eighth
    of it overlapping); the model input keeps the training's scale (input pixels per chip pixel), rounded to a
    whole number of patches."""
    train_chip, train_in = head.meta.get("chip_size"), head.meta.get("img_size")
    chip = s.chip_size if s.chip_size is not None else (train_chip or train_in or 224)
    model_px = s.model_input
    if model_px is None:
        scale = train_in / train_chip if train_chip and train_in else 1.0
        model_px = max(patch_size, int(round(chip * scale / patch_size)) * patch_size)
    for flag, v in (("--chip-size", chip), ("--model-input", model_px)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{flag} must be a positive integer, got {v!r}")
    if model_px % patch_size:
        raise ValueError(f"--model-input {model_px} px is not a multiple of the patch size {patch_size}")
    overlap = s.overlap if s.overlap is not None else int(round(chip / 8))
    return int(chip), int(overlap), int(model_px)


class ScenePredictor(SceneJob):
    """Class/probability maps of one scene (see the module docstring)."""

    kind = "predict"

    def __init__(self, scene: SceneSource, backbone: nn.Module, head: SegmentationHead, out_dir: str,
                 s: PredictSettings, device: torch.device, digests: Dict[str, str],
                 policy: Optional[RasterPolicy] = None):
        self.backbone, self.head, self.s, self.device = backbone, head, s, device
        ps = int(backbone.patch_size)
        self.chip_px, self.overlap, self.model_px = resolve_sizes(s, head, ps)
        reader = SceneReader(scene, policy)
        try:
            g = reader.grid
            check_tiling(self.chip_px, self.overlap, g.height, g.width, 1, scene.name)
            super().__init__(scene, reader, out_dir, s.norm_stats or "scene", s.batch_size, s.progress)
        except Exception:
            reader.close()
            raise
        self.cell, self.channels = 1, head.num_classes
        self.grid = ChipGrid(g.height, g.width, self.chip_px, self.overlap)
        self.weights = self.grid.weights()
        self.signature = {**self.base_signature(), "weights": digests["backbone"], "head": digests["head"],
                          "chip": self.chip_px, "overlap": self.overlap, "model_input": self.model_px,
                          "precision": s.precision, "probs": s.write_probs}
        self.paths = {"classes": os.path.join(out_dir, f"{scene.name}_classes.tif")}
        if s.write_probs:
            self.paths["probs"] = os.path.join(out_dir, f"{scene.name}_probs.tif")
        self.meta_json = os.path.join(out_dir, f"{scene.name}_classes.json")

    def chip_item(self, strip: int, ci: int, arr: np.ndarray, valid: np.ndarray, inside: np.ndarray):
        return (arr, valid) if valid.any() else None

    @torch.no_grad()
    def forward(self, items: List[Tuple[np.ndarray, np.ndarray]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        imgs = torch.from_numpy(np.stack([a for a, _ in items])).to(self.device)
        if self.model_px != self.chip_px:
            imgs = F.interpolate(imgs, size=(self.model_px, self.model_px), mode="bilinear", align_corners=False,
                                 antialias=self.model_px < self.chip_px)
        chn = torch.tensor(self.scene.chn_ids, device=self.device).expand(len(items), -1)
        amp = self.s.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = self.head(self.backbone, {"imgs": imgs, "chn_ids": chn})
        probs = F.interpolate(logits.float(), size=(self.chip_px, self.chip_px), mode="bilinear",
                              align_corners=False).softmax(1).cpu().numpy()
        return [(p.transpose(1, 2, 0), valid) for p, (_, valid) in zip(probs, items)]

    def values(self, result):
        return result

    def create_outputs(self) -> None:
        g, crs, transform = self.reader.grid, self.reader.crs, self.reader.transform
        names = self.head.class_names
        create_partial_raster(self._work_file("classes"), g.width, g.height, 1, crs, transform, dtype="uint8",
                              nodata=NODATA_CLASS, descriptions=["class"], colors=class_colors(len(names)),
                              tags={"CLASS_NAMES": json.dumps(names), "NODATA_CLASS": str(NODATA_CLASS)})
        if self.s.write_probs:
            create_partial_raster(self._work_file("probs"), g.width, g.height, len(names), crs, transform,
                                  descriptions=names)

    def _work_file(self, what: str) -> str:
        return os.path.join(self.work, f"{what}_partial.bin")

    def open_outputs(self) -> None:
        self._dst = {k: PartialRaster(self._work_file(k)) for k in self.paths}

    def sink(self, row: int, col: int, vals: np.ndarray) -> None:
        ok = np.isfinite(vals).all(-1)
        cls = np.where(ok, np.nan_to_num(vals).argmax(-1), NODATA_CLASS).astype(np.uint8)
        self._dst["classes"].write(row, col, cls[..., None])
        if "probs" in self._dst:
            self._dst["probs"].write(row, col, np.where(ok[..., None], vals, np.float32(np.nan)))

    def close_outputs(self) -> None:
        for dst in self._dst.values():
            dst.close()

    def outputs(self) -> List[str]:
        return [*self.paths.values(), self.meta_json]

    def stale_outputs(self) -> List[str]:
        return [*self.outputs(), os.path.join(self.out_dir, f"{self.scene.name}_probs.tif")]

    def finish(self) -> None:
        for what, final in self.paths.items():
            finalize_cog(self._work_file(what), final, self.s.compress)
        atomic_json(self.meta_json, {"classes": self.head.class_names, "colors": class_colors(self.head.num_classes),
                                     "head": self.head.name, "head_file": os.path.abspath(self.head.path),
                                     "nodata": NODATA_CLASS, "source": self.scene.origin, "bands": self.scene.bands,
                                     "report": self.report})


def prepare_scenes(scenes: Sequence[SceneSource], head: SegmentationHead, s: PredictSettings) -> List[SceneSource]:
    """Every scene in the head's channel order, with the head's training statistics where the user gave none;
    scenes whose bands differ from the head's are refused (all checked before any work)."""
    out, stats = [], head.default_stats() if s.norm_stats is None else None
    for scene in scenes:
        scene = head.fit_scene(scene)
        if stats is not None and scene.mean is None:
            scene.mean, scene.std = stats
        out.append(scene)
    return out


def predict_scenes(scenes: Sequence[SceneSource], backbone: nn.Module, head: SegmentationHead, output_dir: str,
                   settings: PredictSettings, device: torch.device,
                   policy: Optional[RasterPolicy] = None) -> List[Dict[str, str]]:
    """Predict every scene (a finished scene whose signature matches is reused); holds the folder's lock."""
    from dinov2.models.panopticon import frozen_fused_cache
    from dinov2.inference.provenance import checked_digest
    from dinov2.utils.digest import file_digest

    check_batch_size(settings.batch_size)
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be 'fp32' or 'bf16', got {settings.precision!r}")
    checked_digest(head, f"head file {head.path}")
    digests = {"backbone": checked_digest(backbone, "the backbone"), "head": file_digest(head.path)}
    head.check_backbone(digests["backbone"], settings.force)
    scenes = prepare_scenes(scenes, head, settings)
    backbone.to(device).eval()
    head.to(device)
    out = []
    with output_lock(output_dir, "panopticon predict"):
        jobs = []
        for scene in scenes:
            jobs.append(ScenePredictor(scene, backbone, head, output_dir, settings, device, digests, policy))
            jobs[-1].reader.close()  # reopened when the scene runs
        for job in jobs:
            try:
                if job.is_done():
                    logger.info("predict: %s already finished, skipped", job.scene.name)
                else:
                    # weights are fixed here: fold the patch embedding once per scene
                    with frozen_fused_cache(backbone), bounded_gdal_cache():
                        job.run()
                    logger.info("predict: %s done (%s)", job.scene.name, job.report)
            finally:
                job.reader.close()
            out.append(dict(job.paths))
    return out


def pixel_weights(grid: ChipGrid, cell: int) -> np.ndarray:
    """Chip blending weights at pixel resolution (each cell-level weight spread over its cell)."""
    return np.kron(grid.weights(), np.ones((cell, cell))).astype(np.float32)


def predict_scene(scene: SceneSource, backbone: nn.Module, head: SegmentationHead, output_dir: str,
                  s: PredictSettings, device: torch.device) -> Dict[str, str]:
    """Class (and probability) COGs of one scene; returns their paths (see `predict_scenes`)."""
    return predict_scenes([scene], backbone, head, output_dir, s, device)[0]
