"""The models torch.hub offers (`panopticon_vitb14`, the RGB `dinov2_vit*14`), as functions of the package.

`hubconf.py` at the repository root re-exports them for `torch.hub.load(<repo or dir>, name)`; `load_model(name)`
(`dinov2.hub`), `panopticon embed/predict/export` and the TerraTorch backbones call them directly, so an installed
package needs no checkout. Weights given as a URL (and the released files) go through `dinov2.weights_cache`
(downloaded once, keyed by source, SHA-256 checked); local files may be `.pth` or `.safetensors`, as a raw
backbone state dict or a training / teacher checkpoint. Imports torch and `dinov2.models` only.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from dinov2.models import backbone_kwargs
from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer
from dinov2.utils.checkpoint import backbone_state_dict, load_checkpoint_file
from dinov2.weights_cache import RELEASE_URLS, WeightsError, cached_download, sha256_of

PANOPTICON_URL = "https://huggingface.co/lewaldm/panopticon/resolve/main/panopticon_vitb14_teacher.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
# entry name -> URL of its released weights
RELEASED: Dict[str, str] = {"panopticon_vitb14": PANOPTICON_URL}
RELEASED.update({n: DINOV2_URL.format(name=n) for n in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
                                                         "dinov2_vitg14")})
RELEASE_URLS.update(RELEASED.values())
# entry points whose patch embedding is spectral (take any bands through `chn_ids`)
SPECTRAL_ENTRY_POINTS: Tuple[str, ...] = ("panopticon_vitb14",)

# Architectures as `student` config sections (the schema of training configs, `dinov2.models.build_model`):
# what `config.yaml` beside exported weights records and what rebuilds them.
_DINOV2 = {"patch_size": 14, "layerscale": 1.0, "ffn_layer": "mlp", "block_chunks": 0, "num_register_tokens": 0,
           "interpolate_antialias": False, "interpolate_offset": 0.1, "embed_layer": "PatchEmbed",
           "pos_emb_img_size": 518}
STUDENT_CONFIGS: Dict[str, Dict[str, Any]] = {
    # the released panopticon_vitb14: ViT-B/14 at 518 px, LayerScale 1e-5, spectral patch embedding with attn_dim
    # 2304 and 16 heads
    "panopticon_vitb14": {
        "arch": "vit_base", "patch_size": 14, "layerscale": 1e-5, "ffn_layer": "mlp", "block_chunks": 0,
        "qkv_bias": True, "proj_bias": True, "ffn_bias": True, "num_register_tokens": 0,
        "interpolate_antialias": False, "interpolate_offset": 0.1, "embed_layer": "PanopticonPE",
        "pos_emb_img_size": 518,
        "pe_args": {"attn_dim": 2304, "chnfus_cfg": {"layer_norm": False, "attn_cfg": {"num_heads": 16}}}},
    "dinov2_vits14": dict(_DINOV2, arch="vit_small"),
    "dinov2_vitb14": dict(_DINOV2, arch="vit_base"),
    "dinov2_vitl14": dict(_DINOV2, arch="vit_large"),
    "dinov2_vitg14": dict(_DINOV2, arch="vit_giant2", ffn_layer="swiglufused"),
}


def build_entry(name: str, **kwargs) -> DinoVisionTransformer:
    """The architecture of entry point `name` with random weights; `kwargs` override constructor arguments
    (e.g. `img_size`, `depth`, `pe_args`)."""
    cfg = STUDENT_CONFIGS[name]
    config = backbone_kwargs(cfg, img_size=int(cfg["pos_emb_img_size"]))
    if not config["pe_args"]:
        del config["pe_args"]
    config.update(kwargs)
    return ARCHS[cfg["arch"]](**config)


def load_weights(model: torch.nn.Module, weights: Optional[str], default_url: str, progress: bool = True,
                 sha256: Optional[str] = None) -> None:
    """Load `weights` (a local `.pth`/`.safetensors` file or URL; None: `default_url`) into `model` strictly."""
    source = weights if weights is not None else default_url
    if str(source).startswith(("http://", "https://")):
        source = cached_download(str(source), progress=progress, sha256=sha256)
    source = os.path.expanduser(str(source))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"weights file not found: {source}")
    if sha256 and not sha256_of(source).startswith(sha256.lower()):
        raise WeightsError(f"weights {source}: SHA-256 does not start with {sha256}")
    try:
        state_dict = load_checkpoint_file(source)
    except WeightsError as exc:
        raise WeightsError(f"{exc}; delete it if it is a partial download") from exc
    try:
        model.load_state_dict(backbone_state_dict(state_dict), strict=True)
    except RuntimeError as exc:  # torch lists every missing / unexpected / mis-shaped key over many lines
        detail = " ".join(str(exc).split())
        raise WeightsError(f"weights {source} do not fit the {type(model).__name__} architecture: "
                           f"{detail[:600]}") from exc


_load_weights = load_weights  # the name hubconf.py exported before


def _panopticon_vitb14(**kwargs) -> DinoVisionTransformer:
    """The released Panopticon ViT-B/14 architecture with random weights (`kwargs` override the configuration)."""
    return build_entry("panopticon_vitb14", **kwargs)


def _entry(name: str, pretrained: bool, weights: Optional[str], progress: bool, sha256: Optional[str],
           **kwargs) -> DinoVisionTransformer:
    model = build_entry(name, **kwargs)
    if pretrained or weights is not None:
        load_weights(model, weights, RELEASED[name], progress, sha256)
    model.eval()
    return model


def panopticon_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                      sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """Panopticon ViT-B/14 (any-sensor). `weights`: local path or URL of the teacher file (default: the release);
    `sha256`: digest (or its prefix) the file must have."""
    return _entry("panopticon_vitb14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vits14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-S/14 backbone (for initialisation and comparison)."""
    return _entry("dinov2_vits14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-B/14 backbone (stage-1 initialisation of Panopticon)."""
    return _entry("dinov2_vitb14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitl14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-L/14 backbone."""
    return _entry("dinov2_vitl14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitg14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-g/14 backbone."""
    return _entry("dinov2_vitg14", pretrained, weights, progress, sha256, **kwargs)


ENTRY_POINTS: Dict[str, Callable[..., DinoVisionTransformer]] = {
    "panopticon_vitb14": panopticon_vitb14, "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14,
    "dinov2_vitl14": dinov2_vitl14, "dinov2_vitg14": dinov2_vitg14,
}
