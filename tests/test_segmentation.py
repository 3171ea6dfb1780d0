"""Segmentation task type: GEO-Bench segmentation files written by the tests, dense heads on a tiny Panopticon,
mIoU against an independent confusion-matrix computation, fine-tuning, shipped task configs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg_fixtures import SEG_TASK_BANDS, write_geobench_segmentation
from test_eval_engine import make_run, read_csv, write_task

from dinov2.eval.dense_heads import build_dense_head
from dinov2.eval.eval import EvalTaskError, main
from dinov2.eval.segmentation import DenseCollate, SegMetrics
from dinov2.eval.tasks import build_task_cfg, eval_config_root

DL = {"batch_size": 4, "num_workers": 0}


def seg_task(epochs=10, **extra):
    ds = {"id": "geobench.m-cashew-plant"}
    cfg = {"task": {"id": "segmentation", "num_classes": 3}, "train_dataset": {**ds, "split": "train"},
           "val_dataset": {**ds, "split": "val"},
           "test_datasets_list": [{**ds, "split": "test", "display_name": "cashew"}],
           "heads": {"n_last_blocks": 2, "learning_rates": [1e-3, 1e-2], "channels": 16},
           "optim": {"epochs": epochs, "warmup_epochs": 0, "dl": DL}}
    for k, v in extra.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return cfg


@pytest.fixture(scope="module")
def seg_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg_world")
    write_geobench_segmentation(root / "geobench", "m-cashew-plant", {"train": 16, "valid": 6, "test": 6},
                                n_classes=3, size=32, block=8)
    return {"root": root, "run": make_run(root / "run")}


def confusion_metrics(pred: np.ndarray, target: np.ndarray, n: int, ignore: int):
    """Independent numpy oracle: IoU per class from a confusion matrix; mIoU over ALL classes (absent ones 0), over
    the classes present in the target, mean F1, overall pixel accuracy."""
    keep = target != ignore
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (target[keep], pred[keep]), 1)
    inter = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - np.diag(cm)
    iou = inter / (union + 1e-6)
    f1 = 2 * inter / (cm.sum(0) + cm.sum(1) + 1e-6)
    present = cm.sum(1) > 0
    return {"mIoU": iou.mean(), "mIoU_present_classes": iou[present].mean(), "mF1": f1.mean(),
            "mAcc": inter.sum() / cm.sum(), "iou": iou}


def test_seg_metrics_equal_confusion_matrix_with_absent_classes():
    rng = np.random.default_rng(0)
    n, ignore = 6, 255
    pred = rng.integers(0, 4, size=(3, 10, 10))  # classes 4, 5 never predicted
    target = rng.integers(0, 3, size=(3, 10, 10))  # classes 3..5 absent from the targets
    target[:, :2] = ignore
    m = SegMetrics(n, ignore)
    for p, t in zip(pred, target):  # accumulated over batches
        m.update(torch.from_numpy(p[None]), torch.from_numpy(t[None]))
    out = m.compute()
    ref = confusion_metrics(pred, target, n, ignore)
    for key in ("mIoU", "mIoU_present_classes", "mF1", "mAcc"):
        assert out[key] == pytest.approx(ref[key], abs=1e-9), key
    assert out["pixel_acc"] == out["mAcc"] and out["n_pixels"] == 3 * 8 * 10
    assert out["IoU_per_class"] == pytest.approx(list(ref["iou"]), abs=1e-9)
    assert out["IoU_per_class"][3:] == [0.0, 0.0, 0.0] and out["present_classes"] == [0, 1, 2]
    # all classes count: mIoU = (IoU0 + IoU1 + IoU2) / 6, half the mean over the 3 present classes
    assert out["mIoU"] == pytest.approx(out["mIoU_present_classes"] / 2)


def test_hand_computed_miou():
    # 3 classes, class 2 absent: pred [0,0,1,1], target [0,1,1,1] -> IoU0 = 1/2, IoU1 = 2/3, IoU2 = 0,
    # mIoU = 7/18 (all classes), 7/12 (present classes), F1 = 2/3, 4/5, 0, acc = 3/4
    m = SegMetrics(3, 255)
    m.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 1, 1, 1]]]))
    out = m.compute()
    assert out["mIoU"] == pytest.approx(7 / 18) and out["mIoU_present_classes"] == pytest.approx(7 / 12)
    assert out["mF1"] == pytest.approx((2 / 3 + 4 / 5) / 3) and out["pixel_acc"] == pytest.approx(0.75)


def test_labels_outside_the_classes_are_refused():
    m = SegMetrics(2, 255)
    with pytest.raises(ValueError, match=r"Label values \[7\]"):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 7], [1, 255]]]))


def test_dense_collate_pads_to_patch_multiple_and_ignores_padding():
    coll = DenseCollate(patch_size=8, ignore_index=255)
    x = {"imgs": torch.ones(2, 10, 13), "chn_ids": torch.tensor([664, 559])}
    mask = torch.arange(130).reshape(10, 13) % 3
    xb, yb = coll([(x, mask)])
    assert xb["imgs"].shape == (1, 2, 16, 16) and yb.shape == (1, 16, 16)
    assert torch.equal(yb[0, :10, :13], mask) and (yb[0, 10:] == 255).all() and (yb[0, :, 13:] == 255).all()
    assert (xb["imgs"][0, :, 10:] == 0).all() and xb["chn_ids"].shape == (1, 2)
    # joint resize keeps labels as labels (nearest) and flips move image and mask together
    coll = DenseCollate(patch_size=8, ignore_index=255, img_size=16, augment=True, seed=3)
    img = torch.zeros(1, 8, 8)
    img[0, :, :4] = 1.0
    m = torch.zeros(8, 8, dtype=torch.long)
    m[:, :4] = 1
    for _ in range(6):
        xb, yb = coll([({"imgs": img, "chn_ids": torch.tensor([664])}, m)])
        assert set(yb.unique().tolist()) <= {0, 1}
        assert torch.equal((xb["imgs"][0, 0] > 0.5).long(), yb[0])


@pytest.mark.parametrize("kind,size", [("linear", (4, 6)), ("upernet", (16, 24)), ("upernet_ppm", (16, 24))])
def test_heads_shapes(kind, size):
    torch.manual_seed(0)
    head = build_dense_head(kind, [16, 16, 16], num_classes=5, channels=8).eval()
    maps = [torch.randn(2, 16, 4, 6) for _ in range(3)]
    out = head(maps)
    assert out.shape == (2, 5, *size)  # upernets: the finest pyramid level is x4 the patch grid
    if kind == "linear":  # value oracle: BatchNorm (running stats) then a 1x1 conv of the concatenated maps
        cat = torch.cat(maps, 1)
        bn = head.bn
        z = (cat - bn.running_mean[None, :, None, None]) / torch.sqrt(bn.running_var + bn.eps)[None, :, None, None]
        z = z * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
        ref = torch.einsum("bchw,kc->bkhw", z, head.cls.weight[:, :, 0, 0]) + head.cls.bias[None, :, None, None]
        assert torch.allclose(out, ref, atol=1e-5)
    # CNN-like stages: other widths and sizes, already a pyramid (no resampling: the finest stage's grid)
    head = build_dense_head(kind, [8, 16], num_classes=5, channels=8, pyramid=False).eval()
    stages = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    out = head(stages)
    assert out.shape == (2, 5, 8, 8)
    if kind == "linear":
        up = F.interpolate(stages[1], size=(8, 8), mode="bilinear", align_corners=False)
        assert torch.allclose(out, head.cls(head.bn(torch.cat([stages[0], up], 1))), atol=1e-6)


def test_geobench_segmentation_masks_read_back(seg_world, monkeypatch):
    from dinov2.data.datasets.geobench import GeobenchDataset
    import h5py

    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_world["root"] / "geobench"))
    ds = GeobenchDataset("m-cashew-plant", split="test")
    x, y = ds[2]
    stats = json.loads((ds.task_dir / "band_stats.json").read_text())
    spectral = [b for b in SEG_TASK_BANDS["m-cashew-plant"] if b != "Cloud Probability"]  # the 12 inputs
    with h5py.File(ds.task_dir / f"{ds.samples[2]}.hdf5") as f:
        expected = np.asarray(f["label"])
        imgs = np.stack([(np.asarray(f[b], np.float64) - stats[b]["mean"]) / stats[b]["std"] for b in spectral])
    assert y.dtype == torch.long and torch.equal(y, torch.from_numpy(expected.astype(np.int64)))
    assert len(ds) == 6 and len(spectral) == 12
    assert torch.allclose(x["imgs"], torch.from_numpy(imgs).float(), atol=1e-5)  # z-scored, cloud band left out


def test_segmentation_task_end_to_end(seg_world, monkeypatch, tmp_path):
    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_world["root"] / "geobench"))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    write_task(tmp_path / "cfg", "cashew_seg", seg_task())
    out = tmp_path / "out"
    res = main(str(seg_world["run"]), str(tmp_path / "cfg" / "cashew_seg.yaml"), output_dir=str(out), device="cpu")
    vals = res["cfg/cashew_seg"]
    # 3 classes with distinct spectra and textures: chance mIoU ~ 20; ~40 iterations learn the mask
    assert vals["mIoU"] >= 75.0 and vals["pixel_acc"] >= 85.0 and vals["pixel_acc"] == vals["mAcc"]
    assert vals["mIoU_present_classes"] >= vals["mIoU"]
    detail = json.loads((out / "cfg/cashew_seg" / "results_eval_segmentation.json").read_text())
    assert len(detail["all_val"]) == 4  # 2 decoders x 2 lrs
    assert detail["all_val"]["linear_lr_0_01000"]["mIoU"] >= 70.0  # the linear head alone converges
    assert detail["test"]["cashew"]["mIoU"] == vals["mIoU"]
    rows = read_csv(out / "cfg/cashew_seg" / "results.csv")
    assert {r["metric"] for r in rows} == {"mIoU", "mIoU_present_classes", "mF1", "mAcc", "pixel_acc"}
    assert rows[0]["best_classifier"] == detail["best_head"]
    ckpt = torch.load(out / "cfg/cashew_seg" / "model_final.pth", weights_only=True)
    assert ckpt["best_head"] == detail["best_head"] and "backbone" not in ckpt


def test_finetuning_changes_backbone_but_not_the_evaluated_model(seg_world, monkeypatch, tmp_path):
    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_world["root"] / "geobench"))
    monkeypatch.setenv("PANOPTICON_NO_TQDM", "1")
    cfg = seg_task(epochs=2, **{"heads.decoders": ["linear"], "heads.learning_rates": [1e-2],
                                "optim.finetune": {"enabled": True, "backbone_lr": 1e-3, "drop_path": 0.1}})
    write_task(tmp_path / "cfg", "ft", cfg)
    before = torch.load(seg_world["run"] / "model_final.pth", weights_only=True)["model"]
    main(str(seg_world["run"]), str(tmp_path / "cfg" / "ft.yaml"), output_dir=str(tmp_path / "out"), device="cpu")
    ckpt = torch.load(tmp_path / "out" / "cfg" / "ft" / "model_final.pth", weights_only=True)
    tuned = ckpt["backbone"]
    changed = [k for k, v in tuned.items() if not torch.equal(v, before[f"teacher.backbone.{k}"])]
    assert any(k.startswith("blocks.") for k in changed) and any(k.startswith("patch_embed.") for k in changed)
    after = torch.load(seg_world["run"] / "model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetuning_needs_one_head(seg_world, monkeypatch, tmp_path):
    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_world["root"] / "geobench"))
    write_task(tmp_path / "cfg", "ft2", seg_task(epochs=1, **{"optim.finetune": {"enabled": True}}))
    with pytest.raises(EvalTaskError, match="one decoder and one learning rate"):
        main(str(seg_world["run"]), str(tmp_path / "cfg" / "ft2.yaml"), output_dir=str(tmp_path / "o"),
             device="cpu")


def test_dataset_transform_is_refused(seg_world, monkeypatch, tmp_path):
    monkeypatch.setenv("GEO_BENCH_DIR", str(seg_world["root"] / "geobench"))
    cfg = seg_task(epochs=1)
    cfg["train_dataset"]["transform"] = [{"id": "Resize", "size": 16}]
    write_task(tmp_path / "cfg", "tr", cfg)
    with pytest.raises(EvalTaskError, match="take no 'transform'"):
        main(str(seg_world["run"]), str(tmp_path / "cfg" / "tr.yaml"), output_dir=str(tmp_path / "o"), device="cpu")


SEG_TASKS = {"cashew-plant-seg": ("m-cashew-plant", 7), "sa-crop-type-seg": ("m-SA-crop-type", 10),
             "pv4ger-seg": ("m-pv4ger-seg", 2), "chesapeake-landcover-seg": ("m-chesapeake-landcover", 7),
             "nz-cattle-seg": ("m-nz-cattle", 2), "neontree-seg": ("m-NeonTree", 2)}


@pytest.mark.parametrize("name", sorted(SEG_TASKS))
def test_shipped_segmentation_configs(name):
    from dinov2.data import sensors

    path = Path(eval_config_root()) / "1h" / "geobench" / f"{name}.yaml"
    cfg = build_task_cfg(path)
    ds_name, ncls = SEG_TASKS[name]
    assert cfg.task.id == "segmentation" and cfg.task.protocol == "pangaea" and cfg.heads.decoders == ["upernet_ppm"]
    assert cfg.heads.blocks == [3, 5, 7, 11] and cfg.task.inference == "sliding" and cfg.optim.epochs == 80
    for ds in [cfg.train_dataset, cfg.val_dataset, *cfg.test_datasets_list]:
        assert ds.id == f"geobench.{ds_name}" and not ds.get("transform")
    meta = sensors.load_ds_cfg(ds_name)["metainfo"]
    assert meta["task_id"] == "segmentation" and int(meta["num_classes"]) == ncls
    assert [s.split for s in [cfg.train_dataset, cfg.val_dataset, *cfg.test_datasets_list]] == ["train", "val", "test"]
