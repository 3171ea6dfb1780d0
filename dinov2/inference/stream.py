"""The tiling and blending core of `embed` and `predict`: chips of a `ChipGrid` go read -> model -> blend in
row-major order, across ranks, with memory that does not grow with the scene.

A grid cell is what one output pixel covers: a model patch for embeddings, a scene pixel for class maps. Chips
are read a batch per rank at a time (the next groups prefetched in helper threads), run through the model in full
batches, gathered on rank 0 and blended there, chip by chip, by `StreamBlender`, which hands every part of the
map that no later chip touches to a `sink` at once (positional writes into raw work files) and keeps only one
chip-sized window plus the overlap rows a strip of chips leaves to the next.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dinov2.inference.grid import ChipGrid

Sink = Callable[[int, int, np.ndarray], None]  # (cell row, cell col, (rows, cols, channels) float32; NaN = none)


def dist_info() -> Tuple[int, int]:
    """(rank, world size) of the torch.distributed job, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj: Any, rank: int, world: int) -> List[Any]:
    """Every rank's `obj` on rank 0 (an empty list elsewhere)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def agree(error: Optional[BaseException], world: int) -> None:
    """Raise on every rank when any rank had an error (its own error where it had one, else the first rank's
    message as a ValueError), so that no rank goes on to wait for the others."""
    if world == 1:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    errors: List[Optional[str]] = [None] * world
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ValueError(first)


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StreamBlender:
    """Blends chip results (cell-level values and weights) chip by chip in row-major order, holding one chip-sized
    window and the overlap rows a strip leaves to the next (``overlap`` cell rows x grid width): memory does not
    grow with the scene. After chip (s, j), cell columns [c_j, c_j + stride) of the strip's rows are final
    horizontally; of those, rows [r_s, r_s + stride) are final and go to `sink` (all rows in the last strip), and
    the bottom ``overlap`` rows go to the next strip's carry. Sink writes are idempotent, so a resumed strip is
    simply redone from its carry (`save_carry` / the `carry` file of a resumed run)."""

    def __init__(self, grid: ChipGrid, weights: np.ndarray, channels: int, sink: Sink,
                 carry: Optional[str] = None):
        self.grid, self.weights, self.sink = grid, weights, sink
        self.n, self.o, self.st = grid.chip, grid.overlap, grid.stride
        self.n_strips, self.ncols = len(grid.row_starts), len(grid.col_starts)
        acc_w = grid.col_starts[-1] + grid.chip
        self.buf_num = np.zeros((self.n, self.n, channels), np.float32)
        self.buf_den = np.zeros((self.n, self.n), np.float32)
        self.carry_num = np.zeros((self.o, acc_w, channels), np.float32)
        self.carry_den = np.zeros((self.o, acc_w), np.float32)
        if carry is not None and self.o > 0:
            with np.load(carry) as saved:
                self.carry_num[...], self.carry_den[...] = saved["num"], saved["den"]
        self.next_num, self.next_den = np.zeros_like(self.carry_num), np.zeros_like(self.carry_den)

    def place(self, strip: int, ci: int, values: Optional[np.ndarray], wmask: Optional[np.ndarray]) -> bool:
        """Blend chip (strip, ci): `values` (n, n, C) with weight mask `wmask` (n, n) bool, or None for a chip
        without valid cells. Returns True when the chip ended its strip (the caller then commits the strip)."""
        g, n, o, st = self.grid, self.n, self.o, self.st
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
        if values is not None:
            w = self.weights * wmask
            self.buf_num += values * w[..., None]
            self.buf_den += w
        last_col, last_strip = ci == self.ncols - 1, strip == self.n_strips - 1
        wc = n if last_col else st
        kr, kc = min(n if last_strip else st, g.rows - r0), min(wc, g.cols - c0)
        if kr > 0 and kc > 0:
            den = self.buf_den[:kr, :kc, None]
            with np.errstate(invalid="ignore", divide="ignore"):
                vals = np.where(den > 0, self.buf_num[:kr, :kc] / den, np.float32(np.nan))
            self.sink(r0, c0, vals)
        if not last_strip and o:
            self.next_num[:, c0:c0 + wc] = self.buf_num[st:, :wc]
            self.next_den[:, c0:c0 + wc] = self.buf_den[st:, :wc]
        return last_col

    def save_carry(self, path: str) -> None:
        """Write the overlap rows the finished strip leaves to the next one, then make them the current carry."""
        tmp = path + ".tmp.npz"
        np.savez(tmp, num=self.next_num, den=self.next_den)
        os.replace(tmp, path)
        self.carry_num, self.next_num = self.next_num, self.carry_num
        self.carry_den, self.next_den = self.next_den, self.carry_den
        self.next_num[...], self.next_den[...] = 0.0, 0.0


def owned_window(grid: ChipGrid, strip: int, ci: int, cell: int) -> Tuple[int, int]:
    """(rows, cols) in pixels, from a chip's top-left corner, of the pixels this chip is the first to cover: each
    scene pixel belongs to exactly one chip (for counting per-pixel events once)."""
    last_strip, last_col = strip == len(grid.row_starts) - 1, ci == len(grid.col_starts) - 1
    return ((grid.chip if last_strip else grid.stride) * cell, (grid.chip if last_col else grid.stride) * cell)


def stream_chips(grid: ChipGrid, start: int, batch_size: int, read: Callable[[int, int], Tuple[Any, Any]],
                 forward: Callable[[List[Any]], List[Any]], place: Callable[[int, int, Any, Any], None],
                 rank: int = 0, world: int = 1, progress: Optional[Callable[[int], None]] = None,
                 read_workers: int = 1, prefetch: Optional[Callable[[List[Tuple[int, int]]], None]] = None) -> None:
    """Run chips from strip `start` on. `read(strip, ci)` -> (item or None when there is nothing to compute, a
    small per-chip note) runs in `read_workers` helper threads, each reading one group ahead of the model (more
    than one hides the latency of remote reads; `read` must then be thread-safe), after `prefetch(chips)` (the
    group's (strip, ci) of this rank, in the same thread: e.g. one read of their common window); `forward(items)` (full
    batches, one result per item) on every rank for its chips (chip k belongs to rank k % world);
    `place(strip, ci, result or None, note)` on rank 0 in row-major order."""
    ncols = len(grid.col_starts)
    first, end = start * ncols, len(grid.row_starts) * ncols
    size = batch_size * world  # a group: one batch per rank, the unit of reading and of gathering results
    groups = [range(a, min(a + size, end)) for a in range(first, end, size)]

    def read_group(group: Sequence[int]) -> List[Tuple[int, Any, Any]]:
        mine = [k for k in group if k % world == rank]
        if prefetch is not None and mine:
            prefetch([divmod(k, ncols) for k in mine])
        return [(k, *read(*divmod(k, ncols))) for k in mine]

    carry: List[Tuple[int, Any, Any]] = []  # this rank's chips read but not computed yet (fewer than a batch)
    ready: Dict[int, Tuple[Any, Any]] = {}  # rank 0: results waiting for their turn in row-major order
    next_chip = first
    depth = max(1, int(read_workers))
    with ThreadPoolExecutor(max_workers=depth) as pool:
        pending = [pool.submit(read_group, g) for g in groups[:depth]]
        for gi, group in enumerate(groups):
            chips = pending.pop(0).result()
            if gi + depth < len(groups):
                pending.append(pool.submit(read_group, groups[gi + depth]))
            results = [(k, (None, note)) for k, item, note in chips if item is None]
            todo = carry + [c for c in chips if c[1] is not None]
            # full batches only (CPU forward passes are much slower per chip in small ones), except at the end
            n = len(todo) if gi + 1 == len(groups) else len(todo) // batch_size * batch_size
            for a in range(0, n, batch_size):
                batch = todo[a:a + batch_size]
                outs = forward([item for _, item, _ in batch])
                results.extend((k, (out, note)) for (k, _, note), out in zip(batch, outs))
            carry = todo[n:]
            frontier = carry[0][0] if carry else group[-1] + 1  # chips from here on are not done on this rank
            gathered = gather((results, frontier), rank, world)
            if rank == 0:
                for part, _ in gathered:
                    ready.update(part)
                limit = min(f for _, f in gathered)
                for k in range(next_chip, limit):
                    place(*divmod(k, ncols), *ready.pop(k))
                    if progress is not None:
                        progress(1)
                next_chip = max(next_chip, limit)
