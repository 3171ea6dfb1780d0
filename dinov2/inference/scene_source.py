"""A scene to embed: its channels (file, band, channel id), mask, metadata; and the checks every way of describing
one shares (numbers from YAML/JSON, wavelengths, registry bands, unique channel ids).

`dinov2.inference.sources` builds scenes from files, folders and scenes YAMLs, `dinov2.inference.stac` from STAC
items (local item JSONs and API searches alike).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dinov2.data.remote import is_url


@dataclass(frozen=True)
class MaskSpec:
    """Pixels that a mask raster marks are no-data: band `index` (1-based) of `path`; a pixel is masked when its
    value is one of `values`, or when any of the bit positions `bits` is set (bit 0 = least significant)."""

    path: str
    index: int = 1
    values: Tuple[int, ...] = ()
    bits: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.values) == bool(self.bits):
            raise ValueError(f"mask {self.path}: give the masked values (--mask-values) or bits (--mask-bits), "
                             "one of the two")
        if any(not 0 <= b <= 63 for b in self.bits):
            raise ValueError(f"mask {self.path}: bit positions must be 0..63, got {list(self.bits)}")

    def masked(self, band: np.ndarray) -> np.ndarray:
        """Boolean array: True where `band` (the mask's values) says no-data."""
        if self.values:
            return np.isin(band, np.asarray(self.values))
        flags = np.uint64(sum(1 << b for b in self.bits))
        return (band.astype(np.int64).astype(np.uint64) & flags) != 0

    def signature(self) -> Dict[str, Any]:
        """What of the mask decides the values (the file's identity is among the scene's inputs)."""
        return {"file": self.path, "band": self.index, "values": list(self.values), "bits": list(self.bits)}


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
    mask: Optional[MaskSpec] = None
    clip: Optional[Tuple[float, float, float, float]] = None  # WGS84 box W, S, E, N the scene is cropped to

    @property
    def bands(self) -> List[str]:
        return [c.band for c in self.channels]

    @property
    def chn_ids(self) -> List[int]:
        return [c.chn_id for c in self.channels]

    @property
    def files(self) -> List[str]:
        """The files the bands come from (without the mask)."""
        return list(dict.fromkeys(c.path for c in self.channels))

    @property
    def input_files(self) -> List[str]:
        """Every file the scene's values depend on: band files and mask."""
        return self.files + ([self.mask.path] if self.mask and self.mask.path not in self.files else [])

    @property
    def urls(self) -> List[str]:
        """The remote inputs among `input_files` (URLs the user named, directly or through a STAC item)."""
        return [f for f in self.input_files if is_url(f)]


def safe_name(name: str) -> str:
    """`name` reduced to characters safe in file names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "scene"


def wavelength_id(nm: Any, what: str) -> int:
    """Channel id of a centre wavelength in nm (⌊nm⌋); values outside 200..20000 nm are refused."""
    try:
        v = float(nm)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: wavelength {nm!r} is not a number (nm)") from None
    if not 200.0 <= v <= 20000.0:
        raise ValueError(f"{what}: wavelength {v} nm is outside 200..20000 nm (give nanometres)")
    return int(round(v, 3))  # ⌊nm⌋ after removing float noise (0.665 um * 1000 = 664.999...)


def registry_channels(sensor: str, bands: Sequence[str], paths: Sequence[str],
                      indexes: Sequence[int]) -> List[Channel]:
    """Channels of registry bands of `sensor` (ids from the registry's centre wavelengths)."""
    from dinov2.data.sensors import band_info

    out = []
    for band, path, idx in zip(bands, paths, indexes):
        info = band_info(sensor, band)
        out.append(Channel(path, int(idx), info["key"], int(info["mu"])))
    return out


def tif_datetime(tags: Dict[str, str]) -> Optional[str]:
    """Acquisition time from GeoTIFF tags (ISO 8601), or None."""
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


@dataclass(frozen=True)
class MaskFlags:
    """The command line's mask: a STAC item's asset (`asset`), a raster (`file`, for one plain GeoTIFF input) or a
    band of the plain GeoTIFF input itself (`band` alone; with `asset`/`file`, the band of that raster), and the
    masked `values` or `bits`."""

    asset: Optional[str] = None
    file: Optional[str] = None
    band: Optional[int] = None
    values: Tuple[int, ...] = ()
    bits: Tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.asset and self.file:
            raise ValueError("give --mask-asset (STAC items) or --mask-file (a plain GeoTIFF), not both")
        if self.band is not None and self.band < 1:
            raise ValueError(f"--mask-band is a 1-based band number, got {self.band}")
        if self.values and self.bits:
            raise ValueError("give --mask-values or --mask-bits, not both")
        if self.active and not (self.values or self.bits):
            raise ValueError("a mask needs --mask-values (masked values, e.g. 3,8,9,10 for Sentinel-2 SCL) or "
                             "--mask-bits (bit positions, e.g. 0,1,2,3,4 for Landsat QA_PIXEL)")
        if (self.values or self.bits) and not self.active:
            raise ValueError("--mask-values/--mask-bits need a mask: --mask-asset (STAC), --mask-file or "
                             "--mask-band")
        if any(not 0 <= b <= 63 for b in self.bits):
            raise ValueError(f"--mask-bits: bit positions must be 0..63, got {list(self.bits)}")

    @property
    def active(self) -> bool:
        return bool(self.asset or self.file or self.band is not None)

    def spec(self, path: str, index: Optional[int] = None) -> MaskSpec:
        """The mask of a scene: band `index` (else `band`, else 1) of `path`."""
        return MaskSpec(path, int(index or self.band or 1), tuple(self.values), tuple(self.bits))


def mask_from_yaml(entry: Any, default_file: Optional[str], what: str) -> MaskSpec:
    """A scenes YAML ``mask: {file, band, values | bits}`` (file: default the scene's own single file)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{what}: mask must be a mapping {{file, band, values | bits}}, got {entry!r}")
    unknown = sorted(set(entry) - {"file", "band", "values", "bits"})
    if unknown:
        raise ValueError(f"{what}: mask has unknown keys {unknown} (known: file, band, values, bits)")
    path = entry.get("file") or default_file
    if path is None:
        raise ValueError(f"{what}: mask needs 'file' (the scene has several files)")

    def ints(key: str) -> Tuple[int, ...]:
        vals = numbers(entry.get(key) or [], f"{what} mask {key}") or []
        if any(v != int(v) for v in vals):
            raise ValueError(f"{what}: mask {key} must be integers, got {entry.get(key)}")
        return tuple(int(v) for v in vals)

    band = entry.get("band", 1)
    if isinstance(band, bool) or not isinstance(band, int) or band < 1:
        raise ValueError(f"{what}: mask band must be a 1-based band number, got {band!r}")
    try:
        return MaskSpec(str(path), band, ints("values"), ints("bits"))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
