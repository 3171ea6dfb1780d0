"""EuroSAT-SAR (eval id ``eurosat-sar``): Sentinel-1 VV/VH (dB) 64x64 patches in the 10 EuroSAT classes.

Layout: ``<root>/<split>.csv`` with columns ``filepath`` (relative to root, or absolute) and ``class_name``;
each file a 2-band float GeoTIFF (VV, VH). chn_ids and normalisation statistics from the ``eurosat-sar``
band YAML. ``split`` may be a comma-separated list of CSV stems, concatenated.

The released download has only the class folders ``<root>/<Class>/<Class>_<n>.tif``; ``make_splits`` (command:
``python -m dinov2.run.prepare_data eurosat-sar <root>``) writes the split CSVs next to them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from dinov2.data import sensors
from dinov2.data.datasets.eval_base import EvalDataset
from dinov2.data.io import read_tiff_chw, resolve_root
from dinov2.data.normalize import normalizer_from_ds_cfg

CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake")


class EurosatSAR(EvalDataset):
    """EuroSAT-SAR split; samples ``({'imgs': (2,64,64), 'chn_ids': (2,) = [-1 VV, -2 VH]}, class index)``."""

    num_classes = len(CLASSES)

    def __init__(self, root: str = "${RDIR}/datasets/eurosat_SAR", full_spectra: bool = False,
                 normalize: bool = True, transform=None, split: str = "train", **kwargs):
        import pandas as pd

        self.root = Path(resolve_root(root, "eurosat-sar dataset folder"))
        self.display_name = kwargs.pop("display_name", "eurosat-sar")
        self.samples: List[Tuple[Path, int]] = []
        for stem in [s.strip() for s in str(split).split(",") if s.strip()]:
            csv = self.root / f"{stem}.csv"
            if not csv.is_file():
                raise FileNotFoundError(f"eurosat-sar: split file {csv} does not exist")
            df = pd.read_csv(csv)
            if not {"filepath", "class_name"} <= set(df.columns):
                raise ValueError(f"eurosat-sar: {csv} needs columns filepath, class_name (has {list(df.columns)})")
            for fp, cls in zip(df["filepath"], df["class_name"]):
                if cls not in CLASSES:
                    raise ValueError(f"eurosat-sar: unknown class {cls!r} in {csv}")
                path = Path(fp) if Path(fp).is_absolute() else self.root / fp
                self.samples.append((path, CLASSES.index(cls)))
        self.transform = transform
        self.normalizer = normalizer_from_ds_cfg("eurosat-sar") if normalize else None
        self.chn_ids = sensors.ds_chn_ids("eurosat-sar", full_spectra=full_spectra)

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def read_image(path: Path) -> torch.Tensor:
        """(2,H,W) float32 from a 2-band tif (pixel- or band-interleaved)."""
        if not path.is_file():
            raise FileNotFoundError(f"eurosat-sar: image {path} does not exist")
        arr = read_tiff_chw(str(path)).astype(np.float32)
        if arr.shape[0] != 2:
            raise ValueError(f"eurosat-sar: {path} has shape {arr.shape}, expected 2 bands (VV, VH)")
        return torch.from_numpy(np.ascontiguousarray(arr))

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        imgs = self.read_image(path)
        return self.make_sample(imgs, label)


SPLIT_STEMS = ("train", "val", "test", "small_train", "small_val", "small_test")


def scan_release(root: str) -> Dict[str, List[str]]:
    """Class name -> sorted image paths (relative to `root`) of the released folder `<root>/<Class>/*.tif`."""
    base = Path(resolve_root(root, "eurosat-sar dataset folder"))
    found = {c: sorted(str(p.relative_to(base)) for ext in ("*.tif", "*.tiff") for p in (base / c).glob(ext))
             for c in CLASSES if (base / c).is_dir()}
    found = {c: v for c, v in found.items() if v}
    if not found:
        present = sorted(p.name for p in base.iterdir())[:12]
        raise ValueError(f"eurosat-sar: {base} holds no class folder with .tif images (expected folders named "
                         f"{', '.join(CLASSES)}; found {present})")
    return found


def make_splits(root: str, seed: int = 42, test_fraction: float = 0.2, val_fraction_of_train: float = 1 / 8,
                small_sizes: Sequence[int] = (2000, 1000, 1000), overwrite: bool = False) -> Dict[str, str]:
    """Write the split CSVs (`filepath`, `class_name`) the reader needs into `root`, following the published
    recipe: every class cut to the size of the smallest class, a stratified `test_fraction` test split, 1/8 of the
    rest as validation, and class-balanced `small_train`/`small_val`/`small_test` subsets of those (sizes
    `small_sizes`). The draw uses numpy's generator seeded with `seed`, so its membership is reproducible here but
    not identical to the published files. Returns {split stem: csv path}."""
    import pandas as pd

    from dinov2.utils.checkpoint import write_atomic

    if len(small_sizes) != 3 or any(int(n) < 0 for n in small_sizes):
        raise ValueError(f"small_sizes must be three counts (train, val, test), got {list(small_sizes)}")
    base = Path(resolve_root(root, "eurosat-sar dataset folder"))
    out = {stem: str(base / f"{stem}.csv") for stem in SPLIT_STEMS}
    existing = [p for p in out.values() if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"eurosat-sar: split file {existing[0]} exists (use overwrite=True / --overwrite)")
    found = scan_release(str(base))
    n_cls = min(len(v) for v in found.values())
    rng = np.random.default_rng(seed)
    parts: Dict[str, List[Tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for cls, files in found.items():
        pick = [files[i] for i in rng.permutation(len(files))[:n_cls]]
        n_test = int(round(test_fraction * n_cls))
        n_val = int(round(val_fraction_of_train * (n_cls - n_test)))
        parts["test"] += [(f, cls) for f in pick[:n_test]]
        parts["val"] += [(f, cls) for f in pick[n_test:n_test + n_val]]
        parts["train"] += [(f, cls) for f in pick[n_test + n_val:]]
    for stem, n_small in zip(("train", "val", "test"), small_sizes):
        per_class, rest = divmod(int(n_small), len(found))
        rows = []
        for k, cls in enumerate(found):
            mine = [r for r in parts[stem] if r[1] == cls]
            want = per_class + (1 if k < rest else 0)
            if want > len(mine):
                raise ValueError(f"eurosat-sar: small_{stem} wants {n_small} images but split {stem!r} has only "
                                 f"{len(mine)} of class {cls}; lower the small sizes")
            rows += [mine[i] for i in sorted(rng.permutation(len(mine))[:want])]
        parts[f"small_{stem}"] = rows
    for stem, rows in parts.items():
        df = pd.DataFrame(rows, columns=["filepath", "class_name"])
        write_atomic(out[stem], lambda tmp, df=df: df.to_csv(tmp, index=False), suffix=".csv")
    return out
