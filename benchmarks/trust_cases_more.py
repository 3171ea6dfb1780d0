"""The predict, search, export and convert cases of `trust_cases.py` (see there)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from trust_world import BANDS, scene, vrt, write_head, write_run, write_tif


def _read(path, band=None):
    import rasterio

    with rasterio.open(path) as src:
        return src.read(band) if band else src.read()


def register(case, embed_args) -> None:
    """Add the cases to `trust_cases.CASES` through its `case` decorator."""

    def predict_args(w, head, src, out, *extra, bands=",".join(BANDS)):
        return ["predict", head, src, "--sensor", "sentinel2", "--bands", bands, "--model", w.run, "-o", out,
                "--no-progress", *extra]

    def same_map(w, out, name, ref_src, *extra, ref_bands=",".join(BANDS), head=None):
        def check():
            from dinov2.run.predict import main

            ref = os.path.join(os.path.dirname(out), "ref")
            shutil.rmtree(ref, ignore_errors=True)
            main(predict_args(w, head or w.head, ref_src, ref, *extra, bands=ref_bands)[1:])
            ref_name = os.path.splitext(os.path.basename(ref_src))[0]
            a, b = _read(f"{out}/{name}_probs.tif"), _read(f"{ref}/{ref_name}_probs.tif")
            cls = _read(f"{out}/{name}_classes.tif", 1)
            ok = cls != 255
            return (np.allclose(a, b, atol=1e-5, equal_nan=True) and ok.any()
                    and np.allclose(a[:, ok].sum(0), 1, atol=1e-4) and (a[:, ok].argmax(0) == cls[ok]).all())
        return check

    @case("predict", "clean scene", "ok")
    def _(w, d):
        return predict_args(w, w.head, w.tif, f"{d}/o"), same_map(w, f"{d}/o", "s", w.tif)

    @case("predict", "bands in another order are matched to the head's", "ok")
    def _(w, d):
        src = write_tif(f"{d}/swap.tif", scene()[[3, 2, 1, 0]])
        return (predict_args(w, w.head, src, f"{d}/o", bands="B08,B04,B03,B02"),
                same_map(w, f"{d}/o", "swap", w.tif))

    @case("predict", "head of another backbone with --force", "ok")
    def _(w, d):
        head = write_head(f"{d}/h.pth", w.run, backbone_digest="0" * 32)
        return (predict_args(w, head, w.tif, f"{d}/o", "--force"),
                same_map(w, f"{d}/o", "s", w.tif, "--force", head=head))

    @case("predict", "head of an earlier version (no metadata) with --chip-size", "ok")
    def _(w, d):
        keys = ("format_version", "bands", "chn_ids", "sensor", "norm_mean", "norm_std", "norm_note", "img_size",
                "chip_size", "patch_size", "embed_dim", "backbone_digest")
        head = write_head(f"{d}/h.pth", w.run, **{k: None for k in keys})
        return (predict_args(w, head, w.tif, f"{d}/o", "--chip-size", "56", "--overlap", "7"),
                same_map(w, f"{d}/o", "s", w.tif))

    @case("predict", "one absurd pixel is counted no-data", "ok")
    def _(w, d):
        data = scene().astype("float32")
        data[0, 50, 60] = 3e35

        def check():
            report = json.load(open(f"{d}/o/s_classes.json"))["report"]
            cls = _read(f"{d}/o/s_classes.tif", 1)
            return report["absurd_pixels"] == 1 and cls[50, 60] == 255 and (cls != 255).sum() == cls.size - 1
        return predict_args(w, w.head, write_tif(f"{d}/s.tif", data), f"{d}/o"), check

    @case("predict", "head file changed under the same name is recomputed", "ok")
    def _(w, d):
        from dinov2.run.predict import main

        head = write_head(f"{d}/h.pth", w.run)
        main(predict_args(w, head, w.tif, f"{d}/o")[1:])
        write_head(head, w.run, classes=("a", "b"))
        return predict_args(w, head, w.tif, f"{d}/o"), same_map(w, f"{d}/o", "s", w.tif, head=head)

    heads = {"empty": lambda d: open(f"{d}/h.pth", "w").close(),
             "truncated": lambda d: open(f"{d}/h.pth", "wb").write(open(f"{d}/../../head.pth", "rb").read()[:900]),
             "text": lambda d: open(f"{d}/h.pth", "w").write("hello"),
             "FIFO": lambda d: os.mkfifo(f"{d}/h.pth"),
             "a folder without model_final.pth": lambda d: os.mkdir(f"{d}/h.pth"),
             "a list, not a dict": lambda d: __import__("torch").save([1, 2], f"{d}/h.pth"),
             "missing keys": lambda d: __import__("torch").save({"heads": {}}, f"{d}/h.pth")}
    for name, make in heads.items():
        @case("predict", f"head file: {name}")
        def _(w, d, make=make):
            make(d)
            return predict_args(w, f"{d}/h.pth", w.tif, f"{d}/o"), None

    changes = {"class names of the wrong length": {"class_names": ["a", "b"]}, "300 classes": {"num_classes": 300},
               "another feature width": {"embed_dim": 64}, "another backbone": {"backbone_digest": "0" * 32},
               "a class count its weights do not have": {"num_classes": 4, "class_names": None},
               "other bands": {"chn_ids": [492, 559, 664, 740], "bands": ["B02", "B03", "B04", "B06"]}}
    for name, change in changes.items():
        @case("predict", f"head: {name}")
        def _(w, d, change=change):
            return predict_args(w, write_head(f"{d}/h.pth", w.run, **change), w.tif, f"{d}/o"), None

    for flag, value in (("--chip-size", "0"), ("--chip-size", "-5"), ("--chip-size", "1000000"),
                        ("--model-input", "50"), ("--overlap", "56"), ("--batch-size", "0"), ("--chip-size", "nan"),
                        ("--bands", "B02,B03,B04,B05"), ("--norm-stats", "missing.json")):
        @case("predict", f"{flag} {value}")
        def _(w, d, flag=flag, value=value):
            args = predict_args(w, w.head, w.tif, f"{d}/o")
            if flag == "--bands":
                args[args.index("--bands") + 1] = value
                return args, None
            return [*args, flag, value], None

    @case("predict", "a VRT input")
    def _(w, d):
        return predict_args(w, w.head, vrt(f"{d}/x.tif", w.tif), f"{d}/o"), None

    @case("predict", "a second run while another holds the folder")
    def _(w, d):
        from dinov2.utils.folder_lock import FolderLock

        os.makedirs(f"{d}/o")
        w.keep_predict = FolderLock(f"{d}/o", ".panopticon.lock", "panopticon predict").acquire()
        return predict_args(w, w.head, w.tif, f"{d}/o"), None

    # -------------------------------------------------------------------------------------------- search
    def chips(w):
        if "chips" not in w.refs:
            from dinov2.run.embed import main

            main(embed_args(w, w.tif, f"{w.dir}/embedded")[1:])
            w.refs["chips"] = f"{w.dir}/embedded/chips.parquet"
        return w.refs["chips"]

    def table(w, d, change):
        import pandas as pd

        df = pd.read_parquet(chips(w))
        df = change(df)
        df.to_parquet(f"{d}/t.parquet")
        return f"{d}/t.parquet"

    def nan_first(df):
        """The query chip s:r0c0 (wherever the part's spatial order put it) first, with a NaN embedding."""
        df = df.sort_values("chip_id", key=lambda c: c != "s:r0c0", kind="stable").reset_index(drop=True)
        df.at[0, "mean_embedding"] = np.full(len(df.at[0, "mean_embedding"]), np.nan, np.float32)
        return df

    @case("search", "by chip id", "ok")
    def _(w, d):
        return ["search", chips(w), "--chip-id", "s:r0c0", "-k", "3", "--output", f"{d}/r.csv"], \
            lambda: _first_is(f"{d}/r.csv", "s:r0c0")

    @case("search", "by lon/lat", "ok")
    def _(w, d):
        import pandas as pd

        row = pd.read_parquet(chips(w)).iloc[1]
        return ["search", chips(w), "--lonlat", str(row.lon), str(row.lat), "--output", f"{d}/r.csv"], \
            lambda: _first_is(f"{d}/r.csv", row.chip_id)

    @case("search", "a chip without a valid embedding is left out", "ok")
    def _(w, d):
        import pandas as pd

        t = table(w, d, nan_first)
        second = pd.read_parquet(t).chip_id[1]
        return ["search", t, "--chip-id", second, "-k", "50", "--output", f"{d}/r.csv"], \
            lambda: _first_is(f"{d}/r.csv", second) and pd.read_parquet(t).chip_id[0] not in \
            set(pd.read_csv(f"{d}/r.csv").chip_id)

    bad_tables = {"empty table": lambda w, d: table(w, d, lambda df: df.iloc[:0]),
                  "garbage bytes": lambda w, d: open(f"{d}/t.parquet", "wb").write(b"PAR1xx") and f"{d}/t.parquet",
                  "FIFO": lambda w, d: os.mkfifo(f"{d}/t.parquet") or f"{d}/t.parquet",
                  "missing file": lambda w, d: f"{d}/none.parquet",
                  "a folder": lambda w, d: os.mkdir(f"{d}/t.parquet") or f"{d}/t.parquet",
                  "no embedding column": lambda w, d: table(w, d, lambda df: df.drop(columns=["mean_embedding"])),
                  "query without a valid embedding": lambda w, d: table(w, d, nan_first),
                  "all-zero query embedding": lambda w, d: table(w, d, lambda df: df.assign(mean_embedding=[
                      np.zeros(len(v), np.float32) for v in df.mean_embedding]))}
    for name, make in bad_tables.items():
        @case("search", name)
        def _(w, d, make=make):
            return ["search", make(w, d), "--chip-id", "s:r0c0"], None

    for extra in (["--chip-id", "nope"], ["--lonlat", "0", "0"], ["--lonlat", "nan", "nan"],
                  ["--chip-id", "s:r0c0", "-k", "0"], ["--chip-id", "s:r0c0", "-k", "-3"],
                  ["--chip-id", "s:r0c0", "--embedding", "bogus"], []):
        @case("search", f"flags {' '.join(extra) or '(no query)'}")
        def _(w, d, extra=extra):
            return ["search", chips(w), *extra], None

    # -------------------------------------------------------------------------------------------- export, convert
    @case("export", "--check with a NaN weight", "nonzero")
    def _(w, d):
        import torch

        run = write_run(f"{d}/run")
        ck = torch.load(f"{run}/model_final.pth", weights_only=True)
        key = next(k for k in ck["model"] if k.endswith("blocks.0.attn.qkv.weight"))
        ck["model"][key][0, 0] = float("nan")
        torch.save(ck, f"{run}/model_final.pth")
        return ["export", "--model", run, "--output", f"{d}/m.onnx", "--img-size", "56", "--check"], None

    @case("convert", "a state dict with a wrong shape", "nonzero")
    def _(w, d):
        import torch

        from dinov2 import load_model

        sd = load_model(w.run).state_dict()
        sd["cls_token"] = torch.zeros(1, 1, 7)
        torch.save(sd, f"{d}/wrong.pth")
        shutil.copy(f"{w.run}/config.yaml", f"{d}/config.yaml")
        return ["convert", f"{d}/wrong.pth", f"{d}/out.pth", "--to", "torchgeo"], None

    @case("convert", "a model that is not ViT-B/14 to torchgeo without --force", "nonzero")
    def _(w, d):
        return ["convert", f"{w.run}/model_final.pth", f"{d}/out.pth", "--to", "torchgeo"], None


def _first_is(csv: str, chip_id: str) -> bool:
    import pandas as pd

    res = pd.read_csv(csv)
    return len(res) > 0 and res.chip_id[0] == chip_id and abs(res.similarity[0] - 1.0) < 1e-6
