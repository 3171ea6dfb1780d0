"""Fixture writers for the user-label and regression datasets, in their real on-disk layouts:

- ``write_hyperview``: the public HYPERVIEW release — ``train_data/<sample_index>.npz`` (a masked array saved as
  ``data`` + ``mask``, 150 bands, varying field sizes) and ``train_gt.csv`` (``sample_index, P, K, Mg, pH``);
  targets are affine in a per-field brightness factor, so they are predictable from the image.
- ``write_chips``: GeoTIFF chips (UTM 32633, 10 m, chips on a regular ground grid) + a labels CSV.
- ``write_label_scene``: a 4-band scene GeoTIFF and an aligned class-id GeoTIFF (class by 160 m blocks, each class
  with its own spectrum and 8 px texture).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


def write_hyperview(root: Path, n: int = 24, seed: int = 0) -> Path:
    import pandas as pd

    rng = np.random.default_rng(seed)
    (root / "train_data").mkdir(parents=True, exist_ok=True)
    base = 500 + 300 * np.sin(np.linspace(0, 3, 150))
    rows = []
    for i in range(n):
        s = rng.uniform(0, 1)
        h, w = rng.integers(11, 24, size=2)
        data = (base[:, None, None] * (1 + s) + rng.normal(0, 5, size=(150, h, w))).astype(np.int16)
        mask = np.zeros_like(data, dtype=bool)
        mask[:, :2, :2] = True  # pixels outside the field
        np.savez(root / "train_data" / f"{i}.npz", data=data, mask=mask)
        rows.append({"sample_index": i, "P": 40 + 60 * s, "K": 150 + 100 * s, "Mg": 120 + 80 * s, "pH": 6 + s})
    pd.DataFrame(rows).to_csv(root / "train_gt.csv", index=False)
    return root


def _write_tif(path: Path, arr: np.ndarray, left: float, top: float, res: float = 10.0, nodata=None,
               crs: int = 32633) -> None:
    import rasterio
    from rasterio.transform import from_origin

    arr = arr if arr.ndim == 3 else arr[None]
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, crs=f"EPSG:{crs}", transform=from_origin(left, top, res, res),
                       nodata=nodata) as dst:
        dst.write(arr)


def write_chips(root: Path, task: str, n_side: int = 6, size: int = 16, n_classes: int = 3, seed: int = 0,
                split_column: bool = False) -> Path:
    """``n_side`` x ``n_side`` chips on a 320 m grid; class (or value) from a smooth spatial field + spectra."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    signature = rng.normal(size=(n_classes, 4)) * 3
    rows: List[Dict] = []
    for j in range(n_side):
        for i in range(n_side):
            left, top = 500000 + 320 * i, 5000000 - 320 * j
            c = int((i + 2 * j) % n_classes)
            texture = rng.normal(size=(size, size))
            arr = (signature[c][:, None, None] + texture[None] + 0.1 * rng.normal(size=(4, size, size)))
            arr = (arr * 100 + 1000).astype(np.float32)
            name = f"chip_{j}_{i}.tif"
            row = {"file": f"chips/{name}"}
            (root / "chips").mkdir(exist_ok=True)
            if task == "segmentation":
                mask = np.full((size, size), c, np.uint8)
                mask[: size // 2] = (c + 1) % n_classes
                arr[:, : size // 2] = ((signature[(c + 1) % n_classes][:, None, None] + texture[None, : size // 2])
                                       * 100 + 1000)
                mask[0, 0] = 255  # unlabelled pixel
                _write_tif(root / "chips" / f"mask_{j}_{i}.tif", mask, left, top, nodata=255)
                row["mask"] = f"chips/mask_{j}_{i}.tif"
            _write_tif(root / "chips" / name, arr, left, top)
            if task == "classification":
                row["label"] = f"class_{c}"
            elif task == "multilabel":
                row["labels"] = f"class_{c};class_{(c + 1) % n_classes}"
            elif task == "regression":
                row["value"] = float(c) * 2.5 + 1.0
            if split_column:
                row["split"] = ["train", "valid", "test"][(i + j) % 3]
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def write_label_scene(root: Path, size: int = 128, res: float = 10.0, n_classes: int = 3, seed: int = 0,
                      label_res: Optional[float] = None) -> Dict:
    """A 4-band Sentinel-2-like scene (B02, B03, B04, B08) and a label raster; returns the scene dict."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    left, top = 600000.0, 5100000.0
    blocks = rng.integers(n_classes, size=(size // 16, size // 16))
    cls = np.kron(blocks, np.ones((16, 16), dtype=np.int64))
    signature = rng.normal(size=(n_classes, 4)) * 3
    texture = rng.normal(size=(n_classes, 8, 8)) * 3  # a class pattern per 8 px cell (the test models' patch)
    yy, xx = np.indices(cls.shape) % 8
    img = signature[cls].transpose(2, 0, 1) + texture[cls, yy, xx][None] + 0.1 * rng.normal(size=(4, size, size))
    _write_tif(root / "scene.tif", (img * 100 + 1000).astype(np.float32), left, top, res)
    lres = label_res or res
    f = int(round(lres / res))
    lab = cls[::f, ::f].astype(np.uint8)
    lab[:2, :2] = 255
    _write_tif(root / "labels.tif", lab, left, top, lres, nodata=255)
    return {"sensor": "sentinel2", "file": str(root / "scene.tif"), "bands": ["B02", "B03", "B04", "B08"],
            "labels": str(root / "labels.tif"), "name": "labelled"}
