"""Embed whole scenes: stream chips a batch at a time, run the backbone, blend overlapping patch embeddings chip
by chip, write a patch-embedding COG per scene and a GeoParquet part of chip embeddings per scene (the chip table
``<out>/chips.parquet/``, see `dinov2.inference.chips_table`) — resumable and shardable over ranks, with memory
that does not grow with the scene.

The streaming core is `dinov2.inference.stream` (one output pixel per model patch here), the resumable scene job
`dinov2.inference.scene_job`. Per scene, work happens in ``<out>/.embed/<scene>/`` (the partial map as a raw ENVI
work file, one parquet shard per strip of chips, the overlap rows carried to the next strip, ``state.json``); the
finished ``<scene>_patches.tif`` and ``chips.parquet/<scene>.parquet`` are renamed into place and
``.embed/<scene>.done.json`` marks the scene complete. One
run at a time writes a folder (``<out>/.panopticon.lock``). Under torch.distributed every rank embeds every
world-size-th chip and rank 0 blends and writes, so the output equals a single-process run.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dinov2.data.raster_open import RasterPolicy
from dinov2.inference.chip_table import chip_rows
from dinov2.inference.chips_table import EMBEDDING_DTYPES, PART_FORMAT, check_compatible, part_rows, write_chip_part
from dinov2.inference.grid import ChipGrid, check_batch_size, check_tiling, size_in_pixels
from dinov2.inference.provenance import FORMAT_VERSION, checked_digest  # noqa: F401 - FORMAT_VERSION kept here
from dinov2.inference.reader import SceneReader
from dinov2.inference.scene_job import SceneJob, output_lock
from dinov2.inference.sources import SceneSource, collect_scenes
from dinov2.inference.stream import broadcast, dist_info
from dinov2.inference.writers import (PartialRaster, bounded_gdal_cache, combine_shards, create_partial_raster,
                                      finalize_cog, write_table)

logger = logging.getLogger("dinov2")


@dataclass
class EmbedSettings:
    """Tiling, normalisation and runtime options of `embed_scenes` (defaults are the CLI's)."""

    chip_size: str = "224"  # pixels ('224', '224px') or metres ('2240m'); a multiple of the patch size
    overlap: str = "28"  # same units; blended with linear cross-fades
    batch_size: int = 8
    min_valid: float = 0.5  # a patch is embedded when at least this fraction of its in-scene pixels is valid
    norm_stats: str = "scene"  # 'scene' | stats file (.yaml/.json) | 'dataset:<name>'
    precision: str = "fp32"  # 'fp32' | 'bf16' (autocast; meant for GPUs)
    compress: str = "zstd"
    progress: bool = True
    embedding_dtype: str = "float32"  # chip table embeddings: 'float32' | 'float16' | 'int8' (per-vector scale)


class SceneEmbedder(SceneJob):
    """Embeds one scene with a loaded backbone (see the module docstring). `weights_digest`: the content digest
    of the model's weights (computed here when not given; `embed_scenes` computes it once per run)."""

    kind = "embed"

    def __init__(self, scene: SceneSource, model: torch.nn.Module, out_dir: str, settings: EmbedSettings,
                 device: torch.device, weights_digest: Optional[str] = None, policy: Optional[RasterPolicy] = None):
        from dinov2.utils.digest import state_dict_digest

        self.model, self.s, self.device = model, settings, device
        info = model.info
        self.ps, self.dim = int(info.patch_size), int(info.embed_dim)
        reader = SceneReader(scene, policy)
        try:
            g = reader.grid
            metres = [v for v in (settings.chip_size, settings.overlap) if str(v).strip().lower().endswith("m")
                      and not str(v).strip().lower().endswith("px")]
            if metres and reader.crs.is_geographic:
                raise ValueError(f"scene {scene.name}: chip size/overlap {metres} are in metres but the scene's "
                                 f"CRS {reader.crs} is in degrees; give pixels instead")
            chip_px = size_in_pixels(settings.chip_size, g.res, self.ps, "--chip-size")
            overlap_px = size_in_pixels(settings.overlap, g.res, self.ps, "--overlap")
            check_tiling(chip_px, overlap_px, g.height, g.width, self.ps, scene.name)
            super().__init__(scene, reader, out_dir, settings.norm_stats, settings.batch_size, settings.progress)
        except Exception:
            reader.close()
            raise
        self.cell = self.ps
        self.grid = ChipGrid(-(-g.height // self.ps), -(-g.width // self.ps), chip_px // self.ps,
                             overlap_px // self.ps)
        self.weights, self.channels = self.grid.weights(), self.dim
        self.final_tif = os.path.join(out_dir, f"{scene.name}_patches.tif")
        self.table = os.path.join(out_dir, ".embed", f"{scene.name}.chips.parquet")
        self.part = os.path.join(out_dir, "chips.parquet", f"{scene.name}.parquet")
        self.signature = {**self.base_signature(), "weights": weights_digest or state_dict_digest(model),
                          "patch_size": self.ps, "embed_dim": self.dim, "chip": self.grid.chip,
                          "overlap": self.grid.overlap, "model_input": chip_px, "min_valid": settings.min_valid,
                          "precision": settings.precision, "embedding_dtype": settings.embedding_dtype}
        self._rows: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ chips and model
    def chip_item(self, strip: int, ci: int, arr: np.ndarray, valid: np.ndarray, inside: np.ndarray):
        n, p = self.grid.chip, self.ps
        v = valid.reshape(n, p, n, p).sum((1, 3))
        i = inside.reshape(n, p, n, p).sum((1, 3))
        pvalid = (i > 0) & (v >= self.s.min_valid * np.maximum(i, 1))
        if not pvalid.any():  # not embedded at all
            return None
        return arr, pvalid, float(valid.sum()) / float(max(inside.sum(), 1))

    @torch.no_grad()
    def forward(self, items: List[Tuple]) -> List[Dict[str, Any]]:
        x = torch.from_numpy(np.stack([it[0] for it in items])).to(self.device)
        ids = torch.tensor(self.scene.chn_ids, dtype=torch.long, device=self.device).expand(x.shape[0], -1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.precision == "bf16"):
            out = self.model.forward_features({"imgs": x, "chn_ids": ids})
        n = self.grid.chip
        cls = out["x_norm_clstoken"].float().cpu().numpy()
        patches = out["x_norm_patchtokens"].float().cpu().numpy().reshape(x.shape[0], n, n, self.dim)
        return [{"cls": c, "patches": p, "pvalid": it[1], "valid_fraction": it[2]}
                for it, c, p in zip(items, cls, patches)]

    def values(self, result: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        return result["patches"], result["pvalid"]

    def on_chip(self, strip: int, ci: int, result: Optional[Dict[str, Any]]) -> None:
        if result is not None:
            pv = result["pvalid"]
            self._rows.append({"ci": ci, "cls": result["cls"], "mean": result["patches"][pv].mean(0),
                               "n_valid": int(pv.sum()), "valid_fraction": result["valid_fraction"]})

    def on_strip(self, strip: int) -> None:
        """The strip's chip-table shard (a strip of no-data chips has no rows and no shard)."""
        if self._rows:
            import pyarrow as pa

            write_table(os.path.join(self.work, f"chips_{strip:06d}.parquet"),
                        chip_rows(self.scene, self.reader, self.grid, self.ps, self.dim, strip, self._rows),
                        {"datetime": pa.string()})
        self._rows = []

    # ------------------------------------------------------------------ outputs
    @property
    def partial(self) -> str:
        return os.path.join(self.work, "patches_partial.bin")

    def create_outputs(self) -> None:
        from affine import Affine

        g = self.reader.grid
        create_partial_raster(self.partial, self.grid.cols, self.grid.rows, self.dim, self.reader.crs,
                              Affine(g.res * self.ps, 0, g.left, 0, -g.res * self.ps, g.top),
                              descriptions=[f"emb_{k:03d}" for k in range(self.dim)])

    def open_outputs(self) -> None:
        self._dst = PartialRaster(self.partial)

    def sink(self, row: int, col: int, vals: np.ndarray) -> None:
        self._dst.write(row, col, vals)

    def close_outputs(self) -> None:
        self._dst.close()

    def outputs(self) -> List[str]:
        return [self.final_tif, self.table, self.part]

    def part_meta(self) -> Dict[str, Any]:
        """What the scene's chip-table part records of its making (parts of one table must agree on it)."""
        return {"format": PART_FORMAT, "model_digest": self.signature["weights"],
                "model": str(self.model.info.source), "embedding_dtype": self.s.embedding_dtype}

    def finish(self) -> None:
        shards = [os.path.join(self.work, f"chips_{k:06d}.parquet") for k in range(len(self.grid.row_starts))]
        shards = [p for p in shards if os.path.isfile(p)]
        if not shards:
            raise ValueError(f"scene {self.scene.name}: no chip has a valid patch (no-data {self.reader.nodata}, "
                             f"--min-valid {self.s.min_valid}); nothing to embed")
        combine_shards(shards, self.table)
        finalize_cog(self.partial, self.final_tif, self.s.compress)
        write_chip_part(self.table, self.part, self.s.embedding_dtype, self.part_meta())


def check_settings(settings: EmbedSettings) -> None:
    """Refuse settings that no scene could use (one line each, naming the flag)."""
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be 'fp32' or 'bf16', got {settings.precision!r}")
    check_batch_size(settings.batch_size)
    if settings.embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"--embedding-dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got "
                         f"{settings.embedding_dtype!r}")
    if not 0.0 < settings.min_valid <= 1.0:  # NaN fails too
        raise ValueError(f"--min-valid must be in (0, 1], got {settings.min_valid}")


def embed_scenes(scenes: Sequence[SceneSource], model: torch.nn.Module, output_dir: str,
                 settings: Optional[EmbedSettings] = None, device: Optional[torch.device] = None,
                 policy: Optional[RasterPolicy] = None) -> Dict[str, Any]:
    """Embed `scenes` into `output_dir` (reusing finished scenes whose signature matches); returns paths and
    counts (rank 0). Holds the folder's lock for the run (see `dinov2.utils.folder_lock`)."""
    from dinov2.models.panopticon import frozen_fused_cache

    settings = settings or EmbedSettings()
    check_settings(settings)
    if not hasattr(model, "info"):
        raise ValueError("the model must come from dinov2.load_model (it needs model.info)")
    if not model.info.any_sensor:
        raise ValueError(f"model {model.info.source!r} is an RGB DINOv2 backbone; embedding needs a Panopticon "
                         "(any-sensor) model")
    rank, world = dist_info()
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    digest = checked_digest(model, f"model {model.info.source}")  # once per run: decides reuse of stored scenes
    done, skipped = [], []
    with output_lock(output_dir, "panopticon embed", rank, world):
        jobs = []
        for scene in scenes:  # every scene's settings are checked before any work
            jobs.append(SceneEmbedder(scene, model, output_dir, settings, device, digest, policy))
            jobs[-1].reader.close()  # reopened when the scene runs
        os.makedirs(os.path.join(output_dir, ".embed"), exist_ok=True)
        chips = _chips_dataset(output_dir, rank)
        if rank == 0 and jobs:  # one chip table holds one model's embeddings, in one dtype
            names = {f"{j.scene.name}.parquet" for j in jobs}
            check_compatible([os.path.join(chips, f) for f in sorted(os.listdir(chips))
                              if f.endswith(".parquet") and f not in names], jobs[0].part_meta())
        for emb in jobs:
            try:
                finished = broadcast(emb.is_done() if rank == 0 else None, world)
                if finished:
                    skipped.append(emb.scene.name)
                    logger.info("embed: %s already finished, skipped", emb.scene.name)
                else:
                    # weights are fixed here: fold the patch embedding once per scene
                    with frozen_fused_cache(model), bounded_gdal_cache():
                        emb.run(rank, world)
                    if rank == 0:
                        logger.info("embed: %s done (%s)", emb.scene.name, emb.report)
            finally:
                emb.reader.close()
            done.append(emb.final_tif)
        result: Dict[str, Any] = {"patches": done, "skipped": skipped, "chips": chips, "n_chips": 0}
        if rank == 0:
            result["n_chips"] = sum(part_rows(j.part) for j in jobs)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    return result


def _chips_dataset(output_dir: str, rank: int) -> str:
    """``<out>/chips.parquet/``, the folder of chip-table parts; a single-file table left by an earlier version is
    moved aside (``chips_v2.parquet``), never deleted."""
    path = os.path.join(output_dir, "chips.parquet")
    if rank == 0:
        if os.path.isfile(path):
            old = os.path.join(output_dir, "chips_v2.parquet")
            os.replace(path, old)
            logger.warning("embed: %s was a single-file chip table of an earlier version; moved to %s, chips are "
                           "now written as one part per scene in %s/", path, old, path)
        os.makedirs(path, exist_ok=True)
    return path


def embed(inputs, model="panopticon_vitb14", output_dir: str = "embeddings", sensor: Optional[str] = None,
          bands: Optional[Sequence[str]] = None, wavelengths_nm: Optional[Sequence[float]] = None,
          nodata: Optional[float] = None, device: Optional[str] = None, allow_vrt: bool = False,
          **settings) -> Dict[str, Any]:
    """Python entry point: ``embed('scene.tif', model='panopticon_vitb14', output_dir='out', sensor=..., ...)``.

    `inputs`: a path or list of paths (GeoTIFFs, folders, scenes YAMLs, STAC item JSONs); `model`: anything
    `dinov2.load_model` takes, or a loaded model; `allow_vrt`: read VRT inputs (see `dinov2.data.raster_open`);
    `settings`: fields of `EmbedSettings`."""
    from dinov2.distributed import get_device
    from dinov2.hub import load_model

    policy = RasterPolicy(allow_vrt=allow_vrt)
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    scenes = collect_scenes([str(p) for p in paths], sensor, bands, wavelengths_nm, nodata, policy)
    net = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    return embed_scenes(scenes, net, output_dir, EmbedSettings(**settings),
                        torch.device(device) if device else get_device(), policy)
