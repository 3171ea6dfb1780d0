"""Per-band normalisation statistics for embedding a scene.

Panopticon was pretrained on inputs z-scored per dataset and band; there are no global constants that fit every
sensor and processing level (L1C digital numbers, L2A reflectance, dB backscatter ...). Sources, in order:
1. `mean`/`std` given for the scene in a scenes YAML;
2. ``--norm-stats scene`` (default): robust mean/std of the scene's own valid pixels (1st-99th percentile core of
   a decimated read) — the same statistics training on your own GeoTIFFs uses, and right for any sensor;
   embeddings of different scenes are then each relative to their scene. For values comparable across scenes,
   use 3. or 4.;
3. ``--norm-stats <file.yaml|json>``: ``{mean: [...], std: [...]}`` in channel order, or ``{<band>: {mean, std}}``;
4. ``--norm-stats dataset:<name>``: the ``norm_stats`` of a dataset band list in the registry
   (``dinov2/configs/data/{pretrain,eval}/<name>.yaml``), matched by sensor/band.
"""
from __future__ import annotations

import json
import os
from typing import Any, List, Tuple

from dinov2.inference.sources import SceneSource, number, numbers


def _from_mapping(data: Any, scene: SceneSource, what: str) -> Tuple[List[float], List[float]]:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected a mapping, got {type(data).__name__}")
    if "mean" in data and "std" in data:
        mean, std = numbers(data["mean"], f"{what}: mean"), numbers(data["std"], f"{what}: std")
        if len(mean) != len(scene.channels) or len(std) != len(scene.channels):
            raise ValueError(f"{what}: {len(mean)} means / {len(std)} stds for the {len(scene.channels)} bands "
                             f"{scene.bands} of scene {scene.name}")
        return mean, std
    lower = {str(k).lower(): v for k, v in data.items()}
    missing = [b for b in scene.bands if b.lower() not in lower]
    if missing:
        raise ValueError(f"{what}: no statistics for bands {missing} of scene {scene.name} (has {sorted(data)})")
    try:
        return ([number(lower[b.lower()]["mean"], f"{what}: {b} mean") for b in scene.bands],
                [number(lower[b.lower()]["std"], f"{what}: {b} std") for b in scene.bands])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{what}: each band needs {{mean, std}} ({e})") from None


def _from_dataset(name: str, scene: SceneSource) -> Tuple[List[float], List[float]]:
    from dinov2.data.sensors import load_ds_cfg

    cfg = load_ds_cfg(name)
    stats = cfg["metainfo"].get("norm_stats")
    if not isinstance(stats, dict):
        raise ValueError(f"dataset config {name!r} has no norm_stats")
    by_id = {b["id"].lower(): (float(m), float(s)) for b, m, s in zip(cfg["bands"], stats["mean"], stats["std"])}
    ids = [f"{scene.sensor}/{b}".lower() for b in scene.bands]
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"dataset {name!r} has no statistics for {missing} (scene {scene.name}); it has "
                         f"{sorted(by_id)}")
    return [by_id[i][0] for i in ids], [by_id[i][1] for i in ids]


def read_stats_file(mode: str) -> Any:
    """Content of a ``--norm-stats`` file (JSON or YAML); errors name the file."""
    from dinov2.data.raster_open import check_regular_file

    path = os.path.expanduser(str(mode))
    if not os.path.exists(path):
        raise ValueError(f"--norm-stats {mode!r}: expected 'scene', 'dataset:<name>' or a stats file, and no such "
                         "file exists")
    check_regular_file(path, "--norm-stats file")
    try:
        with open(path) as f:
            if path.lower().endswith(".json"):
                return json.load(f)
            import yaml

            return yaml.safe_load(f)
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"--norm-stats file {path} is not valid JSON/YAML: {e}") from None
    except Exception as e:  # yaml.YAMLError
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"--norm-stats file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        raise


def resolve_stats(mode: str, scene: SceneSource, reader) -> Tuple[List[float], List[float]]:
    """(mean, std) per channel of `scene` for normalisation mode `mode` (see the module docstring)."""
    if scene.mean is not None and scene.std is not None:
        mean, std = list(scene.mean), list(scene.std)
    elif mode == "scene":
        mean, std = reader.stats()
    elif str(mode).startswith("dataset:"):
        mean, std = _from_dataset(str(mode)[len("dataset:"):], scene)
    else:
        mean, std = _from_mapping(read_stats_file(str(mode)), scene, os.path.expanduser(str(mode)))
    bad = [b for b, s in zip(scene.bands, std) if not 0 < s < float("inf")]
    if bad:
        raise ValueError(f"scene {scene.name}: standard deviation must be positive for bands {bad}")
    return [float(v) for v in mean], [float(v) for v in std]
