"""Similarity search over the chip embeddings of `chips.parquet` (cosine similarity, exact).

Rows whose embedding is not finite or all zeros have no valid embedding: they are never returned (the number
left out is logged), and a query chip without one is refused. A file that is not a chip table, or an empty one,
raises naming the file.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import numpy as np

logger = logging.getLogger("dinov2")
NEEDED = ("chip_id", "scene", "bbox_wgs84", "lon", "lat")


def read_chip_table(chips: str, column: str):
    """The columns search needs from a chips.parquet; errors name the file."""
    import pandas as pd
    import pyarrow as pa

    from dinov2.data.raster_open import check_regular_file

    check_regular_file(chips, "chip table")
    try:
        df = pd.read_parquet(chips, columns=[*NEEDED, column])
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{chips} is not a chip table written by `panopticon embed` (needs columns "
                         f"{[*NEEDED, column]}): {str(e).splitlines()[0]}") from None
    if df.empty:
        raise ValueError(f"{chips} holds no chips (an empty table); nothing to search")
    return df


def search_chips(chips: str, k: int = 10, chip_id: Optional[str] = None,
                 lonlat: Optional[Tuple[float, float]] = None, embedding: str = "mean"):
    """The `k` chips most similar to a query chip (`chip_id`) or to the chip containing a WGS84 point
    (`lonlat`), as a DataFrame sorted by cosine `similarity` (the query itself comes first)."""
    import pandas as pd

    column = {"mean": "mean_embedding", "cls": "cls_embedding"}.get(embedding)
    if column is None:
        raise ValueError(f"embedding must be 'mean' or 'cls', got {embedding!r}")
    if (chip_id is None) == (lonlat is None):
        raise ValueError("give exactly one query: a chip id or a lon/lat point")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"-k must be a positive integer, got {k!r}")
    df = read_chip_table(chips, column)
    try:
        emb = np.stack(df[column].to_numpy()).astype(np.float64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{chips}: column {column} does not hold equal-length embeddings ({e})") from None
    norms = np.linalg.norm(emb, axis=1)
    usable = np.isfinite(emb).all(1) & (norms > 0)
    if chip_id is not None:
        hits = np.flatnonzero(df["chip_id"].to_numpy() == chip_id)
        if not len(hits):
            raise ValueError(f"chip id {chip_id!r} is not in {chips} (e.g. {df['chip_id'].iloc[0]!r})")
        q = int(hits[0])
    else:
        lon, lat = float(lonlat[0]), float(lonlat[1])
        if not (np.isfinite(lon) and np.isfinite(lat)):
            raise ValueError(f"--lonlat must be finite numbers, got {lon}, {lat}")
        box = pd.DataFrame(list(df["bbox_wgs84"]))
        inside = ((box["xmin"] <= lon) & (lon <= box["xmax"]) & (box["ymin"] <= lat) & (lat <= box["ymax"])).to_numpy()
        if not inside.any():
            raise ValueError(f"no chip in {chips} contains lon={lon}, lat={lat}")
        cand = np.flatnonzero(inside & usable) if (inside & usable).any() else np.flatnonzero(inside)
        # overlapping chips: take the one whose centre is nearest
        q = int(cand[np.argmin((df["lon"].to_numpy()[cand] - lon) ** 2 + (df["lat"].to_numpy()[cand] - lat) ** 2)])
    if not usable[q]:
        raise ValueError(f"query chip {df['chip_id'].iloc[q]!r} in {chips} has no valid {embedding} embedding "
                         "(not finite or all zeros)")
    if not usable.all():
        logger.warning("search: %d of %d chips in %s have no valid %s embedding and are left out",
                       int((~usable).sum()), len(df), chips, embedding)
    emb = np.where(usable[:, None], emb, 0.0) / np.where(usable, norms, 1.0)[:, None]
    sim = emb @ emb[q]
    cand = np.flatnonzero(usable)
    order = cand[np.argsort(-sim[cand], kind="stable")][:k]
    out = df.iloc[order].drop(columns=[column]).reset_index(drop=True)
    out.insert(1, "similarity", sim[order])
    return out
