"""Approximate-nearest-neighbour index over the chips of an embed output (``panopticon index``).

The index lives beside the chip table in ``<out>/chips.index/``: ``<embedding>.usearch`` (an HNSW graph over the
unit-normalised embeddings, cosine metric, vectors stored in float16 by default), ``meta.parquet`` (one row per
key: chip id, scene, centre, WGS84 bbox, time, part — the columns a search reports and filters on, no
embeddings) and ``manifest.json`` (the parts indexed, by size and modification time, with their key ranges).

usearch (HNSW) rather than FAISS: one small wheel with no BLAS, float16/int8 storage, an index that is served
memory-mapped from disk (`view`), so a query neither loads every vector nor the whole graph into memory, and
incremental additions — a new scene's part is appended without rebuilding. Keys are row numbers in part order.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from dinov2.inference.chips_table import chip_parts, decode_embeddings, open_part, part_info, valid_rows
from dinov2.inference.output_store import local_chips

logger = logging.getLogger("dinov2")
INDEX_FORMAT = "panopticon-index/1"
EMBEDDINGS = {"mean": "mean_embedding", "cls": "cls_embedding"}
META_COLUMNS = ("chip_id", "scene", "lon", "lat", "bbox_wgs84", "datetime")
INDEX_DTYPES = ("f32", "f16", "i8")


@dataclass
class IndexSettings:
    """HNSW parameters (usearch names): graph degree, and candidate-list sizes when adding and searching."""

    dtype: str = "f16"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 128


def load_usearch():
    """usearch's ``Index`` class, imported only after PROJ has started.

    usearch's compiled module links its own C++ runtime; loaded before PROJ, it leaves PROJ (pyproj's and the one
    inside rasterio) unable to read its database for the rest of the process ("cannot build unit of measure
    EPSG:9001: non double value"). Started first, PROJ keeps working and usearch is unaffected."""
    try:
        import pyproj

        pyproj.CRS.from_epsg(4326).to_wkt()
    except ImportError:  # without pyproj nothing in this process uses PROJ through it
        pass
    from usearch.index import Index

    return Index


def index_dir(chips: str) -> str:
    """``<out>/chips.index`` of an output folder, its ``chips.parquet`` or a part in it."""
    p = os.path.abspath(os.path.expanduser(str(chips)))
    if os.path.basename(p) == "chips.parquet":
        p = os.path.dirname(p)
    elif p.endswith(".parquet") and os.path.basename(os.path.dirname(p)) == "chips.parquet":
        p = os.path.dirname(os.path.dirname(p))
    return os.path.join(p, "chips.index")


def _part_stamp(path: str) -> List[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _read_manifest(folder: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"index manifest {path} is unreadable ({e}); delete {folder} and run `panopticon index` "
                         "again") from None
    return m if isinstance(m, dict) and m.get("format") == INDEX_FORMAT else None


def index_status(chips: str, embedding: str = "mean") -> str:
    """'current', 'missing' or a one-line reason why the index does not describe the chip table any more."""
    folder = index_dir(chips)
    m = _read_manifest(folder)
    if m is None or embedding not in m.get("indexes", {}):
        return "missing"
    parts = {os.path.basename(p): _part_stamp(p) for p in chip_parts(chips)}
    indexed = {k: v["stamp"] for k, v in m["parts"].items()}
    new = sorted(set(parts) - set(indexed))
    gone = sorted(set(indexed) - set(parts))
    changed = sorted(k for k in set(parts) & set(indexed) if parts[k] != indexed[k])
    if new or gone or changed:
        what = [f"{len(x)} {name} ({', '.join(x[:3])}{', ...' if len(x) > 3 else ''})"
                for x, name in ((new, "new"), (gone, "removed"), (changed, "changed")) if x]
        return "out of date: parts " + "; ".join(what)
    return "current"


def _part_batches(part: str, columns: Sequence[str], rows_per_batch: int = 8192):
    f = open_part(part, ("chip_id",))
    have = set(f.schema_arrow.names)
    yield from f.iter_batches(batch_size=rows_per_batch, columns=[c for c in columns if c in have])


def build_index(chips: str, embeddings: Sequence[str] = ("mean",), settings: Optional[IndexSettings] = None,
                progress: bool = True, rebuild: bool = False) -> Dict[str, Any]:
    """Build (or extend with new parts) the index of `chips` (output folder or its chips.parquet); returns a
    summary: rows, parts added, whether it was rebuilt, the folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dinov2.utils.progress import progress_bar

    Index = load_usearch()
    chips = local_chips(chips)  # object storage: a local mirror of its parts, updated
    settings = settings or IndexSettings()
    if settings.dtype not in INDEX_DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(INDEX_DTYPES)}, got {settings.dtype!r}")
    for e in embeddings:
        if e not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}, got {e!r}")
    parts = chip_parts(chips)
    folder = index_dir(chips)
    os.makedirs(folder, exist_ok=True)
    old = None if rebuild else _read_manifest(folder)
    stamps = {os.path.basename(p): _part_stamp(p) for p in parts}
    params = {"dtype": settings.dtype, "connectivity": settings.connectivity}
    if old is not None:
        indexed = {k: v["stamp"] for k, v in old["parts"].items()}
        same = (all(stamps.get(k) == v for k, v in indexed.items()) and old.get("params") == params
                and all(e in old["indexes"] for e in embeddings)
                and all(os.path.isfile(os.path.join(folder, f"{e}.usearch")) for e in old["indexes"]))
        if not same:
            logger.info("index: parts changed or settings differ since %s was built; rebuilding", folder)
            old = None
    todo = [p for p in parts if old is None or os.path.basename(p) not in old["parts"]]
    infos = {part_info(p).get("model_digest") for p in parts}
    if len(infos) > 1:
        raise ValueError(f"{chips}: parts come from {len(infos)} different models; an index serves one model")
    next_key = 0 if old is None else int(old["rows"])
    names = list(embeddings) if old is None else list(old["indexes"])
    indexes = {}
    for e in names:
        path = os.path.join(folder, f"{e}.usearch")
        if old is not None:
            indexes[e] = Index.restore(path, view=False)
        else:
            indexes[e] = None  # created at the first batch, once the width is known
    meta_tables = [] if old is None else [pq.read_table(os.path.join(folder, "meta.parquet"))]
    manifest_parts = {} if old is None else dict(old["parts"])
    skipped = 0
    total = sum(open_part(p, [c for e in names for c in (EMBEDDINGS[e],)]).metadata.num_rows for p in todo)
    bar = progress_bar(total=total, unit="chip", desc="index", enabled=progress)
    cols = list(META_COLUMNS) + [c for e in names for c in (EMBEDDINGS[e], EMBEDDINGS[e] + "_scale")]
    for part in todo:
        start = next_key
        for batch in _part_batches(part, cols):
            n = batch.num_rows
            keys = np.arange(next_key, next_key + n, dtype=np.uint64)
            vectors = {e: decode_embeddings(batch, EMBEDDINGS[e]) for e in names}
            usable = np.logical_and.reduce([valid_rows(x) for x in vectors.values()])
            skipped += int((~usable).sum())
            for e, x in vectors.items():
                if indexes[e] is None:
                    indexes[e] = Index(ndim=x.shape[1], metric="cos", dtype=settings.dtype,
                                       connectivity=settings.connectivity, expansion_add=settings.expansion_add,
                                       expansion_search=settings.expansion_search)
                if usable.any():
                    indexes[e].add(keys[usable], x[usable])
            meta = {c: batch.column(c) for c in META_COLUMNS if c in batch.schema.names}
            meta["key"] = pa.array(keys.astype(np.int64))
            meta["part"] = pa.array([os.path.basename(part)] * n)
            meta_tables.append(pa.table(meta).filter(pa.array(usable)))
            next_key += n
            bar.update(n)
        manifest_parts[os.path.basename(part)] = {"stamp": stamps[os.path.basename(part)],
                                                  "keys": [start, next_key]}
    bar.close()
    if skipped:
        logger.warning("index: %d chips have no valid embedding (not finite or all zeros) and are not indexed",
                       skipped)
    if next_key == 0:
        raise ValueError(f"{chips}: the chip table has no rows; nothing to index")
    for e, idx in indexes.items():
        tmp = os.path.join(folder, f".{e}.usearch.tmp")
        idx.save(tmp)
        os.replace(tmp, os.path.join(folder, f"{e}.usearch"))
    meta = pa.concat_tables(meta_tables, promote_options="default")
    tmp = os.path.join(folder, ".meta.parquet.tmp")
    pq.write_table(meta, tmp, row_group_size=4096, compression="zstd")
    os.replace(tmp, os.path.join(folder, "meta.parquet"))
    manifest = {"format": INDEX_FORMAT, "rows": next_key, "parts": manifest_parts, "params": params,
                "indexes": {e: {"ndim": int(indexes[e].ndim)} for e in indexes},
                "model_digest": next(iter(infos))}
    tmp = os.path.join(folder, ".manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "manifest.json"))
    return {"folder": folder, "rows": next_key, "added_parts": len(todo), "rebuilt": old is None,
            "embeddings": sorted(indexes)}


class ChipIndex:
    """A built index opened for queries (memory-mapped; safe to keep open across queries)."""

    def __init__(self, chips: str, embedding: str = "mean", expansion_search: Optional[int] = None):
        Index = load_usearch()
        self.folder = index_dir(chips)
        m = _read_manifest(self.folder)
        if m is None or embedding not in m["indexes"]:
            raise FileNotFoundError(f"no {embedding} index in {self.folder}; run `panopticon index` first")
        self.manifest, self.embedding = m, embedding
        self.index = Index.restore(os.path.join(self.folder, f"{embedding}.usearch"), view=True)
        if expansion_search:
            self.index.expansion_search = int(expansion_search)
        self.meta_path = os.path.join(self.folder, "meta.parquet")

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def meta(self, filters=None, columns: Optional[Sequence[str]] = None):
        """Rows of meta.parquet (pyarrow table) matching a pyarrow filter expression."""
        import pyarrow.parquet as pq

        return pq.read_table(self.meta_path, filters=filters, columns=list(columns) if columns else None)

    def vectors(self, keys: np.ndarray) -> np.ndarray:
        """Stored vectors of `keys` as float32 (unit length up to the storage precision)."""
        v = self.index.get(np.asarray(keys, np.uint64), dtype="f32")
        return np.asarray(v, np.float32).reshape(len(keys), -1)

    def search(self, query: np.ndarray, count: int) -> tuple:
        """(keys, cosine similarities) of the `count` approximate nearest neighbours of `query`."""
        count = int(min(count, len(self)))
        m = self.index.search(np.asarray(query, np.float32), count)
        return np.asarray(m.keys, np.int64), 1.0 - np.asarray(m.distances, np.float64)
