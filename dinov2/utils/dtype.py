"""Names of compute dtypes in configs -> torch dtypes, and the autocast/grad-scaler policy per device."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

import torch

logger = logging.getLogger("dinov2")

_NAMES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def as_torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """`'fp16'|'bf16'|'fp32'` (and long names) or a torch.dtype -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_NAMES)}")
    return _NAMES[key]


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a training step uses on a device: autocast dtype (None = plain fp32) and whether a GradScaler is
    needed (only fp16 on CUDA)."""

    device_type: str
    autocast_dtype: Union[torch.dtype, None]
    use_grad_scaler: bool

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device_type, enabled=False)
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def precision_policy(device: torch.device, dtype: Union[str, torch.dtype], grad_scaler: bool = True) -> PrecisionPolicy:
    """Policy for `dtype` on `device`. On CPU the GPU recipe's fp16 runs in fp32: CPU autocast has no fp16 speed-up
    and bf16 autocast measured 1.9x slower than fp32 for a ViT-B training step on a CPU without bf16 matrix units
    (benchmarks/README.md); ask for bf16 explicitly to use it."""
    dt = as_torch_dtype(dtype)
    if device.type == "cpu" and dt == torch.float16:
        logger.info("compute_precision: fp16 requested on CPU, running in fp32 (use dtype=bf16 for CPU autocast)")
        dt = torch.float32
    if dt == torch.float32:
        return PrecisionPolicy(device.type, None, False)
    return PrecisionPolicy(device.type, dt, bool(grad_scaler) and dt == torch.float16 and device.type == "cuda")
