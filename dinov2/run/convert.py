"""`panopticon convert`: checkpoints to and from torchgeo's Panopticon state-dict layout (a timm ViT), and between
`.pth` and `.safetensors`.

    panopticon convert runs/mine/model_final.pth panopticon_torchgeo.pth                # -> torchgeo, 224 px
    panopticon convert --to panopticon panopticon_torchgeo.pth panopticon_vitb14_teacher.pth
    panopticon convert --to panopticon runs/mine hf_repo/model.safetensors               # format only

Before anything is written, the result is checked against the target layout: every key, every shape and every
value finite, else the command exits with status 2 naming what is wrong. torchgeo's `panopticon_vitb14` is
ViT-B/14 with the released spectral patch embedding; other architectures are refused for that layout unless
`--force`. The layout differences are listed in `dinov2/interop.py` and docs/interop.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

EPILOG = """examples:
  panopticon convert panopticon_vitb14_teacher.pth panopticon_torchgeo.pth
  panopticon convert --img-size 448 runs/mine/model_final.pth mine_torchgeo_448.pth
  panopticon convert --to panopticon panopticon_torchgeo.pth back_teacher.pth
  panopticon convert --to panopticon runs/mine hf_repo/model.safetensors     # weights + config for load_model

load the result with torchgeo:
  model = torchgeo.models.panopticon_vitb14(img_size=224); model.load_state_dict(torch.load(OUT))
load a file in this project's layout:
  dinov2.load_model(OUT)   or   torch.hub.load(REPO, 'panopticon_vitb14', source='local', weights=OUT)
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a Panopticon backbone between this project's layout (hub teacher file or training "
                    "checkpoint) and torchgeo's Panopticon layout (timm ViT keys under `model.`), as .pth or "
                    ".safetensors (chosen by the output's suffix).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="checkpoint to read (.pth or .safetensors): hub teacher file, training checkpoint "
                                 "(model_final.pth, teacher_checkpoint.pth), a run folder (its model_final.pth) or "
                                 "a torchgeo Panopticon state dict")
    p.add_argument("output", help="file to write, written atomically: a plain state dict (.pth), or .safetensors "
                                  "(in this project's layout with the config that rebuilds it, in the header and "
                                  "a config.yaml beside it)")
    p.add_argument("--to", choices=["torchgeo", "panopticon"], default=None,
                   help="target layout (default: the other one than the input's; the same one only changes the "
                        "file format)")
    p.add_argument("--img-size", type=int, default=None,
                   help="image size the target's position embedding covers (default: 224 for torchgeo, 518 for "
                        "panopticon from torchgeo, unchanged for a format-only conversion)")
    p.add_argument("--patch-size", type=int, default=14, help="patch size of the model (default: 14)")
    p.add_argument("--pos-resample", choices=("antialias", "forward"), default="antialias",
                   help="how the position table is resized to --img-size: antialias (bicubic with antialiasing, as "
                        "torchgeo loads the release; default) or forward (as this project's forward pass "
                        "interpolates it at that size, so torchgeo's outputs equal this project's there)")
    p.add_argument("--force", action="store_true",
                   help="write a torchgeo-layout file for a model that is not ViT-B/14 (torchgeo's "
                        "panopticon_vitb14 cannot load it; the keys, shapes and values are still checked)")
    return p


def _source(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], str, str]:
    """(backbone state dict, its student config, checkpoint file, where the config came from) of the input. This
    project's layout gets its config as `load_model` would (run config, safetensors header, config.yaml beside);
    torchgeo's layout, and a checkpoint without any config, the released ViT-B/14 architecture."""
    from dinov2.hub import HUB_STUDENT_CFG, spec_from_checkpoint
    from dinov2.interop import detect_layout
    from dinov2.utils.checkpoint import backbone_state_dict, load_checkpoint_file

    file = os.path.join(path, "model_final.pth") if os.path.isdir(path) else path
    state = backbone_state_dict(load_checkpoint_file(file))
    released = (state, dict(HUB_STUDENT_CFG), file, "the released ViT-B/14 architecture")
    if detect_layout(state) == "torchgeo":
        return released
    try:
        spec = spec_from_checkpoint(file)
    except FileNotFoundError:  # a training checkpoint without its run's config.yaml
        return released[:3] + ("the released ViT-B/14 architecture (no config.yaml found beside it)",)
    if spec.student_cfg == HUB_STUDENT_CFG:
        return released
    return state, dict(spec.student_cfg), file, "its config"


def convert(args: argparse.Namespace) -> str:
    """Convert, check and write; returns the summary line."""
    from dinov2.hub import HUB_STUDENT_CFG
    from dinov2.interop import (detect_layout, expected_layout, from_torchgeo, layout_problems, pos_embed_grid,
                                resize_pos_embed, to_torchgeo)
    from dinov2.utils.checkpoint import save_atomic, save_backbone_safetensors

    state, student, file, origin = _source(args.input)
    source = detect_layout(state)
    target = args.to or ("panopticon" if source == "torchgeo" else "torchgeo")
    safetensors = args.output.endswith(".safetensors")
    if source == target and safetensors == file.endswith(".safetensors"):
        raise ValueError(f"{file} is already in the {target} layout and format; name an output with the other "
                         "suffix (.pth / .safetensors) to change only the format")
    if target == "torchgeo":
        out = to_torchgeo(state, img_size=args.img_size or 224, patch_size=args.patch_size,
                          resample=args.pos_resample)
        grid = pos_embed_grid(out["model.pos_embed"])
    elif source == "torchgeo":
        out = from_torchgeo(state, img_size=args.img_size or 518, patch_size=args.patch_size)
        grid = pos_embed_grid(out["pos_embed"])
    else:  # format only (and the position grid when --img-size is given)
        key = "model.pos_embed" if source == "torchgeo" else "pos_embed"
        grid = (args.img_size // args.patch_size) if args.img_size else pos_embed_grid(state[key])
        out = dict(state, **{key: resize_pos_embed(state[key], grid, args.pos_resample)})
    img_size = grid * int(student.get("patch_size", args.patch_size))
    problems = layout_problems(out, expected_layout(student, img_size, target))
    if problems:
        raise ValueError(f"{file} does not convert to a valid {target} backbone (checked against {origin}): "
                         f"{'; '.join(problems)}")
    if target == "torchgeo" and not args.force:
        released = layout_problems(out, expected_layout(HUB_STUDENT_CFG, img_size, target), limit=2)
        if released:
            raise ValueError(f"{file} is not a ViT-B/14 Panopticon ({'; '.join(released)}); torchgeo's "
                             "panopticon_vitb14 cannot load it. --force writes it anyway")
    if safetensors:
        config = dict(student, pos_emb_img_size=img_size, block_chunks=0) if target == "panopticon" else None
        save_backbone_safetensors(out, args.output, config, {"layout": target})
    else:
        save_atomic(out, args.output)
    return (f"wrote {args.output}: {len(out)} tensors, {source} -> {target} layout, position grid {grid}x{grid}, "
            f"every key, shape and value checked")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon convert` entry point; anticipated errors -> one line, exit status 2."""
    args = get_args_parser().parse_args(argv)
    from dinov2.weights_cache import WeightsError

    try:
        print(convert(args), file=sys.stdout)
    except (ValueError, FileNotFoundError, WeightsError, ModuleNotFoundError) as exc:
        print(f"panopticon convert: error: {exc}", file=sys.stderr)
        return 2
    return 0
