"""Writers for embeddings: the patch-embedding raster (partial GTiff -> Cloud-Optimised GeoTIFF) and the chip
table shards of a scene (parquet strips -> one table per scene; `chips_table` turns it into the published part).
Every final file is written under a temporary name and renamed, so an
interrupted run never leaves a file that looks complete.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

# GDAL's block cache defaults to 5 % of RAM and fills with every block a run reads or writes, so peak memory would
# follow scene size; reading and writing run under this bound instead (rasterio takes GDAL_CACHEMAX in bytes).
GDAL_CACHE_MB = 16


def bounded_gdal_cache(mb: int = GDAL_CACHE_MB):
    """Context manager: GDAL's block cache capped at `mb` MB (default ``GDAL_CACHE_MB``; process-wide while
    active)."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=int(mb) << 20)


def atomic_json(path: str, obj: Dict[str, Any]) -> None:
    """Write JSON via a temporary file and rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """JSON content, or None when the file does not exist."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def create_partial_raster(path: str, width: int, height: int, count: int, crs, transform, dtype: str = "float32",
                          nodata: float = float("nan"), descriptions: Optional[Sequence[str]] = None,
                          tags: Optional[Dict[str, str]] = None,
                          colors: Optional[Sequence[Tuple[int, int, int]]] = None) -> None:
    """The map while it is computed: a raw pixel-interleaved file with an ENVI header (``.hdr`` beside `path`,
    written by GDAL with the CRS and transform), so that `PartialRaster` writes chip-sized windows of hundreds of
    bands as plain positional writes and the final COG copy reads it through GDAL. Patch embeddings arrive a chip
    at a time; GDAL's own writes of such windows into a GeoTIFF cost tens of milliseconds each (measured: ~30 ms
    per 14 x 14 x 768 window into 16 px tiles), positional writes well under one.

    `descriptions` (per band) and dataset `tags` go into a ``.aux.xml`` beside it and `colors` (a colour per class
    value of a one-band map) into the header as an ENVI classification lookup: `finalize_cog` carries all of them
    into the COG."""
    import rasterio

    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        with rasterio.open(path, "w", driver="ENVI", width=width, height=height, count=count, dtype=dtype,
                           crs=crs, transform=transform, nodata=nodata, INTERLEAVE="BIP"):
            pass
    # GDAL turns the header's generated "band names" into one metadata item per band, which the COG copy would
    # carry into the output; the optional key is dropped from the header (descriptions come from the .aux.xml)
    import re
    from xml.sax.saxutils import escape, quoteattr

    header = next(h for h in (os.path.splitext(path)[0] + ".hdr", path + ".hdr") if os.path.isfile(h))
    with open(header) as f:
        text = re.sub(r"band names = \{[^}]*\}\n?", "", f.read())
    if colors:
        text = text.replace("ENVI Standard", "ENVI Classification")
        text += f"classes = {len(colors)}\nclass lookup = {{{', '.join(str(int(v)) for c in colors for v in c)}}}\n"
    with open(header, "w") as f:
        f.write(text)
    if descriptions or tags:
        items = "".join(f"<MDI key={quoteattr(str(k))}>{escape(str(v))}</MDI>" for k, v in (tags or {}).items())
        bands = "".join(f'<PAMRasterBand band="{i + 1}"><Description>{escape(str(d))}</Description></PAMRasterBand>'
                        for i, d in enumerate(descriptions or []))
        with open(path + ".aux.xml", "w") as f:
            f.write(f"<PAMDataset><Metadata>{items}</Metadata>{bands}</PAMDataset>\n")


class PartialRaster:
    """Positional window writes into a raster made by `create_partial_raster` (native byte order, as GDAL wrote
    its header); the file's pages stay in the OS cache, not in this process."""

    def __init__(self, path: str):
        import rasterio

        with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
            if src.driver != "ENVI":
                raise ValueError(f"{path} is a {src.driver} raster, not a partial map")
            self.width, self.height, self.count = src.width, src.height, src.count
            self.dtype = np.dtype(src.dtypes[0])
        self.path = path
        self._fd = os.open(path, os.O_RDWR)

    def write(self, row0: int, col0: int, data: np.ndarray) -> None:
        """Write (rows, cols, count) values at row `row0`, column `col0` (cast to the raster's dtype)."""
        rows, cols, count = data.shape
        if count != self.count or row0 < 0 or col0 < 0 or row0 + rows > self.height or col0 + cols > self.width:
            raise ValueError(f"window {rows}x{cols}x{count} at ({row0}, {col0}) does not fit {self.path} "
                             f"({self.height}x{self.width}x{self.count})")
        data = np.ascontiguousarray(data, dtype=self.dtype)
        pixel = self.count * self.dtype.itemsize
        line = self.width * pixel
        for i in range(rows):
            os.pwrite(self._fd, data[i].tobytes(), (row0 + i) * line + col0 * pixel)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "PartialRaster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_rows(path: str, row0: int, data: np.ndarray) -> None:
    """Write (D, rows, W) values at row `row0` of a partial raster (NaN = no data in float maps)."""
    with PartialRaster(path) as dst:
        dst.write(row0, 0, data.transpose(1, 2, 0))


# Wide rasters (embedding maps: hundreds of float bands per pixel) get small tiles and no overviews. GDAL (3.10)
# builds overviews of a pixel-interleaved raster band by band, decompressing every tile once per band: for a
# 768-band map that took minutes where the copy itself takes a second (measured). Small tiles keep one tile's
# decompressed bytes, and so a pixel read and the copy's memory, small whatever the map's size.
MAX_OVERVIEW_BANDS = 16
MAX_TILE_BYTES = 4 << 20


def cog_layout(count: int, itemsize: int = 4) -> Tuple[int, bool]:
    """(tile side in pixels, with overviews) of the COG of a `count`-band raster."""
    if count <= MAX_OVERVIEW_BANDS:
        return 256, True
    side = 256
    while side > 16 and side * side * count * itemsize > MAX_TILE_BYTES:
        side //= 2
    return side, False


def finalize_cog(partial: str, final: str, compress: str = "zstd") -> None:
    """Copy the partial raster into a Cloud-Optimised GeoTIFF (tiled, compressed; overviews for rasters of few
    bands, see `cog_layout`) at `final`, with the descriptions, tags and colours `create_partial_raster` recorded.

    Float embeddings compress ~4x less than imagery whatever the codec; level-1 ZSTD with the floating-point
    predictor is ~2x faster than DEFLATE at the same size (measured on a 768-band map). Maps without overviews
    are written by the GTiff driver with the COG layout (``COPY_SRC_OVERVIEWS``: header and tile index first, the
    same file the COG driver writes), because their small tiles are below the smallest that the COG driver's
    ``BLOCKSIZE`` option declares (128) and GDAL would warn on every copy."""
    import rasterio
    from rasterio.shutil import copy as rio_copy

    codec = compress.upper()
    # our own work file: its .aux.xml is read (PAM), whatever the input-reading policy around this call says
    with rasterio.Env(GDAL_PAM_ENABLED="YES", GDAL_DISABLE_READDIR_ON_OPEN="FALSE"):
        with rasterio.open(partial) as src:
            dtype = np.dtype(src.dtypes[0])
            side, overviews = cog_layout(src.count, dtype.itemsize)
        tmp = os.path.join(os.path.dirname(partial), "final_cog.tif")
        common = {"COMPRESS": codec, "BIGTIFF": "IF_SAFER", "NUM_THREADS": "ALL_CPUS"}
        if overviews:
            opts = dict(driver="COG", BLOCKSIZE=side, OVERVIEWS="AUTO", OVERVIEW_RESAMPLING=(
                "NEAREST" if dtype.kind in "iu" else "AVERAGE"), **common)
            if codec in ("ZSTD", "DEFLATE"):
                opts.update(PREDICTOR="YES", LEVEL=1)
        else:
            opts = dict(driver="GTiff", TILED="YES", BLOCKXSIZE=side, BLOCKYSIZE=side, COPY_SRC_OVERVIEWS="YES",
                        INTERLEAVE="PIXEL", **common)
            if codec in ("ZSTD", "DEFLATE"):
                level = "ZSTD_LEVEL" if codec == "ZSTD" else "ZLEVEL"
                opts.update({"PREDICTOR": 3 if dtype.kind == "f" else 2, level: 1})
        with bounded_gdal_cache():
            rio_copy(partial, tmp, **opts)
    os.replace(tmp, final)


def write_table(path: str, columns: Dict[str, Any], types: Optional[Dict[str, Any]] = None) -> None:
    """A parquet shard (plain pyarrow table) written atomically; 2-D arrays become fixed-size float32 lists,
    `types` fixes the arrow type of columns that may be all-null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for k, v in columns.items():
        if isinstance(v, np.ndarray) and v.ndim == 2:
            flat = pa.array(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
            arrays[k] = pa.FixedSizeListArray.from_arrays(flat, v.shape[1])
        else:
            arrays[k] = pa.array(v, type=(types or {}).get(k))
    tmp = f"{path}.tmp{os.getpid()}"
    pq.write_table(pa.table(arrays), tmp)
    os.replace(tmp, path)


def combine_shards(shards: Sequence[str], out: str) -> None:
    """Concatenate parquet shards (same schema) into one file, atomically, one shard in memory at a time."""
    import pyarrow.parquet as pq

    if not shards:
        raise ValueError(f"no chip tables to combine into {out}")
    tmp = f"{out}.tmp{os.getpid()}"
    writer = None
    for shard in shards:
        table = pq.read_table(shard)
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table.cast(writer.schema))
    writer.close()
    os.replace(tmp, out)
