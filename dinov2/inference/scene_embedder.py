"""One scene through the backbone: `SceneEmbedder` reads its chips, runs the model, blends overlapping patch
embeddings into the patch-embedding map and collects the chip rows; `EmbedSettings` are the run's options.

Work happens in ``<out>/.embed/<scene>/`` (the partial map as a raw ENVI work file, one parquet shard per strip of
chips, the overlap rows carried to the next strip, ``state.json``); the finished ``<scene>_patches.tif`` and
``chips.parquet/<scene>.parquet`` are renamed into place and ``.embed/<scene>.done.json`` marks the scene complete
(see `dinov2.inference.scene_job`; `dinov2.inference.embed` runs scenes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from dinov2.data.raster_open import RasterPolicy
from dinov2.inference.chip_table import chip_rows
from dinov2.inference.chips_table import EMBEDDING_DTYPES, PART_FORMAT, write_chip_part
from dinov2.inference.grid import ChipGrid, check_batch_size, check_tiling, size_in_pixels
from dinov2.inference.reader import SceneReader
from dinov2.inference.scene_job import SceneJob
from dinov2.inference.sources import SceneSource
from dinov2.inference.writers import PartialRaster, combine_shards, create_partial_raster, finalize_cog, write_table


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
    read_workers: int = 0  # threads reading chips ahead of the model; 0: 1 for local scenes, 4 for remote ones
    patch_map: bool = True  # write <scene>_patches.tif; False: the chip table only


def output_paths(out_dir: str, name: str) -> Tuple[str, str, str]:
    """(patch-embedding COG, float32 chip table, chip-table part) of scene `name` in `out_dir`."""
    return (os.path.join(out_dir, f"{name}_patches.tif"), os.path.join(out_dir, ".embed", f"{name}.chips.parquet"),
            os.path.join(out_dir, "chips.parquet", f"{name}.parquet"))


def required_outputs(out_dir: str, name: str, patch_map: bool = True) -> List[str]:
    """The files that must exist for scene `name` to count as finished (without the COG when no map is written)."""
    paths = list(output_paths(out_dir, name))
    return paths if patch_map else paths[1:]


def part_meta(model: torch.nn.Module, digest: str, embedding_dtype: str) -> Dict[str, Any]:
    """The ``panopticon`` metadata of the chip-table parts a model writes (parts of one table agree on it)."""
    return {"format": PART_FORMAT, "model_digest": digest, "model": str(model.info.source),
            "embedding_dtype": embedding_dtype}


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
        self.final_tif, self.table, self.part = output_paths(out_dir, scene.name)
        self.signature = {**self.base_signature(), "weights": weights_digest or state_dict_digest(model),
                          "patch_size": self.ps, "embed_dim": self.dim, "chip": self.grid.chip,
                          "overlap": self.grid.overlap, "model_input": chip_px, "min_valid": settings.min_valid,
                          "precision": settings.precision, "embedding_dtype": settings.embedding_dtype}
        if not settings.patch_map:  # only when off, so that scenes finished by earlier versions keep their signature
            self.signature["patch_map"] = False
        self._rows: List[Dict[str, Any]] = []
        if settings.read_workers > 0:
            self.read_workers = settings.read_workers

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
        if not self.s.patch_map:
            return
        from affine import Affine

        g = self.reader.grid
        create_partial_raster(self.partial, self.grid.cols, self.grid.rows, self.dim, self.reader.crs,
                              Affine(g.res * self.ps, 0, g.left, 0, -g.res * self.ps, g.top),
                              descriptions=[f"emb_{k:03d}" for k in range(self.dim)])

    def open_outputs(self) -> None:
        self._dst = PartialRaster(self.partial) if self.s.patch_map else None

    def sink(self, row: int, col: int, vals: np.ndarray) -> None:
        if self._dst is not None:
            self._dst.write(row, col, vals)

    def close_outputs(self) -> None:
        if self._dst is not None:
            self._dst.close()

    def outputs(self) -> List[str]:
        return required_outputs(self.out_dir, self.scene.name, self.s.patch_map)

    def stale_outputs(self) -> List[str]:
        # a map of other settings must go too when this run writes none: it would look like this run's
        return [self.final_tif, self.table, self.part]

    def part_meta(self) -> Dict[str, Any]:
        """What the scene's chip-table part records of its making (parts of one table must agree on it)."""
        return part_meta(self.model, self.signature["weights"], self.s.embedding_dtype)

    def finish(self) -> None:
        shards = [os.path.join(self.work, f"chips_{k:06d}.parquet") for k in range(len(self.grid.row_starts))]
        shards = [p for p in shards if os.path.isfile(p)]
        if not shards:
            raise ValueError(f"scene {self.scene.name}: no chip has a valid patch (no-data {self.reader.nodata}, "
                             f"--min-valid {self.s.min_valid}); nothing to embed")
        combine_shards(shards, self.table)
        if self.s.patch_map:
            finalize_cog(self.partial, self.final_tif, self.s.compress)
        self.marker_extra["n_chips"] = write_chip_part(self.table, self.part, self.s.embedding_dtype, self.part_meta())


def check_settings(settings: EmbedSettings) -> None:
    """Refuse settings that no scene could use (one line each, naming the flag)."""
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"--precision must be 'fp32' or 'bf16', got {settings.precision!r}")
    check_batch_size(settings.batch_size)
    if settings.embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"--embedding-dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got "
                         f"{settings.embedding_dtype!r}")
    if isinstance(settings.read_workers, bool) or not isinstance(settings.read_workers, int) or \
            not 0 <= settings.read_workers <= 64:
        raise ValueError(f"--read-workers must be an integer in 0..64 (0: automatic), got {settings.read_workers!r}")
    if not isinstance(settings.patch_map, bool):
        raise ValueError(f"patch_map must be True or False, got {settings.patch_map!r}")
    if not 0.0 < settings.min_valid <= 1.0:  # NaN fails too
        raise ValueError(f"--min-valid must be in (0, 1], got {settings.min_valid}")
