"""Export a backbone as a `torch.export` program (``.pt2``) or as ONNX.

Inputs, in this order: ``imgs`` (B, C, H, W) float32 and ``chn_ids`` (B, C) (band centre wavelength in nm,
negative SAR codes; float32, or int64 with ``chn_ids_dtype=torch.int64``), plus ``spec_masks`` (B, C) bool
(True = ignore the channel) with ``spec_masks=True``; batch and channel count are dynamic. An RGB DINOv2 backbone
takes ``imgs`` (B, 3, H, W) only. Outputs, as asked by ``outputs`` (default ``("embedding",)``):

- ``embedding`` (B, D): the normed class token, what ``model(x_dict)`` returns;
- ``patch_tokens`` (B, N, D): the normed patch tokens, ``forward_features(x)["x_norm_patchtokens"]``, N =
  (H / patch) * (W / patch) in row-major order.

By default the image size is fixed (224 x 224): the position table is resampled once to that grid, exactly as the
eager model would for that size, so the graph carries no interpolation. With ``dynamic_size=True`` height and width
are dynamic (multiples of the patch size) and the graph interpolates the stored table per call as the eager model
does (bicubic with DINOv2's +0.1 offset, written as two small matrix products, see ``dinov2.export_pos``).

Input validation (NaN pixels, id checks) runs only in eager mode; an exported model trusts its inputs. Imports
torch only; ``onnx`` / ``onnxscript`` (for ``torch.onnx.export``) and ``onnxruntime`` (for
:func:`dinov2.export_check.check_onnx`) are the ``export`` extra.
"""
from __future__ import annotations

import copy
import types
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from dinov2.export_pos import dynamic_pos_encoding
from dinov2.models.vision_transformer import DinoVisionTransformer

INPUT_NAMES = ("imgs", "chn_ids")
OUTPUT_NAMES = ("embedding",)
OUTPUTS = {"embedding": "x_norm_clstoken", "patch_tokens": "x_norm_patchtokens"}
CHN_IDS_DTYPES = (torch.float32, torch.int64)
DEFAULT_IMG_SIZE = 224
DEFAULT_OPSET = 18


def is_spectral(model: nn.Module) -> bool:
    """True when `model` has the spectral patch embedding (takes `chn_ids`)."""
    return type(getattr(model, "patch_embed", None)).__name__ == "PanopticonPE"


def input_names(model: nn.Module, spec_masks: bool = False) -> List[str]:
    """Graph input names, in order: imgs[, chn_ids][, spec_masks]."""
    return list(INPUT_NAMES if is_spectral(model) else INPUT_NAMES[:1]) + (["spec_masks"] if spec_masks else [])


class ExportWrapper(nn.Module):
    """`(imgs[, chn_ids[, spec_masks]]) -> output or tuple of outputs` around a backbone (see the module doc)."""

    def __init__(self, backbone: DinoVisionTransformer, outputs: Sequence[str] = OUTPUT_NAMES,
                 spec_masks: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.outputs = tuple(outputs)
        self.spectral = is_spectral(backbone)
        self.spec_masks = bool(spec_masks)

    def forward(self, *inputs: torch.Tensor):
        x = dict(zip(input_names(self.backbone, self.spec_masks), inputs))
        feats = self.backbone.forward_features(x)
        outs = tuple(self.backbone.head(feats[OUTPUTS[o]]) if o == "embedding" else feats[OUTPUTS[o]]
                     for o in self.outputs)
        return outs[0] if len(outs) == 1 else outs


def check_options(model: nn.Module, img_size: int, outputs: Sequence[str] = OUTPUT_NAMES,
                  dynamic_size: bool = False, chn_ids_dtype: torch.dtype = torch.float32,
                  spec_masks: bool = False) -> DinoVisionTransformer:
    """Refuse what cannot be exported (a ValueError naming the option and value)."""
    if not isinstance(model, DinoVisionTransformer):
        raise ValueError(f"export needs a DinoVisionTransformer backbone, got {type(model).__name__}")
    if img_size <= 0 or img_size % model.patch_size:
        raise ValueError(f"img_size {img_size} must be a positive multiple of the patch size {model.patch_size}")
    unknown = [o for o in outputs if o not in OUTPUTS]
    if not outputs or unknown or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs {list(outputs)} must be distinct names from {list(OUTPUTS)}")
    if chn_ids_dtype not in CHN_IDS_DTYPES:
        raise ValueError(f"chn_ids_dtype {chn_ids_dtype} must be one of {CHN_IDS_DTYPES}")
    if not is_spectral(model) and (spec_masks or chn_ids_dtype != torch.float32):
        raise ValueError("spec_masks and chn_ids_dtype apply to the spectral patch embedding (PanopticonPE) only; "
                         "an RGB backbone takes imgs (B, 3, H, W) alone")
    if dynamic_size and img_size < 2 * model.patch_size:
        raise ValueError(f"with dynamic_size, img_size {img_size} (the tracing example) must span at least two "
                         f"patches ({2 * model.patch_size} px)")
    if dynamic_size and model.interpolate_antialias:
        raise ValueError("dynamic_size needs a model without interpolate_antialias (its per-call resampling is "
                         "not expressible as the exported matrix products); export at a fixed img_size")
    return model


def prepare_for_export(model: DinoVisionTransformer, img_size: int = DEFAULT_IMG_SIZE,
                       outputs: Sequence[str] = OUTPUT_NAMES, dynamic_size: bool = False,
                       spec_masks: bool = False) -> ExportWrapper:
    """A frozen eval-mode copy of `model`, wrapped for export; the original is left untouched. Fixed size: the
    position table resampled to `img_size`; `dynamic_size`: the table kept and interpolated in the graph."""
    check_options(model, img_size, outputs, dynamic_size, spec_masks=spec_masks)
    clone = copy.deepcopy(model).eval()
    if dynamic_size:
        clone.interpolate_pos_encoding = types.MethodType(dynamic_pos_encoding, clone)
    else:
        grid = img_size // model.patch_size
        ref = next(model.parameters())
        with torch.no_grad():
            dummy = torch.zeros(1, 1 + grid * grid, model.embed_dim, dtype=ref.dtype, device=ref.device)
            pos = model.interpolate_pos_encoding(dummy, grid, grid).detach().clone()
        clone.pos_embed = nn.Parameter(pos, requires_grad=False)
    for p in clone.parameters():
        p.requires_grad_(False)
    return ExportWrapper(clone, outputs, spec_masks).eval()


def example_inputs(batch: int = 2, channels: int = 3, img_size: int = DEFAULT_IMG_SIZE,
                   device: Optional[torch.device] = None, chn_ids_dtype: torch.dtype = torch.float32,
                   spec_masks: bool = False, height: Optional[int] = None) -> tuple:
    """Example `(imgs, chn_ids[, spec_masks])`: random pixels, distinct optical wavelengths (nm), no channel
    masked. `height` (default `img_size`) allows a non-square example."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(batch, channels, height or img_size, img_size, generator=g)
    ids = torch.linspace(450.0, 2200.0, channels).expand(batch, channels).contiguous().to(chn_ids_dtype)
    out = (imgs.to(device), ids.to(device))
    if spec_masks:
        out += (torch.zeros(batch, channels, dtype=torch.bool, device=device),)
    return out


def _dynamic_shapes(wrapper: ExportWrapper, dynamic_size: bool) -> Dict[str, Tuple[Dict[int, object], ...]]:
    batch = torch.export.Dim("batch", min=1, max=65536)
    imgs: Dict[int, object] = {0: batch}
    if wrapper.spectral:
        chans = torch.export.Dim("channels", min=1, max=4096)
        imgs[1] = chans
    if dynamic_size:
        p = int(wrapper.backbone.patch_size)
        imgs[2] = p * torch.export.Dim("patch_rows", min=1, max=1024)
        imgs[3] = p * torch.export.Dim("patch_cols", min=1, max=1024)
    shapes = [imgs]
    if wrapper.spectral:
        shapes.append({0: batch, 1: chans})
    if wrapper.spec_masks:
        shapes.append({0: batch, 1: chans})
    return {"inputs": tuple(shapes)}


def export_program(model: DinoVisionTransformer, img_size: int = DEFAULT_IMG_SIZE,
                   outputs: Sequence[str] = OUTPUT_NAMES, dynamic_size: bool = False,
                   chn_ids_dtype: torch.dtype = torch.float32,
                   spec_masks: bool = False) -> "torch.export.ExportedProgram":
    """`torch.export` program of `model` (dynamic batch and channels; height and width with `dynamic_size`)."""
    check_options(model, img_size, outputs, dynamic_size, chn_ids_dtype, spec_masks)
    wrapper = prepare_for_export(model, img_size, outputs, dynamic_size, spec_masks)
    device = next(wrapper.parameters()).device
    channels = 3 if wrapper.spectral else int(model.patch_embed.in_chans)
    # a non-square example (one patch row more) keeps height and width separate symbols, neither of size 1
    height = img_size + model.patch_size if dynamic_size else None
    example = example_inputs(2, channels, img_size, device, chn_ids_dtype, spec_masks, height)
    if not wrapper.spectral:
        example = example[:1]
    with torch.no_grad():
        return torch.export.export(wrapper, example, dynamic_shapes=_dynamic_shapes(wrapper, dynamic_size))


def save_program(model: DinoVisionTransformer, path: str, img_size: int = DEFAULT_IMG_SIZE,
                 outputs: Sequence[str] = OUTPUT_NAMES, dynamic_size: bool = False,
                 chn_ids_dtype: torch.dtype = torch.float32, spec_masks: bool = False) -> str:
    """Write the `torch.export` program to `path` (``.pt2``); load it with `torch.export.load(path).module()`
    and call it with the inputs in order."""
    torch.export.save(export_program(model, img_size, outputs, dynamic_size, chn_ids_dtype, spec_masks), str(path))
    return str(path)


def export_onnx(model: DinoVisionTransformer, path: str, img_size: int = DEFAULT_IMG_SIZE,
                opset: int = DEFAULT_OPSET, outputs: Sequence[str] = OUTPUT_NAMES, dynamic_size: bool = False,
                chn_ids_dtype: torch.dtype = torch.float32, spec_masks: bool = False) -> str:
    """Write `model` as ONNX to `path` (inputs and outputs named as in the module doc); returns `path`."""
    program = export_program(model, img_size, outputs, dynamic_size, chn_ids_dtype, spec_masks)
    onnx_program = torch.onnx.export(program, input_names=input_names(model, spec_masks), output_names=list(outputs),
                                     opset_version=int(opset), dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return str(path)


def onnx_parity(model: DinoVisionTransformer, path: str, sizes: Sequence[int] = (DEFAULT_IMG_SIZE,),
                channels: Sequence[int] = (3, 13, 202), batch: int = 2, outputs: Sequence[str] = OUTPUT_NAMES,
                chn_ids_dtype: torch.dtype = torch.float32,
                spec_masks: bool = False) -> Dict[Tuple[int, int], float]:
    """Run the ONNX file with onnxruntime and the eager model on random inputs at each image size in `sizes` and
    channel count in `channels` (an RGB backbone: 3 only). Returns `{(size, channels): max |difference| over all
    outputs}`; NaN when either side has a non-finite value or a wrong shape, so a tolerance check
    (`not diff <= tol`) fails on it."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = input_names(model, spec_masks)
    ref = next(model.parameters())
    model.eval()
    out: Dict[Tuple[int, int], float] = {}
    for size in sizes:
        for c in (channels if is_spectral(model) else (3,)):
            inputs = example_inputs(batch, int(c), int(size), chn_ids_dtype=chn_ids_dtype, spec_masks=spec_masks)
            feed = {n: t.numpy() for n, t in zip(names, inputs)}
            got = session.run(list(outputs), feed)
            x = {n: t.to(ref.device) for n, t in zip(names, inputs)}
            with torch.no_grad():
                feats = model.forward_features(x)
            worst = 0.0
            for name, value in zip(outputs, got):
                want = feats[OUTPUTS[name]].float().cpu().numpy()
                if value.shape != want.shape or not (np.isfinite(value).all() and np.isfinite(want).all()):
                    worst = float("nan")
                    break
                worst = max(worst, float(np.abs(value - want).max()))
            out[(int(size), int(c))] = worst
    return out


def check_onnx(model: DinoVisionTransformer, path: str, channels: Sequence[int] = (3, 13, 202), batch: int = 2,
               img_size: int = DEFAULT_IMG_SIZE) -> Dict[int, float]:
    """`onnx_parity` of the embedding at one image size, keyed by channel count."""
    return {c: d for (_, c), d in onnx_parity(model, path, (img_size,), channels, batch).items()}
