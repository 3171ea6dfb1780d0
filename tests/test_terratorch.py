"""Panopticon in TerraTorch: the backbone registry, channel ids from TerraTorch's band names, outputs equal to the
model's own per-block tokens, an EncoderDecoderFactory model with UperNet that trains, and `terratorch fit` run on
the docs page's YAML with a tiny GeoTIFF segmentation dataset written here."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT

# not imported at collection: importing TerraTorch changes torch's global matmul precision (the integration puts it
# back), which would leak into every other test collected in the same process
pytestmark = pytest.mark.skipif(importlib.util.find_spec("terratorch") is None, reason="terratorch not installed")
rasterio = pytest.importorskip("rasterio")

BANDS = ["BLUE", "GREEN", "RED", "NIR_NARROW"]
TINY = dict(depth=4, pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}})


@pytest.fixture(scope="module")
def registry():
    import dinov2.integrations.terratorch as tt
    from terratorch.registry import BACKBONE_REGISTRY

    assert tt.REGISTERED == ["panopticon_vitb14", "panopticon"]
    return BACKBONE_REGISTRY


def test_band_names_to_channel_ids():
    from dinov2.integrations.terratorch import band_chn_ids

    from dinov2.data.sensors import band_info

    def mu(sensor, band):  # the registry's centre wavelength of the band the name must resolve to
        return band_info(sensor, band)["mu"]

    ids = band_chn_ids(["BLUE", "NIR_NARROW", "SWIR_1", "VV", "ASC_VV", "sentinel2/B8A", "landsat8/tirs1"])
    assert ids == [mu("sentinel2", "B02"), mu("sentinel2", "B8A"), mu("sentinel2", "B11"), -1.0, -5.0,
                   mu("sentinel2", "B8A"), mu("landsat8", "B10")]
    assert [int(v) for v in ids] == [492, 864, 1613, -1, -5, 864, 10847]
    from terratorch.datasets.utils import HLSBands

    assert band_chn_ids([HLSBands.BLUE, HLSBands.RED]) == [mu("sentinel2", "B02"), mu("sentinel2", "B04")]
    assert torch.get_float32_matmul_precision() == "highest"  # TerraTorch's import-time setting was undone
    with pytest.raises(ValueError, match="bare numbers"):
        band_chn_ids([3])
    with pytest.raises(ValueError, match="unknown band 'INFRARED'"):
        band_chn_ids(["INFRARED"])


def test_registered_backbone_matches_the_model_and_trains(registry):
    assert "panopticon_vitb14" in registry and "panopticon" in registry
    torch.manual_seed(0)
    backbone = registry.build("panopticon_vitb14", bands=BANDS, pretrained=False, **TINY)
    assert backbone.out_channels == [768] * 4 and backbone.training
    x = torch.randn(2, 4, 56, 56)
    outs = backbone(x)
    assert [tuple(o.shape) for o in outs] == [(2, 17, 768)] * 4
    ids = torch.tensor([[492.5, 559.8, 664.6, 864.7]] * 2)
    with torch.no_grad():
        want = backbone.model.get_intermediate_layers({"imgs": x, "chn_ids": ids}, n=[0, 1, 2, 3],
                                                      return_class_token=True, norm=True)
    for got, (patches, cls) in zip(outs, want):
        torch.testing.assert_close(got[:, 0], cls)
        torch.testing.assert_close(got[:, 1:], patches)
    sum(o.square().mean() for o in outs).backward()
    assert backbone.model.patch_embed.conv3d.conv3d.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expected \(B, 4, H, W\)"):
        backbone(torch.randn(1, 3, 56, 56))
    with pytest.raises(ValueError, match="exactly one of bands"):
        registry.build("panopticon_vitb14", pretrained=False, **TINY)


def test_encoder_decoder_factory_with_upernet(registry):
    from terratorch.models import EncoderDecoderFactory

    torch.manual_seed(0)
    model = EncoderDecoderFactory().build_model(
        task="segmentation", backbone="panopticon_vitb14", backbone_pretrained=False, backbone_bands=BANDS,
        backbone_depth=4, backbone_pe_args=TINY["pe_args"],
        necks=[{"name": "SelectIndices", "indices": [0, 1, 2, 3]}, {"name": "ReshapeTokensToImage"},
               {"name": "LearnedInterpolateToPyramidal"}],
        decoder="UperNetDecoder", decoder_channels=32, num_classes=3)
    x = torch.randn(2, 4, 56, 56)
    out = model(x).output
    assert out.shape == (2, 3, 56, 56)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 3, (2, 56, 56))).backward()
    assert model.encoder.model.blocks[0].attn.qkv.weight.grad is not None


def test_panopticon_backbone_from_a_run_folder(registry, tmp_path):
    from test_embed import STUDENT, write_run

    run = write_run(tmp_path / "run", seed=4)
    backbone = registry.build("panopticon", model=run, wavelengths=[490, 560, 665], out_indices=[-1])
    assert backbone.out_channels == [STUDENT["embed_dim"]] and all(p.requires_grad for p in backbone.parameters())
    assert backbone(torch.randn(1, 3, 28, 28))[0].shape == (1, 5, STUDENT["embed_dim"])


def _docs_yaml():
    text = (ROOT / "docs" / "terratorch.md").read_text()
    return yaml.safe_load(re.findall(r"```yaml\n(.*?)```", text, re.S)[0])


def _write_dataset(root, n_bands=6, size=56):
    """`data/{train,val,test}/images/*_img.tif` and `labels/*_mask.tif`: the layout the docs config reads; the
    class is a threshold on one band so that there is something to learn."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for sub in ("images", "labels"):
            (root / "data" / split / sub).mkdir(parents=True)
        for i in range(n):
            img = rng.normal(1500, 500, (n_bands, size, size)).astype("float32")
            mask = (img[3] > 1500).astype("int16")[None]
            for arr, sub, name in ((img, "images", f"s{i}_img.tif"), (mask, "labels", f"s{i}_mask.tif")):
                with rasterio.open(root / "data" / split / sub / name, "w", driver="GTiff", width=size,
                                   height=size, count=arr.shape[0], dtype=arr.dtype) as dst:
                    dst.write(arr)


@pytest.mark.slow
def test_terratorch_fit_runs_the_docs_config(tmp_path):
    """The YAML of docs/terratorch.md, as users run it, with the release's weights replaced by random ones (no
    download), a few steps on CPU, and a small batch."""
    cfg = _docs_yaml()
    assert cfg["model"]["init_args"]["model_args"]["backbone"] == "panopticon_vitb14"
    cfg["model"]["init_args"]["model_args"]["backbone_pretrained"] = False
    cfg["data"]["init_args"].update(batch_size=2, num_workers=0)
    cfg["trainer"].update(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                          logger=False, enable_progress_bar=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "custom_modules").mkdir()
    (tmp_path / "custom_modules" / "__init__.py").write_text("import dinov2.integrations.terratorch\n")
    _write_dataset(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2", PANOPTICON_OFFLINE="1")
    terratorch = [sys.executable, "-c", "from terratorch.__main__ import main; main()"]
    proc = subprocess.run(terratorch + ["fit", "--config", "config.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ckpt = tmp_path / "runs" / "terratorch" / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.encoder.model.patch_embed.") for k in state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
