"""Remote vs local `panopticon embed` throughput: a COG served over HTTP with byte ranges and an injected latency
per request (tests/servers.py's LocalServer, in its own process so that it never competes with the run for the
GIL), embedded from its URL and from the local file.

    PYTHONPATH=. python benchmarks/remote_embed.py                       # ViT-B/14 (random weights), 50 ms
    PYTHONPATH=. python benchmarks/remote_embed.py --device cuda --size 4096 --workers 1 4 8
    PYTHONPATH=. python benchmarks/remote_embed.py --tiny --size 448     # checks the script (numbers mean little)

The scene: a `--bands`-band uint16 COG of `--size`^2 px (DEFLATE, `--tile` px tiles, pixel-interleaved, as
Sentinel-2/Landsat COGs are), one file per band with `--per-band-files` (as STAC items serve them). Each row
times `embed_scenes` end to end (statistics, reads, model, blending, COG and GeoParquet writes; model loading and
a warm-up excluded), best of `--repeats`, and counts the HTTP requests the run made. Target: remote >= 80 % of
local chips/s at 50 ms per request.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

BANDS = ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]


def write_scene(folder: str, size: int, bands: int, tile: int, per_band: bool) -> list:
    """The scene's COG(s): one multi-band file, or one file per band."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    data = np.stack([1000 + 400 * np.sin(xx / (9 + i)) * np.cos(yy / (13 + i)) + rng.normal(0, 40, (size, size))
                     for i in range(bands)]).astype("uint16")
    groups = [(f"{b}.tif", data[i:i + 1]) for i, b in enumerate(BANDS[:bands])] if per_band else [("stack.tif", data)]
    paths = []
    for name, arr in groups:
        path = os.path.join(folder, name)
        with rasterio.open(path, "w", driver="COG", width=size, height=size, count=len(arr), dtype="uint16",
                           crs="EPSG:32632", transform=from_origin(500000, 5000000, 10, 10), BLOCKSIZE=tile,
                           COMPRESS="DEFLATE", PREDICTOR=2) as dst:
            dst.write(arr)
        paths.append(path)
    return paths


def serve(root: str, latency: float, conn) -> None:
    """Server process: serve `root`; answer 'count' with the requests seen since the last count."""
    from servers import LocalServer

    with LocalServer(root, latency=latency) as srv:
        conn.send(srv.url)
        seen = 0
        while conn.recv() == "count":
            conn.send(len(srv.requests) - seen)
            seen = len(srv.requests)


def scene_of(paths: list, base: str, name: str):
    """The scene of the files (local paths, or their URLs under `base`)."""
    from dinov2.inference.sources import Channel, SceneSource

    chans, k = [], 0
    ids = {"B02": 492, "B03": 559, "B04": 664, "B08": 832, "B05": 704, "B06": 740, "B07": 782, "B8A": 864,
           "B11": 1613, "B12": 2202}
    for p in paths:
        import rasterio

        with rasterio.open(p) as src:
            count = src.count
        href = f"{base}/{os.path.basename(p)}" if base else p
        for i in range(count):
            chans.append(Channel(href, i + 1, BANDS[k], ids[BANDS[k]]))
            k += 1
    return SceneSource(name, "sentinel2", chans, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="panopticon_vitb14", help="hub name (random weights) or run folder")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 32-d model instead (checks the script)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    p.add_argument("--bands", type=int, default=4, choices=range(1, len(BANDS) + 1), metavar="N")
    p.add_argument("--tile", type=int, default=512, help="COG tile side in pixels")
    p.add_argument("--per-band-files", action="store_true", help="one COG per band (as STAC items serve them)")
    p.add_argument("--latency", type=float, default=0.05, help="seconds added to every request")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--read-workers of the remote runs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chip-size", default="224")
    p.add_argument("--overlap", default="28")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from dinov2.inference.embed import EmbedSettings, embed_scenes
    from dinov2.run.embed import load_backbone

    tmp = tempfile.mkdtemp(prefix="remote_embed_")
    if args.tiny:
        from test_embed import write_run

        model = load_backbone(write_run(os.path.join(tmp, "run")))
    else:
        model = load_backbone(args.model, random_init=not os.path.exists(args.model))
    device = torch.device(args.device)
    data = os.path.join(tmp, "data")
    os.makedirs(data)
    paths = write_scene(data, args.size, args.bands, args.tile, args.per_band_files)
    parent, child = mp.Pipe()
    server = mp.get_context("spawn").Process(target=serve, args=(data, args.latency, child), daemon=True)
    server.start()
    url = parent.recv()

    def timed(base: str, workers: int) -> tuple:
        best, chips, requests = float("inf"), 0, 0
        for r in range(args.repeats):
            settings = EmbedSettings(args.chip_size, args.overlap, args.batch_size, progress=False,
                                     read_workers=workers)
            out = os.path.join(tmp, f"out_{len(os.listdir(tmp))}")
            parent.send("count")
            parent.recv()
            t = time.perf_counter()
            res = embed_scenes([scene_of(paths, base, "scene")], model, out, settings, device)
            best = min(best, time.perf_counter() - t)
            parent.send("count")
            chips, requests = res["n_chips"], parent.recv()
        return chips, best, requests

    embed_scenes([scene_of(paths, "", "warm")], model, os.path.join(tmp, "warm"),
                 EmbedSettings(args.chip_size, args.overlap, args.batch_size, progress=False), device)
    rows = [("local", 1, *timed("", 1))]
    rows += [("remote", w, *timed(url, w)) for w in args.workers]
    parent.send("stop")
    local_rate = rows[0][2] / rows[0][3]
    print(f"scene {args.size}^2 px, {args.bands} bands ({'one file per band' if args.per_band_files else 'one file'}"
          f", {args.tile} px tiles), latency {args.latency * 1000:.0f} ms/request, chip {args.chip_size} overlap "
          f"{args.overlap}, batch {args.batch_size}, model {'tiny' if args.tiny else args.model} on {args.device}")
    print("| source | read workers | chips | s | chips/s | vs local | HTTP requests |")
    print("|---|---|---|---|---|---|---|")
    for src, w, chips, secs, reqs in rows:
        rate = chips / secs
        print(f"| {src} | {w} | {chips} | {secs:.2f} | {rate:.1f} | {rate / local_rate:.0%} | {reqs} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
