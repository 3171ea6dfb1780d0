"""The PANGAEA segmentation protocol: preset values, the UPerNet's layout, the step schedule against torch's
MultiStepLR, sliding-window inference at native resolution, random crops that move image and mask together."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinov2.eval.dense_data import DenseCollate
from dinov2.eval.dense_heads import UPerNet, build_dense_head
from dinov2.eval.dense_probe import multistep, sliding_logits, window_starts
from dinov2.eval.tasks import build_task_cfg, eval_config_root


def test_preset_values():
    cfg = build_task_cfg(eval_config_root() / "1h" / "geobench" / "cashew-plant-seg.yaml")
    assert cfg.task.protocol == "pangaea" and cfg.task.img_size == 224 and cfg.task.inference == "sliding"
    assert cfg.task.train_input == "crop" and cfg.task.augment is False and cfg.heads.blocks == [3, 5, 7, 11]
    assert cfg.heads.decoders == ["upernet_ppm"] and cfg.heads.channels == 512 and cfg.heads.learning_rates == [1e-4]
    assert (cfg.optim.epochs, cfg.optim.dl.batch_size, cfg.optim.weight_decay) == (80, 8, 0.05)
    assert cfg.optim.schedule == "multistep" and cfg.optim.milestones == [0.6, 0.9] and cfg.optim.gamma == 0.1
    quick = build_task_cfg(eval_config_root() / "1h" / "geobench" / "cashew-plant-seg.yaml",
                           {"task.protocol": "quick"})
    assert quick.heads.decoders == ["linear", "upernet"] and quick.task.inference == "resize" and quick.task.augment
    with pytest.raises(ValueError, match=r"task.protocol='pangea' is not a segmentation protocol; choose from "
                                         r"\['pangaea', 'quick'\]"):
        build_task_cfg(eval_config_root() / "1h" / "geobench" / "cashew-plant-seg.yaml", {"task.protocol": "pangea"})


def test_upernet_layout_and_wiring():
    torch.manual_seed(0)
    head = UPerNet([16] * 4, num_classes=5, channels=8).eval()
    neck = head.neck.resample
    assert [type(m).__name__ for m in neck] == ["Sequential", "ConvTranspose2d", "Identity", "MaxPool2d"]
    assert [type(m).__name__ for m in neck[0]] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert [s[0].output_size for s in head.ppm.stages] == [1, 2, 3, 6] and head.dropout.p == 0.1
    assert isinstance(head.dropout, nn.Dropout2d) and head.cls.kernel_size == (1, 1)
    assert build_dense_head("upernet_ppm", [768] * 4, 3, 512).bottleneck[0].in_channels == 4 * 512
    # value oracle of the wiring: the decoder recomputed step by step from its own layers
    maps = [torch.randn(2, 16, 6, 6) for _ in range(4)]
    up = lambda x, ref: F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    lv = [neck[0](maps[0]), neck[1](maps[1]), maps[2], neck[3](maps[3])]
    assert [tuple(x.shape[-2:]) for x in lv] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    top = lv[3]
    pooled = [up(stage(top), top) for stage in head.ppm.stages]
    lat = [head.lateral[i](lv[i]) for i in range(3)] + [head.ppm.bottleneck(torch.cat([top, *pooled], 1))]
    lat[2] = lat[2] + up(lat[3], lat[2])
    lat[1] = lat[1] + up(lat[2], lat[1])
    lat[0] = lat[0] + up(lat[1], lat[0])
    outs = [head.fpn[i](lat[i]) for i in range(3)] + [lat[3]]
    ref = head.cls(head.bottleneck(torch.cat([outs[0]] + [up(o, outs[0]) for o in outs[1:]], 1)))
    assert torch.allclose(head(maps), ref, atol=1e-5)


def test_step_schedule_equals_torch_multisteplr():
    total = 37
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(0.6 * total), int(0.9 * total)], gamma=0.1)
    for it in range(total):
        assert multistep(it, total, [0.6, 0.9], 0.1) == pytest.approx(opt.param_groups[0]["lr"]), it
        opt.step()
        sched.step()


def test_window_grid_is_pangaeas():
    """Origins round(linspace(0, H - win, ceil(H / win))) per axis."""
    assert window_starts(224, 224) == [0]
    assert window_starts(256, 224) == [0, 32]
    assert window_starts(500, 224) == [0, 138, 276]
    assert window_starts(40, 16) == [0, 12, 24]
    for size, win in ((256, 224), (500, 224), (401, 28)):
        n = math.ceil(size / win)
        assert window_starts(size, win) == [round(i * (size - win) / (n - 1)) for i in range(n)]


def test_sliding_logits_cover_and_average_at_native_resolution():
    imgs = torch.arange(2 * 3 * 40 * 37, dtype=torch.float32).reshape(2, 3, 40, 37)
    seen = []

    def identity(window):  # per-pixel "logits" = the pixels themselves: averaging must give them back exactly
        seen.append(tuple(window.shape[-2:]))
        return {"h": window * 1.0}

    out = sliding_logits(identity, imgs, 16)
    assert torch.equal(out["h"], imgs) and set(seen) == {(16, 16)} and len(seen) == 3 * 3
    calls = iter(range(100))

    def constant(window):  # window k predicts k everywhere: overlaps hold the mean of their windows
        return {"h": torch.full_like(window[:, :1], float(next(calls)))}

    out = sliding_logits(constant, imgs, 16)["h"][0, 0]
    rows, cols = window_starts(40, 16), window_starts(37, 16)
    expect = torch.zeros(40, 37)
    count = torch.zeros(40, 37)
    for k, (r, c) in enumerate((r, c) for r in rows for c in cols):
        expect[r:r + 16, c:c + 16] += k
        count[r:r + 16, c:c + 16] += 1
    assert torch.allclose(out, expect / count)
    small = sliding_logits(identity, imgs[..., :10, :10], 16)["h"]  # smaller than a window: resized once
    assert small.shape == (2, 3, 10, 10)


def test_random_crops_move_image_and_mask_together():
    coll = DenseCollate(patch_size=8, ignore_index=255, img_size=16, augment=True, seed=0, mode="crop")
    img = torch.arange(40 * 40, dtype=torch.float32).reshape(1, 40, 40)
    mask = torch.arange(40 * 40).reshape(40, 40)
    tops = set()
    for _ in range(8):
        xb, yb = coll([({"imgs": img, "chn_ids": torch.tensor([664])}, mask)])
        assert xb["imgs"].shape == (1, 1, 16, 16) and torch.equal(xb["imgs"][0, 0].long(), yb[0])
        tops.add(int(yb[0].min()) // 40)
    assert len(tops) > 1  # random positions
    coll = DenseCollate(patch_size=8, ignore_index=255, img_size=16, mode="crop")  # smaller image: padded
    small = coll([({"imgs": img[:, :10, :12], "chn_ids": torch.tensor([664])}, mask[:10, :12])])[1][0]
    assert torch.equal(small[:10, :12], mask[:10, :12]) and (small[10:] == 255).all() and (small[:, 12:] == 255).all()
