"""Multi-crop collate for pretraining: stacks crop dicts (crop-major) and builds iBOT masks."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from dinov2.data.masking import MaskingGenerator

_DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def _as_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"collate dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def _sample_dict(sample: Any) -> Dict[str, Any]:
    # DINOv2-style datasets return (augmented, target); Panopticon datasets return the augmentation dict itself.
    if isinstance(sample, (tuple, list)):
        sample = sample[0]
    if not isinstance(sample, dict) or "global_crops" not in sample or "local_crops" not in sample:
        raise ValueError(
            "collate_data_and_cast expects samples produced by PanopticonAugmentation (dicts with 'global_crops' "
            f"and 'local_crops'), got {type(sample).__name__}"
        )
    return sample


def stack_crops(samples: Sequence[Dict[str, Any]], family: str, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Stack one crop family crop-major (all samples' crop 0, then crop 1, ...); `imgs` is cast to `dtype`."""
    n_crops = len(samples[0][family])
    for s_idx, s in enumerate(samples):
        if len(s[family]) != n_crops:
            raise ValueError(f"sample {s_idx} has {len(s[family])} {family}, sample 0 has {n_crops}")
    if n_crops == 0:
        return {}
    first = samples[0][family][0]
    out: Dict[str, torch.Tensor] = {}
    for key, ref in first.items():
        if not torch.is_tensor(ref):
            continue
        tensors = []
        for c in range(n_crops):
            for s_idx, s in enumerate(samples):
                t = s[family][c].get(key)
                if not torch.is_tensor(t) or t.shape != ref.shape:
                    got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                    hint = (
                        " Crops with different channel counts must be padded to a fixed count with ChnPad "
                        "(PanopticonAugmentation does this)."
                        if key in ("imgs", "chn_ids", "spec_masks")
                        else ""
                    )
                    if key == "chn_ids" and torch.is_tensor(t) and t.dim() != ref.dim():
                        hint += (
                            " chn_ids mix (C,) and (C,2) formats: set full_spectra the same on every dataset of the"
                            " batch."
                        )
                    raise ValueError(
                        f"cannot collate {family}[{c}]['{key}'] of sample {s_idx}: shape {got} differs from "
                        f"{tuple(ref.shape)} of sample 0 crop 0.{hint}"
                    )
                tensors.append(t)
        stacked = torch.stack(tensors)
        out[key] = stacked.to(dtype) if key == "imgs" else stacked
    return out


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: Sequence[float],
    mask_probability: float,
    dtype: Union[torch.dtype, str],
    n_tokens: Optional[int] = None,
    mask_generator: Optional[MaskingGenerator] = None,
    patch_size: Optional[int] = None,
) -> Dict[str, Any]:
    """Collate augmented pretraining samples into the training batch dict.

    Args:
        samples_list: outputs of `PanopticonAugmentation` (or `(output, target)` tuples).
        mask_ratio_tuple: (min, max) fraction of patches masked in a masked global crop.
        mask_probability: fraction of global crops that receive an iBOT mask.
        dtype: dtype of the collated `imgs` (fp16 in training).
        n_tokens: patches per global crop; derived from `mask_generator` or from crop size / `patch_size` if None.
        mask_generator: a `MaskingGenerator`; built as DINOv2 does (half-grid max block) if None.
        patch_size: only used to derive `n_tokens` when neither it nor `mask_generator` is given.
    Returns:
        dict with `collated_global_crops`, `collated_local_crops`, `collated_masks` (2B, N) bool,
        `mask_indices_list`, `masks_weight`, `upperbound`, `n_masked_patches` (and `pe_id` if samples carry one).
    """
    if len(samples_list) == 0:
        raise ValueError("collate_data_and_cast got an empty samples_list")
    dtype = _as_dtype(dtype)
    samples = [_sample_dict(s) for s in samples_list]
    if len(mask_ratio_tuple) != 2 or not 0.0 <= mask_ratio_tuple[0] <= mask_ratio_tuple[1] <= 1.0:
        raise ValueError(f"mask_ratio_tuple must be (min, max) with 0 <= min <= max <= 1, got {mask_ratio_tuple!r}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")

    global_crops = stack_crops(samples, "global_crops", dtype)
    local_crops = stack_crops(samples, "local_crops", dtype)
    if "imgs" not in global_crops:
        raise ValueError("samples have no global crops with 'imgs'")

    if n_tokens is None:
        if mask_generator is not None:
            n_tokens = mask_generator.num_patches
        elif patch_size is not None:
            h, w = global_crops["imgs"].shape[-2:]
            if h % patch_size or w % patch_size:
                raise ValueError(f"global crop size {h}x{w} is not divisible by patch_size {patch_size}")
            n_tokens = (h // patch_size) * (w // patch_size)
        else:
            raise ValueError("collate_data_and_cast needs n_tokens, mask_generator or patch_size")
    if mask_generator is None:
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"n_tokens={n_tokens} is not a square grid; pass a MaskingGenerator for non-square crops")
        mask_generator = MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)
    elif mask_generator.num_patches != n_tokens:
        raise ValueError(f"mask_generator grid has {mask_generator.num_patches} patches but n_tokens={n_tokens}")

    B = global_crops["imgs"].shape[0]
    N = n_tokens
    n_samples_masked = int(B * mask_probability)
    probs = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_samples_masked + 1).tolist()
    upperbound = 0
    masks_list: List[torch.Tensor] = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        ratio = prob_min + (prob_max - prob_min) * torch.rand(()).item()
        masks_list.append(mask_generator(int(N * ratio)).flatten())
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.zeros(N, dtype=torch.bool))
    order = torch.randperm(B).tolist()
    collated_masks = torch.stack([masks_list[k] for k in order])

    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    out: Dict[str, Any] = {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
    if "pe_id" in samples[0]:
        out["pe_id"] = samples[0]["pe_id"]
    return out
