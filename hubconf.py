"""torch.hub entry points: `torch.hub.load('<repo or dir>', 'panopticon_vitb14')`.

Imports torch and this repository's `dinov2.models` only. If the process already imported another package named
`dinov2` (e.g. facebookresearch/dinov2 through torch.hub), this repository's package is imported beside it and
the other one is put back afterwards, so the user's modules keep working and no foreign code runs.

Weights are downloaded once into `<torch hub dir>/checkpoints/` and verified by SHA-256 on every load (against the
digest recorded at download, the hash prefix in the file name `name-<hex>.pth`, or `sha256=`); a cached file is
used without any network request. `PANOPTICON_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) never touches the network.
See docs/hub.md.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import urllib.error
from typing import Dict, Iterator, Optional

import torch

dependencies = ["torch"]
_HERE = os.path.dirname(os.path.abspath(__file__))


def _is_own(module) -> bool:
    """Whether an imported `dinov2` package is the one next to this hubconf.py."""
    paths = list(getattr(module, "__path__", []) or [])
    own = os.path.realpath(os.path.join(_HERE, "dinov2"))
    return bool(paths) and all(os.path.realpath(p) == own for p in paths)


@contextlib.contextmanager
def _own_dinov2() -> Iterator[None]:
    """Within the block `import dinov2...` gives this repository's package (its folder goes first on the import
    path). A different `dinov2` already in `sys.modules` is set aside and restored afterwards; this repository's
    modules stay reachable through the objects imported in the block."""
    loaded = sys.modules.get("dinov2")
    foreign = {}
    if loaded is not None and not _is_own(loaded):
        names = [k for k in sys.modules if k == "dinov2" or k.startswith("dinov2.")]
        foreign = {k: sys.modules.pop(k) for k in names}
    sys.path.insert(0, _HERE)
    try:
        yield
    finally:
        sys.path.remove(_HERE)
        if foreign:
            for k in [k for k in sys.modules if k == "dinov2" or k.startswith("dinov2.")]:
                del sys.modules[k]
            sys.modules.update(foreign)


with _own_dinov2():
    import dinov2 as _dinov2

    if not _is_own(_dinov2):
        raise ImportError(
            f"hubconf.py in {_HERE} needs its own `dinov2` package, but `import dinov2` resolves to "
            f"{list(getattr(_dinov2, '__path__', []))} (another project with the same package name, installed "
            f"ahead of it on the import path). Load from a clean process or uninstall the other package.")
    from dinov2.models.vision_transformer import (
        DinoVisionTransformer,
        vit_base,
        vit_giant2,
        vit_large,
        vit_small,
    )
    from dinov2.utils.checkpoint import backbone_state_dict

PANOPTICON_URL = "https://huggingface.co/lewaldm/panopticon/resolve/main/panopticon_vitb14_teacher.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
OFFLINE_VARIABLES = ("PANOPTICON_OFFLINE", "HF_HUB_OFFLINE")
# SHA-256 of released files whose digest is published; others are checked against the digest recorded at their
# first download (and against a `-<hex>` prefix in the file name, torch.hub's convention, when there is one).
KNOWN_SHA256: Dict[str, str] = {}
_NAME_HASH = re.compile(r"-([a-f0-9]{8,64})\.")


def offline() -> bool:
    """True when an offline variable (`PANOPTICON_OFFLINE`, `HF_HUB_OFFLINE`) is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _expected_digest(url: str, path: str, sha256: Optional[str]) -> Optional[str]:
    """The digest the file must start with: given, published, in the file name, or recorded at download."""
    if sha256:
        return sha256.lower()
    if url in KNOWN_SHA256:
        return KNOWN_SHA256[url]
    m = _NAME_HASH.search(os.path.basename(url))
    if m:
        return m.group(1)
    record = path + ".sha256"
    if os.path.isfile(record):
        with open(record) as f:
            return f.read().split()[0]
    return None


def cached_download(url: str, progress: bool = True, sha256: Optional[str] = None) -> str:
    """Path of `url` in `<torch hub dir>/checkpoints/`: a cached file whose SHA-256 checks out is used without
    any network request; otherwise (and never in offline mode) the file is downloaded and verified."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(url))
    expected = _expected_digest(url, path, sha256)
    if os.path.isfile(path):
        digest = sha256_of(path)
        if expected is None or digest.startswith(expected):
            if not os.path.isfile(path + ".sha256"):
                _record_digest(path, digest)
            return path
        if offline():
            raise RuntimeError(f"offline mode ({'/'.join(OFFLINE_VARIABLES)}): the cached {path} has SHA-256 "
                               f"{digest[:12]}..., expected {expected[:12]}...; replace it with a complete copy")
    elif offline():
        raise RuntimeError(f"offline mode ({'/'.join(OFFLINE_VARIABLES)}): {path} is not cached. Copy the file "
                           f"there, or pass it: torch.hub.load(<repo>, <entry>, weights='/path/to/"
                           f"{os.path.basename(url)}')")
    os.makedirs(folder, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, progress=progress)  # writes a temp file, then renames
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(
            f"could not download {url} ({exc}). Without network, download the file elsewhere and pass it: "
            f"torch.hub.load(<repo>, <entry>, weights='/path/to/{os.path.basename(url)}'), "
            f"or place it at {path}") from exc
    digest = sha256_of(path)
    if expected is not None and not digest.startswith(expected):
        os.remove(path)
        raise RuntimeError(f"downloaded {url} has SHA-256 {digest}, expected {expected}: removed it")
    _record_digest(path, digest)
    return path


def _record_digest(path: str, digest: str) -> None:
    with open(path + ".sha256", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")


def _load_weights(model: torch.nn.Module, weights: Optional[str], default_url: str, progress: bool,
                  sha256: Optional[str] = None) -> None:
    source = weights if weights is not None else default_url
    if str(source).startswith(("http://", "https://")):
        source = cached_download(str(source), progress=progress, sha256=sha256)
    source = os.path.expanduser(str(source))
    if not os.path.isfile(source):
        raise FileNotFoundError(f"weights file not found: {source}")
    if sha256 and not sha256_of(source).startswith(sha256.lower()):
        raise RuntimeError(f"weights {source}: SHA-256 does not start with {sha256}")
    try:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"could not read weights {source} ({exc}); delete it if it is a partial download") from exc
    model.load_state_dict(backbone_state_dict(state_dict), strict=True)


def _panopticon_vitb14(**kwargs) -> DinoVisionTransformer:
    """The released Panopticon ViT-B/14 configuration with random weights (the architecture of
    `panopticon_vitb14_teacher.pth`: ViT-B/14 at 518 px, LayerScale 1e-5, spectral patch embedding with attn_dim
    2304 and 16 heads)."""
    pe_args = kwargs.pop("pe_args", {"attn_dim": 2304, "chnfus_cfg": {"layer_norm": False,
                                                                      "attn_cfg": {"num_heads": 16}}})
    config = dict(img_size=518, patch_size=14, init_values=1e-5, ffn_layer="mlp", block_chunks=0, qkv_bias=True,
                  proj_bias=True, ffn_bias=True, num_register_tokens=0, interpolate_antialias=False,
                  interpolate_offset=0.1, embed_layer="PanopticonPE", pe_args=pe_args)
    config.update(kwargs)
    return vit_base(**config)


def panopticon_vitb14(pretrained: bool = True, weights: Optional[str] = None, progress: bool = True,
                      sha256: Optional[str] = None, **kwargs) -> DinoVisionTransformer:
    """Panopticon ViT-B/14 (any-sensor). `weights`: local path or URL of the teacher file (default: the release);
    `sha256`: digest (or its prefix) the file must have."""
    model = _panopticon_vitb14(**kwargs)
    if pretrained or weights is not None:
        _load_weights(model, weights, PANOPTICON_URL, progress, sha256)
    model.eval()
    return model


def _dinov2(arch, name: str, pretrained: bool, weights: Optional[str], progress: bool, sha256: Optional[str] = None,
            **kwargs):
    config = dict(img_size=518, patch_size=14, init_values=1.0, block_chunks=0, num_register_tokens=0,
                  interpolate_antialias=False, interpolate_offset=0.1, embed_layer="PatchEmbed")
    if arch is vit_giant2:
        config["ffn_layer"] = "swiglufused"
    config.update(kwargs)
    model = arch(**config)
    if pretrained or weights is not None:
        _load_weights(model, weights, DINOV2_URL.format(name=name), progress, sha256)
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
