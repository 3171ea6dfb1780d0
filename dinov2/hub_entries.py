"""The models torch.hub offers (`panopticon_vitb14`, the RGB `dinov2_vit*14`), as functions of the package.

`hubconf.py` at the repository root re-exports them for `torch.hub.load(<repo or dir>, name)`; `load_model(name)`
(`dinov2.hub`), `panopticon embed/predict/export` and the TerraTorch backbones call them directly, so an installed
package needs no checkout. Weights given as a URL (and the released files) go through `dinov2.weights_cache`
(downloaded once, keyed by source, SHA-256 checked); local files may be `.pth` or `.safetensors`, as a raw
backbone state dict or a training / teacher checkpoint. Imports torch and `dinov2.models` only.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from dinov2.models.vision_transformer import DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small
from dinov2.utils.checkpoint import backbone_state_dict, load_checkpoint_file
from dinov2.weights_cache import RELEASE_URLS, cached_download, sha256_of

PANOPTICON_URL = "https://huggingface.co/lewaldm/panopticon/resolve/main/panopticon_vitb14_teacher.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
# entry name -> URL of its released weights
RELEASED: Dict[str, str] = {"panopticon_vitb14": PANOPTICON_URL}
RELEASED.update({n: DINOV2_URL.format(name=n) for n in ("dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
                                                         "dinov2_vitg14")})
RELEASE_URLS.update(RELEASED.values())
# entry points whose patch embedding is spectral (take any bands through `chn_ids`)
SPECTRAL_ENTRY_POINTS: Tuple[str, ...] = ("panopticon_vitb14",)

# the released panopticon_vitb14 architecture (ViT-B/14 at 518 px, LayerScale 1e-5, spectral patch embedding with
# attn_dim 2304 and 16 heads), as keyword arguments of `vit_base`
PANOPTICON_VITB14_CONFIG = dict(
    img_size=518, patch_size=14, init_values=1e-5, ffn_layer="mlp", block_chunks=0, qkv_bias=True, proj_bias=True,
    ffn_bias=True, num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1,
    embed_layer="PanopticonPE",
    pe_args={"attn_dim": 2304, "chnfus_cfg": {"layer_norm": False, "attn_cfg": {"num_heads": 16}}})


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
        raise RuntimeError(f"weights {source}: SHA-256 does not start with {sha256}")
    try:
        state_dict = load_checkpoint_file(source)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; delete it if it is a partial download") from exc
    model.load_state_dict(backbone_state_dict(state_dict), strict=True)


_load_weights = load_weights  # the name hubconf.py exported before


def _panopticon_vitb14(**kwargs) -> DinoVisionTransformer:
    """The released Panopticon ViT-B/14 architecture with random weights (`kwargs` override the configuration)."""
    config = dict(PANOPTICON_VITB14_CONFIG)
    config.update(kwargs)
    return vit_base(**config)


def panopticon_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                      sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """Panopticon ViT-B/14 (any-sensor). `weights`: local path or URL of the teacher file (default: the release);
    `sha256`: digest (or its prefix) the file must have."""
    model = _panopticon_vitb14(**kwargs)
    if pretrained or weights is not None:
        load_weights(model, weights, PANOPTICON_URL, progress, sha256)
    model.eval()
    return model


def _dinov2(arch: Callable[..., DinoVisionTransformer], name: str, pretrained: bool, weights: Optional[str],
            progress: bool, sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    config = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0, num_register_tokens=0,
                  interpolate_antialias=False, interpolate_offset=0.1, embed_layer="PatchEmbed")
    if arch is vit_giant2:
        config["ffn_layer"] = "swiglufused"
    config.update(kwargs)
    model = arch(**config)
    if pretrained or weights is not None:
        load_weights(model, weights, RELEASED[name], progress, sha256)
    model.eval()
    return model


def dinov2_vits14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-S/14 backbone (for initialisation and comparison)."""
    return _dinov2(vit_small, "dinov2_vits14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-B/14 backbone (stage-1 initialisation of Panopticon)."""
    return _dinov2(vit_base, "dinov2_vitb14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitl14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-L/14 backbone."""
    return _dinov2(vit_large, "dinov2_vitl14", pretrained, weights, progress, sha256, **kwargs)


def dinov2_vitg14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                  sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """RGB DINOv2 ViT-g/14 backbone."""
    return _dinov2(vit_giant2, "dinov2_vitg14", pretrained, weights, progress, sha256, **kwargs)


ENTRY_POINTS: Dict[str, Callable[..., DinoVisionTransformer]] = {
    "panopticon_vitb14": panopticon_vitb14, "dinov2_vits14": dinov2_vits14, "dinov2_vitb14": dinov2_vitb14,
    "dinov2_vitl14": dinov2_vitl14, "dinov2_vitg14": dinov2_vitg14,
}
