"""Rows of the chip table (``chips.parquet``): one per embedded chip, with its footprint, WGS84 box and centre,
source, band description and CLS / mean-pooled patch embeddings."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

COLUMNS = ("chip_id", "scene", "chip_row", "chip_col", "row_px", "col_px", "height_px", "width_px",
           "valid_fraction", "n_valid_patches", "footprint_wkb", "bbox_wgs84", "lon", "lat")


def chip_rows(scene, reader, grid, patch_size: int, dim: int, strip: int,
              results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Columns of the chip-table shard of one strip; `results` hold per chip ``ci``, ``cls``, ``mean``,
    ``n_valid`` and ``valid_fraction``."""
    import shapely
    from rasterio.warp import transform as warp_points
    from rasterio.warp import transform_bounds

    g, ps, n = reader.grid, patch_size, grid.chip
    r0 = grid.row_starts[strip] * ps
    cols: Dict[str, list] = {k: [] for k in COLUMNS}
    cls, mean = [], []
    crs = reader.crs
    for r in results:
        c0 = grid.col_starts[r["ci"]] * ps
        h, w = min(n * ps, g.height - r0), min(n * ps, g.width - c0)
        x0, y1 = g.left + c0 * g.res, g.top - r0 * g.res
        x1, y0 = x0 + w * g.res, y1 - h * g.res
        west, south, east, north = transform_bounds(crs, "EPSG:4326", x0, y0, x1, y1, densify_pts=21)
        (lon,), (lat,) = warp_points(crs, "EPSG:4326", [(x0 + x1) / 2], [(y0 + y1) / 2])
        for key, value in (("chip_id", f"{scene.name}:r{strip}c{r['ci']}"), ("scene", scene.name),
                           ("chip_row", strip), ("chip_col", r["ci"]), ("row_px", r0), ("col_px", c0),
                           ("height_px", h), ("width_px", w), ("valid_fraction", r["valid_fraction"]),
                           ("n_valid_patches", r["n_valid"]),
                           ("footprint_wkb", shapely.to_wkb(shapely.box(x0, y0, x1, y1))),
                           ("bbox_wgs84", {"xmin": west, "ymin": south, "xmax": east, "ymax": north}),
                           ("lon", float(lon)), ("lat", float(lat))):
            cols[key].append(value)
        cls.append(r["cls"])
        mean.append(r["mean"])
    k = len(results)
    cols.update(sensor=[scene.sensor] * k, bands=[scene.bands] * k, chn_ids=[scene.chn_ids] * k,
                source_files=[scene.files] * k, datetime=[scene.datetime] * k, crs=[crs.to_string()] * k,
                cls_embedding=np.asarray(cls, np.float32).reshape(k, dim),
                mean_embedding=np.asarray(mean, np.float32).reshape(k, dim))
    return cols
