"""`panopticon convert`: checkpoints to and from torchgeo's Panopticon state-dict layout (a timm ViT).

    panopticon convert runs/mine/model_final.pth panopticon_torchgeo.pth                # -> torchgeo, 224 px
    panopticon convert --to panopticon panopticon_torchgeo.pth panopticon_vitb14_teacher.pth

The layout differences are listed in `dinov2/interop.py` and docs/interop.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EPILOG = """examples:
  panopticon convert panopticon_vitb14_teacher.pth panopticon_torchgeo.pth
  panopticon convert --img-size 448 runs/mine/model_final.pth mine_torchgeo_448.pth
  panopticon convert --to panopticon panopticon_torchgeo.pth back_teacher.pth

load the result with torchgeo:
  model = torchgeo.models.panopticon_vitb14(img_size=224); model.load_state_dict(torch.load(OUT))
load a file converted back with this repository:
  torch.hub.load(REPO, 'panopticon_vitb14', source='local', weights=OUT)
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a Panopticon backbone between this project's layout (hub teacher file or training "
                    "checkpoint) and torchgeo's Panopticon layout (timm ViT keys under `model.`).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read: hub teacher file, training checkpoint (model_final.pth, "
                                 "teacher_checkpoint.pth), a run folder (its model_final.pth) or a torchgeo "
                                 "Panopticon state dict")
    p.add_argument("output", help="file to write (a plain state dict, written atomically)")
    p.add_argument("--to", choices=["torchgeo", "panopticon"], default=None,
                   help="target layout (default: the other one than the input's)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image size the target's position embedding covers (default: 224 for torchgeo, 518 for "
                        "panopticon, the released checkpoint's grid)")
    p.add_argument("--patch-size", type=int, default=14, help="patch size of the model (default: 14)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon convert` entry point."""
    args = get_args_parser().parse_args(argv)
    from dinov2.interop import detect_layout, from_torchgeo, pos_embed_grid, to_torchgeo
    from dinov2.utils.checkpoint import backbone_state_dict, load_checkpoint_file, save_atomic

    source_file = os.path.join(args.input, "model_final.pth") if os.path.isdir(args.input) else args.input
    state = backbone_state_dict(load_checkpoint_file(source_file))
    source = detect_layout(state)
    target = args.to or ("panopticon" if source == "torchgeo" else "torchgeo")
    if source == target:
        raise ValueError(f"{source_file} is already in the {target} layout")
    if target == "torchgeo":
        out = to_torchgeo(state, img_size=args.img_size or 224, patch_size=args.patch_size)
        grid = pos_embed_grid(out["model.pos_embed"])
    else:
        out = from_torchgeo(state, img_size=args.img_size or 518, patch_size=args.patch_size)
        grid = pos_embed_grid(out["pos_embed"])
    save_atomic(out, args.output)
    print(f"wrote {args.output}: {len(out)} tensors, {source} -> {target} layout, position grid {grid}x{grid}",
          file=sys.stdout)
    return 0
