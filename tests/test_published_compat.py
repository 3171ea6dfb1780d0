"""Training checkpoints of the published code as initial weights, `find_lr`, and the EMA under gradient
accumulation."""
import pytest
import torch
from test_train_common import tiny_cfg, tiny_dataset

from dinov2.train.checkpointer import Checkpointer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_model, build_schedulers, do_train
from dinov2.utils.config import apply_scaling_rules, load_config
from dinov2.utils.utils import fix_random_seeds

K = 64  # prototypes of the tiny config


def _published_checkpoint(tmp_path, seed=7):
    """A training checkpoint as the published code writes it: {'model': SSLMetaArch state dict with the iBOT center
    stored as (1, 1, K), 'optimizer': ..., 'iteration': int}, with values distinct from a fresh model."""
    fix_random_seeds(seed)
    src = SSLMetaArch(tiny_cfg(tmp_path / "src"))
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    for k in sd:
        if sd[k].is_floating_point():
            sd[k] += 0.01 * torch.randn_like(sd[k])
    sd["dino_loss.center"] = torch.linspace(-1, 1, K).reshape(1, K)
    sd["ibot_patch_loss.center"] = torch.linspace(2, 3, K).reshape(1, 1, K)  # the published layout
    path = tmp_path / "model_0012499.pth"
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "iteration": 12499}, path)
    return path, sd


def test_published_training_checkpoint_loads_as_initial_weights(tmp_path):
    path, sd = _published_checkpoint(tmp_path)
    qkv = "backbone.blocks.1.attn.qkv.weight"

    # student.pretrained_weights: the student backbone of the published run
    entry = {"path": str(path), "checkpoint_key": "model", "prefix_map": {"student.backbone.": ""}}
    cfg = tiny_cfg(tmp_path / "a")
    cfg.student.pretrained_weights = [entry]
    model = SSLMetaArch(cfg)
    assert torch.equal(model.student.backbone.state_dict()["blocks.1.attn.qkv.weight"], sd[f"student.{qkv}"])
    assert torch.equal(model.teacher.backbone.state_dict()["blocks.1.attn.qkv.weight"], sd[f"student.{qkv}"])

    # without a prefix map nothing would match the backbone: a clear error instead of a silent no-op
    cfg.student.pretrained_weights = [{"path": str(path)}]
    with pytest.raises(ValueError, match=r"none of the .* selected keys .*prefix_map: \{'student.backbone.': ''\}"):
        SSLMetaArch(cfg)

    # MODEL.pretrained_weights: the whole meta-architecture, centers included (iBOT center reshaped)
    cfg = tiny_cfg(tmp_path / "b")
    cfg.MODEL.pretrained_weights = [{"path": str(path)}]
    fix_random_seeds(0)
    model = build_model(cfg)
    got = model.state_dict()
    assert got["ibot_patch_loss.center"].shape == (1, K)
    assert torch.equal(got["ibot_patch_loss.center"][0], torch.linspace(2, 3, K))
    assert torch.equal(got["dino_loss.center"][0], torch.linspace(-1, 1, K))
    assert torch.equal(got[f"student.{qkv}"], sd[f"student.{qkv}"])

    # MODEL.WEIGHTS (a stage-2 start from a finished stage-1 run): iteration restarts at 0
    cfg = tiny_cfg(tmp_path / "c", f"MODEL.WEIGHTS={path}")
    fix_random_seeds(0)
    model = build_model(cfg)
    assert Checkpointer(model, cfg.train.output_dir).resume_or_load(str(path))["start_iter"] == 0
    got = model.state_dict()
    assert torch.equal(got["ibot_patch_loss.center"][0], torch.linspace(2, 3, K))
    assert torch.equal(got[f"teacher.{qkv}"], sd[f"teacher.{qkv}"])


def test_other_shape_mismatches_are_named(tmp_path):
    path, sd = _published_checkpoint(tmp_path)
    sd["ibot_patch_loss.center"] = torch.zeros(1, 1, K + 1)  # a different prototype count: not a layout question
    sd["student.backbone.pos_embed"] = torch.zeros(1, 5, 32)
    torch.save({"model": sd}, path)
    cfg = tiny_cfg(tmp_path / "a")
    cfg.MODEL.pretrained_weights = [{"path": str(path)}]
    with pytest.raises(ValueError, match=r"loading pretrained weights: student.backbone.pos_embed: checkpoint "
                                         r"\(1, 5, 32\) vs model \(1, 17, 32\); ibot_patch_loss.center: checkpoint "
                                         r"\(1, 1, 65\) vs model \(1, 64\)"):
        build_model(cfg)
    model = SSLMetaArch(tiny_cfg(tmp_path / "b"))
    with pytest.raises(ValueError, match=r"shape mismatch loading .*model_0012499.pth: .*ibot_patch_loss.center"):
        Checkpointer(model, str(tmp_path / "b")).resume_or_load(str(path))


def test_find_lr_freezes_every_schedule_at_its_start_value():
    cfg = load_config(None, ["optim.scaling_rule=sqrt_wrt_1024,find_lr", "optim.warmup_epochs=3",
                             "teacher.warmup_teacher_temp=0.04", "teacher.teacher_temp=0.07",
                             "teacher.warmup_teacher_temp_epochs=5", "optim.epochs=10"])
    apply_scaling_rules(cfg, world_size=1)
    s = build_schedulers(cfg, epoch_len=4)
    lr = 0.004 * (10 / 1024) ** 0.5  # default base_lr and batch 10
    for it in (0, 7, 39):
        assert s["teacher_temp"][it] == pytest.approx(0.04)  # where the published schedule starts
        assert s["lr"][it] == pytest.approx(lr)
        assert s["wd"][it] == pytest.approx(0.04) and s["mom"][it] == pytest.approx(0.992)


def test_gradient_accumulation_updates_the_teacher_once_per_step(tmp_path):
    cfg = tiny_cfg(tmp_path, "gradient_accumulation_steps=2", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=1",
                   "teacher.momentum_teacher=0.5", "teacher.final_momentum_teacher=0.5", "optim.clip_grad=0")
    fix_random_seeds(0)
    model = build_model(cfg)
    t0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    res = do_train(cfg, model, dataset=tiny_dataset())
    ckpt = torch.load(res["final_checkpoint"], weights_only=True)
    assert ckpt["iteration"] == 0  # a single optimizer step over two micro-batches
    final = ckpt["model"]
    name = "backbone.blocks.0.mlp.fc1.weight"
    s1, t1 = final[f"student.{name}"], final[f"teacher.{name}"]
    assert not torch.equal(s1, t0[name])  # one optimizer step moved the student
    assert torch.allclose(t1, 0.5 * t0[name] + 0.5 * s1, atol=1e-7)  # one EMA step with m = 0.5
    assert not torch.allclose(t1, 0.25 * t0[name] + 0.75 * s1, atol=1e-6)  # not one per micro-batch
