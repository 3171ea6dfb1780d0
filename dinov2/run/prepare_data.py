"""Prepare published datasets as downloaded: write the index files the readers need next to the data.

    python -m dinov2.run.prepare_data mmearth $RDIR/datasets/mmearth/data_1M_v001
    python -m dinov2.run.prepare_data eurosat-sar $RDIR/datasets/eurosat_SAR
    python -m dinov2.run.prepare_data benv2-shards $RDIR/datasets/benv2

(also `panopticon prepare_data ...`). Each writes atomically and refuses to replace finished output unless asked.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EPILOG = """examples:
  python -m dinov2.run.prepare_data mmearth $RDIR/datasets/mmearth/data_1M_v001
  python -m dinov2.run.prepare_data eurosat-sar $RDIR/datasets/eurosat_SAR --small-sizes 2000 1000 1000
  panopticon prepare_data benv2-shards $RDIR/datasets/benv2 --splits train validation test --bands all s1 s2
"""


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{mmearth,eurosat-sar,benv2-shards}",
                           help="the dataset to prepare (each has its own --help)")

    display = argparse.ArgumentParser(add_help=False)
    display.add_argument("--no-progress", action="store_true",
                         help="no progress bars or lines (the same as PANOPTICON_NO_PROGRESS=1)")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, help=help,
                              description=description, parents=[display])

    mm = command(
        "mmearth", help="build <name>.parquet from the MMEarth download (h5 + _tile_info.json + _splits.json)",
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

    es = command(
        "eurosat-sar", help="write train/val/test (+ small_*) split CSVs for the EuroSAT-SAR class folders",
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

    bs = command(
        "benv2-shards", help="write BigEarthNet-v2 tar shards (the published layout) from the release",
        description="Write <output>/<split>-<bands>/dataset-NNNNNN.tar (members <patch_id>.img.npy: float32 "
                    "(C, 120, 120) unnormalised, Sentinel-1 stored VH then VV as the published builder did; "
                    "<patch_id>.label.npy: bool (19,)), dataset.yaml (sensor, num_classes, channels, "
                    "nsamples_per_shard) and dataset.pt (channel mean/std) from the release under ROOT "
                    "(metadata.parquet, BigEarthNet-S1/, BigEarthNet-S2/). Read them with the dataset id "
                    "benv2_webdataset (url: <folder>/dataset-*.tar, local, https:// or s3://).")
    bs.add_argument("root", help="the BigEarthNet-v2 release folder (holds metadata.parquet)")
    bs.add_argument("--output", default=None, help="shard root (default: <root>/wds)")
    bs.add_argument("--splits", nargs="+", default=["train", "validation", "test"],
                    choices=["train", "validation", "test"], help="splits to write (default: all three)")
    bs.add_argument("--bands", nargs="+", default=["all", "s1", "s2"], choices=["all", "s1", "s2"],
                    help="band sets, one folder each (default: all s1 s2)")
    bs.add_argument("--shards", type=int, default=100, help="shards per folder (default 100, as published)")
    bs.add_argument("--overwrite", action="store_true", help="rebuild folders that already hold a dataset.yaml")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_parser().parse_args(argv)
    if args.no_progress:
        from dinov2.utils.progress import disable_progress

        disable_progress()
    if args.dataset == "mmearth":
        from dinov2.data.datasets.mmearth import prepare_metadata

        path = prepare_metadata(args.folder, out_path=args.output, overwrite=args.overwrite)
        print(f"MMEarth metadata: {path}")
    elif args.dataset == "benv2-shards":
        from dinov2.data.datasets.benv2_wds import write_benv2_shards

        if args.shards < 1:
            raise ValueError(f"--shards must be a positive number, got {args.shards}")
        for folder in write_benv2_shards(args.root, args.output, args.splits, args.bands, args.shards,
                                         overwrite=args.overwrite):
            print(f"BigEarthNet-v2 shards: {folder}")
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
