"""Training loop on CPU with a tiny ViT and tiny crops: learning, resume, NaN stop, freezing, schedules, CLI."""
import json
import os

import pytest
import torch
import yaml
from test_train_common import TINY, SimulatedKill, tiny_cfg, tiny_dataset, write_geotiff_run

from dinov2.train.checkpointer import Checkpointer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_model, build_schedulers, do_train, main
from dinov2.utils.param_groups import apply_optim_schedule
from dinov2.utils.utils import fix_random_seeds


def _model(cfg):
    fix_random_seeds(int(cfg.train.seed))
    return build_model(cfg)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_loss_decreases_on_repeated_batch(tmp_path):
    from dinov2.data.collate import collate_data_and_cast

    cfg = tiny_cfg(tmp_path)
    model = _model(cfg)
    ds = tiny_dataset()
    batch = collate_data_and_cast([ds[i] for i in range(4)], (0.1, 0.5), 0.5, torch.float32, n_tokens=16)
    opt = torch.optim.AdamW(model.get_params_groups(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        losses.append(float(model.forward_backward(batch, teacher_temp=0.04)["total_loss"]))
        opt.step()
        model.update_teacher(0.9)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def _state_equal(a, b, prefix=""):
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    # uninterrupted: 6 iterations, checkpoints every 2
    cfg_a = tiny_cfg(tmp_path / "a", "optim.epochs=3")
    res_a = do_train(cfg_a, _model(cfg_a), dataset=tiny_dataset())
    final_a = _load(res_a["final_checkpoint"])
    assert final_a["iteration"] == 5

    # same run killed while loading the batch of iteration 4 (after the checkpoint of iteration 3) ...
    cfg_b = tiny_cfg(tmp_path / "b", "optim.epochs=3")
    with pytest.raises(SimulatedKill):
        do_train(cfg_b, _model(cfg_b), dataset=tiny_dataset(kill_after=4 * 4))
    ckpt_b = Checkpointer(SSLMetaArch(cfg_b), cfg_b.train.output_dir)
    assert os.path.basename(ckpt_b.last_checkpoint()) == "model_0000003.pth"
    assert not os.path.exists(tmp_path / "b" / "model_final.pth")

    # ... and resumed in a fresh model (different init seed) from the last checkpoint
    fix_random_seeds(12345)
    res_b = do_train(cfg_b, build_model(cfg_b), dataset=tiny_dataset())
    final_b = _load(res_b["final_checkpoint"])
    assert final_b["iteration"] == 5
    assert _state_equal(final_a["model"], final_b["model"]), "resumed weights differ from the uninterrupted run"
    assert torch.equal(final_a["model"]["dino_loss.center"], final_b["model"]["dino_loss.center"])
    # the metrics of the resumed part continue at iteration 4
    its = [json.loads(line)["iteration"] for line in open(tmp_path / "b" / "training_metrics.json")]
    assert its == [0, 1, 2, 3, 4, 5]


def test_nan_pixels_stop_training_and_keep_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.epochs=3")
    # iterations 0-1 read 8 clean samples, iteration 2 gets NaN pixels: the model refuses them (naming image and
    # channel) before they can turn into a NaN loss or NaN weights
    with pytest.raises(ValueError, match=r"image \d+ channel \d+ has NaN pixels"):
        do_train(cfg, _model(cfg), dataset=tiny_dataset(nan_after=8))
    assert open(tmp_path / "last_checkpoint").read().strip() == "model_0000001.pth"
    good = _load(tmp_path / "model_0000001.pth")
    assert good["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_final.pth").exists()


def test_head_freeze_ends_and_schedules_follow_config(tmp_path):
    cfg = tiny_cfg(tmp_path, "optim.epochs=3", "optim.warmup_epochs=1", "optim.freeze_weights=last_layer=1",
                   "teacher.warmup_teacher_temp_epochs=2", "optim.min_lr=0.0")
    model = _model(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    do_train(cfg, model, dataset=tiny_dataset())
    after_epoch1 = _load(tmp_path / "model_0000001.pth")["model"]
    final = _load(tmp_path / "model_final.pth")["model"]
    ll = "student.dino_head.last_layer.weight_v"
    assert torch.equal(after_epoch1[ll], init[ll]), "last layer moved during its freeze epoch"
    assert not torch.equal(final[ll], init[ll]), "last layer never trained after the freeze (published fault)"
    assert not torch.equal(after_epoch1["student.dino_head.mlp.0.weight"], init["student.dino_head.mlp.0.weight"])
    # teacher = EMA of the student: moved, but less than the student
    t, s = "teacher.backbone.blocks.0.attn.qkv.weight", "student.backbone.blocks.0.attn.qkv.weight"
    assert 0 < (final[t] - init[t]).abs().sum() < (final[s] - init[s]).abs().sum()

    recs = [json.loads(line) for line in open(tmp_path / "training_metrics.json")]
    lrs = [r["lr"] for r in recs]
    peak = cfg.optim.lr
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak / 2)  # linear warmup over epoch 1 (2 iterations)
    assert lrs[2] == pytest.approx(peak) and lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # cosine to min_lr
    assert [r["last_layer_lr"] for r in recs[:2]] == [0.0, 0.0] and recs[2]["last_layer_lr"] > 0
    temps = [r["teacher_temp"] for r in recs]
    assert temps[0] == pytest.approx(0.04) and temps[4] == pytest.approx(0.07) and temps[5] == pytest.approx(0.07)
    assert recs[0]["mom"] == pytest.approx(0.992) and recs[-1]["mom"] > recs[0]["mom"]
    assert (tmp_path / "training_curve.png").stat().st_size > 1000

    scheds = build_schedulers(cfg, epoch_len=2)
    assert scheds["wd"][0] == pytest.approx(0.04) and scheds["wd"][5] < 0.4 and scheds["wd"][100] == 0.4
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_multiplier": 0.5,
                            "wd_multiplier": 0.0, "freeze_epochs": 1.0}], lr=1.0)
    apply_optim_schedule(opt, lr=0.2, wd=0.1, epoch=0.5)
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.0
    apply_optim_schedule(opt, lr=0.2, wd=0.1, epoch=1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_gradient_accumulation_bf16_and_keep_n(tmp_path):
    cfg = tiny_cfg(tmp_path, "gradient_accumulation_steps=2", "compute_precision.dtype=bf16", "train.max_to_keep=1",
                   "optim.epochs=3", "train.saveckp_freq=0.5")
    model = _model(cfg)
    assert model.precision.autocast_dtype == torch.bfloat16 and model.fp16_scaler is None  # CPU: no scaler
    res = do_train(cfg, model, dataset=tiny_dataset())
    assert res["last_record"]["current_batch_size"] == 8
    assert torch.isfinite(torch.tensor(res["last_record"]["total_loss"]))
    periodic = sorted(f for f in os.listdir(tmp_path) if f.startswith("model_0"))
    assert periodic == ["model_0000004.pth"]  # keep-N pruned the older ones


def test_pretrained_weights_include_exclude_prefix_map(tmp_path):
    from dinov2.models import build_model as build_backbone

    # an "RGB" ViT of the same size with the standard patch embedding, saved as a raw state dict
    rgb, _ = build_backbone(dict(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=7), only_teacher=True,
                            img_size=28)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    entries = [{"path": str(tmp_path / "rgb.pth"), "exclude": "pos_emb,patch_embed", "prefix_map": {"": p}}
               for p in ("teacher.backbone.", "student.backbone.")]
    cfg = tiny_cfg(tmp_path / "run")
    cfg.MODEL.pretrained_weights = entries
    model = _model(cfg)
    sd = model.state_dict()
    for who in ("student", "teacher"):
        assert torch.equal(sd[f"{who}.backbone.blocks.1.mlp.fc2.weight"], rgb.state_dict()["blocks.1.mlp.fc2.weight"])
        assert torch.equal(sd[f"{who}.backbone.cls_token"], rgb.state_dict()["cls_token"])
        assert not torch.equal(sd[f"{who}.backbone.pos_embed"], rgb.state_dict()["pos_embed"])

    # MODEL.WEIGHTS starts a new run from a finished one (iteration restarts at 0)
    src = tmp_path / "src"
    cfg_src = tiny_cfg(src, "optim.epochs=1")
    do_train(cfg_src, _model(cfg_src), dataset=tiny_dataset())
    cfg2 = tiny_cfg(tmp_path / "stage2", "optim.epochs=1", f"MODEL.WEIGHTS={src / 'model_final.pth'}")
    m2 = _model(cfg2)
    ck = Checkpointer(m2, cfg2.train.output_dir)
    assert ck.resume_or_load(cfg2.MODEL.WEIGHTS)["start_iter"] == 0
    assert _state_equal(m2.state_dict(), _load(src / "model_final.pth")["model"], "student.")


def test_cli_on_geotiff_scenes(tmp_path):
    run_yaml = write_geotiff_run(tmp_path)
    out = tmp_path / "out"
    # W&B requested: used when installed (offline), otherwise a warning and training goes on
    res = main([f"--config-file={run_yaml}", f"--output_dir={out}", *TINY, "optim.epochs=1", "train.use_wandb=true",
                "train.wandb_mode=offline"])
    assert res["iteration"] == 1
    for f in ("config.yaml", "model_final.pth", "last_checkpoint", "training_metrics.json", "training_curve.png",
              "logs/log.txt"):
        assert (out / f).exists(), f
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["student"]["embed_layer"] == "PanopticonPE" and saved["optim"]["lr"] > 0
    sd = _load(out / "model_final.pth")["model"]
    assert any(k.startswith("teacher.backbone.") for k in sd) and any(k.startswith("student.backbone.") for k in sd)
    assert "Training" in (out / "logs" / "log.txt").read_text()


def test_submitit_launcher_runs_training_in_debug_mode(tmp_path, capsys):
    from dinov2.run.train import launch

    run_yaml = write_geotiff_run(tmp_path)
    out = tmp_path / "job"
    job = launch(["--cluster=debug", "--ngpus=1", f"--config-file={run_yaml}", f"--output-dir={out}", *TINY,
                       "optim.epochs=1"])
    assert job.result()["iteration"] == 1
    assert (out / "model_final.pth").exists() and (out / "slurm").is_dir()
    printed = capsys.readouterr().out
    assert f"submitted job {job.job_id} (debug); logs: {out / 'slurm' / str(job.job_id)}/" in printed


def test_training_runs_periodic_and_final_evaluation(tmp_path):
    from eval_fixtures import write_resisc45

    write_resisc45(tmp_path / "resisc45", n_per_class=4)
    ds = {"id": "resisc45", "root": str(tmp_path / "resisc45"), "transform": [{"id": "Resize", "size": 28}]}
    task = {"task": {"id": "knn"}, "train_dataset": dict(ds, split="train"), "test_dataset": dict(ds, split="test"),
            "heads": {"nb_knn": [1]}, "optim": {"dl": {"batch_size": 8, "num_workers": 0}}}
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "r45_knn.yaml").write_text(yaml.safe_dump(task))
    out = tmp_path / "out"
    res = main([f"--config-file={write_geotiff_run(tmp_path)}", f"--output-dir={out}", *TINY, "optim.epochs=1",
                "eval.skip=false", "eval.eval_period_iterations=1", f"eval.config_obj={tmp_path / 'tasks'}",
                f"eval.final_model.config_obj={tmp_path / 'tasks' / 'r45_knn.yaml'}", "eval.remove_ckpts=true"])
    assert sorted(res["eval"]["periodic"]) == [0, 1]
    for it in (0, 1):
        assert list((out / "eval" / str(it)).rglob("results.csv")), f"no eval results for iteration {it}"
        assert not (out / "eval" / str(it) / "teacher_checkpoint.pth").exists()  # removed after evaluation
    final = res["eval"]["final"]
    assert len(final) == 1 and 0.0 <= next(iter(final.values()))["acc_top-1_micro"] <= 100.0
    assert list((out / "eval_model_final").rglob("results.csv"))


def test_fastdevrun_uses_throwaway_subfolder(tmp_path):
    out = tmp_path / "fdr"
    res = main(["--fastdevrun", f"--config-file={write_geotiff_run(tmp_path)}", f"--output-dir={out}", *TINY,
                "eval.skip=true"])
    assert res["iteration"] == 9  # fastdevrun: 1 epoch of 10 iterations, batch 2, one worker
    assert out.is_dir() and list(out.iterdir()) == []  # the random sub-folder is deleted at the end
