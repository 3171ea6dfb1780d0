"""`panopticon search`: the chips most similar to a query chip or a point, in an embed output's chip table.

Uses the index built by `panopticon index` when it matches the chip table (fast, approximate: HNSW), else scans
the table exactly, part by part, with memory that does not grow with the table.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

EPILOG = """examples:
  panopticon search out/ --chip-id s2_nocloud:r3c4 -k 5
  panopticon search out/ --lonlat -73.61 40.95 --embedding cls
  panopticon search out/ --chip-id s2_nocloud:r3c4 --bbox -74.1,40.5,-73.5,41.0 --datetime 2024-06-01/2024-08-31
  panopticon search out/chips.parquet --chip-id s2_nocloud:r3c4 --exact
"""


def _bbox(text: str):
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W,S,E,N numbers, got {text!r}") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"expected 4 numbers W,S,E,N, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon search", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chips", help="output folder of `panopticon embed` or its chips.parquet, or an output in object "
                   "storage (s3://bucket/prefix: mirrored into the cache, indexed and searched there)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--chip-id", help="query chip id (column chip_id, '<scene>:r<row>c<col>')")
    q.add_argument("--lonlat", nargs=2, type=float, metavar=("LON", "LAT"), help="query: the chip containing this "
                   "WGS84 point")
    p.add_argument("-k", type=_positive, default=10, help="number of results (default: %(default)s)")
    p.add_argument("--embedding", choices=("mean", "cls"), default="mean",
                   help="mean-pooled patch embeddings or CLS tokens (default: %(default)s)")
    p.add_argument("--bbox", type=_bbox, help="only chips intersecting this WGS84 box W,S,E,N")
    p.add_argument("--datetime", help="only chips acquired in START/END (ISO dates or times; '..' = open end)")
    p.add_argument("--exact", action="store_true", help="scan every embedding even when an index exists")
    p.add_argument("--output", help="also write the results to this CSV file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dinov2.inference.search import search_chips

    res = search_chips(args.chips, args.k, args.chip_id, tuple(args.lonlat) if args.lonlat else None, args.embedding,
                       bbox=args.bbox, datetime=args.datetime, exact=args.exact)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 10):
        print(res[["chip_id", "similarity", "scene", "lon", "lat", "datetime"]].to_string(index=False))
    if args.output:
        res.to_csv(args.output, index=False)
    return 0


if __name__ == "__main__":  # `python -m dinov2.run.search`: the CLI's one-line errors
    import sys

    from dinov2.run.cli import run_command

    raise SystemExit(run_command("search", main, sys.argv[1:], prog="python -m dinov2.run.search"))
