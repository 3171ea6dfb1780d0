"""`panopticon search`: the chips most similar to a query chip or a point, from an embed run's chips.parquet.

Chips without a valid embedding are left out; errors are one line (exit status 2, `--debug` for the traceback).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

EPILOG = """examples:
  panopticon search out/chips.parquet --chip-id s2_nocloud:r3c4 -k 5
  panopticon search out/chips.parquet --lonlat -73.61 40.95 --embedding cls
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon search", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chips", help="chips.parquet written by `panopticon embed`")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--chip-id", help="query chip id (column chip_id)")
    q.add_argument("--lonlat", nargs=2, type=float, metavar=("LON", "LAT"), help="query point in WGS84")
    p.add_argument("-k", type=int, default=10, help="number of results (default: %(default)s)")
    p.add_argument("--embedding", choices=("mean", "cls"), default="mean",
                   help="mean-pooled patch embeddings or CLS tokens (default: %(default)s)")
    p.add_argument("--output", help="also write the results to this CSV file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dinov2.inference.search import search_chips

    res = search_chips(args.chips, args.k, args.chip_id, tuple(args.lonlat) if args.lonlat else None, args.embedding)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 10):
        print(res[["chip_id", "similarity", "scene", "lon", "lat"]].to_string(index=False))
    if args.output:
        res.to_csv(args.output, index=False)
    return 0


if __name__ == "__main__":  # `python -m dinov2.run.search`: the CLI's one-line errors
    import sys

    from dinov2.run.cli import run_command

    raise SystemExit(run_command("search", main, sys.argv[1:], prog="python -m dinov2.run.search"))
