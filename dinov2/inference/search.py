"""Similarity search over the chips of an embed output (cosine similarity).

With an index built by `panopticon index` (``<out>/chips.index``) a query reads the query chip's vector from the
index, its approximate neighbours from the HNSW graph and their descriptions from the index's small metadata
table — no embedding column is read. Without an index, or with ``exact=True``, the chip table is scanned part by
part and row group by row group, keeping only the best k (memory does not grow with the table). An index that no
longer matches the chip table (parts added, removed or rewritten since it was built) is not used: the search
falls back to the exact scan and says so.
"""
from __future__ import annotations

import heapq
import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from dinov2.inference.chips_table import chip_parts, decode_embeddings, open_part, valid_rows
from dinov2.inference.index import EMBEDDINGS, META_COLUMNS, ChipIndex, index_status
from dinov2.inference.output_store import local_chips

logger = logging.getLogger("dinov2")
EXACT_CANDIDATES = 20000  # a filter leaving at most this many chips is answered exactly from the index's vectors


@dataclass
class ChipFilter:
    """Which chips may be returned: WGS84 bbox (W, S, E, N) intersecting the chip's, and an inclusive time range
    (ISO dates/times; either end may be None)."""

    bbox: Optional[Tuple[float, float, float, float]] = None
    start: Optional[np.datetime64] = None
    end: Optional[np.datetime64] = None

    @classmethod
    def parse(cls, bbox: Optional[Sequence[float]] = None, datetime: Optional[str] = None) -> "ChipFilter":
        """From ``--bbox W,S,E,N`` values and ``--datetime START/END`` (``..`` or empty = open end)."""
        box = None
        if bbox is not None:
            box = tuple(float(v) for v in bbox)
            if len(box) != 4 or not all(np.isfinite(box)) or box[0] > box[2] or box[1] > box[3]:
                raise ValueError(f"--bbox must be W,S,E,N with W <= E and S <= N, got {bbox}")
        start = end = None
        if datetime:
            ends = str(datetime).split("/")
            if len(ends) > 2:
                raise ValueError(f"--datetime must be START/END or one instant, got {datetime!r}")
            ends = ends * 2 if len(ends) == 1 else ends
            try:
                start, end = (None if e in ("", "..") else _instant(e) for e in ends)
            except ValueError:
                raise ValueError(f"--datetime {datetime!r}: expected ISO dates/times such as "
                                 "2024-06-01/2024-06-30T23:59:59") from None
        return cls(box, start, end)

    @property
    def active(self) -> bool:
        return self.bbox is not None or self.start is not None or self.end is not None

    def mask(self, table) -> np.ndarray:
        """Rows of an arrow table (with bbox_wgs84 and datetime) that pass the filter."""
        n = table.num_rows
        keep = np.ones(n, bool)
        if self.bbox is not None:
            b = table.column("bbox_wgs84")
            get = lambda f: np.asarray(b.combine_chunks().field(f) if hasattr(b, "combine_chunks")  # noqa: E731
                                       else b.field(f), np.float64)
            w, s, e, nn = self.bbox
            keep &= (get("xmin") <= e) & (get("xmax") >= w) & (get("ymin") <= nn) & (get("ymax") >= s)
        if self.start is not None or self.end is not None:
            times = np.array([_instant(t) if t else np.datetime64("NaT") for t in
                              table.column("datetime").to_pylist()], dtype="datetime64[s]")
            ok = ~np.isnat(times)
            if self.start is not None:
                ok &= times >= self.start
            if self.end is not None:
                ok &= times <= self.end
            keep &= ok
        return keep


def _instant(text: str) -> np.datetime64:
    t = str(text).strip().replace("Z", "").split("+")[0]
    return np.datetime64(t, "s")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _locate_query(parts: List[str], chip_id: Optional[str], lonlat, column: str):
    """(query unit vector, chip id) from the chip table, reading only the part and row group that hold it."""
    import pyarrow.dataset as ds

    if chip_id is not None:
        scene = chip_id.rsplit(":", 1)[0]
        named = [p for p in parts if os.path.basename(p) == f"{scene}.parquet"]
        for part in named or parts:  # chip ids are '<scene>:r<i>c<j>' and parts '<scene>.parquet'
            f = open_part(part, ("chip_id", column))
            for rg in range(f.num_row_groups):
                ids = f.read_row_group(rg, columns=["chip_id"]).column("chip_id").to_pylist()
                if chip_id in ids:
                    row = ids.index(chip_id)
                    cols = [c for c in (column, column + "_scale") if c in f.schema_arrow.names]
                    t = f.read_row_group(rg, columns=cols).slice(row, 1)
                    return _unit(decode_embeddings(t, column)[0]), chip_id
        first = open_part(parts[0])
        where = parts[0] if len(parts) == 1 else os.path.dirname(parts[0])
        if sum(open_part(p).metadata.num_rows for p in parts) == 0:
            raise ValueError(f"{where} holds no chips (an empty table); nothing to search")
        example = first.read_row_group(0, columns=["chip_id"]).column("chip_id")[0].as_py() \
            if first.metadata.num_row_groups and first.metadata.row_group(0).num_rows else None
        raise ValueError(f"chip id {chip_id!r} is not in {where}" + (f" (e.g. {example!r})" if example else ""))
    lon, lat = float(lonlat[0]), float(lonlat[1])
    if not (np.isfinite(lon) and np.isfinite(lat)):
        raise ValueError(f"--lonlat must be finite numbers, got {lon}, {lat}")
    b = {f: ds.field(("bbox_wgs84", f)) for f in ("xmin", "ymin", "xmax", "ymax")}
    expr = (b["xmin"] <= lon) & (b["xmax"] >= lon) & (b["ymin"] <= lat) & (b["ymax"] >= lat)
    for p in parts:
        open_part(p, ("chip_id", "lon", "lat", "bbox_wgs84"))
    t = ds.dataset(parts, format="parquet").to_table(columns=["chip_id", "lon", "lat"], filter=expr)
    if t.num_rows == 0:
        raise ValueError(f"no chip in {os.path.dirname(parts[0]) if len(parts) > 1 else parts[0]} contains "
                         f"lon={lon}, lat={lat}")
    d2 = (t.column("lon").to_numpy() - lon) ** 2 + (t.column("lat").to_numpy() - lat) ** 2
    return _locate_query(parts, t.column("chip_id")[int(np.argmin(d2))].as_py(), None, column)


def _exact(parts: List[str], q: np.ndarray, k: int, column: str, flt: ChipFilter, qid: str):
    """Top-k rows by a streaming scan: [(similarity, {meta})] best first."""
    best: List[Tuple[float, int, Dict[str, Any]]] = []  # min-heap of (sim, -order, row)
    order = invalid = 0
    for part in parts:
        f = open_part(part, ("chip_id", column))
        names = set(f.schema_arrow.names)
        cols = [c for c in (*META_COLUMNS, column, column + "_scale") if c in names]
        for batch in f.iter_batches(batch_size=8192, columns=cols):
            x = decode_embeddings(batch, column)
            usable = valid_rows(x)
            invalid += int((~usable).sum())
            sim = _unit(np.where(usable[:, None], x, 0.0)) @ q
            ok = usable & (flt.mask(batch) if flt.active else True)
            idx = np.flatnonzero(ok)
            if len(idx) > k:
                idx = idx[np.argpartition(-sim[idx], k - 1)[:k]]
            for i in idx:
                item = (float(sim[i]), -(order + int(i)), i)
                if len(best) < k:
                    heapq.heappush(best, (*item[:2], _row(batch, i)))
                elif item[:2] > best[0][:2]:
                    heapq.heapreplace(best, (*item[:2], _row(batch, i)))
            order += batch.num_rows
    if invalid:
        logger.warning("search: %d chips have no valid %s (not finite or all zeros) and are left out", invalid, column)
    return [(s, r) for s, _, r in sorted(best, key=lambda t: (-t[0], -t[1]))]


def _row(table, i: int) -> Dict[str, Any]:
    return {c: table.column(c)[int(i)].as_py() for c in META_COLUMNS if c in table.schema.names}


def _indexed(index: ChipIndex, q: np.ndarray, k: int, flt: ChipFilter):
    """Top-k by the ANN index (exact over the candidates when a filter leaves few): [(similarity, key)]."""
    if not flt.active:
        keys, sims = index.search(q, k)
        return list(zip(sims.tolist(), keys.tolist()))
    cand = index.meta(columns=["key", "bbox_wgs84", "datetime"])
    keys = cand.column("key").to_numpy()[flt.mask(cand)]
    if len(keys) == 0:
        return []
    if len(keys) <= EXACT_CANDIDATES:
        sims = np.concatenate([index.vectors(keys[a:a + 4096]) @ q for a in range(0, len(keys), 4096)])
        top = np.argsort(-sims, kind="stable")[:k]
        return list(zip(sims[top].tolist(), keys[top].tolist()))
    allowed = set(keys.tolist())
    count = k * max(2, int(2 * len(index) / len(keys)))
    while True:  # over-fetch until k results pass the filter (or the whole index was returned)
        got, sims = index.search(q, count)
        hits = [(s, key) for s, key in zip(sims.tolist(), got.tolist()) if key in allowed]
        if len(hits) >= k or count >= len(index):
            return hits[:k]
        count = min(len(index), count * 4)


def search_chips(chips: str, k: int = 10, chip_id: Optional[str] = None,
                 lonlat: Optional[Tuple[float, float]] = None, embedding: str = "mean",
                 bbox: Optional[Sequence[float]] = None, datetime: Optional[str] = None, exact: bool = False):
    """The `k` chips most similar to a query chip (`chip_id`) or to the chip containing a WGS84 point
    (`lonlat`), optionally restricted to chips intersecting `bbox` (W, S, E, N) and within `datetime`
    (``START/END``), as a DataFrame sorted by cosine `similarity` (the query itself first when it passes the
    filters). Uses the index of ``panopticon index`` when it is current, unless `exact`."""
    import pandas as pd
    chips = local_chips(chips)  # object storage: a local mirror of its parts, updated

    column = EMBEDDINGS.get(embedding)
    if column is None:
        raise ValueError(f"embedding must be 'mean' or 'cls', got {embedding!r}")
    if (chip_id is None) == (lonlat is None):
        raise ValueError("give exactly one query: a chip id or a lon/lat point")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    flt = ChipFilter.parse(bbox, datetime)
    parts = chip_parts(chips)
    q, qid = _locate_query(parts, chip_id, lonlat, column)
    if not valid_rows(q[None])[0]:
        raise ValueError(f"query chip {qid!r} in {chips} has no valid {embedding} embedding (not finite or all "
                         "zeros)")
    status = "exact" if exact else index_status(chips, embedding)
    if status == "current":
        index = ChipIndex(chips, embedding)
        hits = _indexed(index, q, k + 1, flt)
        meta = index.meta(filters=[("key", "in", [key for _, key in hits])] if hits else None)
        by_key = {key: _row(meta, i) for i, key in enumerate(meta.column("key").to_pylist())}
        rows = [(s, by_key[key]) for s, key in hits]
    else:
        if status not in ("exact", "missing"):
            logger.warning("search: the index %s; searching exactly (run `panopticon index` to update it)", status)
        rows = _exact(parts, q, k + 1, column, flt, qid)
    own = [r for r in rows if r[1].get("chip_id") == qid]  # the query first, whatever ties or rounding say
    rows = (own + [r for r in rows if r[1].get("chip_id") != qid])[:k]
    out = pd.DataFrame([{"chip_id": r["chip_id"], "similarity": s, **{c: r.get(c) for c in META_COLUMNS[1:]}}
                        for s, r in rows], columns=["chip_id", "similarity", *META_COLUMNS[1:]])
    return out
