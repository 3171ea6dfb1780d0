"""Apply a trained segmentation head (and its backbone) to whole scenes: georeferenced class and probability
maps, with the embedding command's reader, chip layout and cross-fade blending.

A head file is the ``model_final.pth`` that a segmentation task writes into its task folder (all heads, the name
of the head selected on validation, the decoder settings and, after fine-tuning, the tuned backbone). Chips of
``chip_size`` pixels (optionally resized to ``model_input`` pixels, e.g. the size the head was trained at) are
cut from each scene every ``chip_size - overlap`` pixels; per-pixel class probabilities of overlapping chips are
blended with the same linear cross-fades as embeddings and accumulated in memory-mapped arrays in the output
folder (memory stays flat in scene size). Outputs per scene: ``<scene>_classes.tif`` (uint8 class ids, 255 =
no data) and ``<scene>_probs.tif`` (float32, one band per class, NaN = no data) — Cloud-Optimised GeoTIFFs on the
scene's reference grid and CRS. Pixels that are no-data in any input band get no prediction.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.inference.grid import ChipGrid
from dinov2.inference.normstats import resolve_stats
from dinov2.inference.reader import SceneReader
from dinov2.inference.sources import SceneSource
from dinov2.inference.writers import atomic_json, bounded_gdal_cache, finalize_cog

logger = logging.getLogger("dinov2")
NODATA_CLASS = 255


@dataclass
class PredictSettings:
    """Tiling and runtime options of `predict_scenes` (defaults are the CLI's)."""

    chip_size: int = 224  # pixels of the scene grid per chip side
    overlap: int = 28  # pixels
    model_input: Optional[int] = None  # chips are resized to this many pixels (default: chip_size)
    batch_size: int = 8
    norm_stats: str = "scene"
    precision: str = "fp32"
    write_probs: bool = True
    compress: str = "deflate"
    progress: bool = True


class SegmentationHead(nn.Module):
    """The selected head of a segmentation task file, with what it needs to run on a backbone."""

    def __init__(self, path: str, embed_dim: int, feature_dims=None):
        super().__init__()
        from dinov2.eval.dense_heads import build_dense_head

        if not os.path.isfile(path):
            raise FileNotFoundError(f"head file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        need = ("heads", "best_head", "num_classes", "n_last_blocks")
        if not isinstance(state, dict) or any(k not in state for k in need):
            raise ValueError(f"{path} is not a segmentation task's model_final.pth (needs keys {list(need)})")
        self.name = str(state["best_head"])
        self.decoder = self.name.split("_lr_")[0]
        self.num_classes, self.n_blocks = int(state["num_classes"]), int(state["n_last_blocks"])
        # the blocks the head was trained on: 0-based indices (e.g. the PANGAEA protocol's 3, 5, 7, 11) or the last n
        self.blocks = [int(b) for b in state["blocks"]] if state.get("blocks") is not None else self.n_blocks
        if self.num_classes > NODATA_CLASS:
            raise ValueError(f"{path}: {self.num_classes} classes do not fit a uint8 class map")
        self.class_names = list(state.get("class_names") or [f"class_{k}" for k in range(self.num_classes)])
        self.backbone_state = state.get("backbone")
        dims = list(feature_dims(self.n_blocks)) if feature_dims else [int(embed_dim)] * self.n_blocks
        self.head = build_dense_head(self.decoder, dims, self.num_classes, int(state.get("channels", 128)))
        prefix = f"{self.name}."
        sub = {k[len(prefix):]: v for k, v in state["heads"].items() if k.startswith(prefix)}
        missing, unexpected = self.head.load_state_dict(sub, strict=False)
        if missing or unexpected or not sub:
            raise ValueError(f"{path}: head {self.name} does not fit a {self.decoder} decoder over {dims} channels "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); was it trained on this backbone?")
        self.head.eval()

    def forward(self, backbone: nn.Module, x: Dict[str, torch.Tensor]) -> torch.Tensor:
        maps = backbone.get_intermediate_layers(x, n=self.blocks, reshape=True, norm=True)
        return self.head([m.float() for m in maps])


def pixel_weights(grid: ChipGrid, cell: int) -> np.ndarray:
    """Chip blending weights at pixel resolution (each patch-level weight spread over its cell)."""
    return np.kron(grid.weights(), np.ones((cell, cell))).astype(np.float32)


def predict_scene(scene: SceneSource, backbone: nn.Module, head: SegmentationHead, output_dir: str,
                  s: PredictSettings, device: torch.device) -> Dict[str, Any]:
    """Class (and probability) COGs of one scene; returns their paths."""
    from tqdm import tqdm

    reader = SceneReader(scene)
    g = reader.grid
    ps = int(backbone.patch_size)
    model_px = int(s.model_input or s.chip_size)
    if model_px % ps:
        raise ValueError(f"model input size {model_px} px is not a multiple of the patch size {ps}")
    tokens = model_px // ps
    if s.chip_size % tokens:
        raise ValueError(f"chip size {s.chip_size} px must be a multiple of the {tokens} tokens per side that a "
                         f"{model_px} px model input has")
    cell = s.chip_size // tokens  # scene pixels per token
    if s.overlap % cell or s.overlap >= s.chip_size:
        raise ValueError(f"overlap {s.overlap} px must be a multiple of {cell} px and smaller than the chip")
    grid = ChipGrid(-(-g.height // cell), -(-g.width // cell), tokens, s.overlap // cell)
    weights = pixel_weights(grid, cell)
    mean, std = (np.asarray(v, np.float32) for v in resolve_stats(s.norm_stats, scene, reader))
    work = os.path.join(output_dir, ".predict", scene.name)
    os.makedirs(work, exist_ok=True)
    H, W, K = grid.rows * cell, grid.cols * cell, head.num_classes
    acc = np.lib.format.open_memmap(os.path.join(work, "acc.npy"), mode="w+", dtype=np.float32, shape=(K, H, W))
    wsum = np.lib.format.open_memmap(os.path.join(work, "wsum.npy"), mode="w+", dtype=np.float32, shape=(H, W))
    valid_map = np.lib.format.open_memmap(os.path.join(work, "valid.npy"), mode="w+", dtype=bool, shape=(H, W))
    chn = torch.tensor(scene.chn_ids)
    amp = torch.bfloat16 if s.precision == "bf16" else None
    positions = [(r * cell, c * cell) for r in grid.row_starts for c in grid.col_starts]
    bar = tqdm(total=len(positions), desc=f"predict {scene.name}", disable=not s.progress)
    for b0 in range(0, len(positions), s.batch_size):
        batch = positions[b0:b0 + s.batch_size]
        chips = [reader.chip(r, c, s.chip_size, mean, std) for r, c in batch]
        imgs = torch.from_numpy(np.stack([a for a, _, _ in chips])).to(device)
        if model_px != s.chip_size:
            imgs = F.interpolate(imgs, size=(model_px, model_px), mode="bilinear", align_corners=False,
                                 antialias=model_px < s.chip_size)
        x = {"imgs": imgs, "chn_ids": chn.to(device).expand(len(batch), -1)}
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = head(backbone, x)
        probs = F.interpolate(logits.float(), size=(s.chip_size, s.chip_size), mode="bilinear",
                              align_corners=False).softmax(1).cpu().numpy()
        for (r, c), p, (_, valid, _) in zip(batch, probs, chips):
            h, w = min(s.chip_size, H - r), min(s.chip_size, W - c)
            acc[:, r:r + h, c:c + w] += p[:, :h, :w] * weights[:h, :w]
            wsum[r:r + h, c:c + w] += weights[:h, :w]
            valid_map[r:r + h, c:c + w] |= valid[:h, :w]
        bar.update(len(batch))
    bar.close()
    outs = _write_maps(scene, reader, acc, wsum, valid_map, head, output_dir, work, s)
    reader.close()
    del acc, wsum, valid_map
    shutil.rmtree(work, ignore_errors=True)
    return outs


def _write_maps(scene, reader, acc, wsum, valid_map, head, output_dir, work, s) -> Dict[str, str]:
    import rasterio
    from rasterio.windows import Window

    g = reader.grid
    profile = dict(driver="GTiff", width=g.width, height=g.height, crs=reader.crs, transform=reader.transform,
                   tiled=True, blockxsize=256, blockysize=256)
    cls_tmp, prob_tmp = os.path.join(work, "classes.tif"), os.path.join(work, "probs.tif")
    with rasterio.open(cls_tmp, "w", count=1, dtype="uint8", nodata=NODATA_CLASS, **profile) as dc:
        dp = rasterio.open(prob_tmp, "w", count=head.num_classes, dtype="float32", nodata=float("nan"),
                           **profile) if s.write_probs else None
        try:
            for r0 in range(0, g.height, 256):
                h = min(256, g.height - r0)
                p = acc[:, r0:r0 + h, :g.width] / np.maximum(wsum[r0:r0 + h, :g.width], 1e-12)
                ok = valid_map[r0:r0 + h, :g.width] & (wsum[r0:r0 + h, :g.width] > 0)
                cls = np.where(ok, p.argmax(0), NODATA_CLASS).astype(np.uint8)
                dc.write(cls, 1, window=Window(0, r0, g.width, h))
                if dp is not None:
                    dp.write(np.where(ok[None], p, np.nan).astype(np.float32), window=Window(0, r0, g.width, h))
            if dp is not None:
                for k, name in enumerate(head.class_names):
                    dp.set_band_description(k + 1, str(name))
        finally:
            if dp is not None:
                dp.close()
    outs = {"classes": os.path.join(output_dir, f"{scene.name}_classes.tif")}
    finalize_cog(cls_tmp, outs["classes"], s.compress)
    if s.write_probs:
        outs["probs"] = os.path.join(output_dir, f"{scene.name}_probs.tif")
        finalize_cog(prob_tmp, outs["probs"], s.compress)
    atomic_json(os.path.join(output_dir, f"{scene.name}_classes.json"),
                {"classes": head.class_names, "head": head.name, "nodata": NODATA_CLASS, "source": scene.origin})
    return outs


def predict_scenes(scenes: Sequence[SceneSource], backbone: nn.Module, head: SegmentationHead, output_dir: str,
                   settings: PredictSettings, device: torch.device) -> List[Dict[str, str]]:
    """Predict every scene (a finished scene, whose class map exists, is skipped)."""
    os.makedirs(output_dir, exist_ok=True)
    backbone.to(device).eval()
    head.to(device)
    out = []
    for scene in scenes:
        done = os.path.join(output_dir, f"{scene.name}_classes.tif")
        if os.path.exists(done) and os.path.exists(os.path.join(output_dir, f"{scene.name}_classes.json")):
            logger.info("skipping finished scene %s (%s)", scene.name, done)
            out.append({"classes": done})
            continue
        from dinov2.models.panopticon import frozen_fused_cache

        # weights are fixed here: fold the patch embedding once per scene
        with frozen_fused_cache(backbone), bounded_gdal_cache():
            out.append(predict_scene(scene, backbone, head, output_dir, settings, device))
    return out
