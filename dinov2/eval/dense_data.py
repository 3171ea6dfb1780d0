"""Batches of ``(x_dict, mask)`` segmentation samples for the dense probes (``dinov2.eval.segmentation``).

Images and masks always move together: joint resize (image bilinear, mask nearest), joint random crops and flips.
Padding fills images with 0 (the normalised mean) and masks with the ignore index, so padded pixels never count.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

RESIZE, CROP, NATIVE = "resize", "crop", "native"


class DenseCollate:
    """Stack ``(x_dict, mask)`` samples.

    ``mode``: ``resize`` (to ``img_size`` when set, else native size padded to a multiple of the patch size),
    ``crop`` (a random ``img_size`` crop at native resolution, padded when the image is smaller; training) or
    ``native`` (native size, padded only to the largest sample of the batch; windowed inference takes it from
    there). ``augment`` adds joint random horizontal / vertical flips."""

    def __init__(self, patch_size: int, ignore_index: int, img_size: Optional[int] = None, augment: bool = False,
                 seed: int = 0, mode: str = RESIZE):
        if mode not in (RESIZE, CROP, NATIVE):
            raise ValueError(f"DenseCollate mode must be {RESIZE}, {CROP} or {NATIVE}; got {mode!r}")
        if mode == CROP and not img_size:
            raise ValueError("random crops need task.img_size (the crop side in pixels)")
        self.patch_size, self.ignore_index, self.img_size, self.augment = patch_size, ignore_index, img_size, augment
        self.mode, self.seed = mode, seed
        self.gen = torch.Generator().manual_seed(seed)
        self._worker_seed: Optional[int] = None

    def _one(self, x: Dict[str, torch.Tensor], mask: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        imgs = x["imgs"].float()
        mask = torch.as_tensor(mask).long()
        if mask.ndim != 2:
            raise ValueError(f"Segmentation label must be a (H, W) mask, got shape {tuple(mask.shape)}")
        if mask.shape != imgs.shape[-2:]:
            raise ValueError(f"Mask shape {tuple(mask.shape)} differs from image size {tuple(imgs.shape[-2:])}")
        if self.mode == RESIZE and self.img_size:
            size = (int(self.img_size), int(self.img_size))
            imgs = F.interpolate(imgs[None], size=size, mode="bilinear", align_corners=False)[0]
            mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        elif self.mode == CROP:
            imgs, mask = self._crop(imgs, mask, int(self.img_size))
        if self.augment:
            flips = torch.rand(2, generator=self.gen) < 0.5
            dims = [d for d, f in zip((-1, -2), flips.tolist()) if f]
            if dims:
                imgs, mask = imgs.flip(dims), mask.flip(dims)
        return imgs, mask

    def _crop(self, imgs: torch.Tensor, mask: torch.Tensor, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        h, w = mask.shape
        top = int(torch.randint(0, max(1, h - size + 1), (1,), generator=self.gen))
        left = int(torch.randint(0, max(1, w - size + 1), (1,), generator=self.gen))
        return imgs[:, top:top + size, left:left + size], mask[top:top + size, left:left + size]

    def __call__(self, samples: List) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            # in a loader worker: its own seeded draws (the loader's generator gives every worker of every epoch
            # another seed), instead of the same copy of the generator in every worker
            self._worker_seed = info.seed
            self.gen.manual_seed(int(info.seed) % (1 << 63))
        ids = samples[0][0]["chn_ids"]
        if any(not torch.equal(s[0]["chn_ids"], ids) for s in samples):
            raise ValueError("Segmentation batches need one band set; the dataset mixes channel ids")
        pairs = [self._one(x, m) for x, m in samples]
        h = max(i.shape[-2] for i, _ in pairs)
        w = max(i.shape[-1] for i, _ in pairs)
        if self.mode == CROP:
            h = w = int(self.img_size)
        elif self.mode == RESIZE:
            p = self.patch_size
            h, w = math.ceil(h / p) * p, math.ceil(w / p) * p
        imgs = torch.zeros(len(pairs), pairs[0][0].shape[0], h, w)
        masks = torch.full((len(pairs), h, w), self.ignore_index, dtype=torch.long)
        for k, (im, m) in enumerate(pairs):
            imgs[k, :, :im.shape[-2], :im.shape[-1]] = im
            masks[k, :m.shape[-2], :m.shape[-1]] = m
        return {"imgs": imgs, "chn_ids": ids.unsqueeze(0).expand(len(pairs), *ids.shape).clone()}, masks


def check_no_transform(ds_cfg, where: str) -> None:
    """Dataset transforms act on the image only; refuse them for dense tasks."""
    if ds_cfg is not None and ds_cfg.get("transform"):
        raise ValueError(f"{where}: segmentation datasets take no 'transform' (it would move the image but not the "
                         "mask); use task.img_size to resize and task.augment for joint flips")


def make_loader(ds, cfg, collate: DenseCollate, shuffle: bool, seed: int):
    """DataLoader with the task's ``optim.dl`` batch size and workers."""
    dl = (cfg.get("optim") or {}).get("dl") or {}
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=int(dl.get("batch_size", 8)), shuffle=shuffle,
                                       num_workers=int(dl.get("num_workers", 0)), collate_fn=collate,
                                       generator=gen, drop_last=False)
