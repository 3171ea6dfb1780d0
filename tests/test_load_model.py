"""`load_model(source)`: hub names, released-format weights, run folders (incl. the demo config) and checkpoints."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from test_embed import STUDENT, _one_thread, write_run  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X = {"imgs": torch.randn(2, 3, 28, 28), "chn_ids": torch.tensor([[492, 664, 827]] * 2)}


def _teacher(seed):
    from dinov2.models import build_model

    torch.manual_seed(seed)
    return build_model(STUDENT, only_teacher=True, img_size=56)[0].eval()


def _same(a, b):
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(X)["x_norm_patchtokens"],
                                   b.forward_features(X)["x_norm_patchtokens"])


def test_import_dinov2_is_light_and_exports_load_model():
    code = ("import sys, dinov2; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'load_model' in dir(dinov2); from dinov2 import load_model; import dinov2.models, hubconf; "
            "bad = [m for m in ('rasterio', 'pandas', 'geopandas', 'pystac', 'omegaconf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))


def test_hub_name_random_init():
    from dinov2 import load_model

    model = load_model("panopticon_vitb14", pretrained=False)
    info = model.info
    assert (info.patch_size, info.embed_dim, info.n_blocks, info.any_sensor, info.kind) == (14, 768, 12, True, "hub")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert "z-score" in info.normalization and info.default_norm_stats == "scene"
    with pytest.raises(ValueError, match="hub entries: .*panopticon_vitb14"):
        load_model("panopticon_vitx99")
    with pytest.raises(FileNotFoundError, match="model source not found"):
        load_model("/no/such/run")


def test_run_folder_checkpoints_and_weights_file(tmp_path):
    from dinov2 import load_model

    run = write_run(tmp_path / "run", seed=3)
    model = load_model(run)
    assert model.info.kind == "run" and model.info.embed_dim == 32 and model.info.patch_size == 14
    _same(model, _teacher(3))
    # a run still training: no model_final.pth -> the checkpoint named by last_checkpoint
    os.rename(tmp_path / "run" / "model_final.pth", tmp_path / "run" / "model_0000009.pth")
    (tmp_path / "run" / "last_checkpoint").write_text("model_0000009.pth")
    _same(load_model(run), _teacher(3))
    # only periodic teacher checkpoints: the newest one
    only = tmp_path / "teachers"
    for it, seed in ((99, 4), (1999, 5)):
        (only / "eval" / str(it)).mkdir(parents=True)
        state = {"backbone." + k: v for k, v in _teacher(seed).state_dict().items()}
        torch.save({"teacher": state}, only / "eval" / str(it) / "teacher_checkpoint.pth")
    shutil.copy(tmp_path / "run" / "config.yaml", only / "config.yaml")
    loaded = load_model(str(only))
    assert loaded.info.kind == "teacher_checkpoint" and loaded.info.ckpt_path.endswith("1999/teacher_checkpoint.pth")
    _same(loaded, _teacher(5))
    # released format: raw backbone state dict, config.yaml beside it decides the architecture
    wdir = tmp_path / "weights"
    wdir.mkdir()
    torch.save(_teacher(6).state_dict(), wdir / "tiny_teacher.pth")
    shutil.copy(tmp_path / "run" / "config.yaml", wdir / "config.yaml")
    w = load_model(str(wdir / "tiny_teacher.pth"))
    assert w.info.kind == "weights"
    _same(w, _teacher(6))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no model_final.pth"):
        load_model(str(empty))


def test_demo_config_run_loads(tmp_path):
    from omegaconf import OmegaConf

    from dinov2 import load_model
    from dinov2.models import build_model_from_cfg
    from dinov2.run.demo import DEMO_CONFIG, save_random_init

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(DEMO_CONFIG, run / "config.yaml")
    out = save_random_init(run, tmp_path / "random_init")
    model = load_model(str(out))
    cfg = OmegaConf.load(DEMO_CONFIG)
    assert model.info.embed_dim == cfg.student.embed_dim and model.info.n_blocks == cfg.student.depth
    torch.manual_seed(int(cfg.train.seed))
    teacher, _ = build_model_from_cfg(cfg, only_teacher=True)
    with torch.no_grad():
        torch.testing.assert_close(model(X), teacher.eval()(X))


def test_eval_loader_names_still_work(tmp_path):
    from dinov2.eval import model_loading as ml

    run = write_run(tmp_path / "run", seed=7)
    [spec] = ml.resolve_model_objs(run)
    assert isinstance(spec, ml.ModelSpec) and spec.kind == "run"
    assert spec.output_dir == os.path.join(run, "eval_model_final")
    backbone = ml.build_eval_backbone(spec)
    assert isinstance(backbone, ml.EvalBackbone) and backbone.embed_dim == 32
    assert ml.HUB_STUDENT_CFG["pe_args"]["attn_dim"] == 2304
    assert ml.spec_from_checkpoint(os.path.join(run, "model_final.pth")).kind == "run"
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["student"]["embed_dim"] == 32
