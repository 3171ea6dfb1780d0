"""GEO-Bench multi-channel bands (m-NeonTree's 369-channel hyperspectral cube) on files in the released layout written
by the tests: channel expansion, ids, bilinear upsampling to the RGB grid, per-channel statistics, refusals, and the
shipped m-NeonTree segmentation config run end to end."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from published_tables import NEON_HS_IDS
from seg_fixtures import write_geobench_neontree
from test_eval_engine import make_run

from dinov2.data.datasets.geobench import GeobenchDataset
from dinov2.eval.eval import main
from dinov2.eval.tasks import eval_config_root


@pytest.fixture(scope="module")
def neon_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("neon") / "geobench"
    write_geobench_neontree(root, {"train": 4, "valid": 2, "test": 2}, bad_cube_sample="broken")
    return root


def bilinear_up(img: np.ndarray, scale: int) -> np.ndarray:
    """Half-pixel-centred bilinear upsampling by an integer factor, edges clamped (numpy, per 2-D image)."""
    n = img.shape[0]
    src = np.clip((np.arange(n * scale) + 0.5) / scale - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    f = src - lo
    rows = img[lo] * (1 - f)[:, None] + img[hi] * f[:, None]
    return rows[:, lo] * (1 - f)[None] + rows[:, hi] * f[None]


def read(task_dir: Path, name: str, band: str) -> np.ndarray:
    with h5py.File(task_dir / f"{name}.hdf5") as f:
        return np.asarray(f[band]).astype(np.float64)


def test_neon_cube_becomes_369_channels_with_train_statistics(neon_root, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(neon_root))
    ds = GeobenchDataset("m-NeonTree", split="val")
    assert ds.band_names == ["Red", "Green", "Blue", "Neon"]  # no canopy height model
    assert ds.chn_ids.tolist() == [664, 559, 492] + NEON_HS_IDS[:369]
    x, mask = ds[1]
    assert x["imgs"].shape == (372, 40, 40) and x["imgs"].dtype == torch.float32
    name = ds.samples[1]
    assert torch.equal(mask, torch.from_numpy(read(ds.task_dir, name, "label").astype(np.int64)))
    stats = json.loads((ds.task_dir / "band_stats.json").read_text())
    red = (read(ds.task_dir, name, "Red") - stats["Red"]["mean"]) / stats["Red"]["std"]
    np.testing.assert_allclose(x["imgs"][0].numpy(), red, rtol=1e-5, atol=1e-5)
    train = np.stack([read(ds.task_dir, s, "Neon") for s in ds._train_samples])  # (N, 4, 4, 369)
    mean, std = train.mean((0, 1, 2)), train.std((0, 1, 2))
    cube = read(ds.task_dir, name, "Neon")
    for k in (0, 100, 368):
        want = bilinear_up((cube[..., k] - mean[k]) / std[k], 10)
        np.testing.assert_allclose(x["imgs"][3 + k].numpy(), want, rtol=1e-4, atol=1e-4)
    # the pooled GEO-Bench number would leave the channels' offsets in: per-channel z-scores are centred
    assert abs(float(x["imgs"][3:].mean())) < 1.5


def test_multiband_stats_geobench_and_file(neon_root, monkeypatch, tmp_path):
    monkeypatch.setenv("GEO_BENCH_DIR", str(neon_root))
    pooled = GeobenchDataset("m-NeonTree", split="val", multiband_stats="geobench")
    stats = json.loads((pooled.task_dir / "band_stats.json").read_text())["Neon"]
    assert torch.allclose(pooled.normalizer.mean[3:], torch.tensor(stats["mean"], dtype=torch.float32))
    own = {"mean": [float(k) for k in range(369)], "std": [2.0] * 369}
    (tmp_path / "hyp.json").write_text(json.dumps({"Neon": own}))
    ds = GeobenchDataset("m-NeonTree", split="val", multiband_stats=str(tmp_path / "hyp.json"))
    assert ds.normalizer.mean[3:].tolist() == own["mean"] and ds.normalizer.std[-1] == 2.0
    (tmp_path / "short.json").write_text(json.dumps({"mean": [0.0] * 10, "std": [1.0] * 10}))
    with pytest.raises(ValueError, match="10 means / 10 stds for the 369 channels of band 'Neon'"):
        GeobenchDataset("m-NeonTree", split="val", multiband_stats=str(tmp_path / "short.json"))
    with pytest.raises(ValueError, match="no such file"):
        GeobenchDataset("m-NeonTree", split="val", multiband_stats="nope.json")


def test_band_selection_and_refusals(neon_root, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(neon_root))
    rgb = GeobenchDataset("m-NeonTree", split="val", bands=["Red", "Green", "Blue"])
    assert rgb[0][0]["imgs"].shape == (3, 40, 40) and rgb.chn_ids.tolist() == [664, 559, 492]
    hs = GeobenchDataset("m-NeonTree", split="val", bands=["Neon"])
    assert hs[0][0]["imgs"].shape == (369, 40, 40)
    with pytest.raises(ValueError, match=r"\['Canopy Height Model'\] have no channel ids"):
        GeobenchDataset("m-NeonTree", split="val", bands=["Canopy Height Model"])
    test = GeobenchDataset("m-NeonTree", split="test")
    bad = test.samples.index("broken")
    with pytest.raises(ValueError, match=r"broken\.hdf5: band 'Neon' has shape \(4, 4, 368\); task_specs.pkl "
                                         r"declares 369 channels"):
        test[bad]


def test_shipped_neontree_config_runs(monkeypatch, tmp_path):
    """The shipped task config (PANGAEA protocol) on m-NeonTree-format files (tiny model: 2 blocks, 32 px windows
    on the 40 px images, one epoch): 372-channel inputs through the frozen backbone, the UPerNet, an mIoU on test
    computed at the native 40 px label size."""
    root = tmp_path / "geobench"
    write_geobench_neontree(root, {"train": 4, "valid": 2, "test": 2}, seed=1)
    monkeypatch.setenv("GEO_BENCH_DIR", str(root))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    run = make_run(tmp_path / "run")
    cfg = Path(eval_config_root()) / "1h" / "geobench" / "neontree-seg.yaml"
    over = {"task.img_size": 32, "optim.epochs": 1, "optim.dl.batch_size": 2, "optim.dl.num_workers": 0,
            "heads.learning_rates": [1e-2], "heads.channels": 8, "heads.blocks": [0, 1]}
    res = main(str(run), str(cfg), output_dir=str(tmp_path / "out"), device="cpu", **over)
    (vals,) = res.values()
    assert 0.0 <= vals["mIoU"] <= 100.0 and 0.0 <= vals["pixel_acc"] <= 100.0
    detail = json.loads(next((tmp_path / "out").rglob("results_eval_segmentation.json")).read_text())
    assert set(detail["all_val"]) == {"upernet_ppm_lr_0_01000"}
    assert detail["protocol"] == "pangaea" and detail["inference"] == "sliding"
    assert detail["test"]["m-NeonTree"]["n_pixels"] == 2 * 40 * 40  # native label resolution, every pixel
