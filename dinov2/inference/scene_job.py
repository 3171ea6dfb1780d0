"""One scene streamed through a model into raster outputs, resumable strip by strip: the part `embed` and
`predict` share (work folder, provenance, resume, absurd-pixel report, ranks).

Work happens in ``<out>/.<kind>/<scene>/`` (raw work rasters, the overlap rows carried to the next strip,
``state.json``); ``<out>/.<kind>/<scene>.done.json`` marks a finished scene. Both hold the scene's signature
(`dinov2.inference.provenance`): a stored strip or scene is reused only when its signature equals this run's,
otherwise it is recomputed and the log says what changed. A pixel whose value is absurd (see
`dinov2.inference.reader`) is no-data and counted once in the scene's report (``absurd_pixels`` in the done
marker); it never aborts the scene. Finished outputs and the marker are published through the job's `store`
(in place for a local folder; uploaded, marker last, for object storage: `dinov2.inference.output_store`). For
remote inputs the tiles under the coming chips are fetched ahead (`SceneJob._prefetch`). Subclasses define the
grid, chip reading, the model and the outputs.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from dinov2.inference.grid import ChipGrid
from dinov2.inference.normstats import resolve_stats
from dinov2.inference.output_store import OutputStore
from dinov2.inference.provenance import FORMAT_VERSION, changes, input_identity, norm_identity
from dinov2.inference.reader import SceneReader
from dinov2.inference.sources import SceneSource
from dinov2.inference.stream import StreamBlender, broadcast, owned_window, stream_chips
from dinov2.inference.writers import GDAL_CACHE_MB, atomic_json, bounded_gdal_cache, read_json

logger = logging.getLogger("dinov2")
REMOTE_READ_WORKERS = 1
REMOTE_WARM_MB = 256  # decoded tiles one read worker fetches ahead of the chips of a remote scene


class SceneJob(ABC):
    """Base of a scene's streaming job. Subclasses set `grid` (cells), `cell` (pixels per cell), `channels` and
    `weights` in `__init__` and implement the abstract methods below; `stale_outputs`, `on_chip` and `on_strip`
    are optional hooks."""

    kind = "job"
    grid: ChipGrid
    cell: int
    channels: int
    weights: np.ndarray

    def __init__(self, scene: SceneSource, reader: SceneReader, out_dir: str, norm_stats: str, batch_size: int,
                 progress: bool):
        self.scene, self.reader, self.out_dir = scene, reader, out_dir
        self.norm_mode, self.batch_size, self.progress = norm_stats, batch_size, progress
        self.work = os.path.join(out_dir, f".{self.kind}", scene.name)
        self.done_marker = os.path.join(out_dir, f".{self.kind}", f"{scene.name}.done.json")
        # statistics given as values are resolved now (they enter the signature); per-scene ones when running
        self.stats: Optional[Tuple[List[float], List[float]]] = None
        if norm_stats != "scene" or (scene.mean is not None and scene.std is not None):
            self.stats = resolve_stats(norm_stats, scene, reader)
        self.report: Dict[str, Any] = {"absurd_pixels": 0}
        # threads reading chips ahead of the model: remote reads wait on the network, local ones hardly at all
        self.read_workers = REMOTE_READ_WORKERS if scene.urls else 1
        self.store: OutputStore = OutputStore(out_dir)  # where finished outputs go (see `output_store`)
        self.request: Optional[str] = None  # what the run asked for, known without opening inputs (`embed`)
        self.marker: Optional[Dict[str, Any]] = None  # the done marker `is_done` read
        self.marker_extra: Dict[str, Any] = {}  # more facts for the done marker (embed: the chip count)
        self._warmed = threading.local()  # the window each read thread fetched last (`_prefetch`)

    def base_signature(self) -> Dict[str, Any]:
        """Signature entries every job has (subclasses add theirs)."""
        stats = self.stats or (None, None)
        sig = {"format": FORMAT_VERSION, "kind": self.kind, "bands": self.scene.bands,
               "chn_ids": self.scene.chn_ids, "inputs": input_identity(self.scene.input_files),
               "nodata": [v if v is None or v == v else "nan" for v in self.reader.nodata],  # NaN != NaN
               "norm": norm_identity(self.norm_mode, *stats)}
        if self.scene.mask is not None:  # only when given: signatures of earlier outputs stay as they were
            sig["mask"] = self.scene.mask.signature()
        if self.scene.clip is not None:
            sig["clip"] = list(self.scene.clip)
        return sig

    # ------------------------------------------------------------------ subclass interface
    @abstractmethod
    def chip_item(self, strip: int, ci: int, arr: np.ndarray, valid: np.ndarray, inside: np.ndarray) -> Any:
        """What `forward` needs of a read chip, or None when it has nothing valid to compute."""

    @abstractmethod
    def forward(self, items: List[Any]) -> List[Any]:
        """Model results of a batch of `chip_item`s, in order."""

    @abstractmethod
    def values(self, item_result: Any) -> Tuple[np.ndarray, np.ndarray]:
        """(cell values (n, n, C), weight mask (n, n) bool) of a computed chip."""

    @abstractmethod
    def create_outputs(self) -> None:
        """Create the work rasters (a scene started from its first strip)."""

    @abstractmethod
    def open_outputs(self) -> None:
        """Open the work rasters for writing (also when resuming)."""

    @abstractmethod
    def sink(self, row: int, col: int, vals: np.ndarray) -> None:
        """Write blended cell values at cell (`row`, `col`) of the work rasters."""

    @abstractmethod
    def close_outputs(self) -> None:
        """Close the work rasters (also after an error)."""

    @abstractmethod
    def finish(self) -> None:
        """Turn the work files into the final outputs (rank 0, after the last strip)."""

    @abstractmethod
    def outputs(self) -> List[str]:
        """Final files that must exist for the scene to count as finished."""

    def stale_outputs(self) -> List[str]:
        """Files of earlier runs (any settings) removed when the scene is recomputed (default: `outputs`)."""
        return self.outputs()

    def on_chip(self, strip: int, ci: int, result: Any) -> None:
        """Rank 0: a chip was blended (result None: nothing computed)."""

    def on_strip(self, strip: int) -> None:
        """Rank 0: a strip is final, before it is recorded as done."""

    # ------------------------------------------------------------------ provenance and resume
    signature: Dict[str, Any]

    def is_done(self) -> bool:
        """True when the scene's outputs exist (in the store) with this run's signature."""
        marker = self.store.read_json(self.done_marker)
        if marker and marker.get("signature") != self.signature and all(map(self.store.exists, self.outputs())):
            logger.info("%s: %s is recomputed: %s", self.kind, self.scene.name,
                        changes(marker.get("signature"), self.signature))
        self.marker = marker
        return bool(marker and marker.get("signature") == self.signature and all(map(self.store.exists,
                                                                                     self.outputs())))

    def _resume_point(self) -> Tuple[int, Optional[Dict[str, Any]]]:
        state = read_json(os.path.join(self.work, "state.json"))
        if state is not None and state.get("signature") == self.signature:
            return int(state["strips_done"]), state
        if state is not None:
            logger.info("%s: the unfinished work on %s is discarded: %s", self.kind, self.scene.name,
                        changes(state.get("signature"), self.signature))
        if os.path.isdir(self.work):
            shutil.rmtree(self.work)
        # outputs of other settings must not look finished while this run recomputes them
        self.store.remove([self.done_marker, *self.stale_outputs()])
        os.makedirs(self.work)
        return 0, None

    # ------------------------------------------------------------------ the run
    def _read(self, strip: int, ci: int) -> Tuple[Any, int]:
        """(item or None, absurd pixels this chip is the first to cover)."""
        row, col = self.grid.row_starts[strip] * self.cell, self.grid.col_starts[ci] * self.cell
        arr, valid, inside, absurd = self.reader.chip(row, col, self.grid.chip * self.cell, self.mean, self.std)
        oh, ow = owned_window(self.grid, strip, ci, self.cell)
        return self.chip_item(strip, ci, arr, valid, inside), int(absurd[:oh, :ow].sum())

    def _cache_mb(self) -> int:
        """GDAL's block cache for the run: the default bound, or for remote scenes room for the windows that the
        read workers prefetch (`_prefetch`) and the one before each (a fixed amount, whatever the scene's size)."""
        if not self.scene.urls:
            return GDAL_CACHE_MB
        return GDAL_CACHE_MB + 2 * REMOTE_WARM_MB * self.read_workers

    def _prefetch(self, chips: List[Tuple[int, int]]) -> None:
        """Remote scenes: before a group of chips is read, fetch the tiles of every band file under the chips from
        the group's first one on along its strip, as far as `REMOTE_WARM_MB` of decoded tiles allow, in one read
        per band (GDAL requests the tiles in parallel; the chip reads then find them in its block cache): a few
        round trips per strip instead of one per chip and tile. Each read thread keeps its own windows."""
        g, size = self.grid, self.grid.chip * self.cell
        done = getattr(self._warmed, "window", None)
        for strip in sorted({s for s, _ in chips}):
            cis = sorted(ci for s, ci in chips if s == strip)
            if done and done[0] == strip and done[1] <= cis[0] and cis[-1] <= done[2]:
                continue
            x0, last = g.col_starts[cis[0]] * self.cell, cis[-1]
            while last + 1 < len(g.col_starts) and self.reader.window_bytes(
                    size, g.col_starts[last + 1] * self.cell + size - x0) <= REMOTE_WARM_MB << 20:
                last += 1
            self.reader.warm(g.row_starts[strip] * self.cell, x0, size, g.col_starts[last] * self.cell + size - x0)
            done = self._warmed.window = (strip, cis[0], last)

    def _place(self, strip: int, ci: int, result: Any, n_absurd: int) -> None:
        self.report["absurd_pixels"] += n_absurd
        vals, wmask = self.values(result) if result is not None else (None, None)
        if vals is not None:  # a non-finite model output never spreads into its neighbours through the blend
            finite = np.isfinite(vals).all(-1)
            if not finite.all():
                bad = int((~finite & wmask).sum())
                self.report["nonfinite_model_outputs"] = self.report.get("nonfinite_model_outputs", 0) + bad
                vals, wmask = np.where(finite[..., None], vals, np.float32(0)), wmask & finite
        self.on_chip(strip, ci, result)
        if self._blender.place(strip, ci, vals, wmask):
            self.on_strip(strip)
            self._blender.save_carry(os.path.join(self.work, f"carry_{strip + 1}.npz"))
            atomic_json(os.path.join(self.work, "state.json"),
                        {"signature": self.signature, "strips_done": strip + 1, "report": self.report,
                         "stats": [list(map(float, self.stats[0])), list(map(float, self.stats[1]))]})
            old = os.path.join(self.work, f"carry_{strip}.npz")
            if os.path.exists(old):
                os.remove(old)

    def run(self, rank: int = 0, world: int = 1) -> None:
        """Compute the scene (resuming finished strips); rank 0 blends and writes."""
        start, state = self._resume_point() if rank == 0 else (0, None)
        if rank == 0 and state is not None:
            self.report = dict(state.get("report") or self.report)
            self.stats = self.stats or tuple(state["stats"])
        if rank == 0 and self.stats is None:
            self.stats = resolve_stats(self.norm_mode, self.scene, self.reader)
        start, self.stats = broadcast((start, self.stats), world)
        self.mean, self.std = (np.asarray(v, np.float32) for v in self.stats)
        self._blender = None
        if rank == 0:
            if start == 0:
                self.create_outputs()
            self.open_outputs()
            carry = os.path.join(self.work, f"carry_{start}.npz") if start > 0 else None
            self._blender = StreamBlender(self.grid, self.weights, self.channels, self.sink, carry)
        from dinov2.utils.progress import progress_bar

        ncols = len(self.grid.col_starts)
        bar = progress_bar(total=self.grid.n_chips, initial=start * ncols, unit="chip", desc=self.scene.name,
                           enabled=self.progress and rank == 0)
        try:
            with bounded_gdal_cache(self._cache_mb()):
                stream_chips(self.grid, start, self.batch_size, self._read, self.forward, self._place, rank, world,
                             bar.update, self.read_workers, self._prefetch if self.scene.urls else None)
        finally:
            if rank == 0:
                self.close_outputs()
            bar.close()
        if rank == 0:
            if input_identity(self.scene.input_files) != self.signature["inputs"]:
                raise ValueError(f"{self.kind}: an input of {self.scene.name} changed while it was read "
                                 f"({', '.join(self.scene.input_files)}); run again to compute it from the new "
                                 "version")
            self.finish()
            if self.report.get("nonfinite_model_outputs"):
                logger.warning("%s: the model gave non-finite outputs for %d cells of %s: written as no-data",
                               self.kind, self.report["nonfinite_model_outputs"], self.scene.name)
            if self.report["absurd_pixels"]:
                logger.warning("%s: %s has %d absurd pixel values (beyond +-1e10, or more than 1e4 standard "
                               "deviations from the band mean): treated as no-data", self.kind, self.scene.name,
                               self.report["absurd_pixels"])
            atomic_json(self.done_marker, {"signature": self.signature, "finished": time.time(),
                                           "report": self.report, "request": self.request, **self.marker_extra})
            self.store.publish([*self.outputs(), self.done_marker])  # the marker last: it says all is there
            shutil.rmtree(self.work, ignore_errors=True)


LOCK_FILE = ".panopticon.lock"


@contextlib.contextmanager
def output_lock(output_dir: str, job: str, rank: int = 0, world: int = 1) -> Iterator[None]:
    """Hold `output_dir`'s lock for the block: rank 0 takes it for the whole job (all ranks); a live holder makes
    every rank raise `FolderLockedError` naming it; a stale lock is taken over with a warning naming it."""
    from dinov2.utils.folder_lock import FolderLock, FolderLockedError, held_lock

    error, lock = None, None
    if rank == 0 and held_lock(output_dir, LOCK_FILE) is None:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = FolderLock(output_dir, LOCK_FILE, job).acquire()
        except FolderLockedError as e:
            error = ("locked", str(e))
        except OSError as e:
            error = ("oserror", f"cannot write output folder {output_dir}: {e.strerror or e}")
    error = broadcast(error, world)
    if error is not None:
        raise (FolderLockedError if error[0] == "locked" else OSError)(error[1])
    if lock is not None and lock.previous:
        logger.warning("%s: %s", job, lock.describe_previous())
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
