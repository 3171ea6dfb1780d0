"""How far torchgeo's `panopticon_vitb14` is from this project's model on the same weights.

torchgeo resamples the released 37 x 37 position table once, when it loads the weights, to the grid of the image
size the model is built for (bicubic with antialiasing); this project keeps the table and interpolates it to each
input's grid in the forward pass (bicubic, DINOv2's +0.1 offset, no antialiasing). Both are built here from one
state dict through `panopticon convert`'s code (dinov2.interop), so the only difference is the table. Prints the
max |difference| of the normed class tokens per image size (0 at 518 px, the stored grid). No download: random
weights by default, or the released file with --weights.

    python benchmarks/torchgeo_pos_table.py                                   # random weights, 224 and 518 px
    python benchmarks/torchgeo_pos_table.py --weights panopticon_vitb14_teacher.pth --sizes 224 448 518
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dinov2.hub_entries import build_entry  # noqa: E402
from dinov2.interop import torchgeo_table_difference  # noqa: E402
from dinov2.utils.checkpoint import backbone_state_dict, load_checkpoint_file  # noqa: E402

# a Sentinel-2 10-band stack, a Landsat-like 6-band stack and RGB, in nm
BAND_SETS = {"S2 10 bands": [492, 559, 664, 704, 740, 782, 832, 864, 1613, 2202], "6 bands": [482, 561, 654, 865,
             1608, 2200], "RGB": [664, 559, 492]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="released teacher file (default: random weights, seed 0)")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 518], help="image sizes (multiples of 14)")
    p.add_argument("--batch", type=int, default=4, help="images per band set (random, z-scored)")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.weights:
        state = backbone_state_dict(load_checkpoint_file(args.weights))
    else:
        state = build_entry("panopticon_vitb14").state_dict()
    print(f"weights: {args.weights or 'random (seed 0)'}")
    print(f"| image size | {' | '.join(BAND_SETS)} |")
    print(f"|---|{'---|' * len(BAND_SETS)}")
    for size in args.sizes:
        cells = []
        for ids in BAND_SETS.values():
            x = {"imgs": torch.randn(args.batch, len(ids), size, size),
                 "chn_ids": torch.tensor([ids] * args.batch, dtype=torch.float32)}
            cells.append(f"{torchgeo_table_difference(state, x):.2e}")
        print(f"| {size} px | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
