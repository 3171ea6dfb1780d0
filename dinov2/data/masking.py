"""iBOT block masking (BEiT / DINOv2 `MaskingGenerator`), driven only by torch's global RNG."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch


def _uniform(low: float, high: float) -> float:
    # Same semantics as random.uniform (low > high allowed), but on torch's global RNG so that
    # torch.manual_seed / DataLoader worker seeding makes masks reproducible.
    return low + (high - low) * torch.rand(()).item()


class MaskingGenerator:
    """Place random rectangles on a patch grid until a requested number of patches is masked.

    Args:
        input_size: grid size, int (square) or (height, width) in patches (16 for 224 px / patch 14).
        num_masking_patches: default count used when the generator is called without an argument.
        min_num_patches: smallest rectangle area tried.
        max_num_patches: largest rectangle area (DINOv2 uses half of the grid).
        min_aspect: smallest aspect ratio; rectangles use a log-uniform ratio in [min_aspect, max_aspect].
        max_aspect: defaults to 1 / min_aspect.
    """

    def __init__(
        self,
        input_size: Union[int, Sequence[int]],
        num_masking_patches: Optional[int] = None,
        min_num_patches: int = 4,
        max_num_patches: Optional[float] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        if len(input_size) != 2 or min(input_size) < 1:
            raise ValueError(f"MaskingGenerator input_size must be a positive int or (h, w), got {input_size!r}")
        self.height, self.width = int(input_size[0]), int(input_size[1])
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = self.num_patches if max_num_patches is None else max_num_patches
        if min_aspect <= 0:
            raise ValueError(f"MaskingGenerator min_aspect must be > 0, got {min_aspect}")
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ {self.max_num_patches}], "
            f"max = {self.num_masking_patches}, {self.log_aspect_ratio[0]:.3f} ~ {self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> Tuple[int, int]:
        """Grid shape (height, width) in patches."""
        return self.height, self.width

    def _mask(self, mask: torch.Tensor, max_mask_patches: float) -> int:
        delta = 0
        for _ in range(10):
            target_area = _uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(_uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w < self.width and 0 < h < self.height:
                top = int(torch.randint(0, self.height - h + 1, ()).item())
                left = int(torch.randint(0, self.width - w + 1, ()).item())
                window = mask[top : top + h, left : left + w]
                newly = h * w - int(window.sum().item())
                # only accept rectangles that do not overshoot the requested count
                if 0 < newly <= max_mask_patches:
                    window.fill_(True)
                    delta += newly
            if delta > 0:
                break
        return delta

    def __call__(self, num_masking_patches: Optional[int] = None) -> torch.Tensor:
        """Return a bool mask of shape (height, width) with at most `num_masking_patches` True entries."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask
