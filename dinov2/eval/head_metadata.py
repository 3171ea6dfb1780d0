"""What a saved segmentation head must carry so that `panopticon predict` can apply it correctly to new scenes.

`head_metadata` returns the keys added to a segmentation task's ``model_final.pth``:

- ``format_version`` (`HEAD_FORMAT`);
- ``bands`` (names, or None when the dataset does not name them) and ``chn_ids`` (one per input channel, in
  the order the head was trained with), ``sensor`` when known;
- ``norm_mean`` / ``norm_std``: the per-band statistics applied to the training data; None with ``norm_note``
  saying why when the dataset normalised otherwise (e.g. each scene by its own statistics);
- ``img_size``: the model input size in pixels (before padding to the patch size), ``chip_size``: the source
  pixels per training chip side when known (a resized chip differs from it), ``patch_size``, ``embed_dim``;
- ``class_names``: one per class (``class_<k>`` where the task names none);
- ``backbone_digest``: the content digest (`dinov2.utils.digest.state_dict_digest`) of the backbone the head
  was trained on (the tuned one after fine-tuning).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import torch

logger = logging.getLogger("dinov2")
HEAD_FORMAT = 1


def _unwrap(ds):
    while not hasattr(ds, "__getitem__") or hasattr(ds, "dataset") or hasattr(ds, "datasets"):
        if hasattr(ds, "dataset"):
            ds = ds.dataset
        elif hasattr(ds, "datasets"):
            ds = ds.datasets[0]
        else:
            break
    return ds


def _scene_norm(ds, cfg) -> Dict[str, Any]:
    """Statistics of a GeoTIFF-scenes dataset: values when every scene was given the same mean/std, else None."""
    from dinov2.data.datasets.geotiff_scenes import load_scene_list

    try:
        specs, _ = load_scene_list(cfg.train_dataset.get("scenes"))
    except Exception:  # noqa: BLE001 - the scenes were readable during training; be conservative if not now
        specs = []
    means = [torch.cat(s["mean"]).tolist() for s in ds.scenes]
    stds = [torch.cat(s["std"]).tolist() for s in ds.scenes]
    given = bool(specs) and all(isinstance(s, dict) and "mean" in s and "std" in s for s in specs)
    if given and all(m == means[0] for m in means) and all(s == stds[0] for s in stds):
        return {"norm_mean": means[0], "norm_std": stds[0], "norm_note": None}
    return {"norm_mean": None, "norm_std": None,
            "norm_note": "each training scene was normalised by its own robust statistics; predict does the same "
                         "(--norm-stats scene)"}


def head_metadata(cfg, dataset, backbone: torch.nn.Module, num_classes: int) -> Dict[str, Any]:
    """Metadata of a segmentation head trained by a task with config `cfg` on `dataset` over `backbone`."""
    from dinov2.utils.digest import state_dict_digest

    ds = _unwrap(dataset)
    x, _ = ds[0]
    chn_ids = x["chn_ids"].tolist()
    patch = int(backbone.patch_size)
    img_size: Optional[int] = cfg.task.get("img_size") or getattr(ds, "img_size", None)
    meta: Dict[str, Any] = {"format_version": HEAD_FORMAT, "chn_ids": chn_ids, "patch_size": patch,
                            "embed_dim": int(backbone.embed_dim), "sensor": None, "bands": None}
    if hasattr(ds, "scenes") and hasattr(ds, "patch_m"):  # the user's GeoTIFF scenes (LabelRasterScenes)
        meta.update(bands=list(ds.scenes[0]["band_keys"]), sensor=ds.scenes[0]["sensor"],
                    chip_size=int(round(ds.patch_m / ds.scenes[0]["groups"][0].res)), **_scene_norm(ds, cfg))
    else:
        names: List[str] = [str(b) for b in (getattr(ds, "band_names", None) or [])]
        meta.update(bands=names if len(names) == len(chn_ids) else None, chip_size=int(x["imgs"].shape[-1]))
        norm = getattr(ds, "normalizer", None)
        if norm is not None and hasattr(norm, "mean"):
            meta.update(norm_mean=[float(v) for v in norm.mean], norm_std=[float(v) for v in norm.std],
                        norm_note=None)
        else:
            meta.update(norm_mean=None, norm_std=None,
                        norm_note=f"{type(ds).__name__} does not normalise with fixed per-band statistics")
    meta["img_size"] = int(img_size or meta["chip_size"])
    names = [str(c) for c in (cfg.task.get("class_names") or [])]
    if names and len(names) != num_classes:
        logger.warning("task.class_names has %d names for %d classes; the head records class_<k> names", len(names),
                       num_classes)
        names = []
    meta["class_names"] = names or [f"class_{k}" for k in range(num_classes)]
    meta["backbone_digest"] = state_dict_digest(backbone)
    return meta
