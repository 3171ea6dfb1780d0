"""torch.hub entry points: `torch.hub.load('<repo or dir>', 'panopticon_vitb14')`.

Imports torch and `dinov2.models` only. Weights are downloaded once into the torch hub cache and reused.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Optional

import torch

from dinov2.models.vision_transformer import DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small

dependencies = ["torch"]

PANOPTICON_URL = "https://huggingface.co/lewaldm/panopticon/resolve/main/panopticon_vitb14_teacher.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"


def _remote_size(url: str, timeout: float = 10.0) -> Optional[int]:
    """Content-Length of `url`, or None when the server cannot be reached."""
    try:
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            return int(length) if length is not None else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def cached_download(url: str, progress: bool = True) -> str:
    """Path of `url` in `<torch hub dir>/checkpoints/`, downloading it only if absent or of the wrong size."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, os.path.basename(url))
    if os.path.isfile(path):
        expected = _remote_size(url)
        if expected is None or expected == os.path.getsize(path):
            return path  # offline, or the cached copy is complete
    try:
        torch.hub.download_url_to_file(url, path, progress=progress)  # writes a temp file, then renames
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"could not download {url} ({exc}). Without network, download the file elsewhere and pass it: "
            f"torch.hub.load(<repo>, <entry>, weights='/path/to/{os.path.basename(url)}'), "
            f"or place it at {path}"
        ) from exc
    return path


def _load_weights(model: torch.nn.Module, weights: Optional[str], default_url: str, progress: bool) -> None:
    source = weights if weights is not None else default_url
    if str(source).startswith(("http://", "https://")):
        source = cached_download(str(source), progress=progress)
    source = os.path.expanduser(str(source))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"weights file not found: {source}")
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"could not read weights {source} ({exc}); delete it if it is a partial download") from exc
    for key in ("teacher", "model"):  # training checkpoints wrap the state dict
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    prefixes = ("teacher.backbone.", "backbone.")
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    model.load_state_dict(state_dict, strict=True)


def _panopticon_vitb14(**kwargs) -> DinoVisionTransformer:
    """The published Panopticon ViT-B/14 configuration with random weights (reference §8)."""
    pe_args = kwargs.pop("pe_args", {"attn_dim": 2304, "chnfus_cfg": {"layer_norm": False,
                                                                      "attn_cfg": {"num_heads": 16}}})
    config = dict(img_size=518, patch_size=14, init_values=1e-5, ffn_layer="mlp", block_chunks=0, qkv_bias=True,
                  proj_bias=True, ffn_bias=True, num_register_tokens=0, interpolate_antialias=False,
                  interpolate_offset=0.1, embed_layer="PanopticonPE", pe_args=pe_args)
    config.update(kwargs)
    return vit_base(**config)


def panopticon_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                      **kwargs) -> DinoVisionTransformer:
    """Panopticon ViT-B/14 (any-sensor). `weights`: local path or URL of the teacher file; default: the release."""
    model = _panopticon_vitb14(**kwargs)
    if pretrained or weights is not None:
        _load_weights(model, weights, PANOPTICON_URL, progress)
    model.eval()
    return model


def _dinov2(arch, name: str, pretrained: bool, weights: Optional[str], progress: bool, **kwargs):
    config = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0, num_register_tokens=0,
                  interpolate_antialias=False, interpolate_offset=0.1, embed_layer="PatchEmbed")
    if arch is vit_giant2:
        config["ffn_layer"] = "swiglufused"
    config.update(kwargs)
    model = arch(**config)
    if pretrained or weights is not None:
        _load_weights(model, weights, DINOV2_URL.format(name=name), progress)
    model.eval()
    return model


def dinov2_vits14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True, **kwargs):
    """RGB DINOv2 ViT-S/14 backbone (for initialisation and comparison)."""
    return _dinov2(vit_small, "dinov2_vits14", pretrained, weights, progress, **kwargs)


def dinov2_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True, **kwargs):
    """RGB DINOv2 ViT-B/14 backbone (stage-1 initialisation of Panopticon)."""
    return _dinov2(vit_base, "dinov2_vitb14", pretrained, weights, progress, **kwargs)


def dinov2_vitl14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True, **kwargs):
    """RGB DINOv2 ViT-L/14 backbone."""
    return _dinov2(vit_large, "dinov2_vitl14", pretrained, weights, progress, **kwargs)


def dinov2_vitg14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True, **kwargs):
    """RGB DINOv2 ViT-g/14 backbone."""
    return _dinov2(vit_giant2, "dinov2_vitg14", pretrained, weights, progress, **kwargs)
