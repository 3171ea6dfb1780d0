"""LabelRasterScenes (dataset id ``LabelRasterScenes``): the user's scenes with a GeoTIFF of class ids aligned
with each scene, chipped on the fly into segmentation samples ``(x_dict, mask (H, W) long)``.

Scenes are written as for ``GeoTiffScenes`` with one more key per scene: ``labels: <label GeoTIFF>`` (band 1 =
class id; any resolution and extent in the scene's CRS; its nodata value, or ``label_nodata``, becomes
``ignore_index``). Patches of ``patch_size_m`` metres come from the scene grid; the label raster is resampled
(nearest) onto each patch's image grid. Splits are spatial: blocks of ``block_size_m`` (default 4 patches,
aligned with the patch grid so no patch straddles two blocks) are assigned to train/val/test by
``split_fractions`` (see ``dinov2.data.spatial_split``). Patches with less than ``min_labelled_fraction`` of
labelled pixels are skipped.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes, load_scene_list
from dinov2.data.io import expand_path
from dinov2.data.spatial_split import DEFAULT_FRACTIONS, block_split, select_split

logger = logging.getLogger("dinov2")


class LabelRasterScenes(GeoTiffScenes):
    """Segmentation patches of labelled scenes; see the module docstring."""

    def __init__(self, scenes: Union[str, Sequence[Dict[str, Any]]], patch_size_m: float, split: str = "train",
                 block_size_m: Optional[float] = None, split_fractions: Optional[Dict[str, float]] = None,
                 seed: int = 0, num_classes: Optional[int] = None, ignore_index: int = 255,
                 min_labelled_fraction: float = 0.01, img_size: Optional[int] = None, normalize: bool = True,
                 transform=None, min_valid_fraction: float = 0.95, full_spectra: bool = False,
                 cache_dir: Optional[str] = None, **kwargs):
        if transform is not None:
            raise ValueError("LabelRasterScenes takes no transform (it would move the image but not the mask)")
        self.display_name = kwargs.pop("display_name", "label_raster")
        if kwargs:
            raise ValueError(f"LabelRasterScenes: unknown options {sorted(kwargs)}")
        specs, base_dir = load_scene_list(scenes)
        super().__init__(specs, patch_size_m, split="all", holdout_fraction=0.0, mode="eval", img_size=img_size,
                         normalize=normalize, transform=None, min_valid_fraction=min_valid_fraction,
                         full_spectra=full_spectra, cache_dir=cache_dir)
        self.ignore_index = int(ignore_index)
        self.labels: List[Dict[str, Any]] = []
        for i, spec in enumerate(specs):
            self.labels.append(self._open_labels(i, spec, base_dir))
        block = float(block_size_m or 4 * self.patch_m)
        centres_x = [x + self.patch_m / 2 for _, x, _ in self.patches]
        centres_y = [y - self.patch_m / 2 for _, _, y in self.patches]
        # blocks anchored on each scene's patch grid: shift by the scene's first patch corner
        origin = {}
        for si, x, y in self.patches:
            ox, oy = origin.get(si, (x, y))
            origin[si] = (min(ox, x), max(oy, y))
        # scenes are kept apart by an offset of a whole number of blocks
        keys_x = [cx - origin[si][0] + block * 1e6 * si for (si, _, _), cx in zip(self.patches, centres_x)]
        keys_y = [origin[si][1] - cy for (si, _, _), cy in zip(self.patches, centres_y)]
        names = block_split(keys_x, keys_y, block, split_fractions or DEFAULT_FRACTIONS, seed)
        keep = select_split(names, split, "LabelRasterScenes")
        self.patches = [self.patches[i] for i in keep]
        if min_labelled_fraction > 0:
            labelled = [i for i in range(len(self.patches))
                        if float((self.read_mask(i) != self.ignore_index).float().mean()) >= min_labelled_fraction]
            if not labelled:
                raise ValueError(f"LabelRasterScenes: no patch of split {split!r} has >= {min_labelled_fraction} "
                                 "labelled pixels")
            self.patches = [self.patches[i] for i in labelled]
        self.num_classes = int(num_classes) if num_classes else self._max_label() + 1
        logger.info("LabelRasterScenes %s: %d patches, %d classes", split, len(self.patches), self.num_classes)

    def _open_labels(self, idx: int, spec: Dict[str, Any], base_dir: Optional[str]) -> Dict[str, Any]:
        if "labels" not in spec:
            raise ValueError(f"scene {idx} ({spec.get('name', spec.get('sensor'))}): missing 'labels' "
                             "(path of a GeoTIFF of class ids)")
        path = expand_path(str(spec["labels"]), f"scene {idx} labels")
        path = os.path.join(base_dir, path) if base_dir and not os.path.isabs(path) else path
        if not os.path.exists(path):
            raise FileNotFoundError(f"scene {idx}: label raster not found: {path}")
        src = self._handles.get(path)
        scene_file = self.scenes[idx]["groups"][0].files[0]
        scene_crs = self._handles.get(scene_file).crs
        if src.crs != scene_crs:
            raise ValueError(f"label raster {path} has CRS {src.crs}, its scene {scene_crs}")
        nodata = spec.get("label_nodata", src.nodata)
        return {"path": path, "nodata": nodata}

    def _max_label(self) -> int:
        values = set()
        for i in range(len(self.patches)):
            m = self.read_mask(i)
            values.update(m[m != self.ignore_index].unique().tolist())
        if not values:
            raise ValueError("LabelRasterScenes: no labelled pixels")
        return int(max(values))

    def _grid_size(self, si: int) -> int:
        if self.img_size:
            return int(self.img_size)
        finest = self.scenes[si]["groups"][0]
        return int(round(self.patch_m / finest.res))

    def read_mask(self, idx: int) -> torch.Tensor:
        """Class ids ``(S, S)`` of patch ``idx`` on its image grid; unlabelled pixels = ``ignore_index``."""
        from rasterio.enums import Resampling
        from rasterio.windows import from_bounds

        si, x, y = self.patches[idx]
        lab = self.labels[si]
        src = self._handles.get(lab["path"])
        size = self._grid_size(si)
        win = from_bounds(x, y - self.patch_m, x + self.patch_m, y, transform=src.transform)
        fill = lab["nodata"] if lab["nodata"] is not None else self.ignore_index
        arr = src.read(1, window=win, out_shape=(size, size), resampling=Resampling.nearest, boundless=True,
                       fill_value=fill).astype(np.int64)
        out = torch.from_numpy(arr)
        if lab["nodata"] is not None:
            out[out == int(lab["nodata"])] = self.ignore_index
        if ((out < 0) & (out != self.ignore_index)).any():
            raise ValueError(f"{lab['path']}: negative class ids; mark unlabelled pixels with the raster's nodata")
        return out

    def __getitem__(self, idx: int):
        x, _ = super().__getitem__(idx)
        return x, self.read_mask(idx)
