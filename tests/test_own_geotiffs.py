"""The user's own GeoTIFFs: a real-layout EnMAP L2A product gets product-order ids; docs/training.md's "Your own
GeoTIFFs" train + evaluate commands run on a 4-band stack and on a 7-band 30 m Landsat-8 stack; band subsets of the
retrieval tasks are chosen by wavelength, spectral order or band name, never by fixed positions."""
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from data_fixtures import write_geotiff
from published_tables import ENMAP_PRODUCT_NM

from dinov2.eval.retrieval import resolve_band_subset

# Landsat-8 OLI B1-B7 (coastal, blue, green, red, NIR, SWIR1, SWIR2) ids, and Sentinel-2 B02, B03, B04, B08
LANDSAT8_7 = [442, 482, 560, 654, 864, 1608, 2203]
S2_4 = [492, 559, 664, 827]


def _textured(n_bands: int, h: int, w: int, seed: int) -> np.ndarray:
    """Reflectance-like uint16 bands with spatial structure (a smooth field per band plus noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 8.0
    base = np.sin(xx + rng.uniform(0, 6)) * np.cos(yy * 0.7 + rng.uniform(0, 6))
    bands = [1000 + 300 * b + 400 * base * (1 + 0.2 * b) + rng.normal(0, 30, (h, w)) for b in range(n_bands)]
    return np.clip(np.stack(bands), 1, 20000).astype(np.uint16)


def test_enmap_l2a_product_gets_product_order_ids(tmp_path):
    """An EnMAP L2A SPECTRAL_IMAGE (224 int16 bands, 30 m UTM, nodata -32768) read with sensor `enmap` and no
    band list: every channel id is within 5 nm of the product-order band table (and equals its integer part)."""
    from dinov2.data.datasets.geotiff_scenes import GeoTiffScenes

    cube = np.clip(_textured(224, 16, 16, seed=3).astype(np.int32) - 500, 0, 10000).astype(np.int16)
    path = write_geotiff(str(tmp_path / "ENMAP01-____L2A-DT0000001_SPECTRAL_IMAGE.TIF"), cube, 600000.0, 5300000.0,
                         30.0, epsg=32632, nodata=-32768)
    ds = GeoTiffScenes([{"sensor": "enmap", "file": path}], patch_size_m=240, split="all", mode="eval",
                       normalize=False)
    x, _ = ds[0]
    ids = x["chn_ids"].tolist()
    assert len(ids) == 224 and x["imgs"].shape == (224, 8, 8)
    assert all(abs(i - v) <= 5 for i, v in zip(ids, ENMAP_PRODUCT_NM))
    assert ids == [int(v) for v in ENMAP_PRODUCT_NM]
    assert torch.equal(x["imgs"][:, 0, 0], torch.from_numpy(cube[:, 0, 0].astype(np.float32)))
    # a multi-band file without a band list must hold every band of the sensor
    short = write_geotiff(str(tmp_path / "short.tif"), cube[:5], 600000.0, 5300000.0, 30.0)
    with pytest.raises(ValueError, match="short.tif has 5 bands and no 'bands' list.*224 bands of sensor 'enmap'"):
        GeoTiffScenes([{"sensor": "enmap", "file": short}], patch_size_m=240, split="all")


@pytest.mark.parametrize("spec,expected", [
    ({"wavelength_nm": [400, 700]}, [0, 1, 2, 3]),
    ({"wavelength_nm": [[400, 450], [800, 900]]}, [0, 4]),
    ({"alternate": "even"}, [0, 2, 4, 6]),
    ({"alternate": "odd"}, [1, 3, 5]),
    ({"sensor": "landsat8", "bands": ["red", "nir"]}, [3, 4]),
    ({"sensor": "landsat8", "bands": ["B07", "swir1"]}, [5, 6]),
])
def test_band_subsets_by_wavelength_order_or_name(spec, expected):
    assert resolve_band_subset(spec, torch.tensor(LANDSAT8_7, dtype=torch.int16)) == expected


def test_band_subsets_follow_wavelength_not_position():
    # channels stored out of spectral order (NIR first): 'alternate' still splits by wavelength rank
    ids = torch.tensor([840, 650, 560, 450], dtype=torch.int16)
    assert resolve_band_subset({"alternate": "even"}, ids) == [1, 3]    # 450, 650
    assert resolve_band_subset({"alternate": "odd"}, ids) == [0, 2]     # 560, 840
    pairs = torch.tensor([[840.0, 20.0], [450.0, 15.0]])                # (mu, sigma) ids select on mu
    assert resolve_band_subset({"wavelength_nm": [400, 700]}, pairs) == [1]
    s2_pairs = torch.tensor([[492.7, 23.8], [559.8, 12.8], [664.6, 11.8], [827.0, 36.8]])  # Sentinel-2 B02-B04, B08
    assert resolve_band_subset({"sensor": "sentinel2", "bands": ["nir", "red"]}, s2_pairs) == [2, 3]


def test_band_subset_errors_name_the_problem():
    ids = torch.tensor(S2_4, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"channel indices \[4, 6\] out of range for 4 channels.*wavelength_nm"):
        resolve_band_subset({"channels": [0, 2, 4, 6]}, ids, "query_bands")
    with pytest.raises(ValueError, match="selects no channel"):
        resolve_band_subset({"wavelength_nm": [1000, 2500]}, ids)
    with pytest.raises(ValueError, match="exactly one of"):
        resolve_band_subset({"alternate": "even", "wavelength_nm": [400, 700]}, ids)
    with pytest.raises(ValueError, match="exactly one of"):
        resolve_band_subset({"bands": ["red"]}, ids)  # band names need their sensor
    with pytest.raises(ValueError, match="alternate must be 'even' or 'odd'"):
        resolve_band_subset({"alternate": 2}, ids)
    with pytest.raises(ValueError, match="lo <= hi"):
        resolve_band_subset({"wavelength_nm": [700, 400]}, ids)
    with pytest.raises(ValueError, match="Unknown band 'B13' for sensor 'sentinel2'"):
        resolve_band_subset({"sensor": "sentinel2", "bands": ["B13"]}, ids)


# ------------------------------------------------------ docs/training.md: train + evaluate on your own GeoTIFFs
STACKS = {
    # 4 bands at 10 m (Sentinel-2 B02, B03, B04, B08 in one file): 960 m patches are 96 px
    "s2_4band": {"sensor": "sentinel2", "bands": ["B02", "B03", "B04", "B08"], "res": 10.0, "size": (192, 480),
                 "epsg": 32633, "ids": S2_4},
    # Landsat-8 OLI B1-B7 at 30 m: 960 m patches are 32 px
    "landsat8_7band": {"sensor": "landsat8", "bands": ["B01", "B02", "B03", "B04", "B05", "B06", "B07"], "res": 30.0,
                       "size": (64, 160), "epsg": 32617, "ids": LANDSAT8_7},
}


@pytest.mark.parametrize("name", list(STACKS))
def test_readme_own_geotiff_train_and_eval(name, tmp_path, monkeypatch):
    """`python dinov2/train/train.py --config-file dinov2/configs/demo.yaml --output-dir runs/mine
    train.dataset.scenes=/path/scenes.yaml` then `python dinov2/eval/eval.py main --model-obj=runs/mine
    --config-obj=dinov2/configs/eval/demo --test_dataset.scenes=/path/scenes.yaml` (tiny model, a few steps)."""
    from dinov2.eval.eval import main as eval_main
    from dinov2.run.demo import SMOKE_OVERRIDES
    from dinov2.train.train import main as train_main

    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    st = STACKS[name]
    h, w = st["size"]
    stack = write_geotiff(str(tmp_path / "data" / f"{name}.tif"), _textured(len(st["bands"]), h, w, seed=7),
                          400000.0, 4500000.0, st["res"], epsg=st["epsg"])
    import rasterio

    with rasterio.open(stack) as src:  # a real georeferenced file, as a user would have
        assert src.crs.to_epsg() == st["epsg"] and src.transform.a == st["res"] and src.count == len(st["bands"])
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text(yaml.safe_dump({"scenes": [{"sensor": st["sensor"], "file": stack, "bands": st["bands"]}]}))
    run = tmp_path / "runs" / "mine"
    train_main(["--config-file", str(ROOT / "dinov2/configs/demo.yaml"), "--output-dir", str(run),
                f"train.dataset.scenes={scenes}", *SMOKE_OVERRIDES])
    assert (run / "model_final.pth").is_file()
    res = eval_main(str(run), str(ROOT / "dinov2/configs/eval/demo"), **{"test_dataset.scenes": str(scenes)})
    assert set(res) == {"demo/retrieval_visible_vs_infrared", "demo/retrieval_interleaved_bands"}
    for task, metrics in res.items():
        assert metrics["n_samples"] >= 2 and 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 100.0, task
    import json

    out = run / "eval_model_final" / "demo"
    vis = json.loads((out / "retrieval_visible_vs_infrared" / "results_eval_retrieval.json").read_text())
    visible = [i for i in st["ids"] if 400 <= i <= 700]
    assert vis["band_subsets"] == [{"query_chn_ids": visible, "key_chn_ids": [i for i in st["ids"] if i > 700],
                                    "n_samples": metrics["n_samples"]}]
    inter = json.loads((out / "retrieval_interleaved_bands" / "results_eval_retrieval.json").read_text())
    ranked = sorted(st["ids"])
    assert inter["band_subsets"][0]["query_chn_ids"] == ranked[0::2]
    assert inter["band_subsets"][0]["key_chn_ids"] == ranked[1::2]


def test_band_subset_override_replaces_the_task_file_subset():
    """`--task.query_bands="{sensor: landsat8, bands: [red]}"` replaces the task's `{alternate: even}` (no merge)."""
    from omegaconf import OmegaConf

    from dinov2.eval.tasks import build_task_cfg

    override = {"task.query_bands": {"sensor": "landsat8", "bands": ["red"]}, "test_dataset.scenes": "s.yaml"}
    cfg = build_task_cfg(ROOT / "dinov2/configs/eval/demo/retrieval_interleaved_bands.yaml", override)
    task = OmegaConf.to_container(cfg.task)
    assert task["query_bands"] == {"sensor": "landsat8", "bands": ["red"]}
    assert task["key_bands"] == {"alternate": "odd"}
