"""Panopticon backbones in TerraTorch: importing this module registers them in TerraTorch's backbone registry.

Registered names: every spectral hub entry under its own name (``panopticon_vitb14``: the released weights unless
``pretrained=False`` or ``weights=``), and ``panopticon``, which takes any ``load_model`` source as ``model=`` (a
training run folder, a checkpoint, ``hf-hub:ORG/NAME``). In a TerraTorch YAML, with ``EncoderDecoderFactory``::

    backbone: panopticon_vitb14
    backbone_bands: [BLUE, GREEN, RED, NIR_NARROW, SWIR_1, SWIR_2]

Channel ids come from ``bands`` (TerraTorch's ``backbone_bands``): its HLS band names (``BLUE``, ``NIR_NARROW``,
``SWIR_1``, ... as Sentinel-2 MSI bands, thermal as Landsat-8 TIRS; ``VV``, ``VH``, ``ASC_VV``, ``DSC_VH``, ... as
Sentinel-1) or this project's sensor band keys (``sentinel2/B8A``, ``landsat8/B10``, ``enmap/B050``); or from
``wavelengths`` (centre wavelengths in nm, SAR codes -1..-12), one per input channel in order. Bare numbers in
``bands`` are refused, since TerraTorch also uses them as band indices.

The backbone follows TerraTorch's ViT backbones: ``forward(x)`` takes ``(B, C, H, W)`` (H, W multiples of the patch
size; TerraTorch pads) and returns one ``(B, 1 + N, D)`` token sequence per block in ``out_indices`` (default: every
block), class token first, each normed with the backbone's final LayerNorm (as this project's dense tasks use them);
``out_channels`` lists D per output. TerraTorch's ``SelectIndices``, ``ReshapeTokensToImage`` and
``LearnedInterpolateToPyramidal`` necks and its decoders (``UperNetDecoder``, ``FCNDecoder``, ...) apply as to its
other ViTs. From a YAML without Python, TerraTorch imports a ``custom_modules`` folder (``custom_modules_path``)
whose ``__init__.py`` imports this module. Needs the ``terratorch`` extra. See docs/terratorch.md.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

# TerraTorch's band names (HLSBands, plus the SAR names its DOFA backbone knows) -> "<sensor>/<band>" of the
# registry: Sentinel-2 MSI for the optical names, Landsat-8 TIRS for thermal, Sentinel-1 for SAR
TERRATORCH_BANDS: Dict[str, str] = {
    "COASTAL_AEROSOL": "sentinel2/B01", "BLUE": "sentinel2/B02", "GREEN": "sentinel2/B03", "RED": "sentinel2/B04",
    "RED_EDGE_1": "sentinel2/B05", "RED_EDGE_2": "sentinel2/B06", "RED_EDGE_3": "sentinel2/B07",
    "NIR_BROAD": "sentinel2/B08", "NIR_NARROW": "sentinel2/B8A", "WATER_VAPOR": "sentinel2/B09",
    "CIRRUS": "sentinel2/B10", "SWIR_1": "sentinel2/B11", "SWIR_2": "sentinel2/B12",
    "THERMAL_INFRARED_1": "landsat8/B10", "THERMAL_INFRARED_2": "landsat8/B11",
    "VV": "sentinel1/vv", "VH": "sentinel1/vh", "HH": "sentinel1/hh", "HV": "sentinel1/hv",
    "ASC_VV": "sentinel1/vv_asc", "ASC_VH": "sentinel1/vh_asc", "DSC_VV": "sentinel1/vv_desc",
    "DSC_VH": "sentinel1/vh_desc",
}


def band_chn_ids(bands: Sequence[object]) -> List[float]:
    """Channel ids of TerraTorch band names or `sensor/band` keys (see the module doc), in order."""
    from dinov2.data.sensors import band_info, split_band_id

    ids = []
    for band in bands:
        name = str(getattr(band, "value", band))  # HLSBands members carry their name as value
        if isinstance(band, (int, float)) or name.replace(".", "", 1).lstrip("-").isdigit():
            raise ValueError(f"band {band!r}: bare numbers are ambiguous (TerraTorch also uses them as band "
                             "indices); give centre wavelengths in nm as wavelengths=[...]")
        key = TERRATORCH_BANDS.get(name.upper().split(".")[-1], name)
        if "/" not in key:
            raise ValueError(f"unknown band {name!r}: use a TerraTorch name ({', '.join(TERRATORCH_BANDS)}) or "
                             "'<sensor>/<band>' of this project's registry (e.g. sentinel2/B8A)")
        ids.append(float(band_info(*split_band_id(key))["mu"]))
    return ids


class PanopticonBackbone(nn.Module):
    """A Panopticon ViT as a TerraTorch backbone: fixed channel ids, per-block token outputs (see module doc)."""

    def __init__(self, model: nn.Module, chn_ids: Sequence[float], out_indices: Optional[Sequence[int]] = None):
        super().__init__()
        if type(getattr(model, "patch_embed", None)).__name__ != "PanopticonPE":
            raise ValueError("TerraTorch backbones of this project need the spectral patch embedding (PanopticonPE)")
        if not chn_ids:
            raise ValueError("give the input channels as bands=[...] (TerraTorch: backbone_bands) or wavelengths=[...]")
        self.model = model
        n = int(model.n_blocks)
        indices = [int(i) for i in (out_indices if out_indices is not None else range(n))]
        bad = [i for i in indices if not -n <= i < n]
        if not indices or bad:
            raise ValueError(f"out_indices {list(indices)} must be block indices of a {n}-block model")
        self.out_indices = [i % n for i in indices]
        self.register_buffer("chn_ids", torch.tensor([float(c) for c in chn_ids]), persistent=False)
        self.patch_size = int(model.patch_size)
        self.out_channels = [int(model.embed_dim)] * len(self.out_indices)

    def forward(self, x: torch.Tensor, **kwargs) -> List[torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.chn_ids.numel():
            raise ValueError(f"input of shape {tuple(x.shape)}: expected (B, {self.chn_ids.numel()}, H, W) for the "
                             f"configured bands")
        ids = self.chn_ids.to(x.device).expand(x.shape[0], -1)
        pairs = self.model.get_intermediate_layers({"imgs": x, "chn_ids": ids}, n=self.out_indices,
                                                   return_class_token=True, norm=True)
        return [torch.cat([cls[:, None], patches], dim=1) for patches, cls in pairs]


def _channel_ids(bands: Optional[Sequence[object]], wavelengths: Optional[Sequence[float]]) -> List[float]:
    if (bands is None) == (wavelengths is None):
        raise ValueError("give exactly one of bands=[...] (TerraTorch: backbone_bands) and wavelengths=[...]")
    return band_chn_ids(bands) if bands is not None else [float(w) for w in wavelengths]


def _trainable(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def panopticon(model: str, bands: Optional[Sequence[object]] = None, wavelengths: Optional[Sequence[float]] = None,
               out_indices: Optional[Sequence[int]] = None, **kwargs) -> PanopticonBackbone:
    """Any `load_model` source (run folder, checkpoint, hf-hub:ORG/NAME, hub name) as a trainable backbone.
    Other keyword arguments TerraTorch passes (e.g. `pretrained`) are ignored: the source decides the weights."""
    from dinov2.hub import load_model

    return PanopticonBackbone(_trainable(load_model(model)), _channel_ids(bands, wavelengths), out_indices)


def _entry_builder(name: str) -> Callable[..., PanopticonBackbone]:
    def build(bands: Optional[Sequence[object]] = None, wavelengths: Optional[Sequence[float]] = None,
              pretrained: bool = True, weights: Optional[str] = None, ckpt_path: Optional[str] = None,
              out_indices: Optional[Sequence[int]] = None, **kwargs) -> PanopticonBackbone:
        from dinov2.hub_entries import ENTRY_POINTS

        ids = _channel_ids(bands, wavelengths)  # checked before any download
        model = ENTRY_POINTS[name](pretrained=pretrained, weights=weights or ckpt_path, **kwargs)
        return PanopticonBackbone(_trainable(model), ids, out_indices)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"`{name}` as a TerraTorch backbone: the released weights unless pretrained=False or "
                     "weights=/ckpt_path= (a file or URL); other keyword arguments go to the model constructor.")
    return build


def _import_registry():
    """TerraTorch's backbone registry. Importing TerraTorch sets the process-wide float32 matmul precision to
    "medium" (its Clay v1.5 module does so at import), which makes every fp32 matmul on CPU run in bf16 (errors of
    ~1e-3); the caller's setting is put back."""
    precision = torch.get_float32_matmul_precision()
    try:
        from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
    finally:
        torch.set_float32_matmul_precision(precision)
    return TERRATORCH_BACKBONE_REGISTRY


def register() -> List[str]:
    """Register the backbones in TerraTorch's backbone registry (again: replaced); returns their names."""
    registry = _import_registry()

    from dinov2.hub_entries import SPECTRAL_ENTRY_POINTS

    builders: List[Callable[..., PanopticonBackbone]] = [_entry_builder(n) for n in SPECTRAL_ENTRY_POINTS]
    for fn in builders + [panopticon]:
        registry.register(fn)
    return [fn.__name__ for fn in builders] + ["panopticon"]


REGISTERED = register()
