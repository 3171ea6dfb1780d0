"""`panopticon index`: an approximate-nearest-neighbour index over the chips of an embed output, for fast
`panopticon search` at millions of chips.

Writes `<out>/chips.index/` (HNSW graph per embedding kind, a small metadata table, a manifest). Running it again
after more scenes were embedded adds only the new parts; parts rewritten or removed since trigger a rebuild.
A search never uses an index that no longer matches the chip table.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

EPILOG = """examples:
  panopticon index out/
  panopticon index out/ --embedding mean,cls --dtype f32
  panopticon search out/ --chip-id s2:r3c4 -k 10        # uses the index
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon index", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("chips", help="output folder of `panopticon embed` or its chips.parquet, or an output in object "
                   "storage (s3://bucket/prefix: mirrored into the cache, indexed and searched there)")
    p.add_argument("--embedding", default="mean", help="comma-separated kinds to index: mean, cls "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=("f32", "f16", "i8"), default="f16", help="storage of the vectors in the "
                   "index (default: %(default)s; similarities then carry ~1e-3 rounding)")
    p.add_argument("--connectivity", type=int, default=16, help="HNSW graph degree M (default: %(default)s)")
    p.add_argument("--expansion-add", type=int, default=128, help="HNSW efConstruction (default: %(default)s)")
    p.add_argument("--expansion-search", type=int, default=128, help="HNSW ef at query time, stored with the "
                   "index (default: %(default)s)")
    p.add_argument("--rebuild", action="store_true", help="rebuild from scratch instead of adding new parts")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dinov2.inference.index import IndexSettings, build_index

    for name, v in (("--connectivity", args.connectivity), ("--expansion-add", args.expansion_add),
                    ("--expansion-search", args.expansion_search)):
        if v < 2:
            raise ValueError(f"{name} must be an integer >= 2, got {v}")
    kinds = [e.strip() for e in args.embedding.split(",") if e.strip()]
    res = build_index(args.chips, kinds, IndexSettings(args.dtype, args.connectivity, args.expansion_add,
                                                       args.expansion_search),
                      progress=not args.no_progress, rebuild=args.rebuild)
    how = "rebuilt" if res["rebuilt"] else f"added {res['added_parts']} part(s)"
    print(f"index {res['folder']}: {res['rows']} chips ({', '.join(res['embeddings'])}; {how})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
