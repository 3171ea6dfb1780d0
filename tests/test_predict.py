"""`panopticon predict`: a segmentation head trained by the eval CLI on a label raster, applied to a GeoTIFF:
class and probability COGs with the input's CRS and transform, no-data kept, seams blended, resume."""
import json

import numpy as np
import pytest
import rasterio
import torch

from dense_fixtures import write_label_scene
from test_eval_engine import make_run, write_task

from dinov2.run.predict import default_backbone, main as predict_main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import os

    os.environ["PANOPTICON_NO_TQDM"] = "1"
    root = tmp_path_factory.mktemp("predict_world")
    scene = write_label_scene(root / "s", size=128)
    ds = {"id": "LabelRasterScenes", "scenes": [scene], "patch_size_m": 160, "block_size_m": 320,
          "min_valid_fraction": 0.0}
    cfg = {"task": {"id": "segmentation", "class_names": ["a", "b", "c"]}, "train_dataset": {**ds, "split": "train"},
           "val_dataset": {**ds, "split": "val"}, "test_datasets_list": [{**ds, "split": "test"}],
           "heads": {"n_last_blocks": 2, "decoders": ["linear"], "learning_rates": [1e-2]},
           "optim": {"epochs": 6, "warmup_epochs": 0, "dl": {"batch_size": 8, "num_workers": 0}}}
    write_task(root / "cfg", "mine", cfg)
    run = make_run(root / "run")
    from dinov2.eval.eval import main

    main(str(run), str(root / "cfg" / "mine.yaml"), device="cpu")
    return {"root": root, "scene": scene, "task": run / "eval_model_final" / "cfg" / "mine", "run": run}


def test_default_backbone_is_the_run(trained):
    assert default_backbone(trained["task"] / "model_final.pth") == str(trained["run"].resolve())
    with pytest.raises(ValueError, match="pass --model"):
        default_backbone(trained["root"] / "x" / "model_final.pth")


def test_predict_writes_georeferenced_maps(trained, tmp_path):
    scene_tif = trained["scene"]["file"]
    with rasterio.open(scene_tif) as src:  # mark a corner as no-data in a copy of the scene
        arr, profile = src.read(), src.profile
    arr[:, :5, :7] = -9999
    profile.update(nodata=-9999)
    inp = tmp_path / "in.tif"
    with rasterio.open(inp, "w", **profile) as dst:
        dst.write(arr)
    out = tmp_path / "maps"
    argv = [str(trained["task"]), str(inp), "--sensor", "sentinel2", "--bands", "B02,B03,B04,B08", "--output-dir",
            str(out), "--chip-size", "32", "--overlap", "8", "--no-progress"]
    assert predict_main(argv) == 0
    with rasterio.open(out / "in_classes.tif") as c, rasterio.open(inp) as src, \
            rasterio.open(out / "in_probs.tif") as p, rasterio.open(trained["scene"]["labels"]) as lab:
        assert c.crs == src.crs and c.transform == src.transform and c.shape == src.shape
        assert p.count == 3 and p.descriptions == ("a", "b", "c") and p.transform == src.transform
        cls, probs, truth = c.read(1), p.read(), lab.read(1)
    assert (cls[:5, :7] == 255).all() and np.isnan(probs[:, :5, :7]).all()
    ok = cls != 255
    assert set(np.unique(cls[ok]).tolist()) <= {0, 1, 2}
    np.testing.assert_allclose(probs[:, ok].sum(0), 1.0, atol=1e-4)
    assert (probs[:, ok].argmax(0) == cls[ok]).all()
    keep = ok & (truth != 255)
    assert (cls[keep] == truth[keep]).mean() > 0.6  # chance ~0.33: the head learned the label raster
    meta = json.loads((out / "in_classes.json").read_text())
    assert meta["classes"] == ["a", "b", "c"] and meta["nodata"] == 255
    mtime = (out / "in_classes.tif").stat().st_mtime_ns
    assert predict_main(argv) == 0  # a finished scene is skipped
    assert (out / "in_classes.tif").stat().st_mtime_ns == mtime


def test_blending_leaves_no_seams(trained, tmp_path):
    """Overlapping chips give the same map whatever the chip origin: compare two chip sizes inside the scene."""
    inp = trained["scene"]["file"]
    maps = []
    for chip, ov in ((32, 8), (48, 16)):
        out = tmp_path / f"m{chip}"
        predict_main([str(trained["task"]), inp, "--sensor", "sentinel2", "--bands", "B02,B03,B04,B08",
                      "--output-dir", str(out), "--chip-size", str(chip), "--overlap", str(ov), "--no-progress"])
        with rasterio.open(out / "scene_classes.tif") as c:
            maps.append(c.read(1))
    assert maps[0].shape == maps[1].shape and (maps[0] != 255).all()
    assert (maps[0] == maps[1]).mean() > 0.8


def test_bad_head_file_is_refused(tmp_path, trained):
    bad = tmp_path / "model_final.pth"
    torch.save({"heads": {}}, bad)
    with pytest.raises(ValueError, match="not a segmentation task"):
        predict_main([str(bad), trained["scene"]["file"], "--sensor", "sentinel2", "--bands", "B02,B03,B04,B08",
                      "--model", str(trained["run"]), "--output-dir", str(tmp_path / "o")])
