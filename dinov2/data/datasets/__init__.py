"""Dataset registry: config `id` -> dataset class, imported lazily.

Heavy readers (rasterio, h5py, pandas) are only imported when a dataset that needs them is built, so
`import dinov2.data.datasets` stays cheap. `make_dataset` in `dinov2/data/loaders.py` uses `get_dataset_class`.
"""
from __future__ import annotations

import importlib
from typing import Dict

# id -> "module:ClassName" (module relative to this package)
_REGISTRY: Dict[str, str] = {
    # pretraining
    "FmowDataset": "fmow:FmowDataset",
    "MMEarth": "mmearth:MMEarth",
    "SatlasDataset": "satlas:SatlasDataset",
    "satl_webdataset": "satlas_wds:SatlasShards",
    "SpectralEarth": "spectral_earth:SpectralEarthDataset",
    "SpectralEarthDataset": "spectral_earth:SpectralEarthDataset",
    "GeoTiffScenes": "geotiff_scenes:GeoTiffScenes",
    # evaluation
    "geobench": "geobench:GeobenchDataset",  # used as `geobench.<task name>`
    "resisc45": "resisc45:RESISC45",
    "benv2": "benv2:BigEarthNetv2",
    "benv2_webdataset": "benv2_wds:BENv2Shards",
    "eurosat-sar": "eurosat_sar:EurosatSAR",
    "hyperview": "hyperview:Hyperview",
    # the user's own labelled data
    "chips": "chips:ChipsDataset",
    "LabelRasterScenes": "label_raster:LabelRasterScenes",
}


def registered_ids() -> list:
    """All dataset ids `make_dataset` understands (besides the composite ids handled in loaders.py)."""
    return sorted(_REGISTRY)


def get_dataset_class(ds_id: str):
    """Return the dataset class for a config id. `geobench.<task>` ids resolve to the GeoBench reader."""
    key = "geobench" if ds_id.startswith("geobench.") else ds_id
    if key not in _REGISTRY:
        raise ValueError(f"Unknown dataset id {ds_id!r}; known ids: {', '.join(registered_ids())}")
    module_name, cls_name = _REGISTRY[key].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, cls_name)
