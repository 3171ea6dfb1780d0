"""Pretraining augmentation (`PanopticonAugmentation`) and config-driven composition.

Output id format (the collate needs one format per batch):
- views with (C,2) `[mu, sigma]` ids (datasets built with `full_spectra=True`) give float32 (C_pad,2) ids on
  every crop, simulated or not;
- views with (C,) ids give (C_pad,) ids on every crop: a simulated band's id is its truncated mu (in the input
  id dtype), its SRF sigma being used only to synthesise it;
- mixing (C,) and (C,2) ids inside one sample is an error. Batches mixing datasets with different
  `full_spectra` settings fail in the collate with a message saying so.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torchvision.transforms import Compose

from dinov2.data.channel_sim import ChannelSimulator
from dinov2.data.transforms import (
    CenterCrop,
    ChnPad,
    ChnSelect,
    ColorJitterRS,
    ListChnMask,
    ListRandomResizeCrop,
    RandomHVFlip,
    RandomResizedCrop,
    Resize,
    check_view,
)

SENSOR_SINGLE_MASKED = 0  # channel subsampling of one view
CHN_SIM = 1  # hyperspectral channel simulation


class _CropFamily:
    """Settings and building blocks of one crop family (global or local)."""

    def __init__(self, name: str, number: int, size: int, scale: Sequence[float], spectral_size: Sequence[int],
                 multi_select: bool, hs_modes_probs: Sequence[float], pad_size: Optional[int]) -> None:
        if len(spectral_size) != 2:
            raise ValueError(f"{name}_crops_spectral_size must be [low, high], got {spectral_size!r}")
        probs = torch.as_tensor(list(hs_modes_probs), dtype=torch.float64)
        if probs.shape != (2,) or (probs < 0).any() or probs.sum() <= 0:
            raise ValueError(f"{name}_hs_modes_probs must be two non-negative weights [masked, sim], got "
                             f"{hs_modes_probs!r}")
        if number < 0:
            raise ValueError(f"{name}_crops_number must be >= 0, got {number}")
        self.name, self.number, self.multi_select = name, int(number), bool(multi_select)
        self.spectral_size = (int(spectral_size[0]), int(spectral_size[1]))
        self.hs_modes_probs = probs
        self.chn_mask = ListChnMask(*self.spectral_size)
        self.crop = ListRandomResizeCrop(size, scale=scale, antialias=True, interpolation="bicubic")
        self.pad = ChnPad(self.spectral_size[1] if pad_size is None else pad_size)


class PanopticonAugmentation:
    """Turn a list of views of one place into 2 global and N local spectral crops.

    Per crop family: choose a view per crop (globals from distinct views when the sample has >= 2 views; with
    fewer views than crops every view is used once and the rest are drawn with replacement, so a single-view
    sample gives crops with independent channel subsets and boxes), subsample channels (or, for a single
    hyperspectral view with more than `hs_min_channels` channels, simulate bands with probability
    `hs_modes_probs[1]`), crop the same ground footprint in all resolution groups, flip, jitter (unclipped)
    and pad to a fixed channel count with `spec_masks`.

    Extra arguments beyond the published ones: `global_chn_pad_size` / `local_chn_pad_size` (default: the upper
    spectral size, 13 / 4), `hs_min_channels` (30: a single view whose first group has more channels is
    hyperspectral) and `hs_sim_min_channels` (100: fewest source channels for simulation).
    """

    def __init__(
        self,
        global_crops_number: int = 2,
        global_crops_size: int = 224,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        global_crops_spectral_size: Sequence[int] = (4, 13),
        global_multi_select_view_in_single_sensor_modes: bool = False,
        global_hs_modes_probs: Sequence[float] = (1, 0),
        local_crops_number: int = 4,
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_size: int = 98,
        local_crops_spectral_size: Sequence[int] = (1, 4),
        local_multi_select_view_in_single_sensor_modes: bool = True,
        local_hs_modes_probs: Sequence[float] = (1, 0),
        color_jitter_args: Optional[Dict[str, float]] = None,
        hs_valid_wavelength_ranges: Sequence[Sequence[float]] = ((418, 1282), (1530, 1728), (1977, 2445)),
        hs_valid_sigma_ranges: Sequence[Sequence[float]] = ((5, 40),),
        hs_sigma_distribution: str = "uniform",
        global_chn_pad_size: Optional[int] = None,
        local_chn_pad_size: Optional[int] = None,
        hs_min_channels: int = 30,
        hs_sim_min_channels: int = 100,
    ) -> None:
        if global_crops_number != 2:
            raise ValueError(f"global_crops_number must be 2 (DINO teacher/student pairs), got {global_crops_number}")
        self.global_family = _CropFamily("global", global_crops_number, global_crops_size, global_crops_scale,
                                         global_crops_spectral_size, global_multi_select_view_in_single_sensor_modes,
                                         global_hs_modes_probs, global_chn_pad_size)
        self.local_family = _CropFamily("local", local_crops_number, local_crops_size, local_crops_scale,
                                        local_crops_spectral_size, local_multi_select_view_in_single_sensor_modes,
                                        local_hs_modes_probs, local_chn_pad_size)
        jitter = dict(p=0.2, brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0)
        jitter.update(dict(color_jitter_args or {}))
        self.flip = RandomHVFlip(p=0.5)
        self.jitter = ColorJitterRS(**jitter)  # one instance shared by both families, as published
        self.hs_min_channels = int(hs_min_channels)
        self.simulators = {
            fam.name: ChannelSimulator(fam.spectral_size, hs_valid_wavelength_ranges, hs_valid_sigma_ranges,
                                       hs_sigma_distribution, min_channels=hs_sim_min_channels)
            for fam in (self.global_family, self.local_family)
        }

    @staticmethod
    def _choose_views(n_views: int, n_crops: int, replace: bool) -> List[int]:
        if replace:
            return torch.randint(n_views, (n_crops,)).tolist()
        first = torch.randperm(n_views)[:n_crops].tolist()
        return first + torch.randint(n_views, (n_crops - len(first),)).tolist()

    def _family(self, views: List[Dict[str, Any]], fam: _CropFamily, ids_2d: bool) -> List[Dict[str, Any]]:
        n = fam.number
        if n == 0:
            return []
        hyperspectral = len(views) == 1 and views[0]["imgs"][0].shape[0] > self.hs_min_channels
        if hyperspectral:
            modes = torch.multinomial(fam.hs_modes_probs, n, replacement=True).tolist()
            view_idx = self._choose_views(1, n, replace=True)
        else:
            modes = [SENSOR_SINGLE_MASKED] * n
            view_idx = self._choose_views(len(views), n, replace=fam.multi_select)
        crops = []
        for mode, v in zip(modes, view_idx):
            view = views[v]
            if mode == CHN_SIM:
                in_dtype = view["chn_ids"][0].dtype
                view = self.simulators[fam.name](view)
                if not ids_2d:  # keep the sample's (C,) id format: the id of a simulated band is its truncated mu
                    view["chn_ids"] = [view["chn_ids"][0][:, 0].trunc().to(in_dtype)]
            else:
                view = fam.chn_mask(view)
            crop = fam.crop(view)
            crop = self.jitter(self.flip(crop))
            if ids_2d:
                crop["chn_ids"] = crop["chn_ids"].to(torch.float32)
            crops.append(fam.pad(crop))
        return crops

    def __call__(self, views: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        """Augment one pretraining sample (a list of views) into global and local crop dicts."""
        if isinstance(views, dict):
            views = [views]
        if not isinstance(views, (list, tuple)) or len(views) == 0:
            raise ValueError(f"PanopticonAugmentation expects a non-empty list of views, got {type(views).__name__}")
        for k, view in enumerate(views):
            check_view(view, f"view {k}")
        id_dims = {cid.dim() for view in views for cid in view["chn_ids"]}
        if len(id_dims) != 1:
            raise ValueError("views of one sample mix (C,) and (C,2) chn_ids; build every dataset with the same "
                             "full_spectra setting")
        ids_2d = id_dims == {2}
        views = list(views)
        global_crops = self._family(views, self.global_family, ids_2d)
        local_crops = self._family(views, self.local_family, ids_2d)
        return {"global_crops": global_crops, "global_crops_teacher": global_crops, "local_crops": local_crops,
                "offsets": ()}


AUGMENTATIONS: Dict[str, Callable[..., Any]] = {
    cls.__name__: cls
    for cls in (PanopticonAugmentation, ListChnMask, ListRandomResizeCrop, ChnPad, ColorJitterRS, RandomHVFlip,
                Resize, CenterCrop, RandomResizedCrop, ChnSelect, ChannelSimulator)
}


def _to_container(cfg: Any) -> Any:
    try:  # omegaconf is a core dependency, but keep plain dicts/lists working without it
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def make_augmentation(cfg_list: Any) -> Compose:
    """Build a `Compose` from a list of `{id: <class name>, **kwargs}` dicts or nested lists."""
    cfg_list = _to_container(cfg_list)
    if cfg_list is None:
        cfg_list = []
    if isinstance(cfg_list, dict):
        cfg_list = [cfg_list]
    if not isinstance(cfg_list, (list, tuple)):
        raise ValueError(f"augmentation config must be a list of dicts, got {type(cfg_list).__name__}")
    transforms = []
    for k, cfg in enumerate(cfg_list):
        if isinstance(cfg, (list, tuple)):
            transforms.append(make_augmentation(cfg))
            continue
        if not isinstance(cfg, dict) or "id" not in cfg:
            raise ValueError(f"augmentation config entry {k} must be a dict with an 'id' or a nested list, got {cfg!r}")
        kwargs = dict(cfg)
        name = kwargs.pop("id")
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation id {name!r}; valid ids: {sorted(AUGMENTATIONS)}")
        try:
            transforms.append(AUGMENTATIONS[name](**kwargs))
        except TypeError as e:
            raise ValueError(f"bad arguments for augmentation {name!r}: {e}") from e
    return Compose(transforms)
