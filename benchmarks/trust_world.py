"""Files for `trust_cases.py`: a tiny model, clean scenes and their reference outputs, a head file, hostile
variants (written on demand), sentinel side files that must never be read, and a local HTTP server whose request
log must stay empty."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANDS = ["B02", "B03", "B04", "B08"]
STUDENT = {"arch": "vit_small", "embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 14,
           "pos_emb_img_size": 56, "embed_layer": "PanopticonPE", "layerscale": 0.1,
           "pe_args": {"attn_dim": 16, "chnfus_cfg": {"layer_norm": False, "attn_cfg": {"num_heads": 2}}}}
SERVER = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        open(sys.argv[2], "a").write(self.command + " " + self.path + "\\n")
        body = open(sys.argv[1], "rb").read()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
    do_HEAD = do_GET
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"""


def write_run(folder: str, seed: int = 0, student=None) -> str:
    import torch
    import yaml

    from dinov2.models import build_model

    student = student or STUDENT
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"student": student}, f)
    torch.manual_seed(seed)
    model, _ = build_model(student, only_teacher=True, img_size=56)
    torch.save({"model": {"teacher.backbone." + k: v for k, v in model.state_dict().items()}, "iteration": 1},
               os.path.join(folder, "model_final.pth"))
    return folder


def write_tif(path: str, data: np.ndarray, nodata=None, crs="EPSG:32632", transform=None) -> str:
    import rasterio
    from rasterio.transform import from_origin

    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype, crs=crs,
                       transform=transform or from_origin(500000.0, 5000000.0, 10.0, 10.0), nodata=nodata) as dst:
        dst.write(data)
    return path


def scene(h: int = 112, w: int = 112, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip(np.stack([1000 + 400 * np.sin(xx / (7 + 3 * i)) * np.cos(yy / (11 + i)) + rng.normal(0, 30, (h, w))
                             for i in range(4)]), 1, 60000).astype("uint16")


def write_head(path: str, run: str, classes=("water", "forest", "urban"), **changes) -> str:
    """A random linear head for `run`'s backbone, in the format a segmentation task writes."""
    import torch

    from dinov2 import load_model
    from dinov2.eval.dense_heads import build_dense_head
    from dinov2.utils.digest import state_dict_digest

    model = load_model(run)
    torch.manual_seed(0)
    head = build_dense_head("linear", [int(model.embed_dim)], len(classes))
    state = {"heads": {f"linear_lr_0_01000.{k}": v for k, v in head.state_dict().items()},
             "best_head": "linear_lr_0_01000", "num_classes": len(classes), "n_last_blocks": 1, "channels": 128,
             "format_version": 1, "bands": BANDS, "chn_ids": [492, 559, 664, 827], "sensor": "sentinel2",
             "norm_mean": None, "norm_std": None, "norm_note": "per scene", "img_size": 56, "chip_size": 56,
             "patch_size": 14, "embed_dim": int(model.embed_dim), "class_names": list(classes),
             "backbone_digest": state_dict_digest(model)}
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    torch.save(state, path)
    return path


def vrt(path: str, source: str, size: int = 112) -> str:
    """A 4-band VRT reading `source` (a path or URL, written as given)."""
    bands = "".join(f'<VRTRasterBand dataType="UInt16" band="{b}"><SimpleSource><SourceFilename relativeToVRT="0">'
                    f"{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource></VRTRasterBand>"
                    for b in range(1, 5))
    gt = "500000, 10, 0, 5000000, 0, -10"
    with open(path, "w") as f:
        f.write(f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}"><SRS>EPSG:32632</SRS><GeoTransform>{gt}'
                f"</GeoTransform>{bands}</VRTDataset>")
    return path


class Sentinels:
    """FIFOs placed where GDAL would look for side files: a reader opening one is detected (the harness opens the
    write end without blocking, which succeeds only while a reader holds it) and gets end-of-file at once."""

    def __init__(self):
        self.paths: List[str] = []
        self.opened: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def add(self, path: str) -> str:
        if not os.path.exists(path):
            os.mkfifo(path)
        self.paths.append(path)
        return path

    def _watch(self) -> None:
        while not self._stop.wait(0.003):
            for p in list(self.paths):
                try:
                    fd = os.open(p, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: nobody reads it
                    continue
                os.close(fd)
                self.opened.append(p)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class World:
    """Everything the cases share (built once, in `folder`)."""

    def __init__(self, folder: str):
        self.dir = folder
        os.makedirs(folder, exist_ok=True)
        self.run = write_run(os.path.join(folder, "run"))
        self.run1 = write_run(os.path.join(folder, "run1"), seed=1)
        self.tif = write_tif(os.path.join(folder, "s.tif"), scene())
        self.head = write_head(os.path.join(folder, "head.pth"), self.run)
        self.sentinels = Sentinels()
        self.log = os.path.join(folder, "http.log")
        open(self.log, "w").close()
        self._server = subprocess.Popen([sys.executable, "-c", SERVER, self.tif, self.log], stdout=subprocess.PIPE,
                                        text=True)
        self.url = f"http://127.0.0.1:{int(self._server.stdout.readline())}"
        self.refs: Dict[str, str] = {}
        self.n = 0

    def case_dir(self) -> str:
        self.n += 1
        d = os.path.join(self.dir, "cases", f"{self.n:03d}")
        os.makedirs(d, exist_ok=True)
        return d

    def requests(self) -> int:
        with open(self.log) as f:
            return len(f.read().splitlines())

    def close(self) -> None:
        self.sentinels.close()
        self._server.kill()
        self._server.wait()


def run_cli(args: List[str], timeout: float) -> Dict[str, object]:
    """`python -m dinov2 <args>` in a subprocess: return code (None on timeout), stderr, seconds."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t = time.time()
    try:
        res = subprocess.run([sys.executable, "-m", "dinov2", *args], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=timeout)
        return {"rc": res.returncode, "stderr": res.stderr, "stdout": res.stdout, "s": time.time() - t}
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"rc": None, "stderr": err, "stdout": "", "s": time.time() - t}


def json_file(path: str, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path
