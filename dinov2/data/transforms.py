"""Building blocks of the spectral augmentations and the eval transforms.

Two data shapes flow through here (see docs/data.md):
- a *view*: `{'imgs': [Tensor(c_g,H_g,W_g), ...], 'chn_ids': [Tensor(c_g,) or (c_g,2), ...]}` (groups of bands
  sharing one resolution, all covering the same ground footprint);
- an *x_dict* / crop: `{'imgs': Tensor(C,H,W), 'chn_ids': Tensor(C,) or (C,2), optional 'spec_masks': (C,)}`.
Every transform returns new dicts and new tensors; callers' objects are never modified. All randomness comes
from torch's global RNG.
"""
from __future__ import annotations

import ast
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "nearest-exact": "nearest-exact"}


# ---------------------------------------------------------------------------------------------- helpers
def _mode(interpolation: Any) -> str:
    name = getattr(interpolation, "value", interpolation)  # accept torchvision InterpolationMode
    if not isinstance(name, str) or name.lower() not in _MODES:
        raise ValueError(f"interpolation must be one of {sorted(_MODES)}, got {interpolation!r}")
    return _MODES[name.lower()]


def resize_tensor(img: torch.Tensor, size: Tuple[int, int], mode: str = "bilinear", antialias: bool = True) -> torch.Tensor:
    """Resize the last two dims of a (..., H, W) float tensor to `size` (float32 result for non-float input)."""
    if not img.is_floating_point() or img.dtype in (torch.float16, torch.bfloat16):
        img = img.float()  # CPU bicubic/antialias kernels need float32
    lead = img.shape[:-2]
    x = img.reshape(1, -1, *img.shape[-2:])  # interpolate treats every leading entry as a channel
    smooth = mode in ("bilinear", "bicubic")
    out = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False if smooth else None,
                        antialias=antialias and smooth)
    return out.reshape(*lead, *out.shape[-2:])


def parse_size(size: Union[int, str, Sequence[int]]) -> Tuple[int, int]:
    """int -> (s, s); "(h, w)" string or (h, w) sequence -> (h, w)."""
    if isinstance(size, str):
        try:
            size = ast.literal_eval(size)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"size string must look like '224' or '(h, w)', got {size!r}") from e
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"size must be an int or (h, w), got {size!r}")


def check_view(view: Any, where: str = "view") -> None:
    """Raise ValueError unless `view` follows the pretraining view contract."""
    if not isinstance(view, dict) or "imgs" not in view or "chn_ids" not in view:
        raise ValueError(f"{where} must be a dict with 'imgs' and 'chn_ids' lists, got {type(view).__name__}")
    imgs, ids = view["imgs"], view["chn_ids"]
    if not isinstance(imgs, (list, tuple)) or not isinstance(ids, (list, tuple)) or len(imgs) != len(ids):
        raise ValueError(f"{where}: 'imgs' and 'chn_ids' must be lists of equal length (groups of bands)")
    if len(imgs) == 0:
        raise ValueError(f"{where} has no image groups")
    for g, (img, cid) in enumerate(zip(imgs, ids)):
        if not torch.is_tensor(img) or img.dim() != 3:
            raise ValueError(f"{where} group {g}: imgs must be a (c,H,W) tensor, got "
                             f"{tuple(img.shape) if torch.is_tensor(img) else type(img).__name__}")
        if not torch.is_tensor(cid) or cid.dim() not in (1, 2) or cid.shape[0] != img.shape[0] or (
            cid.dim() == 2 and cid.shape[1] != 2
        ):
            raise ValueError(f"{where} group {g}: chn_ids must be ({img.shape[0]},) or ({img.shape[0]},2), got "
                             f"{tuple(cid.shape) if torch.is_tensor(cid) else type(cid).__name__}")


def _check_xdict(x: Any, name: str) -> None:
    if not isinstance(x, dict) or not torch.is_tensor(x.get("imgs")):
        raise ValueError(f"{name} expects an x_dict with an 'imgs' tensor, got {type(x).__name__}")


# ---------------------------------------------------------------------------------------------- views -> crops
class ListChnMask:
    """Keep a random subset of n in [low, min(high, total)] channels of a view; chn_ids travel with channels.

    Channels keep their original order; groups that lose every channel are dropped.
    """

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high:
            raise ValueError(f"ListChnMask needs 1 <= low <= high, got low={low}, high={high}")
        self.low, self.high = int(low), int(high)

    def __call__(self, view: Dict[str, Any]) -> Dict[str, Any]:
        sizes = [img.shape[0] for img in view["imgs"]]
        total = sum(sizes)
        out = dict(view)
        if total <= self.low:
            return out
        n = int(torch.randint(self.low, min(self.high, total) + 1, ()).item())
        if n == total:
            return out
        keep = torch.zeros(total, dtype=torch.bool)
        keep[torch.randperm(total)[:n]] = True
        imgs, ids, start = [], [], 0
        for img, cid, c in zip(view["imgs"], view["chn_ids"], sizes):
            sel = keep[start:start + c].nonzero().flatten()
            start += c
            if sel.numel():
                imgs.append(img[sel])
                ids.append(cid[sel])
        out["imgs"], out["chn_ids"] = imgs, ids
        return out


class ListRandomResizeCrop:
    """Random resized crop of the same ground footprint in every group, each resized to size x size.

    The box is sampled (torchvision RandomResizedCrop parameters) on the group with the most pixels and mapped
    to every other group by its H and W ratio; both box edges are rounded to the nearest pixel, so a group's box
    is within half of its own pixel of the exact footprint. Returns a crop dict with all groups concatenated.
    """

    def __init__(self, size: int, scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 antialias: bool = True, interpolation: Any = "bicubic") -> None:
        self.size = parse_size(size)
        self.scale, self.ratio = list(scale), list(ratio)
        if not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ListRandomResizeCrop: bad scale {scale!r} or ratio {ratio!r}")
        self.antialias, self.mode = antialias, _mode(interpolation)

    @staticmethod
    def _edges(start: int, length: int, factor: float, limit: int) -> Tuple[int, int]:
        lo = int(math.floor(start * factor + 0.5))
        hi = int(math.floor((start + length) * factor + 0.5))
        lo = min(max(lo, 0), limit - 1)
        hi = min(max(hi, lo + 1), limit)
        return lo, hi

    def __call__(self, view: Dict[str, Any]) -> Dict[str, Any]:
        imgs = view["imgs"]
        ref = max(range(len(imgs)), key=lambda g: imgs[g].shape[-2] * imgs[g].shape[-1])
        Hr, Wr = imgs[ref].shape[-2:]
        i, j, h, w = T.RandomResizedCrop.get_params(imgs[ref], self.scale, self.ratio)
        crops = []
        for img in imgs:
            H, W = img.shape[-2:]
            t, b = self._edges(i, h, H / Hr, H)
            l, r = self._edges(j, w, W / Wr, W)
            crops.append(resize_tensor(img[:, t:b, l:r], self.size, self.mode, self.antialias))
        out = {k: v for k, v in view.items() if k not in ("imgs", "chn_ids")}
        out["imgs"] = torch.cat(crops, dim=0)
        out["chn_ids"] = torch.cat(list(view["chn_ids"]), dim=0)
        return out


class ChnPad:
    """Pad a crop to `size` channels with zero images; padded ids repeat the last id; `spec_masks` True there.

    `size < 0` disables padding (a mask is still added). More than `size` channels is an error, because
    such crops could not be collated with the others.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "ChnPad")
        imgs, ids = x["imgs"], x["chn_ids"]
        C = imgs.shape[0]
        mask = x.get("spec_masks")
        mask = torch.zeros(C, dtype=torch.bool) if mask is None else mask.to(torch.bool)
        out = dict(x)
        if self.size < 0 or C == self.size:
            out["spec_masks"] = mask.clone()
            return out
        if C > self.size:
            raise ValueError(f"ChnPad({self.size}) got a crop with {C} channels; raise the pad size or lower the "
                             "channel subsampling bound (crops_spectral_size)")
        if C == 0:
            raise ValueError("ChnPad got a crop with 0 channels")
        n = self.size - C
        out["imgs"] = torch.cat([imgs, imgs.new_zeros((n, *imgs.shape[1:]))], dim=0)
        out["chn_ids"] = torch.cat([ids, ids[-1:].expand(n, *ids.shape[1:])], dim=0)
        out["spec_masks"] = torch.cat([mask, torch.ones(n, dtype=torch.bool)])
        return out


class ColorJitterRS:
    """Per-channel brightness/contrast jitter for normalised multispectral data, applied with probability p.

    Each channel is treated as its own grey image (contrast blends it with its own spatial mean); factors are
    drawn once per call and the op order is random. Unlike torchvision's float ColorJitter the result is NOT
    clamped to [0, 1] — inputs are z-scored (a published fault, docs/differences.md). Saturation and hue have no
    meaning for single-channel images and must be 0.
    """

    def __init__(self, p: float = 0.2, brightness: Any = 0.1, contrast: Any = 0.1, saturation: float = 0.0,
                 hue: float = 0.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ColorJitterRS p must be in [0, 1], got {p}")
        if saturation or hue:
            raise ValueError("ColorJitterRS: saturation and hue are undefined per channel; set them to 0")
        self.p = p
        self.brightness = self._range(brightness, "brightness")
        self.contrast = self._range(contrast, "contrast")

    @staticmethod
    def _range(v: Any, name: str) -> Optional[Tuple[float, float]]:
        if isinstance(v, (int, float)):
            if v < 0:
                raise ValueError(f"ColorJitterRS {name} must be >= 0, got {v}")
            lo, hi = max(0.0, 1.0 - v), 1.0 + v
        elif isinstance(v, (tuple, list)) and len(v) == 2 and 0 <= v[0] <= v[1]:
            lo, hi = float(v[0]), float(v[1])
        else:
            raise ValueError(f"ColorJitterRS {name} must be a number >= 0 or (min, max), got {v!r}")
        return None if lo == hi == 1.0 else (lo, hi)

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "ColorJitterRS")
        out = dict(x)
        if torch.rand(()).item() >= self.p:
            return out
        img = x["imgs"]
        order = torch.randperm(2).tolist()
        b = None if self.brightness is None else torch.empty(()).uniform_(*self.brightness).item()
        c = None if self.contrast is None else torch.empty(()).uniform_(*self.contrast).item()
        for op in order:
            if op == 0 and b is not None:
                img = img * b
            elif op == 1 and c is not None:
                mean = img.mean(dim=(-2, -1), keepdim=True)
                img = c * img + (1.0 - c) * mean
        out["imgs"] = img
        return out


# ---------------------------------------------------------------------------------------------- x_dict transforms
class RandomHVFlip:
    """Vertical flip then horizontal flip, each independently with probability p (x_dict or crop dict)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHVFlip p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "RandomHVFlip")
        out = dict(x)
        flip_v, flip_h = (torch.rand(2) < self.p).tolist()
        dims = ([-2] if flip_v else []) + ([-1] if flip_h else [])
        if dims:
            out["imgs"] = torch.flip(x["imgs"], dims=dims)
        return out


class Resize:
    """Resize `imgs` to exactly (size, size) for an int, or (h, w) for a tuple / "(h,w)" string."""

    def __init__(self, size: Union[int, str, Sequence[int]], antialias: bool = True,
                 interpolation: Any = "bilinear") -> None:
        self.size, self.antialias, self.mode = parse_size(size), antialias, _mode(interpolation)

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "Resize")
        out = dict(x)
        out["imgs"] = resize_tensor(x["imgs"], self.size, self.mode, self.antialias)
        return out


class CenterCrop:
    """Centre crop of `imgs` (zero-padded like torchvision when the image is smaller than the crop)."""

    def __init__(self, size: Union[int, str, Sequence[int]]) -> None:
        self.size = parse_size(size)

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "CenterCrop")
        out = dict(x)
        out["imgs"] = TF.center_crop(x["imgs"], list(self.size))
        return out


class RandomResizedCrop:
    """torchvision RandomResizedCrop on `imgs` of an x_dict (any channel count)."""

    def __init__(self, size: Union[int, str, Sequence[int]], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), antialias: bool = True, interpolation: Any = "bilinear") -> None:
        self.size, self.scale, self.ratio = parse_size(size), list(scale), list(ratio)
        self.antialias, self.mode = antialias, _mode(interpolation)

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "RandomResizedCrop")
        img = x["imgs"]
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        out = dict(x)
        out["imgs"] = resize_tensor(img[..., i:i + h, j:j + w], self.size, self.mode, self.antialias)
        return out


class ChnSelect:
    """Select channels of `imgs` and `chn_ids` (and `spec_masks`) by index or by wavelength.

    Args:
        idxs: channel indices into the input.
        wavelengths: wanted chn_ids (nm; SAR codes are negative ints); each picks the channel whose id (mu for
            (C,2) ids) is nearest, which must lie within `max_diff_nm`. When several channels are equally near
            (e.g. the two EnMAP bands with id 993) the choice is ambiguous and an error asks for `idxs`.
        max_diff_nm: largest accepted distance between a wanted wavelength and the chosen channel's id.
    """

    def __init__(self, idxs: Optional[Sequence[int]] = None, wavelengths: Optional[Sequence[float]] = None,
                 max_diff_nm: float = 1.0) -> None:
        if (idxs is None) == (wavelengths is None):
            raise ValueError("ChnSelect needs exactly one of idxs or wavelengths")
        self.idxs = None if idxs is None else [int(i) for i in idxs]
        self.wavelengths = None if wavelengths is None else [float(w) for w in wavelengths]
        self.max_diff_nm = float(max_diff_nm)

    def _indices(self, ids: torch.Tensor, C: int) -> List[int]:
        if self.idxs is not None:
            bad = [i for i in self.idxs if not -C <= i < C]
            if bad:
                raise ValueError(f"ChnSelect indices {bad} out of range for {C} channels")
            return self.idxs
        mus = (ids[:, 0] if ids.dim() == 2 else ids).double()
        chosen = []
        for wl in self.wavelengths:
            diff = (mus - wl).abs()
            k = int(diff.argmin())
            if diff[k] > self.max_diff_nm:
                raise ValueError(f"ChnSelect: no channel within {self.max_diff_nm} nm of {wl}; nearest id is "
                                 f"{mus[k].item():g}; available ids {mus.tolist()}")
            tied = torch.nonzero(diff == diff[k]).flatten().tolist()
            if len(tied) > 1:
                raise ValueError(f"ChnSelect: wavelength {wl:g} is ambiguous, channels {tied} have ids "
                                 f"{mus[tied].tolist()}; select them by idxs instead")
            chosen.append(k)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"ChnSelect: wavelengths {self.wavelengths} select the same channel more than once")
        return chosen

    def __call__(self, x: Dict[str, Any]) -> Dict[str, Any]:
        _check_xdict(x, "ChnSelect")
        if not torch.is_tensor(x.get("chn_ids")):
            raise ValueError("ChnSelect needs 'chn_ids' in the x_dict")
        C = x["imgs"].shape[-3]
        idx = torch.tensor(self._indices(x["chn_ids"], C), dtype=torch.long)
        out = dict(x)
        out["imgs"] = x["imgs"].index_select(-3, idx)
        out["chn_ids"] = x["chn_ids"].index_select(0, idx)
        if torch.is_tensor(x.get("spec_masks")):
            out["spec_masks"] = x["spec_masks"].index_select(0, idx)
        return out
