"""Hostile cases against `panopticon embed`, `predict`, `search` (and `export`, `convert`) through the real CLI, each
in a subprocess with a timeout and an oracle for "correct"; prints the table of outcomes by command.

    python benchmarks/trust_cases.py                 # every case (a few minutes on 2 CPU cores)
    python benchmarks/trust_cases.py --only search   # one command; --list prints the cases; --verbose each outcome

Outcome classes: ok-correct (exit 0 and the oracle agrees), clean error (exit 2, one line naming the problem),
traceback, hang (timeout), silent wrong output (exit 0 but the oracle disagrees, or exit 0 where an error was due),
unnamed read (a sentinel side file was opened or the local HTTP server saw a request), false refusal (an error for
valid input) and other exit (any other status).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from typing import Callable, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from trust_world import BANDS, ROOT, World, json_file, run_cli, scene, vrt, write_run, write_tif  # noqa: E402

sys.path.insert(0, ROOT)
CLASSES = ["ok-correct", "clean error", "traceback", "hang", "silent wrong output", "unnamed read", "false refusal",
           "other exit"]
CASES: List[tuple] = []


def case(cmd: str, name: str, expect: str = "error"):
    """Register a case: the function gets (world, case folder) and returns (argv, oracle or None)."""
    def deco(fn: Callable):
        CASES.append((cmd, name, expect, fn))
        return fn
    return deco


def patches(path: str) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read()


def embed_args(w: World, src: str, out: str, *extra: str, bands: bool = True) -> List[str]:
    flags = ["--sensor", "sentinel2", "--bands", ",".join(BANDS)] if bands else []
    return ["embed", src, *flags, "--model", w.run, "--chip-size", "56", "--overlap", "14", "-o", out,
            "--no-progress", *extra]


def same_as(w: World, out: str, name: str, ref_src: str, *extra: str, bands: bool = True) -> Callable[[], bool]:
    """Oracle: the output equals a clean in-process run on `ref_src` (the trusted reference)."""
    def check() -> bool:
        from dinov2.run.embed import main

        ref = os.path.join(os.path.dirname(out), "ref")
        shutil.rmtree(ref, ignore_errors=True)
        main(embed_args(w, ref_src, ref, *extra, bands=bands)[1:])
        ref_name = os.path.splitext(os.path.basename(ref_src))[0] if not ref_src.endswith(".yaml") else name
        a, b = patches(os.path.join(out, f"{name}_patches.tif")), patches(os.path.join(ref, f"{ref_name}_patches.tif"))
        return a.shape == b.shape and np.allclose(a, b, atol=1e-5, equal_nan=True) and not np.isnan(a).all()
    return check


# ------------------------------------------------------------------------------------------------ embed
@case("embed", "clean GeoTIFF", "ok")
def _(w, d):
    return embed_args(w, w.tif, f"{d}/o"), same_as(w, f"{d}/o", "s", w.tif)


@case("embed", "side files (.aux.xml, .ovr, .msk, world file) are never opened", "ok")
def _(w, d):
    src = write_tif(f"{d}/s.tif", scene())
    for ext in (".tif.aux.xml", ".aux.xml", ".tif.ovr", ".tif.msk", ".tfw", ".wld", ".xml", ".imd"):
        w.sentinels.add(src[:-4] + ext)
    return embed_args(w, src, f"{d}/o"), same_as(w, f"{d}/o", "s", w.tif)


@case("embed", "scenes YAML", "ok")
def _(w, d):
    y = json_file(f"{d}/scenes.yaml", {"scenes": [{"name": "s", "sensor": "sentinel2", "file": w.tif, "bands": BANDS}]})
    return embed_args(w, y, f"{d}/o", bands=False), same_as(w, f"{d}/o", "s", w.tif)


@case("embed", "folder of GeoTIFFs", "ok")
def _(w, d):
    os.makedirs(f"{d}/in")
    shutil.copy(w.tif, f"{d}/in/s.tif")
    return embed_args(w, f"{d}/in", f"{d}/o"), same_as(w, f"{d}/o", "s", w.tif)


@case("embed", "VRT with --allow-vrt equals its source", "ok")
def _(w, d):
    return embed_args(w, vrt(f"{d}/v.tif", w.tif), f"{d}/o", "--allow-vrt"), same_as(w, f"{d}/o", "v", w.tif)


@case("embed", "--random-init: equal seeds give equal outputs", "ok")
def _(w, d):
    args = ["embed", w.tif, "--sensor", "sentinel2", "--bands", ",".join(BANDS), "--model", "panopticon_vitb14",
            "--random-init", "--seed", "3", "--chip-size", "56", "--overlap", "14", "-o", f"{d}/o", "--no-progress"]

    def check():
        from dinov2.run.embed import main

        main([a if a != f"{d}/o" else f"{d}/o2" for a in args][1:])
        a, b = patches(f"{d}/o/s_patches.tif"), patches(f"{d}/o2/s_patches.tif")
        return np.allclose(a, b, rtol=1e-4, atol=1e-4)  # equal up to thread-count rounding
    return args, check


@case("embed", "NaN pixels are no-data", "ok")
def _(w, d):
    data = scene().astype("float32")
    data[:, 10:20, 10:20] = np.nan
    ref = data.copy()
    ref[:, 10:20, 10:20] = -5
    write_tif(f"{d}/ref.tif", ref, nodata=-5)
    return embed_args(w, write_tif(f"{d}/s.tif", data), f"{d}/o"), same_as(w, f"{d}/o", "s", f"{d}/ref.tif")


for _value, _dtype in ((1e30, "float32"), (1e300, "float64"), (np.inf, "float32"), (-1e25, "float32")):
    @case("embed", f"one absurd pixel ({_value:g}, {_dtype}) is counted no-data", "ok")
    def _(w, d, value=_value, dtype=_dtype):
        data = scene().astype(dtype)
        data[1, 40, 70] = value
        ref = data.copy()
        ref[:, 40, 70] = -5
        write_tif(f"{d}/ref.tif", ref.astype("float32"), nodata=-5)
        base = same_as(w, f"{d}/o", "s", f"{d}/ref.tif")

        def check():
            marker = json.load(open(f"{d}/o/.embed/s.done.json"))
            return marker["report"]["absurd_pixels"] == 1 and base()
        return embed_args(w, write_tif(f"{d}/s.tif", data), f"{d}/o"), check

for _flag, _value in (("--chip-size", "nan"), ("--chip-size", "inf"), ("--chip-size", "-56"), ("--chip-size", "0"),
                      ("--chip-size", "abc"), ("--chip-size", "1e9"), ("--chip-size", "50"), ("--chip-size", "5600m"),
                      ("--overlap", "56"), ("--overlap", "-14"), ("--overlap", "nan"), ("--batch-size", "0"),
                      ("--batch-size", "-1"), ("--batch-size", "10000000"), ("--batch-size", "2.5"),
                      ("--min-valid", "0"), ("--min-valid", "2"), ("--min-valid", "nan"), ("--precision", "fp8"),
                      ("--wavelengths", "490,560,665,842"), ("--compress", "bogus"), ("--norm-stats", "dataset:nope"),
                      ("--norm-stats", "missing.yaml"), ("--model", "missing_run"), ("--nodata", "abc")):
    @case("embed", f"{_flag} {_value}")
    def _(w, d, flag=_flag, value=_value):
        return embed_args(w, w.tif, f"{d}/o", flag, value), None


for _bands in ("B02,B03,B04", "B02,B03,B04,B99", "B02,B02,B03,B04", "B02,B03,B04,B08,B11"):
    @case("embed", f"--bands {_bands} for a 4-band file")
    def _(w, d, bands=_bands):
        return ["embed", w.tif, "--sensor", "sentinel2", "--bands", bands, "--model", w.run, "-o", f"{d}/o"], None

for _wl in ("5,560,665,842", "nan,560,665,842", "490,560,665", "490,490,665,842"):
    @case("embed", f"--wavelengths {_wl}")
    def _(w, d, wl=_wl):
        return ["embed", w.tif, "--wavelengths", wl, "--model", w.run, "-o", f"{d}/o"], None


_YAML = {"mean given as strings": {"mean": ["1234"] * 4, "std": [300] * 4}, "nodata as a string": {"nodata": "0"},
         "std of zero": {"mean": [1000] * 4, "std": [0, 1, 1, 1]}, "negative std": {"mean": [1] * 4, "std": [-1] * 4},
         "three means for four bands": {"mean": [1] * 3, "std": [1] * 3}, "unknown band": {"bands": ["B02", "X"]},
         "NaN mean": {"mean": [float("nan")] * 4, "std": [1] * 4}, "missing sensor": {"sensor": None},
         "file is missing": {"file": "nope.tif"}, "file is /dev/zero": {"file": "/dev/zero"}}
for _name, _spec in _YAML.items():
    @case("embed", f"scenes YAML: {_name}")
    def _(w, d, spec=_spec):
        entry = {"name": "s", "sensor": "sentinel2", "file": w.tif, "bands": BANDS, **spec}
        entry = {k: v for k, v in entry.items() if v is not None}
        return embed_args(w, json_file(f"{d}/scenes.yaml", {"scenes": [entry]}), f"{d}/o", bands=False), None

_TEXT = {"broken YAML": ("scenes.yaml", "scenes: [ {sensor: x\n"), "empty YAML": ("scenes.yaml", ""),
         "YAML that is a number": ("scenes.yaml", "42\n"), "binary YAML": ("scenes.yaml", "\udcff"),
         "broken STAC JSON": ("item.json", '{"type": "Feature", '), "JSON that is no STAC item": ("item.json", "{}"),
         "STAC item without assets": ("item.json", json.dumps({"type": "Feature", "stac_version": "1.0.0", "id": "x",
                                                               "geometry": None, "properties": {"datetime": None},
                                                               "links": [], "assets": {}}))}
for _name, (_file, _text) in _TEXT.items():
    @case("embed", _name)
    def _(w, d, file=_file, text=_text):
        with open(f"{d}/{file}", "w", errors="surrogateescape") as f:
            f.write(text)
        return embed_args(w, f"{d}/{file}", f"{d}/o", bands=False), None


@case("embed", "STAC item whose asset href is a GDAL /vsicurl/ path, not a URL (no request may reach the server)")
def _(w, d):
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "r", "geometry": None, "links": [],
            "properties": {"datetime": "2022-01-01T00:00:00Z", "platform": "sentinel-2a"},
            "assets": {"red": {"href": f"/vsicurl/{w.url}/s.tif", "type": "image/tiff",
                               "eo:bands": [{"name": "B04"}]}}}
    return embed_args(w, json_file(f"{d}/item.json", item), f"{d}/o", bands=False), None


_RASTERS = {"empty file": lambda d: open(f"{d}/x.tif", "w").close(),
            "text file": lambda d: open(f"{d}/x.tif", "w").write("hello"),
            "truncated GeoTIFF": lambda d: open(f"{d}/x.tif", "wb").write(open(f"{d}/../../s.tif", "rb").read()[:3000]),
            "FIFO": lambda d: os.mkfifo(f"{d}/x.tif"),
            "symlink to /dev/zero": lambda d: os.symlink("/dev/zero", f"{d}/x.tif"),
            "folder named x.tif": lambda d: os.mkdir(f"{d}/x.tif"),
            "complex-valued": lambda d: write_tif(f"{d}/x.tif", np.ones((4, 56, 56), np.complex64)),
            "no CRS": lambda d: write_tif(f"{d}/x.tif", scene(), crs=None),
            "all no-data": lambda d: write_tif(f"{d}/x.tif", np.zeros((4, 56, 56), "uint16"), nodata=0),
            "all NaN": lambda d: write_tif(f"{d}/x.tif", np.full((4, 56, 56), np.nan, np.float32)),
            "VRT without --allow-vrt": lambda d: vrt(f"{d}/x.tif", os.path.abspath(f"{d}/../../s.tif")),
            "5-band file for 4 bands": lambda d: write_tif(f"{d}/x.tif", np.ones((5, 56, 56), "uint16"))}
for _name, _make in _RASTERS.items():
    @case("embed", f"raster: {_name}")
    def _(w, d, make=_make):
        make(d)
        return embed_args(w, f"{d}/x.tif", f"{d}/o"), None


@case("embed", "VRT (--allow-vrt) with a raw-raster band")
def _(w, d):
    band = ('<VRTRasterBand dataType="Byte" band="{}" subClass="VRTRawRasterBand"><SourceFilename>/etc/hostname'
            "</SourceFilename><ImageOffset>0</ImageOffset><PixelOffset>1</PixelOffset><LineOffset>8</LineOffset>"
            "</VRTRasterBand>")
    with open(f"{d}/x.tif", "w") as f:
        f.write('<VRTDataset rasterXSize="8" rasterYSize="8"><SRS>EPSG:32632</SRS><GeoTransform>0, 10, 0, 0, 0, -10'
                f"</GeoTransform>{''.join(band.format(b) for b in range(1, 5))}</VRTDataset>")
    return embed_args(w, f"{d}/x.tif", f"{d}/o", "--allow-vrt"), None


for _label, _src in (("a /vsicurl/ URL", "/vsicurl/{url}/s.tif"), ("an http URL", "{url}/s.tif"),
                     ("a WMS connection", "WMS:{url}/wms"), ("a remote VRT", "/vsicurl/{url}/nested.vrt")):
    @case("embed", f"VRT (--allow-vrt) referencing {_label}")
    def _(w, d, src=_src):
        return embed_args(w, vrt(f"{d}/x.tif", src.format(url=w.url)), f"{d}/o", "--allow-vrt"), None


@case("embed", "a remote path given as input")
def _(w, d):
    return embed_args(w, f"/vsicurl/{w.url}/s.tif", f"{d}/o"), None


@case("embed", "output folder blocked by a file")
def _(w, d):
    open(f"{d}/file", "w").close()
    return embed_args(w, w.tif, f"{d}/file/o"), None


@case("embed", "truncated checkpoint")
def _(w, d):
    os.makedirs(f"{d}/run")
    shutil.copy(f"{w.run}/config.yaml", f"{d}/run/config.yaml")
    open(f"{d}/run/model_final.pth", "wb").write(open(f"{w.run}/model_final.pth", "rb").read()[:5000])
    return ["embed", w.tif, "--sensor", "sentinel2", "--bands", ",".join(BANDS), "--model", f"{d}/run", "-o",
            f"{d}/o"], None


@case("embed", "a checkpoint with a NaN weight")
def _(w, d):
    import torch

    run = write_run(f"{d}/run")
    ck = torch.load(f"{run}/model_final.pth", weights_only=True)
    ck["model"][next(k for k in ck["model"] if k.endswith("norm.weight"))][0] = float("nan")
    torch.save(ck, f"{run}/model_final.pth")
    return [a if a != w.run else run for a in embed_args(w, w.tif, f"{d}/o")], None


@case("embed", "a second run while another holds the folder")
def _(w, d):
    from dinov2.utils.folder_lock import FolderLock

    os.makedirs(f"{d}/o")
    w.keep = FolderLock(f"{d}/o", ".panopticon.lock", "panopticon embed").acquire()  # held by this harness
    return embed_args(w, w.tif, f"{d}/o"), None


@case("embed", "a stale lock of a dead run is taken over", "ok")
def _(w, d):
    os.makedirs(f"{d}/o")
    json_file(f"{d}/o/.panopticon.lock", {"host": "x", "pid": 999999, "start_time": "then"})
    return embed_args(w, w.tif, f"{d}/o"), same_as(w, f"{d}/o", "s", w.tif)


for _what in ("weights at the same path", "--nodata", "scenes YAML statistics", "stats file contents"):
    @case("embed", f"changed {_what} is recomputed", "ok")
    def _(w, d, what=_what):
        from dinov2.run.embed import main

        run = write_run(f"{d}/run")
        y = f"{d}/scenes.yaml"
        json_file(y, {"scenes": [{"name": "s", "sensor": "sentinel2", "file": w.tif, "bands": BANDS,
                                  "mean": [1000] * 4, "std": [300] * 4}]})
        stats = json_file(f"{d}/stats.json", {"mean": [1000] * 4, "std": [300] * 4})
        src, extra = (y, []) if "YAML" in what else (w.tif, ["--norm-stats", stats] if "stats" in what else [])
        args = [a if a != w.run else run for a in embed_args(w, src, f"{d}/o", *extra, bands=src == w.tif)]
        main(args[1:])  # the first run, then the change
        if "weights" in what:
            write_run(run, seed=1)
        elif "nodata" in what:
            args += ["--nodata", "1000"]
        elif "YAML" in what:
            json_file(y, {"scenes": [{"name": "s", "sensor": "sentinel2", "file": w.tif, "bands": BANDS,
                                      "mean": [900] * 4, "std": [300] * 4}]})
        else:
            json_file(stats, {"mean": [900] * 4, "std": [300] * 4})

        def check():
            fresh = f"{d}/fresh"
            main([a if a != f"{d}/o" else fresh for a in args][1:])
            return np.allclose(patches(f"{d}/o/s_patches.tif"), patches(f"{fresh}/s_patches.tif"), equal_nan=True)
        return args, check


# ------------------------------------------------------------------------------------------------ predict
from trust_cases_more import register  # noqa: E402  (predict, search, export and convert cases)

register(case, embed_args)


def classify(expect: str, res, oracle: Optional[Callable[[], bool]], unnamed: bool) -> str:
    if res["rc"] is None:
        return "hang"
    if unnamed:
        return "unnamed read"
    if "Traceback (most recent call last)" in res["stderr"]:
        return "traceback"
    if res["rc"] == 0:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                good = oracle() if oracle is not None else expect == "ok"
        except Exception:  # noqa: BLE001 - an output the oracle cannot even read is wrong
            good = False
        return "ok-correct" if good and expect == "ok" else "silent wrong output"
    errors = [ln for ln in res["stderr"].splitlines() if re.match(r"^(panopticon|usage:|\S+: error:)", ln)
              and "error:" in ln]
    if res["rc"] == 2 and len(errors) == 1:
        return "clean error" if expect in ("error", "nonzero") else "false refusal"
    return "clean error" if expect == "nonzero" and res["rc"] not in (0, None) else "other exit"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", help="commands to run (embed, predict, search, export, convert)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--verbose", action="store_true", help="print each case's outcome and error line")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds before a case counts as a hang")
    p.add_argument("--keep", help="build the world in this folder and keep it")
    args = p.parse_args(argv)
    todo = [c for c in CASES if not args.only or c[0] in args.only]
    if args.list:
        for cmd, name, expect, _ in todo:
            print(f"{cmd:8s} {expect:7s} {name}")
        return 0
    logging.basicConfig(level=logging.WARNING)  # the oracles' own in-process runs stay quiet
    folder = args.keep or tempfile.mkdtemp(prefix="trust_cases_")
    world = World(folder)
    table, failures = defaultdict(Counter), []
    try:
        for cmd, name, expect, build in todo:
            d = world.case_dir()
            with contextlib.redirect_stdout(io.StringIO()):  # set-up runs of the harness itself stay quiet
                argv, oracle = build(world, d)
            before_req, before_sent = world.requests(), len(world.sentinels.opened)
            res = run_cli(argv, args.timeout)
            unnamed = world.requests() > before_req or len(world.sentinels.opened) > before_sent
            outcome = classify(expect, res, oracle, unnamed)
            table[cmd][outcome] += 1
            err = next((ln for ln in reversed(res["stderr"].splitlines()) if "error" in ln.lower()), "")
            if outcome not in ("ok-correct", "clean error"):
                failures.append(f"[{outcome}] {cmd}: {name}: {err[:200]}")
            if args.verbose:
                print(f"{outcome:20s} {cmd:8s} {name} ({res['s']:.1f} s) {err[:160]}", flush=True)
    finally:
        world.close()
    print(f"| command | cases | {' | '.join(CLASSES)} |")
    print("|---|---|" + "---|" * len(CLASSES))
    for key in sorted(table):
        row = table[key]
        print(f"| {key} | {sum(row.values())} | " + " | ".join(str(row[c]) for c in CLASSES) + " |")
    total = Counter()
    for row in table.values():
        total.update(row)
    print(f"| all | {sum(total.values())} | " + " | ".join(str(total[c]) for c in CLASSES) + " |")
    for f in failures:
        print(f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
