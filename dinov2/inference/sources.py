"""What to embed: scenes described by GeoTIFF/COG files, folders, scenes YAMLs or STAC items, with band ids.

Every input becomes a list of `SceneSource`s: channels (file, 1-based band index, band name, channel id), the
sensor (registry name or 'custom'), no-data value, acquisition time and optional per-band statistics.
Channel ids follow the model's contract: the registry's ⌊centre wavelength in nm⌋ (negative codes for SAR),
or ⌊wavelength⌋ given inline / by a STAC item's ``eo:bands``. Rasters are opened through
`dinov2.data.raster_open` (what may be read); numbers in YAML must be numbers (``mean: "1234"`` is refused), and a
scene whose bands share a channel id is refused (the model could not tell them apart).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from dinov2.data.raster_open import LOCAL_ONLY, RasterPolicy, check_raster, check_regular_file, is_remote, raster_info

RASTER_SUFFIXES = (".tif", ".tiff")
VRT_SUFFIXES = (".vrt",)
# STAC platform/constellation -> sensor registry name (band names are then looked up in the registry)
STAC_PLATFORMS = {"sentinel-2": "sentinel2", "sentinel2": "sentinel2", "landsat-8": "landsat8",
                  "landsat-9": "landsat9", "sentinel-1": "sentinel1", "enmap": "enmap"}


@dataclass
class Channel:
    """One input band: `path` band `index` (1-based) is band `band` with channel id `chn_id`."""

    path: str
    index: int
    band: str
    chn_id: int


@dataclass
class SceneSource:
    """A scene to embed: its channels plus metadata written next to the embeddings."""

    name: str
    sensor: str
    channels: List[Channel]
    origin: str
    nodata: Optional[float] = None
    datetime: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def bands(self) -> List[str]:
        return [c.band for c in self.channels]

    @property
    def chn_ids(self) -> List[int]:
        return [c.chn_id for c in self.channels]

    @property
    def files(self) -> List[str]:
        return list(dict.fromkeys(c.path for c in self.channels))


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "scene"


def _wavelength_id(nm: Any, what: str) -> int:
    try:
        v = float(nm)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: wavelength {nm!r} is not a number (nm)") from None
    if not 200.0 <= v <= 20000.0:
        raise ValueError(f"{what}: wavelength {v} nm is outside 200..20000 nm (give nanometres)")
    return int(round(v, 3))  # ⌊nm⌋ after removing float noise (0.665 um * 1000 = 664.999...)


def _registry_channels(sensor: str, bands: Sequence[str], paths: Sequence[str],
                       indexes: Sequence[int]) -> List[Channel]:
    from dinov2.data.sensors import band_info

    out = []
    for band, path, idx in zip(bands, paths, indexes):
        info = band_info(sensor, band)
        out.append(Channel(path, int(idx), info["key"], int(info["mu"])))
    return out


def _tif_datetime(tags: Dict[str, str]) -> Optional[str]:
    for key in ("ACQUISITION_DATETIME", "DATETIME", "TIFFTAG_DATETIME"):
        if tags.get(key):
            v = str(tags[key])
            m = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2}) (\d{2}:\d{2}:\d{2})", v)  # TIFF's own format
            return f"{m.group(1)}-{m.group(2)}-{m.group(3)}T{m.group(4)}" if m else v
    return None


def number(value: Any, what: str) -> float:
    """A finite number from YAML/JSON; strings (``"1234"``), booleans and NaN/inf are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ValueError(f"{what} must be a finite number, got {value!r} ({type(value).__name__})")
    return float(value)


def numbers(values: Any, what: str) -> Optional[List[float]]:
    """`number` of each entry of a list (or of a mapping's values); None stays None."""
    if values is None:
        return None
    if isinstance(values, dict):
        return [number(v, f"{what} [{k}]") for k, v in values.items()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{what} must be a list of numbers, got {values!r}")
    return [number(v, f"{what} [{i}]") for i, v in enumerate(values)]


def check_unique_ids(scene: "SceneSource") -> "SceneSource":
    """Refuse a scene in which two bands have the same channel id."""
    seen: Dict[int, str] = {}
    for ch in scene.channels:
        if ch.chn_id in seen:
            raise ValueError(f"scene {scene.name} ({scene.origin}): bands {seen[ch.chn_id]!r} and {ch.band!r} have the "
                             f"same channel id {ch.chn_id}; the model could not tell them apart (give each band once)")
        seen[ch.chn_id] = ch.band
    return scene


def scene_from_raster(path: str, sensor: Optional[str] = None, bands: Optional[Sequence[str]] = None,
                      wavelengths_nm: Optional[Sequence[float]] = None, name: Optional[str] = None,
                      nodata: Optional[float] = None, datetime: Optional[str] = None,
                      policy: RasterPolicy = LOCAL_ONLY) -> SceneSource:
    """A multi-band GeoTIFF as one scene; band ids from `sensor` + `bands` (registry) or `wavelengths_nm`."""
    info = raster_info(path, policy)
    count = info["count"]
    if wavelengths_nm is not None:
        if len(wavelengths_nm) != count:
            raise ValueError(f"{path}: {len(wavelengths_nm)} wavelengths_nm given for {count} bands")
        ids = [_wavelength_id(w, path) for w in wavelengths_nm]
        names = list(bands) if bands else [f"{i}nm" for i in ids]
        chans = [Channel(path, i + 1, str(n), c) for i, (n, c) in enumerate(zip(names, ids))]
        sensor = sensor or "custom"
    elif sensor:
        if bands is None:
            bands = info["descriptions"]
            if any(b is None for b in bands):
                raise ValueError(f"{path}: give the band list (--bands) for sensor {sensor!r}; the file's bands "
                                 "have no descriptions")
        if len(bands) != count:
            raise ValueError(f"{path}: {len(bands)} band names given for {count} bands")
        keep = [(b, i + 1) for i, b in enumerate(bands) if b is not None]
        chans = _registry_channels(sensor, [b for b, _ in keep], [path] * len(keep), [i for _, i in keep])
    else:
        raise ValueError(f"{path}: cannot tell which bands it holds; give --sensor and --bands (registry names), "
                         "--wavelengths, or a scenes YAML entry {file: ..., wavelengths_nm: [...]}")
    return check_unique_ids(SceneSource(_safe_name(name or os.path.splitext(os.path.basename(path))[0]),
                                        str(sensor).lower(), chans, path, nodata,
                                        datetime or _tif_datetime(info["tags"])))


def _load_yaml_scenes(path: str):
    """(scene specs, base folder) of a scenes YAML; a file that is not YAML raises naming it."""
    import yaml

    from dinov2.data.datasets.geotiff_scenes import load_scene_list

    check_regular_file(path, "scenes YAML")
    try:
        return load_scene_list(path)
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text (YAML) file: {e}") from None


def scenes_from_yaml(path: str, policy: RasterPolicy = LOCAL_ONLY) -> List[SceneSource]:
    """A scenes YAML as training uses it (``{sensor, files}`` / ``{sensor, file, bands}``), plus inline entries
    ``{file, wavelengths_nm}`` for sensors not in the registry."""
    from dinov2.data.datasets.geotiff_scenes import _band_values, _scene_channels
    from dinov2.data.io import expand_path

    specs, base = _load_yaml_scenes(path)
    out = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: scene {i} must be a mapping, got {spec!r}")
        for key in ("mean", "std", "wavelengths_nm"):
            numbers(spec.get(key), f"{path}: scene {i} {key}")
        if spec.get("nodata") is not None:
            number(spec["nodata"], f"{path}: scene {i} nodata")
        name = spec.get("name")
        if "wavelengths_nm" in spec:
            if "file" not in spec:
                raise ValueError(f"{path}: scene {i} with wavelengths_nm needs 'file' (one multi-band GeoTIFF)")
            f = expand_path(str(spec["file"]), f"scene {i} file")
            f = os.path.join(base, f) if base and not os.path.isabs(f) else f
            scene = scene_from_raster(f, spec.get("sensor"), spec.get("bands"), spec["wavelengths_nm"], name,
                                      spec.get("nodata"), spec.get("datetime"), policy)
        else:
            sensor = str(spec.get("sensor", "")).lower()
            for ref in ([spec["file"]] if "file" in spec else list(dict(spec.get("files") or {}).values())):
                ref = expand_path(str(ref), f"scene {i} file")
                check_raster(os.path.join(base, ref) if base and not os.path.isabs(ref) else ref, policy)
            chans = _scene_channels(spec, base, i)
            chan_list = _registry_channels(sensor, [k for k, _, _ in chans], [p for _, p, _ in chans],
                                           [b for _, _, b in chans])
            first = chan_list[0].path
            scene = check_unique_ids(SceneSource(
                _safe_name(name or f"{os.path.splitext(os.path.basename(path))[0]}_{i}_{sensor}"), sensor, chan_list,
                path, spec.get("nodata"), spec.get("datetime") or _tif_datetime(raster_info(first, policy)["tags"])))
        keys = scene.bands
        scene.mean = _band_values(spec.get("mean"), keys, scene.sensor, f"{scene.name} mean") \
            if scene.sensor != "custom" else _plain_list(spec.get("mean"), len(keys), f"{scene.name} mean")
        scene.std = _band_values(spec.get("std"), keys, scene.sensor, f"{scene.name} std") \
            if scene.sensor != "custom" else _plain_list(spec.get("std"), len(keys), f"{scene.name} std")
        scene.datetime = str(scene.datetime) if scene.datetime is not None else None
        out.append(scene)
    return out


def _plain_list(values: Any, n: int, what: str) -> Optional[List[float]]:
    if values is None:
        return None
    vals = numbers(values, what)
    if len(vals) != n:
        raise ValueError(f"{what}: {len(vals)} values for {n} bands")
    return vals


def _stac_bands(asset) -> List[Dict[str, Any]]:
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [dict(b) for b in bands]


def _read_stac_item(path: str):
    import pystac

    from dinov2.data.io import read_json

    check_regular_file(path, "STAC item")
    data = read_json(path, "STAC item")
    try:
        return pystac.Item.from_dict(data, href=os.path.abspath(path))
    except Exception as e:  # pystac raises KeyError/TypeError/STACTypeError on malformed items
        raise ValueError(f"{path} is not a STAC item: {type(e).__name__}: {e}") from None


def scene_from_stac(path: str, policy: RasterPolicy = LOCAL_ONLY) -> SceneSource:
    """A local STAC item JSON: every GeoTIFF asset with ``eo:bands`` contributes its bands. Band ids come from
    the sensor registry when the platform and band name are known there, else from the centre wavelength.
    Remote asset hrefs are read only when the policy names them."""
    from dinov2.data.sensors import list_sensors, resolve_band

    item = _read_stac_item(path)
    props = item.properties
    platform = str(props.get("constellation") or props.get("platform") or "").lower()
    sensor = next((s for p, s in STAC_PLATFORMS.items() if platform.startswith(p)), None)
    if sensor is not None and sensor not in list_sensors():
        sensor = None
    chans: List[Channel] = []
    for key, asset in item.assets.items():
        bands = _stac_bands(asset)
        if not bands:
            continue
        href = asset.get_absolute_href() or asset.href
        href = href[7:] if href.startswith("file://") else href
        if not href.lower().endswith(RASTER_SUFFIXES) and "tiff" not in str(asset.media_type or ""):
            continue
        if is_remote(href) and not policy.is_named_url(href):
            raise ValueError(f"{path}: asset {key!r} is remote ({href}); only local assets are read")
        check_raster(href, policy)
        for i, b in enumerate(bands):
            what = f"{path}: asset {key!r} band {i}"
            names = [n for n in (b.get("name"), b.get("common_name")) if n]
            band_key = None
            if sensor is not None:
                for n in names:
                    try:
                        band_key = resolve_band(sensor, n)
                        break
                    except ValueError:
                        continue
            if band_key is not None:
                chans.extend(_registry_channels(sensor, [band_key], [href], [i + 1]))
                continue
            cw = b.get("center_wavelength", b.get("eo:center_wavelength"))
            cw = None if cw is None else number(cw, f"{what} center_wavelength")
            if cw is None:
                raise ValueError(f"{what} ({names}) has no center_wavelength and is not a known band of "
                                 f"platform {platform!r}")
            chans.append(Channel(href, i + 1, str(names[0] if names else key), _wavelength_id(float(cw) * 1000, what)))
    if not chans:
        raise ValueError(f"{path}: no GeoTIFF asset with eo:bands found (assets: {list(item.assets)})")
    dt = item.datetime or props.get("start_datetime")
    return check_unique_ids(SceneSource(_safe_name(item.id), sensor or "custom", chans, path, None,
                                        dt.isoformat() if hasattr(dt, "isoformat") else (str(dt) if dt else None)))


def collect_scenes(inputs: Sequence[str], sensor: Optional[str] = None, bands: Optional[Sequence[str]] = None,
                   wavelengths_nm: Optional[Sequence[float]] = None, nodata: Optional[float] = None,
                   policy: RasterPolicy = LOCAL_ONLY) -> List[SceneSource]:
    """Scenes of every input: GeoTIFF/COG files, folders of them, scenes YAMLs, STAC item JSONs (and VRTs when the
    policy allows them)."""
    scenes: List[SceneSource] = []
    rasters = RASTER_SUFFIXES + (VRT_SUFFIXES if policy.allow_vrt else ())

    plain: List[str] = []

    def add_raster(p: str) -> None:
        plain.append(p)
        scenes.append(scene_from_raster(p, sensor, bands, wavelengths_nm, nodata=nodata, policy=policy))

    with policy.env():  # files opened by shared readers (band counts of scenes YAML entries) follow it too
        for inp in inputs:
            p = os.path.expanduser(os.path.expandvars(str(inp)))
            low = p.lower()
            if os.path.isdir(p):
                files = sorted(f for f in os.listdir(p) if f.lower().endswith(rasters))
                if not files:
                    raise ValueError(f"folder {p} holds no {'/'.join(rasters)} files")
                for f in files:
                    add_raster(os.path.join(p, f))
            elif not os.path.exists(p):
                raise FileNotFoundError(f"input not found: {p}")
            elif low.endswith((".yaml", ".yml")):
                scenes.extend(scenes_from_yaml(p, policy))
            elif low.endswith(".json"):
                scenes.append(scene_from_stac(p, policy))
            elif low.endswith(rasters):
                add_raster(p)
            elif low.endswith(VRT_SUFFIXES):
                raise ValueError(f"input {p} is a GDAL VRT (it makes GDAL read other files); pass --allow-vrt to "
                                 "read it")
            else:
                raise ValueError(f"input {p}: expected a GeoTIFF (.tif/.tiff), a folder, a scenes YAML or a STAC "
                                 "item .json")
    given = [f for f, v in (("--sensor", sensor), ("--bands", bands), ("--wavelengths", wavelengths_nm)) if v]
    if given and not plain:
        raise ValueError(f"{', '.join(given)} describe plain GeoTIFF inputs, and none was given (scenes YAMLs and "
                         "STAC items describe their own bands)")
    for s in scenes:  # the run's --nodata applies to every scene
        s.nodata = s.nodata if nodata is None else nodata
    seen: Dict[str, int] = {}
    for s in scenes:
        if s.name in seen:
            raise ValueError(f"two scenes are named {s.name!r} ({s.origin}); give them distinct 'name's")
        seen[s.name] = 1
    return scenes
