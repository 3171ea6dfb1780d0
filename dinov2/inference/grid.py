"""Chip layout over a scene's patch grid, and the blending weights that stitch overlapping chips.

The scene's reference grid is cut into model patches of `patch_size` pixels, anchored at the top-left pixel;
the patch grid has ceil(H / p) x ceil(W / p) cells, so the last row/column reaches past the scene edge (those
pixels are padding). Chips are `n` x `n` patches placed every `n - overlap` patches, with the last chip of a row
or column reaching past the grid when needed — every patch is covered and chip patches coincide with grid
patches, so overlapping chips predict the same cells and can be averaged. Chips are processed in rows
("strips"); once strip k is done, patch rows above strip k+1's first row are final.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np


def size_in_pixels(value: str, res: float, patch_size: int, what: str) -> int:
    """'224' / '224px' (pixels) or '2240m' (metres, CRS units) -> pixels, a multiple of `patch_size`."""
    s = str(value).strip().lower()
    number = s[:-2] if s.endswith("px") else s[:-1] if s.endswith("m") else s
    try:
        px = float(number) / (res if s.endswith("m") and not s.endswith("px") else 1.0)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a number of pixels ('224') or metres ('2240m')") from None
    if not math.isfinite(px) or px < 0:
        raise ValueError(f"{what} {value!r} must be a finite, non-negative size")
    if abs(px - round(px)) > 1e-6 or round(px) % patch_size:
        raise ValueError(f"{what} {value!r} is {px:g} px at {res:g} m pixels; it must be a whole multiple of the "
                         f"model's patch size {patch_size} px (e.g. {patch_size * 16} px = "
                         f"{patch_size * 16 * res:g} m)")
    return int(round(px))


def check_tiling(chip_px: int, overlap_px: int, height: int, width: int, unit: int, scene: str) -> None:
    """Refuse a chip that is empty, not larger than its overlap, or larger than the scene allows (its longer
    side rounded up to `unit` pixels: a bigger chip would be mostly mirrored padding)."""
    if chip_px < 1:
        raise ValueError(f"--chip-size must be positive, got {chip_px} px")
    if not 0 <= overlap_px < chip_px:
        raise ValueError(f"--overlap ({overlap_px} px) must be at least 0 and smaller than the chip ({chip_px} px)")
    limit = -(-max(height, width) // unit) * unit
    if chip_px > limit:
        raise ValueError(f"--chip-size {chip_px} px is larger than scene {scene} ({height} x {width} px) allows; "
                         f"use at most {limit} px")


def check_batch_size(value: int) -> int:
    """A batch size must be a positive integer (and not absurdly large: chips of a batch are held at once)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_BATCH:
        raise ValueError(f"--batch-size must be an integer from 1 to {MAX_BATCH}, got {value!r}")
    return value


MAX_BATCH = 4096


@dataclass
class ChipGrid:
    """Chips of `chip` patches with `overlap` patches over a patch grid of `rows` x `cols` cells."""

    rows: int
    cols: int
    chip: int
    overlap: int

    def __post_init__(self) -> None:
        if self.chip < 1:
            raise ValueError(f"chip size must be at least one patch, got {self.chip}")
        if not 0 <= self.overlap < self.chip:
            raise ValueError(f"overlap ({self.overlap} patches) must be smaller than the chip ({self.chip} patches)")

    @property
    def stride(self) -> int:
        return self.chip - self.overlap

    def _starts(self, n: int) -> List[int]:
        count = 1 if n <= self.chip else math.ceil((n - self.chip) / self.stride) + 1
        return [i * self.stride for i in range(count)]

    @property
    def row_starts(self) -> List[int]:
        return self._starts(self.rows)

    @property
    def col_starts(self) -> List[int]:
        return self._starts(self.cols)

    @property
    def n_chips(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def final_rows(self, strip: int) -> Tuple[int, int]:
        """Patch rows [a, b) that become final when strip `strip` is done."""
        starts = self.row_starts
        a = starts[strip]
        b = starts[strip + 1] if strip + 1 < len(starts) else self.rows
        return a, min(b, self.rows)

    def weights(self) -> np.ndarray:
        """(chip, chip) blending weights: a linear ramp over the overlap on every side (cross-fades sum to 1
        where two chips overlap), 1 elsewhere; never zero, so a lone chip at the scene edge keeps its values."""
        i = np.arange(self.chip, dtype=np.float64)
        ramp = np.minimum(np.minimum(i + 1, self.chip - i), self.overlap + 1) / (self.overlap + 1)
        return np.outer(ramp, ramp).astype(np.float32)
