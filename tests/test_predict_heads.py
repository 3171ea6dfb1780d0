"""Heads carry what prediction needs, and predict streams: a segmentation task's model_final.pth records bands,
statistics, sizes, class names and the backbone digest; predict defaults from them and refuses, before any
work, scenes of other bands, another backbone, wrong class lists and damaged head files; class maps carry a
colour table and class names; memory and work-folder disk do not grow beyond the outputs."""
import json
import os
import threading
import time
import tracemalloc

import numpy as np
import pytest
import rasterio
import torch

from test_embed import smooth_scene, write_tif
from test_eval_engine import STUDENT, make_run
from test_predict import trained  # noqa: F401 - module fixture: a head trained by the eval CLI

from dinov2.run.cli import run_command
from dinov2.run.predict import main as predict_main

BANDS = "B02,B03,B04,B08"
LOCK = ".panopticon.lock"


def _predict(head, scene, out, *extra, bands=BANDS):
    argv = [str(head), str(scene), "--sensor", "sentinel2", "--bands", bands, "-o", str(out), "--no-progress",
            *extra]
    return run_command("predict", predict_main, argv)


def _head_copy(trained, tmp_path, **changes):
    state = torch.load(trained["task"] / "model_final.pth", map_location="cpu", weights_only=True)
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    path = tmp_path / "head" / "model_final.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_head_records_what_prediction_needs(trained):
    from dinov2 import load_model
    from dinov2.utils.digest import state_dict_digest

    state = torch.load(trained["task"] / "model_final.pth", map_location="cpu", weights_only=True)
    assert state["format_version"] == 1 and state["bands"] == ["B02", "B03", "B04", "B08"]
    assert state["chn_ids"] == [492, 559, 664, 827] and state["sensor"] == "sentinel2"
    assert state["norm_mean"] is None and "own robust statistics" in state["norm_note"]
    assert state["chip_size"] == 16 and state["img_size"] == 16 and state["patch_size"] == STUDENT["patch_size"]
    assert state["class_names"] == ["a", "b", "c"] and state["embed_dim"] == STUDENT["embed_dim"]
    assert state["backbone_digest"] == state_dict_digest(load_model(str(trained["run"])))


def test_scene_with_other_bands_is_refused_before_any_work(trained, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(trained["task"], trained["scene"]["file"], out, bands="B02,B03,B04,B05") == 2
    err = capsys.readouterr().err
    assert "has bands ['B02', 'B03', 'B04', 'B05']" in err and "trained on bands ['B02', 'B03', 'B04', 'B08']" in err
    assert len(err.strip().splitlines()) == 1 and sorted(os.listdir(out)) == [LOCK]


def test_bands_in_another_order_are_reordered(trained, tmp_path):
    with rasterio.open(trained["scene"]["file"]) as src:
        arr, profile = src.read(), src.profile
    swapped = tmp_path / "swapped.tif"
    with rasterio.open(swapped, "w", **profile) as dst:
        dst.write(arr[[3, 2, 1, 0]])
    assert _predict(trained["task"], trained["scene"]["file"], tmp_path / "a") == 0
    assert _predict(trained["task"], swapped, tmp_path / "b", bands="B08,B04,B03,B02") == 0
    with rasterio.open(tmp_path / "a" / "scene_probs.tif") as a, rasterio.open(tmp_path / "b" / "swapped_probs.tif") as b:
        np.testing.assert_allclose(a.read(), b.read(), atol=1e-5)


@pytest.mark.parametrize("case", ["class_names", "empty", "truncated", "not_torch", "width"])
def test_bad_heads_are_refused_naming_the_file(trained, tmp_path, capsys, case):
    if case == "class_names":
        head = _head_copy(trained, tmp_path, class_names=["a", "b"])
        want = "2 class names"
    elif case == "width":
        head = _head_copy(trained, tmp_path, embed_dim=STUDENT["embed_dim"] * 2)
        want = "-dimensional features"
    else:
        head = tmp_path / "model_final.pth"
        good = (trained["task"] / "model_final.pth").read_bytes()
        head.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "not_torch": b"hello"}[case])
        want = "empty" if case == "empty" else "cannot be read"
    assert _predict(head, trained["scene"]["file"], tmp_path / "out", "--model", str(trained["run"])) == 2
    err = capsys.readouterr().err.strip()
    assert want in err and str(head) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args,needle", [(["--chip-size", "0"], "--chip-size must be a positive integer"),
                                         (["--model-input", "20"], "not a multiple of the patch size"),
                                         (["--chip-size", "32", "--overlap", "32"], "--overlap (32 px)"),
                                         (["--batch-size", "0"], "--batch-size must be an integer")])
def test_bad_sizes_are_refused(trained, tmp_path, capsys, args, needle):
    assert _predict(trained["task"], trained["scene"]["file"], tmp_path / "out", *args) == 2
    assert needle in capsys.readouterr().err


def test_another_backbone_is_refused_unless_forced(trained, tmp_path, capsys, caplog):
    other = make_run(tmp_path / "other", seed=7)
    assert _predict(trained["task"], trained["scene"]["file"], tmp_path / "o1", "--model", str(other)) == 2
    assert "the head was trained on backbone weights with digest" in capsys.readouterr().err
    assert _predict(trained["task"], trained["scene"]["file"], tmp_path / "o2", "--model", str(other),
                    "--force") == 0
    assert "--force: predicting anyway" in caplog.text


def test_defaults_from_the_head_and_old_heads_still_work(trained, tmp_path, caplog):
    out = tmp_path / "out"
    assert _predict(trained["task"], trained["scene"]["file"], out) == 0  # chip 16 px from the head
    marker = json.loads((out / ".predict" / "scene.done.json").read_text())
    assert marker["signature"]["chip"] == 16 and marker["signature"]["model_input"] == 16
    meta = json.loads((out / "scene_classes.json").read_text())
    assert meta["classes"] == ["a", "b", "c"] and meta["report"] == {"absurd_pixels": 0}
    with rasterio.open(out / "scene_classes.tif") as c:
        assert json.loads(c.tags()["CLASS_NAMES"]) == ["a", "b", "c"] and c.descriptions == ("class",)
        colors = c.colormap(1)
        assert len({colors[k] for k in range(3)}) == 3 and c.nodata == 255
        assert c.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
    old = _head_copy(trained, tmp_path, **{k: None for k in (
        "format_version", "bands", "chn_ids", "sensor", "norm_mean", "norm_std", "norm_note", "chip_size",
        "patch_size", "embed_dim", "backbone_digest", "img_size")})
    assert _predict(old, trained["scene"]["file"], tmp_path / "old", "--model", str(trained["run"]),
                    "--chip-size", "32") == 0
    assert "written by an earlier version" in caplog.text


def _measure(trained, tmp_path, size, tag):
    """(tracemalloc peak bytes, peak bytes of work files, raw output bytes) of predicting a size x size scene."""
    from dinov2 import load_model
    from dinov2.inference.predict import PredictSettings, SegmentationHead, predict_scenes
    from dinov2.inference.sources import collect_scenes

    tif = write_tif(tmp_path / f"{tag}.tif", smooth_scene(size, size, seed=3))
    scenes = collect_scenes([tif], "sentinel2", BANDS.split(","))
    model = load_model(str(trained["run"]))
    head = SegmentationHead(str(trained["task"] / "model_final.pth"), model.embed_dim)
    out = tmp_path / f"out_{tag}"
    stats = tmp_path / "stats.json"  # fixed statistics: the scene-statistics read is bounded, not streamed
    stats.write_text(json.dumps({"mean": [1000.0] * 4, "std": [300.0] * 4}))
    peak_disk, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            try:  # the work files; GDAL's COG copy at the end (final_cog*) is the output being written
                total = sum(f.stat().st_size for f in (out / ".predict").rglob("*")
                            if f.is_file() and not f.name.startswith("final_cog"))
            except OSError:  # a file renamed or removed while listing
                continue
            peak_disk[0] = max(peak_disk[0], total)
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    tracemalloc.start()
    try:
        predict_scenes(scenes, model, head, str(out), PredictSettings(chip_size=32, overlap=8, progress=False,
                                                                   norm_stats=str(stats)),
                       torch.device("cpu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        stop.set()
        t.join()
    return peak, peak_disk[0], size * size * (1 + 4 * 3)  # raw class ids + float32 probabilities of 3 classes


def test_predict_memory_and_work_disk_are_flat(trained, tmp_path):
    small_peak, small_disk, small_bound = _measure(trained, tmp_path, 64, "small")
    big_peak, big_disk, big_bound = _measure(trained, tmp_path, 384, "big")  # 36x the area
    assert big_peak < 1.5 * small_peak + (4 << 20), (small_peak, big_peak)
    for disk, bound in ((small_disk, small_bound), (big_disk, big_bound)):
        assert disk <= bound + (256 << 10), (disk, bound)  # the uncompressed outputs (+ carried rows), no more
