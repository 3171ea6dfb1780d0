"""CORINE Land Cover label rasters -> BigEarthNet 19-class multi-hot vectors.

The code tables (CLC level-3 code -> BigEarthNet 43-class index -> 19-class index) live in
``configs/data/labels/corine_bigearthnet.yaml`` (under ``$CDIR/data`` when that exists), with the nomenclature
sources cited there. Codes without a 19-class counterpart, and codes outside the table (glaciers, no-data), are
dropped from the multi-hot vector by design of the nomenclature.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, Optional, Set, Tuple

import numpy as np
import torch
import yaml

from dinov2.data.sensors import config_root

logger = logging.getLogger("dinov2")
TABLE_RELPATH = "labels/corine_bigearthnet.yaml"


@dataclass(frozen=True)
class CorineNomenclature:
    """The CLC -> BigEarthNet-43 -> BigEarthNet-19 code tables."""

    names19: Tuple[str, ...]
    codes43: Tuple[int, ...]  # CLC code of each 43-class index
    names43: Tuple[str, ...]
    to19: Tuple[Optional[int], ...]  # 19-class index of each 43-class index (None = no counterpart)

    @property
    def num_classes(self) -> int:
        return len(self.names19)

    @property
    def code_to_43(self) -> Dict[int, int]:
        return {c: i for i, c in enumerate(self.codes43)}

    def multihot(self, codes: Iterable[int]) -> torch.Tensor:
        """``(19,)`` int64 multi-hot of the 19-class labels that the given CLC codes map to."""
        c43 = self.code_to_43
        y = torch.zeros(self.num_classes, dtype=torch.int64)
        for code in codes:
            i43 = c43.get(int(code))
            if i43 is not None and self.to19[i43] is not None:
                y[self.to19[i43]] = 1
        return y

    def unknown_codes(self, codes: Iterable[int]) -> Set[int]:
        """Codes that are not in the 43-class table (they carry no BigEarthNet label)."""
        c43 = self.code_to_43
        return {int(c) for c in codes if int(c) not in c43}


def _parse(path: Path) -> CorineNomenclature:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw.get("ben19_classes"), list) or not isinstance(raw.get("ben43_classes"), list):
        raise ValueError(f"{path}: needs lists 'ben19_classes' and 'ben43_classes'")
    names19 = tuple(str(n) for n in raw["ben19_classes"])
    codes, names, to19 = [], [], []
    for i, e in enumerate(raw["ben43_classes"]):
        if not isinstance(e, dict) or not {"clc", "name", "ben19"} <= set(e):
            raise ValueError(f"{path}: ben43_classes[{i}] must have keys clc, name, ben19; got {e!r}")
        j = e["ben19"]
        if j is not None and not 0 <= int(j) < len(names19):
            raise ValueError(f"{path}: ben43_classes[{i}] (CLC {e['clc']}) maps to 19-class index {j}, "
                             f"outside 0..{len(names19) - 1}")
        codes.append(int(e["clc"]))
        names.append(str(e["name"]))
        to19.append(None if j is None else int(j))
    if len(set(codes)) != len(codes):
        raise ValueError(f"{path}: duplicate CLC codes in ben43_classes")
    missing = set(range(len(names19))) - {j for j in to19 if j is not None}
    if missing:
        raise ValueError(f"{path}: 19-class indices {sorted(missing)} receive no CLC code")
    return CorineNomenclature(names19, tuple(codes), tuple(names), tuple(to19))


@lru_cache(maxsize=None)
def _load_cached(path: str) -> CorineNomenclature:
    return _parse(Path(path))


def load_corine_nomenclature(path: Optional[str] = None) -> CorineNomenclature:
    """The code tables from ``path`` or from the data config root."""
    p = Path(path) if path is not None else config_root() / TABLE_RELPATH
    if not p.is_file():
        raise FileNotFoundError(f"CORINE nomenclature table {p} does not exist")
    return _load_cached(str(p.resolve()))


def raster_codes(raster: np.ndarray) -> np.ndarray:
    """Sorted unique integer codes of a label raster (any shape)."""
    if not np.issubdtype(raster.dtype, np.integer):
        if not np.all(np.isfinite(raster)) or not np.all(raster == np.round(raster)):
            raise ValueError(f"CORINE label raster holds non-integer values (dtype {raster.dtype})")
    return np.unique(raster.astype(np.int64))
