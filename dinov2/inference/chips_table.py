"""The chip table of an embed output: a partitioned GeoParquet dataset, one part per scene.

``<out>/chips.parquet/`` is a folder of ``<scene>.parquet`` parts that geopandas, pandas and pyarrow read as one
table (``gpd.read_parquet("out/chips.parquet")``) and DuckDB as a glob (``'out/chips.parquet/*.parquet'``). Every
part has the same schema and the same GeoParquet 1.1 metadata, so the parts concatenate without conversion:

- ``geometry``: the chip footprint in WGS84 (lon/lat, OGC:CRS84), with ``bbox`` declared as its bounding-box
  *covering* column: readers filter by area using row-group statistics instead of reading every row (geopandas
  hides a covering column; ``bbox_wgs84`` holds the same values as an ordinary column);
- ``footprint_wkb`` + ``crs``: the footprint in the scene's own CRS (WKB), as a plain column;
- rows in Hilbert order of the chip centres, grouped into row groups of ~32 MB, ZSTD-compressed;
- embeddings (``cls_embedding``, ``mean_embedding``) as fixed-size lists of float32, float16, or int8 with a
  per-vector float32 scale (``<column>_scale``, value = int8 x scale; symmetric, the largest magnitude maps to 127).

Each part's key-value metadata ``panopticon`` records what produced it (format, model digest, embedding dtype):
parts made by different models never share a dataset (see `check_compatible`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

PART_FORMAT = "panopticon-chips/3"
EMBEDDING_COLUMNS = ("cls_embedding", "mean_embedding")
EMBEDDING_DTYPES = ("float32", "float16", "int8")
ROW_GROUP_BYTES = 32 << 20
META_KEY = b"panopticon"


def encode_embeddings(x: np.ndarray, dtype: str) -> Tuple[Any, Optional[Any]]:
    """(fixed-size list array, per-vector scale array or None) of (N, D) float embeddings in `dtype`."""
    import pyarrow as pa

    if dtype not in EMBEDDING_DTYPES:
        raise ValueError(f"embedding dtype must be one of {', '.join(EMBEDDING_DTYPES)}, got {dtype!r}")
    x = np.asarray(x, np.float32)
    n, d = x.shape
    scale = None
    if dtype == "int8":
        peak = np.abs(x).max(axis=1)
        s = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
        x = np.clip(np.rint(x / s[:, None]), -127, 127).astype(np.int8)
        scale = pa.array(s, pa.float32())
    elif dtype == "float16":
        x = x.astype(np.float16)
    flat = pa.array(np.ascontiguousarray(x).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, d), scale


def decode_embeddings(table, column: str) -> np.ndarray:
    """(N, D) float32 embeddings of `column` of an arrow table or record batch, whatever their stored dtype."""
    col = table.column(column)
    chunks = col.chunks if hasattr(col, "chunks") else [col]
    if col.null_count:
        raise ValueError(f"column {column} has {col.null_count} missing embeddings")
    parts = []
    for c in chunks:  # fixed-size lists as written; plain lists as some engines (DuckDB) hand them back
        flat = c.flatten().to_numpy(zero_copy_only=False)
        d = getattr(c.type, "list_size", None) or (len(flat) // max(len(c), 1))
        if d * len(c) != len(flat):
            raise ValueError(f"column {column}: embeddings of unequal length")
        parts.append(flat.reshape(len(c), d))
    x = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    scale_col = f"{column}_scale"
    if scale_col in table.schema.names:
        x *= np.asarray(table.column(scale_col).to_numpy(zero_copy_only=False), np.float32)[:, None]
    return x


def valid_rows(x: np.ndarray) -> np.ndarray:
    """Rows of (N, D) embeddings that are embeddings at all: finite and not all zeros."""
    x = np.asarray(x)
    return np.isfinite(x).all(axis=-1) & (np.abs(np.nan_to_num(x)).sum(axis=-1) > 0)


def hilbert_order(x: np.ndarray, y: np.ndarray, bits: int = 16) -> np.ndarray:
    """Indices that sort points (x, y) along a Hilbert curve over their extent (2^bits cells per side): nearby
    rows stay nearby on the ground, so row groups cover compact areas."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2:
        return np.arange(len(x))
    side = (1 << bits) - 1

    def scaled(v: np.ndarray) -> np.ndarray:
        lo, hi = v.min(), v.max()
        return np.zeros(len(v), np.int64) if hi <= lo else np.rint((v - lo) / (hi - lo) * side).astype(np.int64)

    xi, yi = scaled(x), scaled(y)
    d = np.zeros(len(x), np.int64)
    s = 1 << (bits - 1)
    while s > 0:  # the classic xy -> d walk, one quadrant level at a time, for all points at once
        rx = (xi & s) > 0
        ry = (yi & s) > 0
        d += s * s * ((3 * rx) ^ ry)
        flip = ~ry
        swap_x = np.where(flip & rx, side - xi, xi)
        swap_y = np.where(flip & rx, side - yi, yi)
        xi, yi = np.where(flip, swap_y, swap_x), np.where(flip, swap_x, swap_y)
        s >>= 1
    return np.argsort(d, kind="stable")


def geo_metadata() -> bytes:
    """GeoParquet 1.1 metadata shared by every part (no file-wide bbox, so all parts' schemas are equal)."""
    covering = {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}
    return json.dumps({"version": "1.1.0", "primary_column": "geometry",
                       "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                                "covering": {"bbox": covering}}}}).encode()


def _wgs84_footprints(wkb: Sequence[bytes], crs: str):
    """Footprints (WKB in `crs`) as WGS84 polygons, edges densified so that the reprojected shape is faithful."""
    import shapely
    from pyproj import Transformer

    geoms = shapely.from_wkb(np.asarray(wkb, dtype=object))
    lengths = np.sqrt(shapely.area(geoms))
    geoms = shapely.segmentize(geoms, np.maximum(lengths / 4, 1e-9))
    t = Transformer.from_crs(crs, "OGC:CRS84", always_xy=True)
    return shapely.transform(geoms, lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _leaf(field) -> str:
    """The parquet column path of an arrow field whose values are to be dictionary-encoded (list values live at
    ``<name>.list.element``; parquet encodings are chosen per leaf)."""
    import pyarrow as pa

    is_list = pa.types.is_list(field.type) or pa.types.is_fixed_size_list(field.type)
    return f"{field.name}.list.element" if is_list else field.name


def write_chip_part(scene_table: str, out: str, dtype: str = "float32",
                    meta: Optional[Dict[str, Any]] = None) -> int:
    """Write the GeoParquet part `out` from a scene's internal chip table (float32 embeddings, footprints in the
    scene CRS), atomically; returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    table = pq.read_table(scene_table)
    if table.num_rows == 0:
        raise ValueError(f"{scene_table} holds no chips")
    crs = table.column("crs")[0].as_py()
    order = hilbert_order(table.column("lon").to_numpy(), table.column("lat").to_numpy())
    table = table.take(pa.array(order))
    geom = _wgs84_footprints(table.column("footprint_wkb").to_pylist(), crs)
    cols = {name: table.column(name) for name in table.schema.names if name not in EMBEDDING_COLUMNS}
    for name in EMBEDDING_COLUMNS:
        values, scale = encode_embeddings(
            table.column(name).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1), dtype)
        cols[name] = values
        if scale is not None:
            cols[f"{name}_scale"] = scale
    b = shapely.bounds(geom)  # the covering must contain its geometry exactly
    cols["bbox"] = pa.StructArray.from_arrays([pa.array(b[:, i], pa.float64()) for i in range(4)],
                                              names=["xmin", "ymin", "xmax", "ymax"])
    cols["geometry"] = pa.array(shapely.to_wkb(geom), pa.binary())
    info = {"format": PART_FORMAT, "embedding_dtype": dtype, **(meta or {})}
    out_table = pa.table(cols).replace_schema_metadata({b"geo": geo_metadata(),
                                                        META_KEY: json.dumps(info, sort_keys=True).encode()})
    row_bytes = max(1, out_table.nbytes // out_table.num_rows)
    tmp = f"{out}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # float embeddings: no dictionary (it never fits and costs ~10 %), byte-stream-split so ZSTD finds the
    # exponent bytes; int8 embeddings and every other column keep dictionary encoding
    floats = [f"{c}.list.element" for c in EMBEDDING_COLUMNS if dtype != "int8"]
    dictionary = [_leaf(f) for f in out_table.schema if f.name not in EMBEDDING_COLUMNS or dtype == "int8"]
    pq.write_table(out_table, tmp, compression="zstd", row_group_size=max(64, ROW_GROUP_BYTES // row_bytes),
                   write_statistics=True, use_dictionary=dictionary, use_byte_stream_split=floats or False)
    os.replace(tmp, out)
    return out_table.num_rows


def chip_parts(path: str) -> List[str]:
    """Parquet files of a chip table: an embed output folder, its ``chips.parquet`` (a folder of parts, or the
    single file of outputs written before parts existed) or one part."""
    from dinov2.data.raster_open import check_regular_file

    p = os.path.expanduser(str(path))
    if os.path.isdir(p) and os.path.exists(os.path.join(p, "chips.parquet")):
        p = os.path.join(p, "chips.parquet")
    if not os.path.isdir(p):  # one file: refused without opening when it is a FIFO, device or missing
        return [check_regular_file(p, "chip table")]
    parts = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".parquet") and not f.startswith("."))
    if not parts:
        raise ValueError(f"{path} holds no chip parts (*.parquet); did `panopticon embed` finish a scene there?")
    return parts


def open_part(path: str, need: Sequence[str] = ("chip_id",)):
    """A part as a ``pyarrow.parquet.ParquetFile``; a file that is not parquet, or lacks the chip table's
    columns, raises ValueError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path} is not a chip table part of `panopticon embed` (unreadable: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = [c for c in need if c not in f.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} is not a chip table part of `panopticon embed` (no column {', '.join(missing)})")
    return f


def part_info(path: str) -> Dict[str, Any]:
    """The ``panopticon`` key-value metadata of a part ({} for files written before parts existed)."""
    raw = (open_part(path, ()).schema_arrow.metadata or {}).get(META_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        raise ValueError(f"{path}: its '{META_KEY.decode()}' metadata is not JSON") from None


def part_rows(path: str) -> int:
    """Number of chips in a part (from the footer; reads no data)."""
    return open_part(path, ()).metadata.num_rows


def check_compatible(parts: Sequence[str], expected: Dict[str, Any], keys=("format", "model_digest",
                                                                          "embedding_dtype"), info_of=None) -> None:
    """Refuse to mix parts that differ from `expected` in `keys` (e.g. another model's embeddings); `info_of`
    reads a part's metadata (default `part_info`; object storage passes its own)."""
    for p in parts:
        info = (info_of or part_info)(p)
        diff = {k: (info.get(k), expected.get(k)) for k in keys if info.get(k) != expected.get(k)}
        if diff:
            what = ", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{p} was written with other settings ({what}); a chip table holds one model's "
                             f"embeddings: use another --output-dir or remove that part")
