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
from typing import Any, List, Optional, Sequence, Tuple

from dinov2.data.raster_open import LOCAL_ONLY, RasterPolicy, check_raster, check_regular_file, raster_info
from dinov2.data.remote import is_url
from dinov2.inference.scene_source import (Channel, MaskFlags, MaskSpec, SceneSource, check_unique_ids,  # noqa: F401
                                           mask_from_yaml, number, numbers, registry_channels, safe_name,
                                           tif_datetime, wavelength_id)
from dinov2.inference.stac import (STAC_PLATFORMS, ItemOptions, read_item, scene_from_item,  # noqa: F401
                                   scene_from_stac, scenes_from_search)

RASTER_SUFFIXES = (".tif", ".tiff")
VRT_SUFFIXES = (".vrt",)


def _url_name(url: str) -> str:
    from urllib.parse import urlsplit

    return os.path.splitext(os.path.basename(urlsplit(url).path))[0]


def scene_from_raster(path: str, sensor: Optional[str] = None, bands: Optional[Sequence[str]] = None,
                      wavelengths_nm: Optional[Sequence[float]] = None, name: Optional[str] = None,
                      nodata: Optional[float] = None, datetime: Optional[str] = None,
                      policy: RasterPolicy = LOCAL_ONLY, mask: Optional[MaskFlags] = None) -> SceneSource:
    """A multi-band GeoTIFF (local path or named URL) as one scene; band ids from `sensor` + `bands` (registry) or
    `wavelengths_nm`. `mask`: a mask file, or (``band`` alone) the file's own band that is the mask, which is then
    not embedded and not counted in `bands` / `wavelengths_nm`."""
    info = raster_info(path, policy)
    own_mask = mask is not None and mask.band is not None and not mask.file
    if own_mask and not 1 <= mask.band <= info["count"]:
        raise ValueError(f"{path}: --mask-band {mask.band}, but the file has {info['count']} bands")
    indexes = [i + 1 for i in range(info["count"]) if not (own_mask and i + 1 == mask.band)]
    count = len(indexes)
    if wavelengths_nm is not None:
        if len(wavelengths_nm) != count:
            raise ValueError(f"{path}: {len(wavelengths_nm)} wavelengths_nm given for {count} bands")
        ids = [wavelength_id(w, path) for w in wavelengths_nm]
        names = list(bands) if bands else [f"{i}nm" for i in ids]
        chans = [Channel(path, b, str(n), c) for b, n, c in zip(indexes, names, ids)]
        sensor = sensor or "custom"
    elif sensor:
        if bands is None:
            bands = [info["descriptions"][i - 1] for i in indexes]
            if any(b is None for b in bands):
                raise ValueError(f"{path}: give the band list (--bands) for sensor {sensor!r}; the file's bands "
                                 "have no descriptions")
        if len(bands) != count:
            raise ValueError(f"{path}: {len(bands)} band names given for {count} bands")
        keep = [(b, i) for b, i in zip(bands, indexes) if b is not None]
        chans = registry_channels(sensor, [b for b, _ in keep], [path] * len(keep), [i for _, i in keep])
    else:
        raise ValueError(f"{path}: cannot tell which bands it holds; give --sensor and --bands (registry names), "
                         "--wavelengths, or a scenes YAML entry {file: ..., wavelengths_nm: [...]}")
    spec = None
    if mask is not None and mask.active:
        spec = mask.spec(path) if own_mask else mask.spec(mask.file)
    base = _url_name(path) if is_url(path) else os.path.splitext(os.path.basename(path))[0]
    return check_unique_ids(SceneSource(safe_name(name or base), str(sensor).lower(), chans, path, nodata,
                                        datetime or tif_datetime(info["tags"]), mask=spec))


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


def _yaml_refs(spec: dict, base: Optional[str], i: int) -> List[str]:
    """The files a scenes YAML entry names (relative paths joined to the YAML's folder; URLs as given)."""
    from dinov2.data.io import expand_path

    refs = [spec["file"]] if "file" in spec else list(dict(spec.get("files") or {}).values())
    out = []
    for ref in refs:
        ref = expand_path(str(ref), f"scene {i} file")
        out.append(ref if is_url(ref) or not base or os.path.isabs(ref) else os.path.join(base, ref))
    return out


def scenes_from_yaml(path: str, policy: RasterPolicy = LOCAL_ONLY) -> List[SceneSource]:
    """A scenes YAML as training uses it (``{sensor, files}`` / ``{sensor, file, bands}``), plus inline entries
    ``{file, wavelengths_nm}`` for sensors not in the registry; files may be URLs, and an entry may give a
    ``mask: {file, band, values | bits}``."""
    from dinov2.data.datasets.geotiff_scenes import _band_values, _scene_channels

    specs, base = _load_yaml_scenes(path)
    refs = {i: _yaml_refs(spec, base, i) for i, spec in enumerate(specs) if isinstance(spec, dict)}
    masks = [spec["mask"]["file"] for spec in specs if isinstance(spec, dict) and isinstance(spec.get("mask"), dict)
             and isinstance(spec["mask"].get("file"), str)]
    policy = policy.with_urls([r for rs in refs.values() for r in rs] + masks)  # the YAML names them
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
            scene = scene_from_raster(refs[i][0], spec.get("sensor"), spec.get("bands"), spec["wavelengths_nm"],
                                      name, spec.get("nodata"), spec.get("datetime"), policy)
        else:
            sensor = str(spec.get("sensor", "")).lower()
            for ref in refs[i]:
                check_raster(ref, policy)
            if "file" in spec and is_url(refs[i][0]) and not spec.get("bands"):
                raise ValueError(f"{path}: scene {i}: give 'bands' for the remote file {refs[i][0]}")
            chans = _scene_channels(spec, base, i)
            chan_list = registry_channels(sensor, [k for k, _, _ in chans], [p for _, p, _ in chans],
                                          [b for _, _, b in chans])
            first = chan_list[0].path
            scene = check_unique_ids(SceneSource(
                safe_name(name or f"{os.path.splitext(os.path.basename(path))[0]}_{i}_{sensor}"), sensor, chan_list,
                path, spec.get("nodata"), spec.get("datetime") or tif_datetime(raster_info(first, policy)["tags"])))
        if spec.get("mask") is not None:
            scene.mask = _yaml_mask(spec["mask"], refs[i], base, f"{path}: scene {i}", policy)
        keys = scene.bands
        scene.mean = _band_values(spec.get("mean"), keys, scene.sensor, f"{scene.name} mean") \
            if scene.sensor != "custom" else _plain_list(spec.get("mean"), len(keys), f"{scene.name} mean")
        scene.std = _band_values(spec.get("std"), keys, scene.sensor, f"{scene.name} std") \
            if scene.sensor != "custom" else _plain_list(spec.get("std"), len(keys), f"{scene.name} std")
        scene.datetime = str(scene.datetime) if scene.datetime is not None else None
        out.append(scene)
    return out


def _yaml_mask(entry: Any, refs: List[str], base: Optional[str], what: str, policy: RasterPolicy) -> MaskSpec:
    mask = mask_from_yaml(entry, refs[0] if len(refs) == 1 else None, what)
    f = mask.path
    if isinstance(entry, dict) and entry.get("file") and not is_url(f) and base and not os.path.isabs(f):
        f = os.path.join(base, f)
    check_raster(f, policy)
    return MaskSpec(f, mask.index, mask.values, mask.bits)


def _plain_list(values: Any, n: int, what: str) -> Optional[List[float]]:
    if values is None:
        return None
    vals = numbers(values, what)
    if len(vals) != n:
        raise ValueError(f"{what}: {len(vals)} values for {n} bands")
    return vals


def collect_scenes(inputs: Sequence[str], sensor: Optional[str] = None, bands: Optional[Sequence[str]] = None,
                   wavelengths_nm: Optional[Sequence[float]] = None, nodata: Optional[float] = None,
                   policy: RasterPolicy = LOCAL_ONLY, options: ItemOptions = ItemOptions(),
                   searched: Optional[Tuple[str, Sequence[dict]]] = None) -> List[SceneSource]:
    """Scenes of every input: GeoTIFF/COG files and ``http(s)://`` / ``s3://`` / ``gs://`` / ``az://`` URLs of
    them, folders of them, scenes YAMLs, STAC item JSONs (local files or URLs; `options` choose their assets,
    mask and clip) and VRTs when the policy allows them; then the items of a search (`searched`: the API URL and
    the item dicts of `dinov2.inference.stac.search_items`). `options.mask` also masks plain GeoTIFF inputs
    (``file``: one mask for the one plain input; ``band`` alone: the input's own band)."""
    scenes: List[SceneSource] = []
    rasters = RASTER_SUFFIXES + (VRT_SUFFIXES if policy.allow_vrt else ())
    policy = policy.with_urls([str(i) for i in inputs])  # URLs on the command line are named
    mask = options.mask
    if mask.file:
        policy = policy.with_urls([mask.file])
        check_raster(mask.file, policy)
    plain: List[str] = []
    items = 0

    def add_raster(p: str) -> None:
        plain.append(p)
        scenes.append(scene_from_raster(p, sensor, bands, wavelengths_nm, nodata=nodata, policy=policy,
                                        mask=mask if (mask.file or (mask.band and not mask.asset)) else None))

    with policy.env():  # files opened by shared readers (band counts of scenes YAML entries) follow it too
        for inp in inputs:
            p = str(inp) if is_url(inp) else os.path.expanduser(os.path.expandvars(str(inp)))
            low = p.split("?")[0].lower()
            if is_url(p):
                if low.endswith(".json"):
                    items += 1
                    scenes.append(scene_from_item(_remote_item(p), p, options, policy))
                elif low.endswith(RASTER_SUFFIXES):
                    add_raster(p)
                else:
                    raise ValueError(f"input {p}: a URL must name a GeoTIFF (.tif/.tiff) or a STAC item (.json)")
            elif os.path.isdir(p):
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
                items += 1
                scenes.append(scene_from_stac(p, policy, options))
            elif low.endswith(rasters):
                add_raster(p)
            elif low.endswith(VRT_SUFFIXES):
                raise ValueError(f"input {p} is a GDAL VRT (it makes GDAL read other files); pass --allow-vrt to "
                                 "read it")
            else:
                raise ValueError(f"input {p}: expected a GeoTIFF (.tif/.tiff), a folder, a scenes YAML or a STAC "
                                 "item .json")
    if searched is not None:
        scenes.extend(scenes_from_search(searched[1], searched[0], options, policy))
        items += len(searched[1])
    check_scene_flags(scenes, plain, items, sensor, bands, wavelengths_nm, nodata, options)
    return scenes


def check_scene_flags(scenes: List[SceneSource], plain: List[str], items: int, sensor, bands, wavelengths_nm,
                      nodata: Optional[float], options: ItemOptions) -> None:
    """Refuse flags that describe inputs of a kind that was not given; apply --nodata; refuse duplicate names."""
    given = [f for f, v in (("--sensor", sensor), ("--bands", bands), ("--wavelengths", wavelengths_nm)) if v]
    if given and not plain:
        raise ValueError(f"{', '.join(given)} describe plain GeoTIFF inputs, and none was given (scenes YAMLs and "
                         "STAC items describe their own bands)")
    mask = options.mask
    if mask.file and len(plain) != 1:
        raise ValueError(f"--mask-file names the mask of one plain GeoTIFF input, and {len(plain)} were given (give "
                         "each scene its mask in a scenes YAML: mask: {file, values | bits})")
    if mask.asset and not items:
        raise ValueError("--mask-asset names an asset of STAC items, and no STAC item was given")
    if mask.band is not None and not (mask.asset or mask.file) and not plain:
        raise ValueError("--mask-band alone names a band of plain GeoTIFF inputs, and none was given")
    if options.assets is not None and not items:
        raise ValueError("--assets chooses assets of STAC items, and no STAC item was given")
    for s in scenes:  # the run's --nodata applies to every scene
        s.nodata = s.nodata if nodata is None else nodata
    seen = set()
    for s in scenes:
        if s.name in seen:
            raise ValueError(f"two scenes are named {s.name!r} ({s.origin}); give them distinct 'name's")
        seen.add(s.name)


def _remote_item(url: str):
    """A STAC item JSON at a URL the user named."""
    import json

    import pystac

    from dinov2.data.remote import read_bytes

    try:
        data = json.loads(read_bytes(url))
    except ValueError as e:
        raise ValueError(f"{url} is not JSON: {e}") from None
    try:
        return pystac.Item.from_dict(data, href=url)
    except Exception as e:
        raise ValueError(f"{url} is not a STAC item: {type(e).__name__}: {e}") from None
