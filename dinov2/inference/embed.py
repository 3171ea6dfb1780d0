"""Embed whole scenes: stream chips a batch at a time, run the backbone, blend overlapping patch embeddings chip
by chip, write a patch-embedding COG per scene and one GeoParquet of chip embeddings — resumable and shardable
over ranks, with memory that does not grow with the scene.

Per scene, work happens in ``<out>/.embed/<scene>/`` (the partial map as a raw ENVI work file, one parquet shard
per strip of chips, the overlap rows carried to the next strip, ``state.json``); the finished
``<scene>_patches.tif`` is renamed into place and ``.embed/<scene>.done.json`` marks it complete. Under
torch.distributed every rank embeds every world-size-th chip and rank 0 blends and writes, so the output equals a
single-process run.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from dinov2.inference.grid import ChipGrid, size_in_pixels
from dinov2.inference.normstats import resolve_stats
from dinov2.inference.reader import SceneReader
from dinov2.inference.sources import SceneSource, collect_scenes
from dinov2.inference.writers import (atomic_json, bounded_gdal_cache, combine_shards, create_partial_raster,
                                      finalize_cog, read_json, write_table, PartialRaster)
from dinov2.inference.chips_table import (EMBEDDING_DTYPES, PART_FORMAT, check_compatible, part_info, part_rows,
                                          write_chip_part)

logger = logging.getLogger("dinov2")
FORMAT_VERSION = 2  # 2: raw ENVI work file, chip-by-chip blending


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


def _dist() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any, rank: int, world: int) -> List[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _file_sig(paths: Sequence[str]) -> List[List[Any]]:
    return [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in paths]


class SceneEmbedder:
    """Embeds one scene with a loaded backbone (see the module docstring)."""

    def __init__(self, scene: SceneSource, model: torch.nn.Module, out_dir: str, settings: EmbedSettings,
                 device: torch.device):
        self.scene, self.model, self.out_dir, self.s, self.device = scene, model, out_dir, settings, device
        info = model.info
        self.ps, self.dim = int(info.patch_size), int(info.embed_dim)
        self.reader = SceneReader(scene)
        g = self.reader.grid
        metres = [v for v in (settings.chip_size, settings.overlap) if str(v).strip().lower().endswith("m")]
        if metres and self.reader.crs.is_geographic:
            raise ValueError(f"scene {scene.name}: chip size/overlap {metres} are in metres but the scene's CRS "
                             f"{self.reader.crs} is in degrees; give pixels instead")
        chip_px = size_in_pixels(settings.chip_size, g.res, self.ps, "chip size")
        overlap_px = size_in_pixels(settings.overlap, g.res, self.ps, "overlap")
        if chip_px == 0:
            raise ValueError("chip size must be positive")
        self.grid = ChipGrid(-(-g.height // self.ps), -(-g.width // self.ps), chip_px // self.ps,
                             overlap_px // self.ps)
        self.weights = self.grid.weights()
        self.final_tif = os.path.join(out_dir, f"{scene.name}_patches.tif")
        self.work = os.path.join(out_dir, ".embed", scene.name)
        self.done_marker = os.path.join(out_dir, ".embed", f"{scene.name}.done.json")
        self.table = os.path.join(out_dir, ".embed", f"{scene.name}.chips.parquet")
        self.signature = {
            "version": FORMAT_VERSION, "model": str(info.source), "ckpt": info.ckpt_path, "patch_size": self.ps,
            "embed_dim": self.dim, "chip": self.grid.chip, "overlap": self.grid.overlap,
            "min_valid": settings.min_valid, "norm_stats": settings.norm_stats, "bands": scene.bands,
            "chn_ids": scene.chn_ids, "files": _file_sig(scene.files), "precision": settings.precision,
        }

    # ------------------------------------------------------------------ reading (runs in a helper thread)
    def _read_chips(self, positions: Sequence[int], rank: int, world: int) -> List[Tuple]:
        """(strip, chip column, normalised chip, valid mask, in-scene mask) of this rank's chips among `positions`
        (row-major chip indices; chip k belongs to rank k % world)."""
        size, ncols = self.grid.chip * self.ps, len(self.grid.col_starts)
        out = []
        for k in positions:
            if k % world == rank:
                strip, ci = divmod(k, ncols)
                row, col = self.grid.row_starts[strip] * self.ps, self.grid.col_starts[ci] * self.ps
                out.append((strip, ci, *self.reader.chip(row, col, size, self.mean, self.std)))
        return out

    def _strip_chips(self, strips: Sequence[int], rank: int, world: int) -> List[Tuple]:
        """This rank's chips of whole `strips` (see `_read_chips`)."""
        ncols = len(self.grid.col_starts)
        return self._read_chips([s * ncols + c for s in strips for c in range(ncols)], rank, world)

    def _chip_groups(self, start: int, world: int) -> List[range]:
        """Row-major chip indices from strip `start` on, in groups of one batch per rank: the unit of reading
        (prefetched in a thread) and of gathering results, so chips in flight do not grow with scene width."""
        ncols = len(self.grid.col_starts)
        first, end = start * ncols, len(self.grid.row_starts) * ncols
        size = self.s.batch_size * world
        return [range(a, min(a + size, end)) for a in range(first, end, size)]

    def _patch_valid(self, valid: np.ndarray, inside: np.ndarray) -> Tuple[np.ndarray, float]:
        n, p = self.grid.chip, self.ps
        v = valid.reshape(n, p, n, p).sum((1, 3))
        i = inside.reshape(n, p, n, p).sum((1, 3))
        pvalid = (i > 0) & (v >= self.s.min_valid * np.maximum(i, 1))
        return pvalid, float(valid.sum()) / float(max(inside.sum(), 1))

    # ------------------------------------------------------------------ model
    @torch.no_grad()
    def _forward(self, imgs: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.stack(imgs)).to(self.device)
        ids = torch.tensor(self.scene.chn_ids, dtype=torch.long, device=self.device).expand(x.shape[0], -1)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.s.precision == "bf16"):
            out = self.model.forward_features({"imgs": x, "chn_ids": ids})
        n = self.grid.chip
        cls = out["x_norm_clstoken"].float().cpu().numpy()
        patches = out["x_norm_patchtokens"].float().cpu().numpy().reshape(x.shape[0], n, n, self.dim)
        return cls, patches

    def _valid_chips(self, chips) -> List[Tuple]:
        """(strip, chip column, chip, patch validity, valid fraction) of the chips with at least one valid patch
        (the others are not embedded at all)."""
        todo = []
        for strip, ci, arr, valid, inside in chips:
            pvalid, frac = self._patch_valid(valid, inside)
            if pvalid.any():
                todo.append((strip, ci, arr, pvalid, frac))
        return todo

    def _embed_chips(self, todo: List[Tuple], flush: bool) -> Tuple[List[Dict[str, Any]], List[Tuple]]:
        """Embed `todo` in full batches; returns the results and the chips left over (fewer than a batch, kept for
        the next group of strips unless `flush`): CPU forward passes are much slower per chip in small batches."""
        bs = self.s.batch_size
        n = len(todo) if flush else len(todo) // bs * bs
        results = []
        for a in range(0, n, bs):
            batch = todo[a:min(a + bs, n)]
            cls, patches = self._forward([t[2] for t in batch])
            for (strip, ci, _, pvalid, frac), c, p in zip(batch, cls, patches):
                results.append({"strip": strip, "ci": ci, "cls": c, "patches": p, "pvalid": pvalid,
                                "valid_fraction": frac})
        return results, todo[n:]

    # ------------------------------------------------------------------ chip table
    def _chip_rows(self, strip: int, results: List[Dict[str, Any]]) -> Dict[str, Any]:
        import shapely
        from rasterio.warp import transform as warp_points
        from rasterio.warp import transform_bounds

        g, ps, n = self.reader.grid, self.ps, self.grid.chip
        r0 = self.grid.row_starts[strip] * ps
        cols: Dict[str, list] = {k: [] for k in ("chip_id", "scene", "chip_row", "chip_col", "row_px", "col_px",
                                                 "height_px", "width_px", "valid_fraction", "n_valid_patches",
                                                 "footprint_wkb", "bbox_wgs84", "lon", "lat")}
        cls, mean = [], []
        crs = self.reader.crs
        for r in results:
            c0 = self.grid.col_starts[r["ci"]] * ps
            h, w = min(n * ps, g.height - r0), min(n * ps, g.width - c0)
            x0, y1 = g.left + c0 * g.res, g.top - r0 * g.res
            x1, y0 = x0 + w * g.res, y1 - h * g.res
            west, south, east, north = transform_bounds(crs, "EPSG:4326", x0, y0, x1, y1, densify_pts=21)
            (lon,), (lat,) = warp_points(crs, "EPSG:4326", [(x0 + x1) / 2], [(y0 + y1) / 2])
            cols["chip_id"].append(f"{self.scene.name}:r{strip}c{r['ci']}")
            cols["scene"].append(self.scene.name)
            cols["chip_row"].append(strip)
            cols["chip_col"].append(r["ci"])
            cols["row_px"].append(r0)
            cols["col_px"].append(c0)
            cols["height_px"].append(h)
            cols["width_px"].append(w)
            cols["valid_fraction"].append(r["valid_fraction"])
            cols["n_valid_patches"].append(r["n_valid"])
            cols["footprint_wkb"].append(shapely.to_wkb(shapely.box(x0, y0, x1, y1)))
            cols["bbox_wgs84"].append({"xmin": west, "ymin": south, "xmax": east, "ymax": north})
            cols["lon"].append(float(lon))
            cols["lat"].append(float(lat))
            cls.append(r["cls"])
            mean.append(r["mean"])
        k = len(results)
        cols.update(sensor=[self.scene.sensor] * k, bands=[self.scene.bands] * k,
                    chn_ids=[self.scene.chn_ids] * k, source_files=[self.scene.files] * k,
                    datetime=[self.scene.datetime] * k, crs=[crs.to_string()] * k,
                    cls_embedding=np.asarray(cls, np.float32).reshape(k, self.dim),
                    mean_embedding=np.asarray(mean, np.float32).reshape(k, self.dim))
        return cols

    # ------------------------------------------------------------------ main loop
    def _state(self) -> Tuple[int, Optional[Dict[str, Any]]]:
        state = read_json(os.path.join(self.work, "state.json"))
        if state is not None and state.get("signature") == self.signature:
            return int(state["strips_done"]), state
        if os.path.isdir(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work)
        return 0, None

    def is_done(self) -> bool:
        marker = read_json(self.done_marker)
        return bool(marker and marker.get("signature") == self.signature and os.path.isfile(self.final_tif)
                    and os.path.isfile(self.table))

    def run(self, rank: int = 0, world: int = 1) -> None:
        """Embed the scene (resuming finished strips); rank 0 blends and writes."""
        start, state = self._state() if rank == 0 else (0, None)
        start, stats = _broadcast((start, state["stats"] if state else None), world)
        if stats is None:
            stats = resolve_stats(self.s.norm_stats, self.scene, self.reader)
        self.mean, self.std = (np.asarray(stats[0], np.float32), np.asarray(stats[1], np.float32))
        grid = self.grid
        partial = os.path.join(self.work, "patches_partial.bin")
        blender = None
        if rank == 0:
            if start == 0:
                g = self.reader.grid
                from affine import Affine

                create_partial_raster(partial, grid.cols, grid.rows, self.dim, self.reader.crs,
                                      Affine(g.res * self.ps, 0, g.left, 0, -g.res * self.ps, g.top))
            blender = _StreamBlender(self, partial, stats, start)
        from tqdm import tqdm

        ncols = len(grid.col_starts)
        bar = tqdm(total=grid.n_chips, initial=start * ncols, unit="chip", desc=self.scene.name,
                   disable=not (self.s.progress and rank == 0), dynamic_ncols=True)
        groups = self._chip_groups(start, world)
        carry: List[Tuple] = []  # this rank's chips read but not yet embedded (fewer than a batch)
        ready: Dict[int, Dict[str, Any]] = {}  # rank 0: results waiting for their turn in row-major order
        next_chip = start * ncols
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(self._read_chips, groups[0], rank, world) if groups else None
                for gi, group in enumerate(groups):
                    chips = pending.result()
                    if gi + 1 < len(groups):
                        pending = pool.submit(self._read_chips, groups[gi + 1], rank, world)
                    results, carry = self._embed_chips(carry + self._valid_chips(chips),
                                                       flush=gi + 1 == len(groups))
                    # chips from this rank's first carried one on are not done yet
                    frontier = carry[0][0] * ncols + carry[0][1] if carry else group[-1] + 1
                    gathered = _gather((results, frontier), rank, world)
                    if rank == 0:
                        for part, _ in gathered:
                            for r in part:
                                ready[r["strip"] * ncols + r["ci"]] = r
                        limit = min(f for _, f in gathered)
                        for k in range(next_chip, limit):  # a chip without a result had no valid patch
                            blender.place(*divmod(k, ncols), ready.pop(k, None))
                            bar.update(1)
                        next_chip = max(next_chip, limit)
        finally:
            if blender is not None:
                blender.close()
        bar.close()
        if rank == 0:
            self._finish(partial, len(grid.row_starts))

    def _end_strip(self, strip: int, rows: List[Dict[str, Any]], carry_num: np.ndarray, carry_den: np.ndarray,
                   stats) -> None:
        """Commit a finished strip: its chip-table shard, the overlap rows it leaves to the next strip, state."""
        if rows:  # a strip of no-data chips has no rows (and no shard)
            import pyarrow as pa

            write_table(os.path.join(self.work, f"chips_{strip:06d}.parquet"), self._chip_rows(strip, rows),
                        {"datetime": pa.string()})
        carry = os.path.join(self.work, f"carry_{strip + 1}.npz")
        tmp = carry + ".tmp.npz"
        np.savez(tmp, num=carry_num, den=carry_den)
        os.replace(tmp, carry)
        atomic_json(os.path.join(self.work, "state.json"),
                    {"signature": self.signature, "strips_done": strip + 1, "stats": [list(map(float, stats[0])),
                                                                                       list(map(float, stats[1]))]})
        old = os.path.join(self.work, f"carry_{strip}.npz")
        if os.path.exists(old):
            os.remove(old)

    def _finish(self, partial: str, n_strips: int) -> None:
        shards = [os.path.join(self.work, f"chips_{k:06d}.parquet") for k in range(n_strips)]
        shards = [p for p in shards if os.path.isfile(p)]
        if not shards:
            raise ValueError(f"scene {self.scene.name}: no chip has a valid patch (no-data {self.reader.nodata}, "
                             f"--min-valid {self.s.min_valid}); nothing to embed")
        combine_shards(shards, self.table)
        finalize_cog(partial, self.final_tif, self.s.compress)
        atomic_json(self.done_marker, {"signature": self.signature, "finished": time.time(),
                                       "settings": asdict(self.s)})
        shutil.rmtree(self.work, ignore_errors=True)


class _StreamBlender:
    """Blends chip results into the partial raster chip by chip, in row-major order, holding one chip-sized window
    and the overlap rows a strip leaves to the next (``overlap`` patch rows x scene width): memory does not grow with
    the scene. After chip (s, j), patch columns [c_j, c_j + stride) of the strip's rows are final horizontally; of
    those, rows [r_s, r_s + stride) are final and written (all rows in the last strip), and the bottom ``overlap``
    rows go to the next strip's carry. Writes are idempotent, so a resumed strip is simply redone."""

    def __init__(self, emb: "SceneEmbedder", partial: str, stats, start: int):
        self.emb, self.stats = emb, stats
        g = emb.grid
        self.n, self.o, self.st = g.chip, g.overlap, g.stride
        self.n_strips, self.ncols = len(g.row_starts), len(g.col_starts)
        acc_w = g.col_starts[-1] + g.chip
        dim = emb.dim
        self.buf_num = np.zeros((self.n, self.n, dim), np.float32)
        self.buf_den = np.zeros((self.n, self.n), np.float32)
        self.carry_num = np.zeros((self.o, acc_w, dim), np.float32)
        self.carry_den = np.zeros((self.o, acc_w), np.float32)
        if start > 0 and self.o > 0:
            saved = np.load(os.path.join(emb.work, f"carry_{start}.npz"))
            self.carry_num[...], self.carry_den[...] = saved["num"], saved["den"]
        self.next_num, self.next_den = np.zeros_like(self.carry_num), np.zeros_like(self.carry_den)
        self.rows: List[Dict[str, Any]] = []
        self.dst = PartialRaster(partial)

    def place(self, strip: int, ci: int, r: Optional[Dict[str, Any]]) -> None:
        g, n, o, st = self.emb.grid, self.n, self.o, self.st
        c0, r0 = g.col_starts[ci], g.row_starts[strip]
        if ci == 0:
            self.buf_num[...], self.buf_den[...] = 0.0, 0.0
            new = 0
        else:  # slide the window right by one stride; the overlap columns keep their partial sums
            self.buf_num[:, :o], self.buf_den[:, :o] = self.buf_num[:, st:].copy(), self.buf_den[:, st:].copy()
            self.buf_num[:, o:], self.buf_den[:, o:] = 0.0, 0.0
            new = o
        if o:  # the previous strips' sums over this strip's top rows, for the columns entering the window
            self.buf_num[:o, new:] += self.carry_num[:, c0 + new:c0 + n]
            self.buf_den[:o, new:] += self.carry_den[:, c0 + new:c0 + n]
        if r is not None:
            w = self.emb.weights * r["pvalid"]
            self.buf_num += r["patches"] * w[..., None]
            self.buf_den += w
            self.rows.append({"ci": ci, "cls": r["cls"], "mean": r["patches"][r["pvalid"]].mean(0),
                              "n_valid": int(r["pvalid"].sum()), "valid_fraction": r["valid_fraction"]})
        last_col, last_strip = ci == self.ncols - 1, strip == self.n_strips - 1
        wc = n if last_col else st
        kr, kc = min(n if last_strip else st, g.rows - r0), min(wc, g.cols - c0)
        if kr > 0 and kc > 0:
            den = self.buf_den[:kr, :kc, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                vals = np.where(den > 0, self.buf_num[:kr, :kc] / den, np.float32(np.nan))
            self.dst.write(r0, c0, vals)
        if not last_strip and o:
            self.next_num[:, c0:c0 + wc] = self.buf_num[st:, :wc]
            self.next_den[:, c0:c0 + wc] = self.buf_den[st:, :wc]
        if last_col:  # positional writes reach the OS before the strip is recorded as done
            self.emb._end_strip(strip, self.rows, self.next_num, self.next_den, self.stats)
            self.rows = []
            self.carry_num, self.next_num = self.next_num, self.carry_num
            self.carry_den, self.next_den = self.next_den, self.carry_den
            self.next_num[...], self.next_den[...] = 0.0, 0.0

    def close(self) -> None:
        self.dst.close()


def embed_scenes(scenes: Sequence[SceneSource], model: torch.nn.Module, output_dir: str,
                 settings: Optional[EmbedSettings] = None, device: Optional[torch.device] = None) -> Dict[str, Any]:
    """Embed `scenes` into `output_dir` (skipping finished ones); returns paths and counts (rank 0)."""
    settings = settings or EmbedSettings()
    if settings.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {settings.precision!r}")
    if settings.batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {settings.batch_size}")
    if settings.embedding_dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got "
                         f"{settings.embedding_dtype!r}")
    if not 0.0 < settings.min_valid <= 1.0:
        raise ValueError(f"min_valid must be in (0, 1], got {settings.min_valid}")
    if not hasattr(model, "info"):
        raise ValueError("the model must come from dinov2.load_model (it needs model.info)")
    if not model.info.any_sensor:
        raise ValueError(f"model {model.info.source!r} is an RGB DINOv2 backbone; embedding needs a Panopticon "
                         "(any-sensor) model")
    rank, world = _dist()
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    os.makedirs(os.path.join(output_dir, ".embed"), exist_ok=True)
    chips_dir = _chips_dataset(output_dir, rank)
    from dinov2.utils.digest import state_dict_digest

    part_meta = {"format": PART_FORMAT, "model_digest": state_dict_digest(model), "model": str(model.info.source),
                 "embedding_dtype": settings.embedding_dtype}
    if rank == 0:  # one chip table holds one model's embeddings, in one dtype
        others = [os.path.join(chips_dir, f) for f in os.listdir(chips_dir) if f.endswith(".parquet")
                  and f[:-len(".parquet")] not in {s.name for s in scenes}]
        check_compatible(others, part_meta)
    done, tables, skipped = [], [], []
    from dinov2.models.panopticon import frozen_fused_cache

    for scene in scenes:
        emb = SceneEmbedder(scene, model, output_dir, settings, device)
        finished = _broadcast(emb.is_done() if rank == 0 else None, world)
        if finished:
            skipped.append(scene.name)
            logger.info("embed: %s already finished, skipped", scene.name)
        else:
            # weights are fixed here: fold the patch embedding once per scene
            with frozen_fused_cache(model), bounded_gdal_cache():
                emb.run(rank, world)
        emb.reader.close()
        tables.append(emb.table)
        done.append(emb.final_tif)
    result: Dict[str, Any] = {"patches": done, "skipped": skipped, "chips": chips_dir, "n_chips": 0}
    if rank == 0:
        for scene, table in zip(scenes, tables):
            part = os.path.join(chips_dir, f"{scene.name}.parquet")
            if scene.name in skipped and os.path.isfile(part) and part_info(part) == part_meta:
                result["n_chips"] += part_rows(part)
            else:
                result["n_chips"] += write_chip_part(table, part, settings.embedding_dtype, part_meta)
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
          nodata: Optional[float] = None, device: Optional[str] = None, **settings) -> Dict[str, Any]:
    """Python entry point: ``embed('scene.tif', model='panopticon_vitb14', output_dir='out', sensor=..., ...)``.

    `inputs`: a path or list of paths (GeoTIFFs, folders, scenes YAMLs, STAC item JSONs); `model`: anything
    `dinov2.load_model` takes, or a loaded model; `settings`: fields of `EmbedSettings`."""
    from dinov2.distributed import get_device
    from dinov2.hub import load_model

    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    scenes = collect_scenes([str(p) for p in paths], sensor, bands, wavelengths_nm, nodata)
    net = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    return embed_scenes(scenes, net, output_dir, EmbedSettings(**settings),
                        torch.device(device) if device else get_device())
