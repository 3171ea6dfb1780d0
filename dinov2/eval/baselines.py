"""Baseline backbones evaluated with the same protocol and results tables as Panopticon.

``--model-obj`` entries of the form ``baseline:<source>/<name>[?key=value&...]``:

- ``baseline:dinov2/dinov2_vits14`` (also ``_vitb14``, ``_vitl14``, ``_vitg14``): this repository's plain RGB DINOv2
  ViTs; options ``weights=<local .pth>`` (released DINOv2 weights) or ``pretrained=false`` (random init; the
  default downloads the released weights once through torch.hub's cache).
- ``baseline:timm/<model name>``: any timm model (``pip install timm``), e.g. ``timm/resnet50`` or
  ``timm/vit_small_patch16_224``; options ``pretrained=true|false`` (default false: timm weights are downloaded
  from the internet), ``weights=<local .pth/.safetensors state dict>``.
- ``baseline:torchgeo/<model name>`` with ``weights=<torchgeo weight enum name>`` (``pip install torchgeo``),
  e.g. ``torchgeo/resnet50?weights=ResNet50_Weights.SENTINEL2_ALL_MOCO&bands=s2``; without ``weights`` the model is
  randomly initialised with one input channel per selected band. DOFA models (``torchgeo/dofa_base_patch16_224``,
  ``?weights=DOFABase16_Weights.DOFA_MAE``) are wavelength-conditioned like Panopticon: they take every optical
  input channel with its id as wavelength (no ``bands=``), and refuse SAR channels.

Band selection (``bands=``): ``rgb`` (the inputs nearest 664/559/492 nm; default), ``s2`` (nearest to the 13
Sentinel-2 L1C band centres, for Sentinel-2 pretrained CNNs), or a comma-separated list of wavelengths in nm.
Every baseline sees the same (normalised) pixels as Panopticon, restricted to those bands. Output folders default
to ``outputs/eval_baselines/<name>`` (or ``--output-dir``).

timm/torchgeo backbones expose their intermediate stages through timm's ``forward_intermediates``; their
"class token" is the spatial mean of a stage, and a CNN's stages are used as a ready-made feature pyramid.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qsl

import torch
import torch.nn as nn

PREFIX = "baseline:"
RGB_NM = (664.0, 559.0, 492.0)
S2_NM = (443.0, 492.0, 559.0, 664.0, 704.0, 740.0, 782.0, 832.0, 864.0, 945.0, 1373.0, 1613.0, 2202.0)
DINOV2_NAMES = ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14")


def is_baseline(obj: str) -> bool:
    return str(obj).strip().startswith(PREFIX)


def parse_baseline(obj: str) -> Tuple[str, str, Dict[str, str]]:
    """``baseline:<source>/<name>?k=v`` -> (source, name, options); clear errors for malformed strings."""
    body = str(obj).strip()[len(PREFIX):]
    body, _, query = body.partition("?")
    source, _, name = body.partition("/")
    if source not in ("dinov2", "timm", "torchgeo") or not name:
        raise ValueError(f"Baseline {obj!r} must look like baseline:dinov2/<name>, baseline:timm/<name> or "
                         f"baseline:torchgeo/<name>[?key=value&...]")
    opts = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(opts) - {"weights", "pretrained", "bands"})
    if unknown:
        raise ValueError(f"Baseline {obj!r}: unknown options {unknown}; use weights, pretrained, bands")
    if source == "dinov2" and name not in DINOV2_NAMES:
        raise ValueError(f"Baseline {obj!r}: unknown DINOv2 model {name!r}; choose from {list(DINOV2_NAMES)}")
    return source, name, opts


def band_wavelengths(spec: Optional[str]) -> Tuple[float, ...]:
    if spec in (None, "", "rgb"):
        return RGB_NM
    if spec == "s2":
        return S2_NM
    try:
        return tuple(float(v) for v in str(spec).split(","))
    except ValueError:
        raise ValueError(f"bands={spec!r}: use rgb, s2 or comma-separated wavelengths in nm") from None


def _truthy(v: Optional[str], default: bool) -> bool:
    if v is None:
        return default
    if v.lower() in ("1", "true", "yes"):
        return True
    if v.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"pretrained={v!r}: use true or false")


def batch_channel_ids(x: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``(C,)`` channel ids (centre wavelengths, nm) shared by every sample of a batch; refuses mixed batches."""
    ids = x["chn_ids"]
    ids = (ids[..., 0] if ids.ndim == 3 else ids).float()
    if not torch.equal(ids, ids[:1].expand_as(ids)):
        raise ValueError("Baselines need one band set per batch")
    return ids[0]


def select_bands(x: Dict[str, torch.Tensor], wavelengths: Sequence[float]) -> torch.Tensor:
    """``(B, len(wavelengths), H, W)``: for each wanted wavelength the input channel with the nearest id
    (optical ids only; refuses inputs that lack a band within 60 nm)."""
    row = batch_channel_ids(x)
    idx = []
    for w in wavelengths:
        dist = torch.where(row > 0, (row - w).abs(), torch.full_like(row, float("inf")))
        j = int(dist.argmin())
        if float(dist[j]) > 60.0:
            raise ValueError(f"The input has no band near {w:.0f} nm (channel ids {row.int().tolist()}); this "
                             "baseline cannot be evaluated on it")
        idx.append(j)
    return x["imgs"][:, idx]


class BandSelectViT(nn.Module):
    """A plain RGB ViT of this repository fed with the bands nearest ``wavelengths``."""

    def __init__(self, vit: nn.Module, wavelengths: Sequence[float]):
        super().__init__()
        self.vit, self.wavelengths = vit, tuple(wavelengths)
        self.embed_dim, self.n_blocks, self.patch_size = vit.embed_dim, vit.n_blocks, vit.patch_size
        self.norm = vit.norm

    def _flat_blocks(self):
        return self.vit._flat_blocks()

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        imgs = select_bands(x, self.wavelengths)
        return self.vit.get_intermediate_layers(imgs, n=n, reshape=reshape, return_class_token=return_class_token,
                                                norm=norm)


class TimmBackbone(nn.Module):
    """A timm (or torchgeo) model through ``forward_intermediates``, fed with the bands nearest ``wavelengths``."""

    def __init__(self, model: nn.Module, wavelengths: Sequence[float]):
        super().__init__()
        if not hasattr(model, "forward_intermediates"):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates (timm >= 1.0 needed)")
        self.model, self.wavelengths = model, tuple(wavelengths)
        self.norm = nn.Identity()
        probe = self._maps(torch.zeros(1, len(self.wavelengths), 64, 64), None)
        self._dims = [int(m.shape[1]) for m in probe]
        self.n_blocks = len(probe)
        self.embed_dim = self._dims[-1]
        self.is_pyramid = len({tuple(m.shape[-2:]) for m in probe}) > 1  # CNN stages
        self.patch_size = 32 if self.is_pyramid else int(64 // probe[-1].shape[-1])

    def feature_dims(self, n: int) -> List[int]:
        return self._dims[-n:]

    def _maps(self, imgs: torch.Tensor, n: Optional[int]) -> List[torch.Tensor]:
        kw: Dict[str, Any] = {"intermediates_only": True}
        if n is not None:
            kw["indices"] = n
        return list(self.model.forward_intermediates(imgs, **kw))

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        if not isinstance(n, int):
            raise ValueError("timm baselines take the last n stages (an int)")
        maps = self._maps(select_bands(x, self.wavelengths), n)
        if reshape and not return_class_token:
            return tuple(maps)
        tokens = [m.flatten(2).transpose(1, 2) for m in maps]
        outs = maps if reshape else tokens
        if return_class_token:
            return tuple((o, t.mean(1)) for o, t in zip(outs, tokens))
        return tuple(outs)


class DOFABackbone(nn.Module):
    """torchgeo's DOFA on all optical input channels, each with its channel id (nm) as wavelength. Intermediate
    outputs are its transformer blocks; the "class token" is the mean of the patch tokens (DOFA's global pool), and
    ``norm`` applies DOFA's final LayerNorm. The fixed position embedding is resized bicubically for other image
    sizes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.embed_dim, self.n_blocks = int(model.embed_dim), len(model.blocks)
        self.patch_size = int(model.patch_size)
        self.norm = model.fc_norm if getattr(model, "global_pool", True) else model.norm

    def _tokens(self, x: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        row = batch_channel_ids(x)
        if bool((row <= 0).any()):
            raise ValueError(f"DOFA takes optical bands only; the input has SAR channel ids {row.int().tolist()}")
        tokens, _ = self.model.patch_embed(x["imgs"], row / 1000.0)  # DOFA wants micrometres
        h, w = x["imgs"].shape[-2:]
        k = self.patch_size
        grid = ((h + 2 - k) // k + 1, (w + 2 - k) // k + 1)  # DOFA's patch convolution pads by 1
        pos = self.model.pos_embed
        n0 = int(round((pos.shape[1] - 1) ** 0.5))
        patch_pos = pos[:, 1:]
        if grid != (n0, n0):
            patch_pos = patch_pos.reshape(1, n0, n0, -1).permute(0, 3, 1, 2)
            patch_pos = torch.nn.functional.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            patch_pos = patch_pos.flatten(2).transpose(1, 2)
        cls = (self.model.cls_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens + patch_pos], dim=1), grid

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        if not isinstance(n, int):
            raise ValueError("DOFA baselines take the last n blocks (an int)")
        tokens, (gh, gw) = self._tokens(x)
        outs = []
        for i, block in enumerate(self.model.blocks):
            tokens = block(tokens)
            if i >= self.n_blocks - n:
                outs.append(tokens[:, 1:])
        if norm:
            outs = [self.norm(o) for o in outs]
        pooled = [o.mean(1) for o in outs]
        if reshape:
            outs = [o.reshape(o.shape[0], gh, gw, -1).permute(0, 3, 1, 2).contiguous() for o in outs]
        if return_class_token:
            return tuple(zip(outs, pooled))
        return tuple(outs)


def build_baseline(obj: str) -> nn.Module:
    """The backbone of a ``baseline:...`` model object, in eval mode."""
    source, name, opts = parse_baseline(obj)
    wavelengths = band_wavelengths(opts.get("bands"))
    if source == "dinov2":
        from dinov2.hub_entries import ENTRY_POINTS

        pretrained = _truthy(opts.get("pretrained"), True)
        vit = ENTRY_POINTS[name](pretrained=pretrained and "weights" not in opts, weights=opts.get("weights"))
        if len(wavelengths) != 3:
            raise ValueError(f"{obj}: DINOv2 ViTs take 3 bands, bands= selects {len(wavelengths)}")
        return BandSelectViT(vit, wavelengths).eval()
    if source == "timm":
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"{obj} needs timm: pip install timm") from e
        model = timm.create_model(name, pretrained=_truthy(opts.get("pretrained"), False), num_classes=0,
                                  in_chans=len(wavelengths))
        if opts.get("weights"):
            from dinov2.utils.checkpoint import load_checkpoint_file

            state = load_checkpoint_file(opts["weights"])
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing:
                raise ValueError(f"{opts['weights']} does not fit {name}: missing {missing[:5]}")
        return TimmBackbone(model, wavelengths).eval()
    try:
        from torchgeo.models import get_model, get_weight
    except ImportError as e:
        raise ImportError(f"{obj} needs torchgeo: pip install torchgeo") from e
    weights = get_weight(opts["weights"]) if opts.get("weights") else None
    if name.startswith("dofa"):
        if "bands" in opts:
            raise ValueError(f"{obj}: DOFA takes every optical input band with its wavelength; drop bands=")
        # dofa_small has no released weights and its builder takes no `weights` argument
        return DOFABackbone(get_model(name, **({"weights": weights} if weights else {}))).eval()
    if weights is not None:
        if "bands" not in opts:
            wavelengths = S2_NM if weights.meta.get("in_chans", 3) == 13 else RGB_NM
        if len(wavelengths) != weights.meta.get("in_chans", len(wavelengths)):
            raise ValueError(f"{obj}: bands= selects {len(wavelengths)} bands but {opts['weights']} takes "
                             f"{weights.meta['in_chans']}")
        return TimmBackbone(get_model(name, weights=weights), wavelengths).eval()
    return TimmBackbone(get_model(name, weights=None, in_chans=len(wavelengths)), wavelengths).eval()
