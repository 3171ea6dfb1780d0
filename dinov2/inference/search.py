"""Similarity search over the chip embeddings of `chips.parquet` (cosine similarity, exact)."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


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
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    df = pd.read_parquet(chips, columns=["chip_id", "scene", "bbox_wgs84", "lon", "lat", column])
    if chip_id is not None:
        hits = np.flatnonzero(df["chip_id"].to_numpy() == chip_id)
        if not len(hits):
            raise ValueError(f"chip id {chip_id!r} is not in {chips} (e.g. {df['chip_id'].iloc[0]!r})")
        q = int(hits[0])
    else:
        lon, lat = float(lonlat[0]), float(lonlat[1])
        box = pd.DataFrame(list(df["bbox_wgs84"]))
        inside = ((box["xmin"] <= lon) & (lon <= box["xmax"]) & (box["ymin"] <= lat) & (lat <= box["ymax"])).to_numpy()
        if not inside.any():
            raise ValueError(f"no chip in {chips} contains lon={lon}, lat={lat}")
        cand = np.flatnonzero(inside)  # overlapping chips: take the one whose centre is nearest
        q = int(cand[np.argmin((df["lon"].to_numpy()[cand] - lon) ** 2 + (df["lat"].to_numpy()[cand] - lat) ** 2)])
    emb = np.stack(df[column].to_numpy()).astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sim = emb @ emb[q]
    order = np.argsort(-sim, kind="stable")[:k]
    out = df.iloc[order].drop(columns=[column]).reset_index(drop=True)
    out.insert(1, "similarity", sim[order])
    return out
