"""Prepare published datasets as downloaded: write the index files the readers need next to the data.

    python -m dinov2.run.prepare_data mmearth $RDIR/datasets/mmearth/data_1M_v001
    python -m dinov2.run.prepare_data eurosat-sar $RDIR/datasets/eurosat_SAR

(also `panopticon prepare_data ...`). Both are idempotent and write atomically.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EPILOG = """examples:
  python -m dinov2.run.prepare_data mmearth $RDIR/datasets/mmearth/data_1M_v001
  python -m dinov2.run.prepare_data eurosat-sar $RDIR/datasets/eurosat_SAR --small-sizes 2000 1000 1000
"""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{mmearth,eurosat-sar}",
                           help="the dataset to prepare (each has its own --help)")

    mm = sub.add_parser(
        "mmearth", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="build <name>.parquet from the MMEarth download (h5 + _tile_info.json + _splits.json)",
        description="Build the MMEarth row metadata <name>.parquet (hf5_idx, tile_id, split, sensor, s2_type) from "
                    "<name>.h5 (its 'metadata' dataset), <name>_tile_info.json and <name>_splits.json. The "
                    "MMEarth reader does the same on first use; running it ahead of time avoids doing it at the "
                    "start of a training job.")
    mm.add_argument("folder", help="the downloaded folder, e.g. $RDIR/datasets/mmearth/data_1M_v001 (the file "
                                   "names start with the folder name)")
    mm.add_argument("--output", default=None,
                    help="where to write the parquet (default: <folder>/<name>.parquet; with a read-only folder "
                         "~/.cache/panopticon/mmearth/)")
    mm.add_argument("--overwrite", action="store_true", help="rebuild even if the parquet exists")

    es = sub.add_parser(
        "eurosat-sar", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="write train/val/test (+ small_*) split CSVs for the EuroSAT-SAR class folders",
        description="Write <root>/{train,val,test,small_train,small_val,small_test}.csv (columns filepath, "
                    "class_name) for the released EuroSAT-SAR folder <root>/<Class>/*.tif: classes cut to the "
                    "smallest class, stratified test split, 1/8 of the rest as validation, class-balanced small "
                    "subsets.")
    es.add_argument("root", help="folder holding the 10 class folders (AnnualCrop, Forest, ...)")
    es.add_argument("--seed", type=int, default=42, help="seed of the random split (default 42)")
    es.add_argument("--test-fraction", type=float, default=0.2, help="share of each class in test (default 0.2)")
    es.add_argument("--val-fraction", type=float, default=1 / 8,
                    help="share of the remaining images used for validation (default 1/8)")
    es.add_argument("--small-sizes", type=int, nargs=3, default=(2000, 1000, 1000), metavar=("TRAIN", "VAL", "TEST"),
                    help="sizes of small_train, small_val, small_test (default 2000 1000 1000)")
    es.add_argument("--overwrite", action="store_true", help="replace existing split CSVs")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.dataset == "mmearth":
        from dinov2.data.datasets.mmearth import prepare_metadata

        path = prepare_metadata(args.folder, out_path=args.output, overwrite=args.overwrite)
        print(f"MMEarth metadata: {path}")
    else:
        from dinov2.data.datasets.eurosat_sar import make_splits

        out = make_splits(args.root, seed=args.seed, test_fraction=args.test_fraction,
                          val_fraction_of_train=args.val_fraction, small_sizes=args.small_sizes,
                          overwrite=args.overwrite)
        import pandas as pd

        for stem, path in out.items():
            print(f"{stem:12s} {len(pd.read_csv(path)):6d} images  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
