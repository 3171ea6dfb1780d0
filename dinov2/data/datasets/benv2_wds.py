"""BigEarthNet-v2 as tar shards (eval id ``benv2_webdataset``), the layout the published shard builder writes.

``<root>/wds/<split>-<bands>/`` (split: train, validation, test; bands: s1, s2, all) holds ``dataset-NNNNNN.tar``
shards (about 100 per split), ``dataset.yaml`` (``sensor``: s1 | s2 | s1s2, ``num_classes``,
``nsamples_per_shard: {<shard>.tar: <samples>}``) and ``dataset.pt`` (``{'mean', 'std'}`` of the channels).
A sample is ``<patch_id>.img.npy`` (float32 ``(C, 120, 120)``, unnormalised) and ``<patch_id>.label.npy``
(bool ``(19,)``). The builder ran the published raw reader, which stores Sentinel-1 as VH then VV (its files
sorted by name); the reader here puts the channels in this project's order (VV, VH, then Sentinel-2; the ids of
``ben-s1`` / ``ben-s2`` / ``ben-s1s2``) and normalises them with those YAMLs' statistics, so a shard sample equals
the raw-release reader's sample (``dinov2.data.datasets.benv2``). A ``channels`` list in ``dataset.yaml`` (written by
``panopticon prepare_data benv2-shards``) names the stored order explicitly; ``dataset.pt`` is not read.

``url`` is a shard folder, a glob or a brace range of shards, local or ``https://`` / ``s3://``; ``subset`` picks a
seeded random share of the shards (the published configs train on 10 % of them).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from dinov2.data import sensors
from dinov2.data.datasets.benv2 import LABELS_19, S2_BANDS, SIZE, BigEarthNetv2
from dinov2.data.normalize import normalizer_from_ds_cfg
from dinov2.data.shards import ShardStream, load_npy, resolve_shards, select_shards

SENSORS = {"s1": ("s1", "ben-s1"), "s2": ("s2", "ben-s2"), "s1s2": ("all", "ben-s1s2")}
# channel names in the order the published builder stored them, and in this project's order
STORED = {"s1": ["VH", "VV"], "s2": list(S2_BANDS), "s1s2": ["VH", "VV", *S2_BANDS]}
OURS = {"s1": ["VV", "VH"], "s2": list(S2_BANDS), "s1s2": ["VV", "VH", *S2_BANDS]}


class BENv2Shards(ShardStream):
    """Samples ``({'imgs': (C, 120, 120), 'chn_ids': (C,)}, multi-hot (19,) float)`` streamed from shards."""

    SHARD_SUBSET = True  # make_dataset passes `subset` here: it selects shards, not samples

    def __init__(self, url: str, transform=None, normalize: bool = True, subset: Any = -1, seed: int = 42,
                 shuffle: Optional[bool] = None, shuffle_buffer: int = 1000, full_spectra: bool = False,
                 num_classes: int = 19, display_name: Optional[str] = None, split: Optional[str] = None):
        shards, counts, index = resolve_shards(url)
        sensor = str(index.get("sensor", ""))
        if sensor not in SENSORS:
            raise ValueError(f"{url}: dataset.yaml sensor must be one of {sorted(SENSORS)}, got {sensor!r}")
        if int(index.get("num_classes", num_classes)) != num_classes or num_classes != len(LABELS_19):
            raise ValueError(f"{url}: only the 19-class nomenclature is supported (index: "
                             f"{index.get('num_classes')}, config: {num_classes})")
        stored = [str(c) for c in index.get("channels") or STORED[sensor]]
        if sorted(stored) != sorted(OURS[sensor]):
            raise ValueError(f"{url}: dataset.yaml channels {stored} are not the {sensor} channels {OURS[sensor]}")
        self.order = [stored.index(c) for c in OURS[sensor]]
        self.bands, ds_name = SENSORS[sensor]
        self.num_classes, self.transform, self.url = num_classes, transform, str(url)
        self.display_name = display_name or f"benv2-{self.bands}"
        self.chn_ids = sensors.ds_chn_ids(ds_name, full_spectra=full_spectra)
        self.normalizer = normalizer_from_ds_cfg(ds_name) if normalize else None
        split_like = split or os.path.basename(os.path.dirname(str(url)).rstrip("/")) or str(url)
        super().__init__(select_shards(shards, subset, seed), counts, self._sample,
                         shuffle=_default_shuffle(split_like, shuffle), shuffle_buffer=shuffle_buffer, seed=seed)

    def _sample(self, members: Dict[str, Any]):
        key, where = members.get("__key__"), f"{members.get('__url__')}:{members.get('__key__')}"
        if "img.npy" not in members or "label.npy" not in members:
            raise ValueError(f"{where}: a sample needs img.npy and label.npy (has {sorted(members)})")
        img = load_npy(members["img.npy"], where)
        label = load_npy(members["label.npy"], where)
        n = len(self.order)
        if img.shape != (n, SIZE, SIZE) or img.dtype.kind not in "fiu":
            raise ValueError(f"{where}: img.npy is {img.dtype} {img.shape}, expected ({n}, {SIZE}, {SIZE}) numbers")
        if label.shape != (self.num_classes,):
            raise ValueError(f"{where}: label.npy has shape {label.shape}, expected ({self.num_classes},)")
        imgs = torch.from_numpy(np.ascontiguousarray(img[self.order], dtype=np.float32))
        if self.normalizer is not None:
            imgs = self.normalizer(imgs)
        x = {"imgs": imgs, "chn_ids": self.chn_ids.clone()}
        if self.transform is not None:
            x = self.transform(x)
        return x, torch.from_numpy(label.astype(np.float32)), str(key)

    def __iter__(self):
        for x, y, _ in super().__iter__():
            yield x, y

    def keyed(self):
        """``(x, y, patch_id)`` triples (for checks against the raw-release reader)."""
        return super().__iter__()


def _default_shuffle(split_like: str, shuffle: Optional[bool]) -> bool:
    return bool(shuffle) if shuffle is not None else os.path.basename(split_like).startswith("train")


def write_benv2_shards(root: str, output: Optional[str] = None, splits: Sequence[str] = ("train", "validation",
                       "test"), bands: Sequence[str] = ("all", "s1", "s2"), n_shards: int = 100,
                       overwrite: bool = False, progress: bool = True) -> List[str]:
    """Shards of the BigEarthNet-v2 release under ``root`` in the published layout (see the module docstring):
    ``<output or root/wds>/<split>-<bands>/``; returns the folders written. Shards are written to a temporary name
    and renamed, the index last, so an interrupted run leaves no folder that looks complete."""
    import webdataset as wds
    import yaml

    from dinov2.utils.progress import progress_bar

    out_root = output or os.path.join(os.path.expandvars(root), "wds")
    done = []
    for split in splits:
        for b in bands:
            sensor = {"all": "s1s2", "s1": "s1", "s2": "s2"}.get(b)
            if sensor is None:
                raise ValueError(f"bands must be all, s1 or s2; got {b!r}")
            folder = os.path.join(out_root, f"{split}-{b}")
            if os.path.isfile(os.path.join(folder, "dataset.yaml")) and not overwrite:
                raise ValueError(f"{folder} already holds shards (dataset.yaml); pass --overwrite to rebuild")
            os.makedirs(folder, exist_ok=True)
            ds = BigEarthNetv2(root, split=split, bands=b, normalize=False)
            if len(ds) == 0:
                raise ValueError(f"{root}: metadata.parquet has no samples of split {split!r}")
            per_shard = -(-len(ds) // max(1, min(int(n_shards), len(ds))))
            to_stored = [OURS[sensor].index(c) for c in STORED[sensor]]
            counts: Dict[str, int] = {}
            bar = progress_bar(total=len(ds), desc=f"benv2 shards {split}-{b}", enabled=progress)
            for start in range(0, len(ds), per_shard):
                name = f"dataset-{len(counts):06d}.tar"
                tmp = os.path.join(folder, f".{name}.tmp")
                with wds.TarWriter(tmp) as sink:
                    for i in range(start, min(start + per_shard, len(ds))):
                        x, y = ds[i]
                        sink.write({"__key__": ds.rows[i]["patch_id"],
                                    "img.npy": x["imgs"].numpy()[to_stored].astype(np.float32),
                                    "label.npy": y.numpy() > 0.5})
                        bar.update(1)
                os.replace(tmp, os.path.join(folder, name))
                counts[name] = min(start + per_shard, len(ds)) - start
            bar.close()
            norm = normalizer_from_ds_cfg(SENSORS[sensor][1])
            torch.save({"mean": norm.mean[to_stored].clone(), "std": norm.std[to_stored].clone()},
                       os.path.join(folder, "dataset.pt"))
            index = {"sensor": sensor, "num_classes": len(LABELS_19), "channels": STORED[sensor],
                     "nsamples_per_shard": counts}
            tmp = os.path.join(folder, ".dataset.yaml.tmp")
            with open(tmp, "w") as fh:
                yaml.safe_dump(index, fh, sort_keys=False)
            os.replace(tmp, os.path.join(folder, "dataset.yaml"))
            done.append(folder)
    return done
