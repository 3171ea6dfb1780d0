"""STAC items as scenes: a local item JSON and the items of a STAC API search take one path (`scene_from_item`).

An item's raster assets give the bands: every GeoTIFF/COG/JPEG 2000 asset with ``eo:bands`` (or STAC 1.1
``bands``), or the assets named by key (`ItemOptions.assets`, in that order). Band ids come from the sensor
registry when the item's platform/constellation is a registry sensor and the band's name resolves there, else
from its ``center_wavelength`` (µm). Asset hrefs may be local paths or ``http(s)://``, ``s3://``, ``gs://``,
``az://`` URLs: naming (or searching for) the item names its assets, so they are read (see
`dinov2.data.raster_open`). A mask asset (`ItemOptions.mask`, e.g. Sentinel-2 L2A's ``scl``) marks pixels
as no-data. Searches go through pystac-client (`search_items`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from dinov2.data.raster_open import LOCAL_ONLY, RasterPolicy, check_raster, check_regular_file, is_remote
from dinov2.data.remote import is_url
from dinov2.inference.scene_source import (Channel, MaskFlags, SceneSource, check_unique_ids, number,
                                           registry_channels, safe_name, wavelength_id)

# STAC platform/constellation -> sensor registry name (band names are then looked up in the registry)
STAC_PLATFORMS = {"sentinel-2": "sentinel2", "sentinel2": "sentinel2", "landsat-8": "landsat8",
                  "landsat-9": "landsat9", "sentinel-1": "sentinel1", "enmap": "enmap"}
RASTER_ASSET_SUFFIXES = (".tif", ".tiff", ".jp2")
# STAC eo common names that are not the registry's band names (STAC names bands by wavelength: nir08 = 0.8x um)
_LANDSAT = {"nir08": "B05", "swir16": "B06", "swir22": "B07", "lwir11": "B10", "lwir12": "B11"}
STAC_COMMON_NAMES = {"sentinel2": {"nir08": "B8A", "nir09": "B09", "swir16": "B11", "swir22": "B12"},
                     "landsat8": _LANDSAT, "landsat9": _LANDSAT}


@dataclass(frozen=True)
class ItemOptions:
    """How items become scenes: `assets` (keys, in band order; None = every raster asset with eo:bands), the mask
    (its ``asset``), and a WGS84 box to clip to."""

    assets: Optional[Tuple[str, ...]] = None
    mask: MaskFlags = MaskFlags()
    clip: Optional[Tuple[float, float, float, float]] = None


def _stac_bands(asset) -> List[Dict[str, Any]]:
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    return [dict(b) for b in bands]


def read_item(path: str):
    """A local STAC item JSON as a ``pystac.Item`` (relative asset hrefs resolved against its folder)."""
    import pystac

    from dinov2.data.io import read_json

    check_regular_file(path, "STAC item")
    data = read_json(path, "STAC item")
    try:
        return pystac.Item.from_dict(data, href=os.path.abspath(path))
    except Exception as e:  # pystac raises KeyError/TypeError/STACTypeError on malformed items
        raise ValueError(f"{path} is not a STAC item: {type(e).__name__}: {e}") from None


def _href(asset, what: str, policy: RasterPolicy) -> str:
    """The asset's absolute href: a URL (named by the item) or a local raster the policy allows."""
    href = asset.get_absolute_href() or asset.href
    href = href[7:] if href.startswith("file://") else href
    if is_url(href):
        return href
    if is_remote(href):
        raise ValueError(f"{what}: href {href} is neither a local file nor a http(s)://, s3://, gs:// or az:// URL")
    check_raster(href, policy)
    return href


def _is_raster(asset) -> bool:
    href = str(asset.href).split("?")[0].lower()
    mtype = str(asset.media_type or "").lower()
    return href.endswith(RASTER_ASSET_SUFFIXES) or "tiff" in mtype or "jp2" in mtype


def _channels(href: str, bands: List[Dict[str, Any]], key: str, sensor: Optional[str], platform: str,
              where: str) -> List[Channel]:
    from dinov2.data.sensors import resolve_band

    out: List[Channel] = []
    for i, b in enumerate(bands):
        what = f"{where}: asset {key!r} band {i}"
        names = [n for n in (b.get("name"), b.get("common_name")) if n]
        band_key = None
        if sensor is not None:
            for n in names:
                try:
                    band_key = resolve_band(sensor, STAC_COMMON_NAMES.get(sensor, {}).get(str(n).lower(), n))
                    break
                except ValueError:
                    continue
        if band_key is not None:
            out.extend(registry_channels(sensor, [band_key], [href], [i + 1]))
            continue
        cw = b.get("center_wavelength", b.get("eo:center_wavelength"))
        if cw is None:
            raise ValueError(f"{what} ({names}) has no center_wavelength and is not a known band of platform "
                             f"{platform!r}")
        cw = number(cw, f"{what} center_wavelength")
        out.append(Channel(href, i + 1, str(names[0] if names else key), wavelength_id(cw * 1000, what)))
    return out


def scene_from_item(item, where: str, options: ItemOptions = ItemOptions(),
                    policy: RasterPolicy = LOCAL_ONLY) -> SceneSource:
    """The scene of a ``pystac.Item``; `where` names it in errors (the item file, or the API and item id)."""
    from dinov2.data.sensors import list_sensors

    props = item.properties
    platform = str(props.get("constellation") or props.get("platform") or "").lower()
    sensor = next((s for p, s in STAC_PLATFORMS.items() if platform.startswith(p)), None)
    if sensor is not None and sensor not in list_sensors():
        sensor = None
    keys = list(item.assets)
    if options.assets is not None:
        missing = [k for k in options.assets if k not in item.assets]
        if missing:
            raise ValueError(f"{where}: no asset {', '.join(map(repr, missing))} (--assets); the item's assets: "
                             f"{', '.join(keys)}")
        chosen = list(options.assets)
    else:
        chosen = [k for k in keys if k != options.mask.asset and _stac_bands(item.assets[k])
                  and _is_raster(item.assets[k])]
    chans: List[Channel] = []
    for key in chosen:
        asset = item.assets[key]
        bands = _stac_bands(asset)
        if not bands:
            raise ValueError(f"{where}: asset {key!r} has no eo:bands, so its band cannot be identified; choose "
                             f"assets with eo:bands (the item's assets: {', '.join(keys)})")
        href = _href(asset, f"{where}: asset {key!r}", policy)
        chans.extend(_channels(href, bands, key, sensor, platform, where))
    if not chans:
        raise ValueError(f"{where}: no GeoTIFF asset with eo:bands found (assets: {keys})")
    mask = None
    if options.mask.asset is not None:
        key = options.mask.asset
        if key not in item.assets:
            raise ValueError(f"{where}: no asset {key!r} (--mask-asset); the item's assets: {', '.join(keys)}")
        mask = options.mask.spec(_href(item.assets[key], f"{where}: mask asset {key!r}", policy))
    dt = item.datetime or props.get("start_datetime")
    scene = SceneSource(safe_name(item.id), sensor or "custom", chans, where, None,
                        dt.isoformat() if hasattr(dt, "isoformat") else (str(dt) if dt else None), mask=mask,
                        clip=options.clip)
    try:
        return check_unique_ids(scene)
    except ValueError as e:
        if options.assets is not None:
            raise
        raise ValueError(f"{e}; choose the assets with --assets (used: {', '.join(chosen)})") from None


def scene_from_stac(path: str, policy: RasterPolicy = LOCAL_ONLY, options: ItemOptions = ItemOptions()) -> SceneSource:
    """A local STAC item JSON as a scene (see `scene_from_item`)."""
    return scene_from_item(read_item(path), path, options, policy)


# ---------------------------------------------------------------------------------------------- API search
def parse_bbox(text: str) -> Tuple[float, float, float, float]:
    """``W,S,E,N`` in degrees (W > E crosses the antimeridian); malformed boxes raise naming --bbox."""
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--bbox must be W,S,E,N in degrees, got {text!r}") from None
    if len(vals) != 4 or any(v != v for v in vals):
        raise ValueError(f"--bbox must be 4 numbers W,S,E,N in degrees, got {text!r}")
    w, s, e, n = vals
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s < n <= 90):
        raise ValueError(f"--bbox {text!r}: need -180 <= W, E <= 180 and -90 <= S < N <= 90 (degrees)")
    return w, s, e, n


def _instant(text: str, flag: str) -> Optional[_dt.datetime]:
    if text in ("", ".."):
        return None
    try:
        value = _dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not an ISO 8601 date or time (e.g. 2024-06-01 or "
                         "2024-06-01T10:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)


def parse_datetime(text: str) -> str:
    """A STAC datetime: one instant, or ``START/END`` with ``..`` for an open end; refused naming --datetime."""
    parts = str(text).split("/")
    if len(parts) > 2 or not text:
        raise ValueError(f"--datetime must be START/END or one date/time, got {text!r}")
    times = [_instant(p, "--datetime") for p in parts]
    if len(times) == 2 and all(times) and times[0] > times[1]:
        raise ValueError(f"--datetime {text!r}: the start is after the end")
    if len(parts) == 1 and times[0] is None:
        raise ValueError(f"--datetime {text!r}: give a date or time")
    return text


def _json_arg(text: Optional[str], flag: str) -> Optional[Dict[str, Any]]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} is not valid JSON ({e}): {text[:200]!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text[:200]!r}")
    return value


@dataclass(frozen=True)
class Search:
    """A STAC API item search (pystac-client's parameters)."""

    api: str
    collections: Sequence[str]
    bbox: Optional[Tuple[float, float, float, float]] = None
    datetime: Optional[str] = None
    query: Optional[str] = None  # JSON, the STAC query extension
    filter: Optional[str] = None  # CQL2-JSON, the STAC filter extension
    max_items: Optional[int] = None

    def describe(self) -> str:
        parts = [f"collections {','.join(self.collections)}"]
        parts += [f"bbox {','.join(map(str, self.bbox))}"] if self.bbox else []
        parts += [f"datetime {self.datetime}"] if self.datetime else []
        parts += ["query"] if self.query else []
        parts += ["filter"] if self.filter else []
        return ", ".join(parts)


def search_items(search: Search) -> List[Dict[str, Any]]:
    """The item dicts matching `search`, in the API's order; an unreachable URL, a service that is not a STAC API
    with item search, a refused query and an empty result raise ValueError naming the URL."""
    import pystac_client
    from pystac_client.exceptions import APIError

    if not search.collections:
        raise ValueError("--stac-api needs --collections (one or more collection ids)")
    if search.max_items is not None and search.max_items < 1:
        raise ValueError(f"--max-items must be a positive integer, got {search.max_items}")
    query, cql = _json_arg(search.query, "--query"), _json_arg(search.filter, "--filter")
    try:
        client = pystac_client.Client.open(search.api)
    except APIError as e:
        raise ValueError(f"--stac-api {search.api}: not reachable ({str(e).splitlines()[0][:300]})") from None
    except Exception as e:  # not JSON, not a catalog: pystac raises many types
        raise ValueError(f"--stac-api {search.api} is not a STAC API ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
    if not client.conforms_to(pystac_client.ConformanceClasses.ITEM_SEARCH):
        raise ValueError(f"--stac-api {search.api} is a STAC catalog without item search (its conformance "
                         "classes do not include STAC API item-search)")
    # pystac-client only warns when the API lacks the extension, and such an API ignores the expression: every
    # item of the collections would be embedded, so refuse instead
    for value, flag, cls, name in ((query, "--query", "QUERY", "query"), (cql, "--filter", "FILTER", "filter")):
        if value is not None and not client.conforms_to(getattr(pystac_client.ConformanceClasses, cls)):
            raise ValueError(f"--stac-api {search.api} does not implement the STAC {name} extension (its "
                             f"conformance classes lack item-search#{name}), so it would ignore {flag}; "
                             f"{'use --filter' if name == 'query' else 'use --query'} if it supports that, or "
                             "narrow the search with --bbox/--datetime")
    kwargs: Dict[str, Any] = dict(collections=list(search.collections), bbox=search.bbox, datetime=search.datetime,
                                  max_items=search.max_items)
    if query is not None:
        kwargs["query"] = query
    if cql is not None:
        kwargs.update(filter=cql, filter_lang="cql2-json")
    try:
        items = [item.to_dict() for item in client.search(**kwargs).items()]
    except APIError as e:
        raise ValueError(f"--stac-api {search.api}: the search failed ({str(e).splitlines()[0][:300]})") from None
    if not items:
        raise ValueError(f"--stac-api {search.api}: no items match ({search.describe()})")
    return items


def scenes_from_search(items: Sequence[Dict[str, Any]], api: str, options: ItemOptions = ItemOptions(),
                       policy: RasterPolicy = LOCAL_ONLY) -> List[SceneSource]:
    """Scenes of searched item dicts (see `search_items`; the same conversion as a local item's)."""
    import pystac

    scenes = []
    for d in items:
        try:
            item = pystac.Item.from_dict(d)
        except Exception as e:
            raise ValueError(f"--stac-api {api}: item {d.get('id')!r} is not a STAC item: {e}") from None
        scenes.append(scene_from_item(item, f"{api} item {item.id}", options, policy))
    return scenes
