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
    if s.endswith("px"):
        px = float(s[:-2])
    elif s.endswith("m"):
        px = float(s[:-1]) / res
    else:
        px = float(s)
    if px < 0 or abs(px - round(px)) > 1e-6 or round(px) % patch_size:
        raise ValueError(f"{what} {value!r} is {px:g} px at {res:g} m pixels; it must be a whole multiple of the "
                         f"model's patch size {patch_size} px (e.g. {patch_size * 16} px = "
                         f"{patch_size * 16 * res:g} m)")
    return int(round(px))


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
