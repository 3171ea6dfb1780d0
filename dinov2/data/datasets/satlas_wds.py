"""SatlasPretrain as tar shards (dataset id ``satl_webdataset``): the published webdataset variant of
``SatlasDataset``, streamed from a local folder or ``https://`` / ``s3://``.

Layout (as the published builder lays it out): a folder of ``*.tar`` shards with the index ``dataset.yaml``
(``nsamples_per_shard``; see ``dinov2.data.shards``) and a ``.pt`` file of per-sensor statistics. A sample is one
footprint: one member ``<footprint>.<sensor>.tif`` per acquisition it holds (sensor s1, s2 or landsat), a
zlib-compressed TIFF of that acquisition's bands in the order of the ``satlas_<sensor>`` band YAML (s2: B04, B03,
B02 from the true-colour tile, then B05, B06, B07, B08, B11, B12; s1: VV, VH; landsat: B1..B11), all resampled to
one grid, with the 8-bit values of the SatlasPretrain PNGs. Each sample yields ``num_sens`` views (``get_idx_mode``
``unique``: distinct acquisitions, ``replace``: drawn with replacement), every band divided by 255 and z-scored with
the same statistics as ``SatlasDataset`` (the ``.pt`` file is not read), as one image group per view -- the shape
of ``SatlasDataset(resize=True)``'s views. The stream is endless by default (pass after pass, each in a new seeded
order), as pretraining reads it.
"""
from __future__ import annotations

import io
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dinov2.data.datasets.satlas import LAYOUT, SENSOR_DS
from dinov2.data.normalize import normalizer_from_ds_cfg
from dinov2.data.sensors import ds_chn_ids
from dinov2.data.shards import ShardStream, resolve_shards, select_shards
from dinov2.data.views import choose_indices, make_view

GET_IDX_MODES = ("unique", "replace")


def read_tif_chw(data: bytes, n_bands: int, where: str) -> np.ndarray:
    """A shard member TIFF as ``(n_bands, H, W)`` (stored channels-first or -last)."""
    import tifffile

    try:
        arr = tifffile.imread(io.BytesIO(data))
    except Exception as e:  # tifffile raises a variety of errors on damaged data
        raise ValueError(f"{where}: not a readable TIFF ({e})") from None
    if arr.ndim == 2 and n_bands == 1:
        arr = arr[None]
    if arr.ndim == 3 and arr.shape[0] != n_bands and arr.shape[-1] == n_bands:
        arr = np.moveaxis(arr, -1, 0)
    if arr.ndim != 3 or arr.shape[0] != n_bands:
        raise ValueError(f"{where}: TIFF of shape {arr.shape}, expected {n_bands} bands")
    return arr


class SatlasShards(ShardStream):
    """Pretraining samples (lists of ``num_sens`` views) streamed from SatlasPretrain shards."""

    SHARD_SUBSET = True

    def __init__(self, url: str, num_sens: int = 2, get_idx_mode: str = "unique",
                 keep_sensors: Sequence[str] = ("s1", "s2", "landsat"), normalize: bool = True, transform=None,
                 full_spectra: bool = False, subset: Any = -1, seed: int = 42, shuffle: bool = True,
                 shuffle_buffer: int = 1000, endless: bool = True):
        bad = [s for s in keep_sensors if s not in SENSOR_DS]
        if bad:
            raise ValueError(f"unknown Satlas sensors {bad}; valid: {sorted(SENSOR_DS)}")
        if get_idx_mode not in GET_IDX_MODES:
            raise ValueError(f"get_idx_mode must be one of {GET_IDX_MODES}, got {get_idx_mode!r}")
        shards, counts, _ = resolve_shards(url)
        self.num_sens, self.replace, self.keep = int(num_sens), get_idx_mode == "replace", list(keep_sensors)
        self.normalize, self.transform = normalize, transform
        self.n_bands = {s: sum(n for _, n in LAYOUT[s]) for s in self.keep}
        self.chn_ids = {s: ds_chn_ids(SENSOR_DS[s], full_spectra) for s in self.keep}
        self.norms = {s: normalizer_from_ds_cfg(SENSOR_DS[s]) for s in self.keep}
        super().__init__(select_shards(shards, subset, seed), counts, self._sample, shuffle=shuffle,
                         shuffle_buffer=shuffle_buffer, seed=seed, endless=endless)

    def view(self, sensor: str, data: bytes, where: str) -> Dict[str, List[torch.Tensor]]:
        """One acquisition as a view: ``/255``, z-scored per band, one image group with its ids."""
        arr = read_tif_chw(data, self.n_bands[sensor], where)
        img = torch.from_numpy(arr.astype(np.float32)) / 255.0
        if self.normalize:
            img = self.norms[sensor](img)
        return make_view([img], [self.chn_ids[sensor].clone()])

    def _sample(self, members: Dict[str, Any]) -> Any:
        where = f"{members.get('__url__')}:{members.get('__key__')}"
        found = sorted(k for k in members if k.endswith(".tif"))
        unknown = [k for k in found if k[:-4] not in SENSOR_DS]
        if unknown:
            raise ValueError(f"{where}: members {unknown} name no Satlas sensor ({sorted(SENSOR_DS)})")
        entries = [k for k in found if k[:-4] in self.keep]
        if not entries or (not self.replace and len(entries) < self.num_sens):
            raise ValueError(f"{where}: {len(entries)} acquisitions of sensors {self.keep}, {self.num_sens} "
                             "views wanted (get_idx_mode unique)")
        views = [self.view(entries[i][:-4], members[entries[i]], f"{where}.{entries[i]}")
                 for i in choose_indices(len(entries), self.num_sens, replace=self.replace)]
        return self.transform(views) if self.transform is not None else views


def tif_bytes(arr: np.ndarray) -> bytes:
    """``(C, H, W)`` array as a zlib-compressed TIFF (the members' encoding)."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, photometric="minisblack", planarconfig="separate", compression="zlib")
    return buf.getvalue()


def footprint_members(views: Dict[str, np.ndarray], key: str) -> Dict[str, Optional[bytes]]:
    """The tar members of one footprint (``{sensor: (C, H, W) uint8}``), for shard writers and tests."""
    return {"__key__": key, **{f"{s}.tif": tif_bytes(a) for s, a in views.items()}}
