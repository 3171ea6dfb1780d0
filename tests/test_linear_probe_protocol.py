"""The linear-probe protocol on GEO-Bench-format fixtures with a tiny real backbone: the default mode re-augments
every iteration (fresh crops, features on the fly, one backbone pass per batch for all heads), the
``optim.feature_cache`` mode passes the train set through the backbone once, and multiclass and multilabel heads
train and are picked on the validation set."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_student_cfg
from eval_fixtures import write_benv2, write_geobench_task

from dinov2.eval.model_loading import EvalBackbone
from dinov2.eval.tasks import build_task_cfg, run_task
from dinov2.models import build_model

CROP = [{"id": "RandomResizedCrop", "size": 16, "scale": [0.2, 1.0], "antialias": True},
        {"id": "RandomHVFlip", "p": 0.5}]
FIXED = [{"id": "Resize", "size": 16}]


class RecordingBackbone(EvalBackbone):
    """The real frozen tiny ViT; remembers every batch it is run on and whether that ran in inference mode
    (feature extraction of a whole dataset) or not (a training iteration of the on-the-fly probe)."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = []

    def last_blocks(self, x, n):
        self.calls.append((torch.is_inference_mode_enabled(), x["imgs"].detach().clone()))
        return super().last_blocks(x, n)


def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    model, _ = build_model(tiny_student_cfg(layerscale=1.0, pos_emb_img_size=16), only_teacher=True, img_size=16)
    return RecordingBackbone(model)


def task_cfg(tmp_path: Path, train_tf, multilabel=False, task="m-eurosat", **optim):
    gb = lambda split, tf: {"id": f"geobench.{task}", "split": split, "transform": tf}  # noqa: E731
    cfg = {"task": {"id": "multilabelclassification" if multilabel else "classification"},
           "train_dataset": gb("train", train_tf), "val_dataset": gb("val", FIXED),
           "test_datasets_list": [gb("test", FIXED)],
           "heads": {"n_last_blocks_list": [1, 2], "learning_rates": [1e-6, 1.0, 10.0]},
           "optim": {"dl": {"batch_size": 1, "num_workers": 0}, **optim}}
    path = tmp_path / "cfg" / "probe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return build_task_cfg(path)  # merged with the shipped defaults (feature_cache: false unless set)


@pytest.fixture(scope="module")
def one_image_task(tmp_path_factory):
    """One training image, so every iteration (batch size 1) is a whole epoch of the same image."""
    root = tmp_path_factory.mktemp("gb_one")
    write_geobench_task(root, "m-eurosat", {"train": 1, "valid": 3, "test": 3})
    return root


def test_default_mode_reaugments_every_epoch(one_image_task, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(one_image_task))
    cfg = task_cfg(tmp_path, CROP, epochs=4)
    assert cfg.optim.feature_cache is False
    backbone = tiny_backbone()
    run_task(cfg, backbone, tmp_path / "out", device="cpu")
    train_inputs = [imgs for inference, imgs in backbone.calls if not inference]
    # 4 epochs of one image at batch size 1: 4 iterations, ONE backbone pass each for all 2x2x3 heads
    assert len(train_inputs) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(train_inputs[i], train_inputs[j]), f"epochs {i} and {j} saw the same crop"
    # val and test (3 + 3 images) were extracted once, in inference mode, not per validation
    assert sum(inference for inference, _ in backbone.calls) == 6
    out = json.loads((tmp_path / "out" / "results_eval_linear.json").read_text())
    assert out["protocol"] == "on-the-fly augmentation" and len(out["all_val"]) == 12

    # control: a deterministic train transform gives the same input every epoch (the test above can fail)
    backbone = tiny_backbone()
    run_task(task_cfg(tmp_path, FIXED, epochs=3), backbone, tmp_path / "out_fixed", device="cpu")
    fixed = [imgs for inference, imgs in backbone.calls if not inference]
    assert len(fixed) == 3 and all(torch.equal(fixed[0], f) for f in fixed[1:])


def test_feature_cache_mode_passes_train_set_once(one_image_task, tmp_path, monkeypatch):
    monkeypatch.setenv("GEO_BENCH_DIR", str(one_image_task))
    backbone = tiny_backbone()
    res = run_task(task_cfg(tmp_path, CROP, epochs=4, feature_cache=True), backbone, tmp_path / "out",
                   device="cpu")
    assert all(inference for inference, _ in backbone.calls)  # no forward pass during head training
    assert len(backbone.calls) == 1 + 3 + 3  # train once, val, test
    assert set(res) == {"acc_top-1_micro", "acc_top-1_macro", "acc_top-1_macro_present_classes", "acc_top-5_micro"}
    out = json.loads((tmp_path / "out" / "results_eval_linear.json").read_text())
    assert out["protocol"].startswith("feature_cache") and out["max_iter"] == 4


def probe_task(tmp_path: Path, train, val, test, multilabel: bool, epochs: int, batch_size: int):
    cfg = {"task": {"id": "multilabelclassification" if multilabel else "classification"},
           "train_dataset": train, "val_dataset": val, "test_datasets_list": [test],
           "heads": {"n_last_blocks_list": [1, 2], "learning_rates": [1e-6, 1.0, 10.0]},
           "optim": {"epochs": epochs, "dl": {"batch_size": batch_size, "num_workers": 0}}}
    path = tmp_path / "cfg" / "probe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return build_task_cfg(path)


@pytest.mark.parametrize("multilabel", [False, True], ids=["multiclass", "multilabel"])
def test_heads_train_and_best_is_picked_on_val(multilabel, tmp_path, monkeypatch):
    """Default (on-the-fly) mode on GEO-Bench m-eurosat (multiclass) and BigEarthNet-v2 (multilabel, 19 labels).
    The fixtures' class signal is a pixel pattern that random crops destroy, so the train transform here is
    fixed; re-augmentation is shown above."""
    if multilabel:
        write_benv2(tmp_path / "ben", {"train": 6, "validation": 3, "test": 3})
        ds = lambda split: {"id": "benv2", "root": str(tmp_path / "ben"), "bands": "s2", "split": split,  # noqa
                            "transform": FIXED}
        cfg = probe_task(tmp_path, ds("train"), ds("validation"), ds("test"), True, epochs=20, batch_size=6)
    else:
        write_geobench_task(tmp_path / "gb", "m-eurosat", {"train": 16, "valid": 8, "test": 8})
        monkeypatch.setenv("GEO_BENCH_DIR", str(tmp_path / "gb"))
        ds = lambda split: {"id": "geobench.m-eurosat", "split": split, "transform": FIXED}  # noqa: E731
        cfg = probe_task(tmp_path, ds("train"), ds("val"), ds("test"), False, epochs=15, batch_size=8)
    res = run_task(cfg, tiny_backbone(), tmp_path / "out", device="cpu")
    out = json.loads((tmp_path / "out" / "results_eval_linear.json").read_text())
    first = "MulLabAvergPrec_macro" if multilabel else "acc_top-1_micro"
    val = {head: vals[first] for head, vals in out["all_val"].items()}
    assert len(val) == 2 * 2 * 3
    best = out["best_classifier"]
    assert val[best] == max(val.values()) and out["val"][first] == val[best]
    # heads with lr 1e-6 barely move from their N(0, 0.01) start: the picked head is a trained one, clearly better
    untrained = [v for h, v in val.items() if h.endswith("lr_0_00000")]
    assert not best.endswith("lr_0_00000") and val[best] >= max(untrained) + 10.0
    # results.csv reports that head on the test set
    assert out["test"]["test0"][first] == res[first] and res[first] >= (60.0 if multilabel else 50.0)
    saved = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)
    assert saved["best_classifier"] == best and len(saved["heads"]) == 2 * 12


def test_batch_stream_runs_epochs_back_to_back():
    """Endless sampler: full batches that run across epoch boundaries; every epoch is a new permutation."""
    from dinov2.eval.linear import batch_index_stream

    stream = batch_index_stream(10, 4, seed=3)
    batches = [next(stream) for _ in range(15)]
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]  # 60 indices = 6 epochs of 10
    epochs = [flat[e * 10:(e + 1) * 10] for e in range(6)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 6  # reshuffled every epoch
