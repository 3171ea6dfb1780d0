"""Other backbones under the same protocol: this repository's plain RGB DINOv2 ViTs and timm models through
``--model-obj baseline:...``, on the GEO-Bench-format fixtures (kNN and segmentation)."""
import importlib.util

import pytest
import torch

from seg_fixtures import write_geobench_segmentation
from test_eval_engine import write_task
from test_segmentation import seg_task

from dinov2.eval.baselines import band_wavelengths, parse_baseline, select_bands
from dinov2.eval.eval import main


def test_parse_and_band_selection():
    assert parse_baseline("baseline:timm/resnet18?bands=s2&pretrained=false") == \
        ("timm", "resnet18", {"bands": "s2", "pretrained": "false"})
    with pytest.raises(ValueError, match="unknown options"):
        parse_baseline("baseline:timm/resnet18?colour=1")
    with pytest.raises(ValueError, match="must look like"):
        parse_baseline("baseline:keras/x")
    x = {"imgs": torch.arange(4.0)[None, :, None, None].expand(2, 4, 2, 2),
         "chn_ids": torch.tensor([[492, 559, 664, 832]] * 2)}
    assert select_bands(x, band_wavelengths("rgb"))[0, :, 0, 0].tolist() == [2.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="no band near 740 nm"):
        select_bands(x, band_wavelengths("s2"))
    with pytest.raises(ValueError, match="no band near"):
        select_bands({"imgs": torch.zeros(1, 2, 2, 2), "chn_ids": torch.tensor([[-1, -2]])}, band_wavelengths("rgb"))


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_world")
    write_geobench_segmentation(root / "geobench", "m-cashew-plant", {"train": 8, "valid": 4, "test": 4},
                                n_classes=3, size=28, block=14)
    return root


def _run(model_obj, seg_root, tmp_path, monkeypatch, epochs=2):
    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_root / "geobench"))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    write_task(tmp_path / "cfg", "seg", seg_task(epochs=epochs, **{"heads.decoders": ["linear", "upernet"],
                                                                   "heads.learning_rates": [1e-2]}))
    return main(model_obj, str(tmp_path / "cfg" / "seg.yaml"), output_dir=str(tmp_path / "out"), device="cpu")


def test_dinov2_rgb_baseline_segmentation(seg_root, tmp_path, monkeypatch):
    res = _run("baseline:dinov2/dinov2_vits14?pretrained=false", seg_root, tmp_path, monkeypatch)
    assert 0.0 <= res["cfg/seg"]["mIoU"] <= 100.0
    assert (tmp_path / "out" / "cfg" / "seg" / "results_eval_segmentation.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_cnn_baseline_segmentation(seg_root, tmp_path, monkeypatch):
    res = _run("baseline:timm/resnet18", seg_root, tmp_path, monkeypatch)
    assert 0.0 <= res["cfg/seg"]["mIoU"] <= 100.0


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_timm_baseline_knn(seg_root, tmp_path, monkeypatch):
    from eval_fixtures import write_geobench_task

    write_geobench_task(tmp_path / "gb", "m-eurosat", {"train": 12, "test": 6}, size=32)
    monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path / "gb"))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    write_task(tmp_path / "cfg", "knn", {"task": {"id": "knn"}, "train_dataset": {"id": "geobench.m-eurosat",
               "split": "train"}, "test_dataset": {"id": "geobench.m-eurosat", "split": "test"},
               "heads": {"nb_knn": [1]}, "optim": {"dl": {"batch_size": 8, "num_workers": 0}}})
    res = main("baseline:timm/resnet18", str(tmp_path / "cfg" / "knn.yaml"), output_dir=str(tmp_path / "o"),
               device="cpu")
    assert 0.0 <= res["cfg/knn"]["acc_top-1_micro"] <= 100.0


needs_torchgeo = pytest.mark.skipif(importlib.util.find_spec("torchgeo") is None or
                                    importlib.util.find_spec("timm") is None, reason="torchgeo is not installed")


@needs_torchgeo
def test_torchgeo_sentinel2_resnet_baseline_segmentation(seg_root, tmp_path, monkeypatch):
    # random init (weights cannot be downloaded here), the 12 bands nearest the Sentinel-2 centres
    res = _run("baseline:torchgeo/resnet18?bands=443,492,559,664,704,740,782,832,864,945,1613,2202", seg_root,
               tmp_path, monkeypatch, epochs=1)
    assert 0.0 <= res["cfg/seg"]["mIoU"] <= 100.0


@needs_torchgeo
def test_torchgeo_dofa_takes_every_band_with_its_wavelength(seg_root, monkeypatch):
    from dinov2.eval.baselines import build_baseline

    torch.manual_seed(0)
    net = build_baseline("baseline:torchgeo/dofa_small_patch16_224")
    imgs = torch.randn(2, 4, 32, 32)
    x = {"imgs": imgs, "chn_ids": torch.tensor([[492, 559, 664, 842]] * 2)}
    maps = net.get_intermediate_layers(x, n=2, reshape=True)
    assert [tuple(m.shape) for m in maps] == [(2, net.embed_dim, 2, 2)] * 2
    (last, pooled), = net.get_intermediate_layers(x, n=1, return_class_token=True)
    assert torch.allclose(pooled, last.mean(1), atol=1e-6)
    # the wavelengths condition the patch embedding: the same pixels labelled as other bands embed differently
    other = net.get_intermediate_layers({"imgs": imgs, "chn_ids": torch.tensor([[700, 800, 900, 1600]] * 2)}, n=1)
    assert not torch.allclose(other[0], net.get_intermediate_layers(x, n=1)[0])
    # at DOFA's native 224 px the blocks reproduce DOFA's own global-pool feature
    big = {"imgs": torch.randn(1, 3, 224, 224), "chn_ids": torch.tensor([[492, 559, 664]])}
    ref = net.model.forward_features(big["imgs"], [0.492, 0.559, 0.664])
    raw = net.get_intermediate_layers(big, n=1, norm=False)[0]
    assert torch.allclose(net.norm(raw.mean(1)), ref, atol=1e-5)
    with pytest.raises(ValueError, match="optical bands only"):
        net.get_intermediate_layers({"imgs": imgs[:, :2], "chn_ids": torch.tensor([[-1, -2]] * 2)})
    with pytest.raises(ValueError, match="drop bands="):
        build_baseline("baseline:torchgeo/dofa_small_patch16_224?bands=rgb")


@needs_torchgeo
def test_torchgeo_dofa_baseline_segmentation(seg_root, tmp_path, monkeypatch):
    res = _run("baseline:torchgeo/dofa_small_patch16_224", seg_root, tmp_path, monkeypatch, epochs=1)
    assert 0.0 <= res["cfg/seg"]["mIoU"] <= 100.0
