"""Export a Panopticon backbone as a `torch.export` program (``.pt2``) or as ONNX.

Both take the inputs ``imgs`` (B, C, H, W) float32 and ``chn_ids`` (B, C) float32 (band centre wavelength in nm,
negative SAR codes), in that order, with a dynamic batch size and a dynamic channel count, and return
``embedding`` (B, D), the normed class token (what ``model(x_dict)`` returns). The image size is fixed at export
(224 x 224 by default): the positional embedding is resampled once to that grid, exactly as the eager model would
resample it for that size, so the exported graph carries no interpolation.

Input validation (NaN pixels, dtype casts, masks) runs only in eager mode; an exported model trusts its inputs,
so check them before feeding an exported model. ``spec_masks`` is not an input of the exported graph: pass only
the valid channels.

Imports torch only; ``onnx`` / ``onnxscript`` (needed by ``torch.onnx.export``) and ``onnxruntime`` (for
:func:`check_onnx`) are the ``export`` extra.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from dinov2.models.vision_transformer import DinoVisionTransformer

INPUT_NAMES = ("imgs", "chn_ids")
OUTPUT_NAMES = ("embedding",)
DEFAULT_IMG_SIZE = 224
DEFAULT_OPSET = 18


class ExportWrapper(nn.Module):
    """`(imgs, chn_ids) -> embedding (B, D)` around a spectral backbone (positional tables at one image size)."""

    def __init__(self, backbone: DinoVisionTransformer) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, imgs: torch.Tensor, chn_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone({"imgs": imgs, "chn_ids": chn_ids})


def _check_model(model: nn.Module, img_size: int) -> DinoVisionTransformer:
    if not isinstance(model, DinoVisionTransformer):
        raise ValueError(f"export needs a DinoVisionTransformer backbone, got {type(model).__name__}")
    if type(model.patch_embed).__name__ != "PanopticonPE":
        raise ValueError("export supports the spectral patch embedding (embed_layer='PanopticonPE') only")
    if img_size <= 0 or img_size % model.patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of the patch size {model.patch_size}")
    return model


def prepare_for_export(model: DinoVisionTransformer, img_size: int = DEFAULT_IMG_SIZE) -> ExportWrapper:
    """A copy of `model` in eval mode whose positional embedding is resampled to `img_size`, wrapped for export.

    The original model is left untouched."""
    _check_model(model, img_size)
    grid = img_size // model.patch_size
    ref = next(model.parameters())
    with torch.no_grad():
        dummy = torch.zeros(1, 1 + grid * grid, model.embed_dim, dtype=ref.dtype, device=ref.device)
        pos = model.interpolate_pos_encoding(dummy, grid, grid).detach().clone()
    clone = copy.deepcopy(model).eval()
    clone.pos_embed = nn.Parameter(pos, requires_grad=False)
    for p in clone.parameters():
        p.requires_grad_(False)
    return ExportWrapper(clone).eval()


def example_inputs(batch: int = 2, channels: int = 3, img_size: int = DEFAULT_IMG_SIZE,
                   device: Optional[torch.device] = None) -> tuple:
    """Example `(imgs, chn_ids)` used to trace: random pixels, distinct optical wavelengths (nm)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, channels, img_size, img_size, generator=g)
    ids = torch.linspace(450.0, 2200.0, channels).expand(batch, channels).contiguous()
    return imgs.to(device), ids.to(device)


def _dynamic_shapes() -> Dict[str, Dict[int, object]]:
    batch = torch.export.Dim("batch", min=1, max=65536)
    chans = torch.export.Dim("channels", min=1, max=4096)
    return {"imgs": {0: batch, 1: chans}, "chn_ids": {0: batch, 1: chans}}


def export_program(model: DinoVisionTransformer, img_size: int = DEFAULT_IMG_SIZE) -> "torch.export.ExportedProgram":
    """`torch.export` program of `model` with dynamic batch and channel dimensions."""
    wrapper = prepare_for_export(model, img_size)
    device = next(wrapper.parameters()).device
    with torch.no_grad():
        return torch.export.export(wrapper, example_inputs(img_size=img_size, device=device),
                                   dynamic_shapes=_dynamic_shapes())


def save_program(model: DinoVisionTransformer, path: str, img_size: int = DEFAULT_IMG_SIZE) -> str:
    """Write the `torch.export` program to `path` (``.pt2``); load it with `torch.export.load(path).module()`."""
    torch.export.save(export_program(model, img_size), str(path))
    return str(path)


def export_onnx(model: DinoVisionTransformer, path: str, img_size: int = DEFAULT_IMG_SIZE,
                opset: int = DEFAULT_OPSET) -> str:
    """Write `model` as ONNX to `path` (inputs ``imgs``, ``chn_ids``; output ``embedding``); returns `path`."""
    program = export_program(model, img_size)
    onnx_program = torch.onnx.export(program, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                     opset_version=int(opset), dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return str(path)


def check_onnx(model: DinoVisionTransformer, path: str, channels: Sequence[int] = (3, 13, 202), batch: int = 2,
               img_size: int = DEFAULT_IMG_SIZE) -> Dict[int, float]:
    """Run the ONNX file with onnxruntime and the eager model on random inputs; returns the max |difference|
    of the embeddings per channel count."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = next(model.parameters())
    out: Dict[int, float] = {}
    model.eval()
    for c in channels:
        imgs, ids = example_inputs(batch, int(c), img_size)
        (got,) = session.run(list(OUTPUT_NAMES), {"imgs": imgs.numpy().astype(np.float32),
                                                   "chn_ids": ids.numpy().astype(np.float32)})
        with torch.no_grad():
            want = model({"imgs": imgs.to(ref.device), "chn_ids": ids.to(ref.device)}).float().cpu().numpy()
        out[int(c)] = float(np.abs(got - want).max())
    return out
