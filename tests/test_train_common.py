"""Shared helpers of the training tests (tiny ViT, tiny crops, in-memory pretraining samples in the real sample
format) and tests of config assembly: every shipped training config parses and builds."""
import os

import pytest
import torch
from torch.utils.data import Dataset

from dinov2.utils.config import CONFIG_DIR, apply_scaling_rules, load_config

# tiny model and crops: global 28 px, local 14 px, patch 7, 64 prototypes
TINY = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=7", "student.pos_emb_img_size=28", "student.embed_layer=PanopticonPE",
    "student.drop_path_rate=0.0", "student.pe_args.attn_dim=32", "student.pe_args.chnfus_cfg.attn_cfg.num_heads=2",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32", "ibot.head_bottleneck_dim=16",
    "compute_precision.dtype=fp32", "train.batch_size_per_gpu=4", "train.num_workers=0",
    "train.persistent_workers=false", "train.pin_memory=false", "train.OFFICIAL_EPOCH_LENGTH=2",
    "train.log_every_n_steps=1", "train.saveckp_freq=1", "train.seed=3", "optim.epochs=2",
    "optim.base_lr=0.01", "optim.scaling_rule=sqrt_wrt_1024", "optim.warmup_epochs=0", "eval.skip=true",
    "eval.eval_period_epoch=-1", "teacher.warmup_teacher_temp_epochs=1",
]
AUGM = dict(id="PanopticonAugmentation", global_crops_size=28, local_crops_size=14, local_crops_number=2,
            global_crops_spectral_size=[2, 4], local_crops_spectral_size=[1, 2],
            color_jitter_args=dict(p=0.0, brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0))


def tiny_cfg(tmp_path, *extra):
    """Resolved tiny training config writing into `tmp_path`."""
    cfg = load_config(None, list(TINY) + list(extra))
    cfg.train.output_dir = str(tmp_path)
    cfg.train.pretrain_augm = AUGM
    apply_scaling_rules(cfg, 1)
    return cfg


def make_sample(idx: int, nan: bool = False):
    """One place seen by two sensors, in the pretraining-sample contract (list of views of band groups)."""
    g = torch.Generator().manual_seed(1000 + idx)
    s2 = {"imgs": [torch.randn(4, 32, 32, generator=g)], "chn_ids": [torch.tensor([492, 559, 664, 832])]}
    multi = {"imgs": [torch.randn(3, 32, 32, generator=g), torch.randn(2, 16, 16, generator=g)],
             "chn_ids": [torch.tensor([482, 561, 655]), torch.tensor([-1, -2])]}
    if nan:
        for view in (s2, multi):
            for img in view["imgs"]:
                img.fill_(float("nan"))
    return [s2, multi]


class SimulatedKill(Exception):
    """Raised by `InMemoryScenes(kill_after=k)` to stop a run like a killed job."""


class InMemoryScenes(Dataset):
    """Map-style pretraining dataset of `make_sample` places; after `nan_after` calls it returns NaN pixels (a
    bad batch mid-run, which the model refuses), after `kill_after` calls it raises `SimulatedKill`."""

    def __init__(self, n: int = 8, transform=None, nan_after: int = -1, kill_after: int = -1):
        self.n, self.transform, self.nan_after, self.kill_after, self.calls = n, transform, nan_after, kill_after, 0

    def __len__(self):
        return self.n

    def __getitem__(self, idx):
        if not 0 <= idx < self.n:
            raise IndexError(f"index {idx} out of range for {self.n} samples")
        if 0 <= self.kill_after <= self.calls:
            raise SimulatedKill(f"simulated kill after {self.calls} samples")
        self.calls += 1
        sample = make_sample(idx, nan=0 <= self.nan_after < self.calls)
        return self.transform(sample) if self.transform is not None else sample


def tiny_dataset(n: int = 8, nan_after: int = -1, kill_after: int = -1):
    from dinov2.data.augmentations import make_augmentation

    return InMemoryScenes(n, transform=make_augmentation([dict(AUGM)]), nan_after=nan_after, kill_after=kill_after)


class SlowSamples(Dataset):
    """Delays every sample of a dataset by `delay_s` seconds (results unchanged): keeps a run alive long enough
    to be killed at a chosen point."""

    def __init__(self, dataset, delay_s: float):
        self.dataset, self.delay_s = dataset, float(delay_s)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        import time

        time.sleep(self.delay_s)
        return self.dataset[idx]


def write_spectral_earth_run(tmp_path, n: int = 40, corrupt=(7,), size: int = 16) -> tuple:
    """A SpectralEarth pretraining config over `n` real-format EnMAP patch TIFFs of which those in `corrupt`
    are cut to half their length (a file damaged in transfer). Returns (config path, list of corrupt paths)."""
    import yaml
    from data_fixtures import write_spectral_earth

    root = tmp_path / "rdir"
    fx = write_spectral_earth(str(root), n=n, size=size)
    bad = []
    for i in corrupt:
        path = root / "spectral_earth" / "enmap" / fx["rels"][i]
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        bad.append(str(path))
    run_cfg = {"train": {"dataset": {"id": "SpectralEarth", "root": str(root), "split": "train",
                                     "normalize": False}, "pretrain_augm": AUGM}}
    path = tmp_path / "spectral_run.yaml"
    path.write_text(yaml.safe_dump(run_cfg))
    return str(path), bad


def write_geotiff_run(tmp_path) -> str:
    """A GeoTiffScenes pretraining config over a fixture Sentinel-2 scene (real GeoTIFF layout); returns its path."""
    import yaml
    from data_fixtures import write_s2_scene

    scene = write_s2_scene(str(tmp_path / "scene"))
    scenes = tmp_path / "scenes.yaml"
    scenes.write_text(yaml.safe_dump({"scenes": [{"sensor": "sentinel2", "files": scene["files"]}]}))
    run_cfg = {"train": {"dataset": {"id": "GeoTiffScenes", "scenes": str(scenes), "patch_size_m": 300},
                         "pretrain_augm": AUGM}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_cfg))
    return str(path)


@pytest.fixture
def env_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("RDIR", str(tmp_path / "res"))
    monkeypatch.setenv("ODIR", str(tmp_path / "out"))
    return tmp_path


@pytest.mark.parametrize("name", ["quick_check.yaml", "stage1.yaml", "stage2.yaml", None])
def test_every_config_parses_and_builds(env_dirs, name):
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    path = str(CONFIG_DIR / name) if name else None
    full = load_config(path, [])
    apply_scaling_rules(full, world_size=1)
    assert full.optim.lr > 0 and full.train.seed is not None
    if name in ("stage1.yaml", "stage2.yaml"):
        assert full.train.pretrain_augm.id == "PanopticonAugmentation"  # published stage1 named a missing class
        assert full.eval.only_eval is False
        assert full.student.embed_layer == "PanopticonPE" and full.optim.freeze_weights == "last_layer=1"
        # sqrt rule: 75 per GPU on 1 GPU -> 5e-4 * sqrt(75/1024)
        assert abs(full.optim.lr - 5e-4 * (75 / 1024) ** 0.5) < 1e-9
    if name == "stage2.yaml":
        assert full.MODEL.WEIGHTS == os.path.join(os.environ["ODIR"], "stage1", "model_final.pth")
    # the model itself, with sizes made tiny so each config builds quickly
    model = SSLMetaArch(load_config(path, list(TINY)))
    assert model.student.backbone.embed_dim == 32


def test_real_vit_base_quick_check_builds(env_dirs):
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    cfg = load_config(str(CONFIG_DIR / "quick_check.yaml"), [])
    model = SSLMetaArch(cfg)
    assert model.embed_dim == 768 and model.student.backbone.n_blocks == 12
    assert model.student.dino_head.last_layer.weight_v.shape == (65536, 256)
    groups = model.get_params_groups()
    frozen = [n for g in groups if g["freeze_epochs"] == 1 for n in g["names"]]
    assert sorted(frozen) == ["dino_head.last_layer.weight_g", "dino_head.last_layer.weight_v"]


def test_config_merge_order_env_resolvers_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_BSZ", "7")
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size_per_gpu: ${oc.env:MY_BSZ}\n  seed: 5\noptim:\n  base_lr: ${env:MY_LR,0.5}\n")
    cfg = load_config(str(f), ["train.seed=9"])
    # numeric strings from the environment become numbers for keys declared numeric
    assert cfg.train.batch_size_per_gpu == 7 and cfg.train.seed == 9 and float(cfg.optim.base_lr) == 0.5
    assert cfg.student.arch == "vit_base"  # from the defaults
    f.write_text("optim:\n  base_lr: ${env:SURELY_NOT_SET_VAR}\n")
    with pytest.raises(Exception, match="SURELY_NOT_SET_VAR"):
        load_config(str(f), [])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["train.seed"])
    cfg = load_config(None, ["train.batch_size_per_gpu=32", "gradient_accumulation_steps=2", "optim.base_lr=1e-3"])
    apply_scaling_rules(cfg, world_size=4)  # total batch 256 -> lr * sqrt(1/4)
    assert abs(cfg.optim.lr - 5e-4) < 1e-12
    cfg.optim.scaling_rule = "bogus"
    with pytest.raises(ValueError, match="bogus"):
        apply_scaling_rules(cfg, 1)


def test_dotenv_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PANOPTICON_TEST_DOTENV", raising=False)
    (tmp_path / ".env").write_text("PANOPTICON_TEST_DOTENV=0.123\n")
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  base_lr: ${oc.env:PANOPTICON_TEST_DOTENV}\n")
    assert float(load_config(str(f), []).optim.base_lr) == 0.123
    os.environ.pop("PANOPTICON_TEST_DOTENV", None)
