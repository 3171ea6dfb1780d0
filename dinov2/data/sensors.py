"""Sensor / band registry: turns "sensor + band" or a dataset band list into channel ids (`chn_ids`).

All band definitions live in YAML under `dinov2/configs/data/` (root overridable by `$CDIR/data`):
`satellites/<sensor>.yaml` (band key -> name, Gaussian SRF mu/sigma in nm, GSD) and `pretrain/*.yaml`,
`eval/*.yaml` (dataset band lists `{id: "<sensor>/<band key or name>"}` + metadata). Nothing here hard-codes
a band list.

A channel id is `int(mu)` (truncation toward zero; SAR codes are negative), or `[mu, sigma]` (float32) with
`full_spectra=True`.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import yaml

_PKG_ROOT = Path(__file__).resolve().parent.parent / "configs" / "data"
_SATELLITE_DIR = "satellites"


def config_root() -> Path:
    """Root of the data configs: `$CDIR/data` when it exists, else the package's `dinov2/configs/data`."""
    cdir = os.environ.get("CDIR")
    if cdir:
        cand = Path(os.path.expandvars(cdir)).expanduser() / "data"
        if (cand / _SATELLITE_DIR).is_dir():
            return cand
    return _PKG_ROOT


def _read_yaml(path: Path) -> Dict[str, Any]:
    with open(path) as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("bands"), (dict, list)):
        raise ValueError(f"{path}: expected a mapping with a 'bands' entry")
    return data


@functools.lru_cache(maxsize=None)
def _sensor_files(root: str) -> Dict[str, Path]:
    return {p.stem: p for p in sorted((Path(root) / _SATELLITE_DIR).glob("*.yaml"))}


def list_sensors() -> List[str]:
    """Names of all sensors in the registry."""
    return sorted(_sensor_files(str(config_root())))


@functools.lru_cache(maxsize=None)
def _load_sensor_cached(root: str, name: str) -> Dict[str, Any]:
    files = _sensor_files(root)
    if name not in files:
        raise ValueError(f"Unknown sensor {name!r}; valid sensors: {', '.join(sorted(files))}")
    data = _read_yaml(files[name])
    for key, band in data["bands"].items():
        g = band.get("gaussian") if isinstance(band, dict) else None
        if not isinstance(g, dict) or "mu" not in g or "sigma" not in g:
            raise ValueError(f"{files[name]}: band {key!r} lacks gaussian mu/sigma")
    return data


def load_sensor(name: str) -> Dict[str, Any]:
    """Return the sensor's YAML content (a deep copy): metadata keys plus `bands` {key: band dict}."""
    return copy.deepcopy(_load_sensor_cached(str(config_root()), str(name).lower()))


def _strip_zeros(key: str) -> str:
    # "B01" == "B1", "B008" == "B8", "B8A" stays distinct from "B08"
    m = re.fullmatch(r"([a-z]*)0*(\d+)([a-z]*)", key)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}" if m else key


@functools.lru_cache(maxsize=None)
def _band_index(root: str, sensor: str) -> Dict[str, str]:
    """lower-case alias -> band key. Aliases: key, zero-stripped key, `name`. Exact keys win over names."""
    bands = _load_sensor_cached(root, sensor)["bands"]
    index: Dict[str, str] = {}
    for key, band in bands.items():
        name = band.get("name")
        if name is not None:
            index.setdefault(str(name).lower(), key)
    for key in bands:
        index[_strip_zeros(key.lower())] = key
    for key in bands:
        index[key.lower()] = key
    return index


def resolve_band(sensor: str, band: str) -> str:
    """Band key of `band` (a key like 'B04'/'b4' or a name like 'red', case-insensitive) for `sensor`."""
    sensor = str(sensor).lower()
    index = _band_index(str(config_root()), sensor)
    b = str(band).strip().lower()
    key = index.get(b) or index.get(_strip_zeros(b))
    if key is None:
        bands = _load_sensor_cached(str(config_root()), sensor)["bands"]
        names = [f"{k}({v.get('name')})" if v.get("name") else k for k, v in bands.items()]
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} bands)" if len(names) > 40 else "")
        raise ValueError(f"Unknown band {band!r} for sensor {sensor!r}; valid bands: {shown}")
    return key


def band_info(sensor: str, band: str) -> Dict[str, Any]:
    """Full description of one band: key, name, mu, sigma, gaussian {mu, sigma}, gsd (metres or None), and the
    YAML's extra keys (orbit, polarization, ...)."""
    sensor = str(sensor).lower()
    key = resolve_band(sensor, band)
    data = _load_sensor_cached(str(config_root()), sensor)
    raw = data["bands"][key]
    gsd = raw.get("GSD", raw.get("gsd", data.get("GSD", data.get("gsd"))))
    info = {k: v for k, v in raw.items() if k not in ("gaussian", "GSD", "gsd")}
    mu, sigma = float(raw["gaussian"]["mu"]), float(raw["gaussian"]["sigma"])
    info.update(sensor=sensor, key=key, name=raw.get("name", key), mu=mu, sigma=sigma,
                gaussian={"mu": mu, "sigma": sigma}, gsd=None if gsd is None else float(gsd))
    return info


def sensor_bands(sensor: str) -> List[str]:
    """All band keys of a sensor, in YAML order."""
    return list(_load_sensor_cached(str(config_root()), str(sensor).lower())["bands"].keys())


def _ids_tensor(pairs: Sequence[Tuple[float, float]], full_spectra: bool) -> torch.Tensor:
    if full_spectra:
        return torch.tensor([[mu, sg] for mu, sg in pairs], dtype=torch.float32).reshape(-1, 2)
    # int() truncates toward zero, as the published int16 cast does
    return torch.tensor([int(mu) for mu, _ in pairs], dtype=torch.int16)


def band_chn_ids(sensor: str, bands: Iterable[str], full_spectra: bool = False) -> torch.Tensor:
    """Channel ids of `bands` of `sensor`: int16 `(C,)`, or float32 `(C,2)` [mu, sigma] if `full_spectra`."""
    if isinstance(bands, str):
        bands = [bands]
    pairs = [(i["mu"], i["sigma"]) for i in (band_info(sensor, b) for b in bands)]
    return _ids_tensor(pairs, full_spectra)


def split_band_id(band_id: str) -> Tuple[str, str]:
    """'sentinel2/B04' -> ('sentinel2', 'B04') with a clear error for malformed ids."""
    parts = str(band_id).split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"Band id {band_id!r} must look like '<sensor>/<band key or name>'")
    return parts[0].lower(), parts[1]


@functools.lru_cache(maxsize=None)
def _ds_files(root: str) -> Dict[str, Path]:
    files: Dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if Path(dirpath).name == _SATELLITE_DIR:
            continue
        for fn in sorted(filenames):
            if fn.endswith(".yaml"):
                files.setdefault(Path(fn).stem, Path(dirpath) / fn)  # pretrain/ and eval/ copies are identical
    return files


def list_datasets() -> List[str]:
    """Names of all dataset band YAMLs (pretrain/ and eval/)."""
    return sorted(_ds_files(str(config_root())))


@functools.lru_cache(maxsize=None)
def _load_ds_cfg_cached(root: str, ds_name: str) -> Dict[str, Any]:
    files = _ds_files(root)
    if ds_name not in files:
        raise ValueError(f"Unknown dataset {ds_name!r}; valid datasets: {', '.join(sorted(files))}")
    data = _read_yaml(files[ds_name])
    bands = []
    for i, entry in enumerate(data["bands"]):
        if not isinstance(entry, dict) or "id" not in entry:
            raise ValueError(f"{files[ds_name]}: band entry {i} needs an 'id' key, got {entry!r}")
        sensor, band = split_band_id(entry["id"])
        info = band_info(sensor, band)
        merged = {**info, **{k: v for k, v in entry.items() if k != "id"}}
        merged["id"] = f"{sensor}/{info['key']}"
        bands.append(merged)
    meta = {k: v for k, v in data.items() if k != "bands"}
    return {"ds_name": ds_name, "bands": bands, "metainfo": meta}


def load_ds_cfg(ds_name: str) -> Dict[str, Any]:
    """Dataset band config: `{'ds_name', 'bands': [band info + 'id'], 'metainfo': {non-band keys}}`."""
    return copy.deepcopy(_load_ds_cfg_cached(str(config_root()), str(ds_name)))


def ds_chn_ids(ds_name: str, full_spectra: bool = False) -> torch.Tensor:
    """Channel ids of a dataset's band list, `(C,)` int16 or `(C,2)` float32."""
    bands = _load_ds_cfg_cached(str(config_root()), str(ds_name))["bands"]
    return _ids_tensor([(b["mu"], b["sigma"]) for b in bands], full_spectra)


def ds_band_names(ds_name: str) -> List[str]:
    """Band names (e.g. 'red', 'vv_asc') of a dataset's band list, in order."""
    return [b["name"] for b in _load_ds_cfg_cached(str(config_root()), str(ds_name))["bands"]]


def ds_band_gsds(ds_name: str) -> List[Optional[float]]:
    """Native GSD in metres (or None) of each band of a dataset, in order."""
    return [b["gsd"] for b in _load_ds_cfg_cached(str(config_root()), str(ds_name))["bands"]]


def ds_rgb_indices(ds_name: str) -> List[int]:
    """Positions of the bands named red, green, blue (in that order) in a dataset's band list."""
    names = [str(n).lower() for n in ds_band_names(ds_name)]
    missing = [c for c in ("red", "green", "blue") if c not in names]
    if missing:
        raise ValueError(f"dataset config {ds_name!r} has no band named {missing} (bands: {names[:20]})")
    return [names.index(c) for c in ("red", "green", "blue")]
