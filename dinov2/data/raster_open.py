"""Read only what the user named: the one place where inference opens input rasters.

`open_raster(path, policy)` opens a raster through an allow-list of GDAL drivers (GeoTIFF/COG, JPEG 2000 for
Sentinel-2 band files; VRT only when the user opted in) under GDAL settings that keep GDAL from reading or
fetching anything else:

- no side files: ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR`` (no directory listing, so no ``.aux.xml``, external
  ``.ovr``/``.msk`` overviews and masks, or world files are discovered), ``GDAL_PAM_ENABLED=NO`` (no PAM
  ``.aux.xml`` read or written), ``GDAL_GEOREF_SOURCES=INTERNAL``;
- no network for local inputs: ``CPL_VSIL_CURL_ALLOWED_FILENAME`` set to a name no URL has, so every curl-based
  virtual file system (``/vsicurl/``, ``/vsis3/``, ...) refuses to open anything; the URLs the user named
  (`RasterPolicy.urls`: inputs on the command line, in a scenes YAML, asset hrefs of STAC items the user named or
  searched for) are the only exception, each opened with exactly its own name allowed, as a GeoTIFF/COG or
  JPEG 2000 only (never a VRT: its references could not be checked), under `dinov2.data.remote.http_options`;
- VRTs: refused unless ``allow_vrt``; then every file a VRT references is checked by the same policy before GDAL
  sees it (local regular files of allowed formats only, no ``/vsi*``, URLs or driver prefixes), raw-raster
  bands (``GDAL_VRT_ENABLE_RAWRASTERBAND=NO``) and Python pixel functions (``GDAL_VRT_ENABLE_PYTHON=NO``) are
  never enabled;
- FIFOs, devices, sockets and folders given as rasters are refused from `os.stat`, before any open (an open of a
  FIFO would block).

Refusals raise `RasterRefusedError` (a ValueError naming the file and the reason); files GDAL cannot decode raise
`dinov2.data.io.UnreadableFileError`.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

from dinov2.data.io import UnreadableFileError
from dinov2.data.remote import gdal_path, http_options, is_url

INPUT_DRIVERS = ("GTiff", "JP2OpenJPEG")  # COGs are GeoTIFFs; JP2 for Sentinel-2 band files
NO_NETWORK = "/vsicurl/panopticon-read-only-what-the-user-named"  # matches no real URL
_REMOTE = re.compile(r"^(/vsi\w+/|[A-Za-z][\w+.-]+://)")
_DRIVER_PREFIX = re.compile(r"^[A-Za-z][\w-]*:")  # e.g. 'WMS:', 'HDF5:', 'GTIFF_DIR:' connection strings
MAX_VRT_BYTES = 16 << 20
MAX_VRT_DEPTH = 4


class RasterRefusedError(ValueError):
    """The policy does not allow reading this path."""


@dataclass(frozen=True)
class RasterPolicy:
    """What input rasters may be read. `urls`: remote paths the user named explicitly (GDAL may fetch exactly
    these); `allow_vrt`: VRT files (and so the local files they reference) may be read."""

    allow_vrt: bool = False
    urls: FrozenSet[str] = field(default_factory=frozenset)
    drivers: Tuple[str, ...] = INPUT_DRIVERS

    def allowed_drivers(self) -> List[str]:
        return list(self.drivers) + (["VRT"] if self.allow_vrt else [])

    def is_named_url(self, path: str) -> bool:
        return str(path) in self.urls and is_url(path)

    def with_urls(self, urls) -> "RasterPolicy":
        """This policy with `urls` named too (URLs the user gave; other remote paths are ignored)."""
        import dataclasses

        return dataclasses.replace(self, urls=frozenset(self.urls) | {str(u) for u in urls if is_url(u)})

    def gdal_options(self, opening: Optional[str] = None) -> Dict[str, str]:
        """GDAL settings of reads under this policy; `opening`: the named URL being opened (the only name GDAL
        may then fetch; reads of opened files need no name)."""
        opts = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "GDAL_PAM_ENABLED": "NO",
                "GDAL_GEOREF_SOURCES": "INTERNAL", "GDAL_VRT_ENABLE_RAWRASTERBAND": "NO",
                "GDAL_VRT_ENABLE_PYTHON": "NO", "CPL_VSIL_CURL_ALLOWED_FILENAME": NO_NETWORK}
        if self.urls:
            opts.update(http_options())
        if opening is not None and self.is_named_url(opening):
            opts["CPL_VSIL_CURL_ALLOWED_FILENAME"] = gdal_path(opening)
        return opts

    def env(self, opening: Optional[str] = None):
        """rasterio.Env with `gdal_options` (wrap opens and reads of input rasters in it)."""
        import rasterio

        return rasterio.Env(**self.gdal_options(opening))


LOCAL_ONLY = RasterPolicy()


def is_remote(path: str) -> bool:
    """True for URLs and GDAL virtual file system paths."""
    return bool(_REMOTE.match(str(path)))


def check_regular_file(path: str, what: str = "file") -> str:
    """`path` if it is an existing regular file (symlinks followed); folders, FIFOs, devices and sockets are
    refused without opening them."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UnreadableFileError(path, e) from None
    if stat.S_ISREG(st.st_mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
    raise RasterRefusedError(f"{what} {path} is {kind}, not a regular file")


_MAGIC = ((b"II*\x00", "GTiff"), (b"MM\x00*", "GTiff"), (b"II+\x00", "GTiff"), (b"MM\x00+", "GTiff"),
          (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JP2OpenJPEG"), (b"\xffO\xffQ", "JP2OpenJPEG"))


def sniff_format(path: str) -> Optional[str]:
    """GDAL driver of a local file from its first bytes: 'GTiff', 'JP2OpenJPEG', 'VRT' or None (other)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<VRTDataset"):
        return "VRT"
    return next((driver for magic, driver in _MAGIC if head.startswith(magic)), None)


def _vrt_sources(path: str) -> List[Tuple[str, str]]:
    """(tag, resolved path) of every file reference in a VRT; refuses VRT kinds that compute or fetch."""
    import xml.etree.ElementTree as ET

    if os.path.getsize(path) > MAX_VRT_BYTES:
        raise RasterRefusedError(f"VRT {path} is larger than {MAX_VRT_BYTES >> 20} MB")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise RasterRefusedError(f"VRT {path} is not valid XML: {e}") from None
    if root.get("subClass"):
        raise RasterRefusedError(f"VRT {path}: {root.get('subClass')} VRTs are not supported (plain VRTs only)")
    refs = []
    base = os.path.dirname(os.path.abspath(path))
    for el in root.iter():
        if el.tag in ("VRTRasterBand",) and el.get("subClass") not in (None, "VRTSourcedRasterBand"):
            raise RasterRefusedError(f"VRT {path}: {el.get('subClass')} bands are not allowed (they read raw files "
                                     "or run code)")
        if el.tag in ("SourceFilename", "SourceDataset"):
            ref = (el.text or "").strip()
            if is_remote(ref) or _DRIVER_PREFIX.match(ref) or ref.startswith("<"):
                raise RasterRefusedError(f"VRT {path} references {ref[:200]!r}, which is not a local file; only "
                                         "local files may be referenced")
            if el.get("relativeToVRT") == "1" or not os.path.isabs(ref):
                ref = os.path.join(base if el.get("relativeToVRT") == "1" else os.getcwd(), ref)
            refs.append((el.tag, ref))
    return refs


def check_raster(path: str, policy: RasterPolicy = LOCAL_ONLY, _depth: int = 0) -> Optional[str]:
    """Refuse `path` unless the policy allows reading it (see the module docstring); returns the GDAL driver to
    open it with (None for a named URL: GDAL tells GeoTIFF from JPEG 2000). Does not open it in GDAL."""
    if is_remote(path):
        if policy.is_named_url(path):
            return None
        raise RasterRefusedError(f"{path} is a remote or virtual path; only local files and URLs you name may be "
                                 "read")
    check_regular_file(path, "raster")
    driver = sniff_format(path)
    if driver == "VRT":
        if not policy.allow_vrt:
            raise RasterRefusedError(f"{path} is a GDAL VRT (an XML file that makes GDAL read other files); pass "
                                     "--allow-vrt to read it")
        if _depth >= MAX_VRT_DEPTH:
            raise RasterRefusedError(f"{path}: VRTs nested deeper than {MAX_VRT_DEPTH} levels")
        for _, ref in _vrt_sources(path):
            try:
                check_raster(ref, policy, _depth + 1)
            except (RasterRefusedError, FileNotFoundError) as e:
                raise RasterRefusedError(f"VRT {path} references {ref}: {e}") from None
    elif driver not in policy.drivers:
        if os.path.getsize(path) == 0:
            raise RasterRefusedError(f"{path} is empty (0 bytes)")
        raise RasterRefusedError(f"{path} is not a GeoTIFF/COG or JPEG 2000 file (formats read: "
                                 f"{', '.join(policy.allowed_drivers())})")
    return driver


def open_raster(path: str, policy: RasterPolicy = LOCAL_ONLY):
    """Open an input raster read-only under `policy` (a rasterio dataset). Module-level so that
    `functools.partial(open_raster, policy=...)` can serve `LazyHandles`."""
    import rasterio
    from rasterio.errors import RasterioIOError

    path = str(path)
    driver = check_raster(path, policy)
    try:
        with policy.env(path):
            if driver is None:  # a named URL: JPEG 2000 by its name, else GeoTIFF/COG (never a VRT or any other)
                jp2 = path.split("?")[0].lower().endswith(".jp2") and "JP2OpenJPEG" in policy.drivers
                driver = "JP2OpenJPEG" if jp2 else "GTiff"
                src = rasterio.open(gdal_path(path), driver=driver)
            else:
                src = rasterio.open(path, driver=driver)
    except RasterioIOError as e:
        raise UnreadableFileError(path, ValueError(f"GDAL cannot open it as {driver or 'a raster'}: {e}")) from None
    complex_types = [d for d in src.dtypes if str(d).startswith("complex")]
    if complex_types:
        src.close()
        raise RasterRefusedError(f"{path} has complex-valued bands ({complex_types[0]}); give real-valued bands "
                                 "(e.g. amplitude or intensity)")
    return src


def raster_info(path: str, policy: RasterPolicy = LOCAL_ONLY) -> Dict[str, Any]:
    """Band count, band descriptions and tags of an input raster (opened under `policy`)."""
    src = open_raster(path, policy)
    try:
        return {"count": src.count, "descriptions": list(src.descriptions), "tags": dict(src.tags())}
    finally:
        src.close()


def named_opener(policy: Optional[RasterPolicy] = None):
    """A picklable `path -> dataset` opener bound to `policy` (for `dinov2.data.io.LazyHandles`)."""
    import functools

    return functools.partial(open_raster, policy=policy or LOCAL_ONLY)
