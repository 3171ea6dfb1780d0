"""`panopticon predict`: apply a trained segmentation head (and its backbone) to new scenes.

Writes, in --output-dir, `<scene>_classes.tif` (uint8 class ids, 255 = no data, colour table, class names) and
`<scene>_probs.tif` (one float32 band per class), Cloud-Optimised GeoTIFFs on each scene's grid and CRS, plus
`<scene>_classes.json` (class names, colours, report). The head is the `model_final.pth` of a segmentation task
folder (written by the eval CLI); the backbone defaults to the training run that folder belongs to
(`<run>/eval_*/.../model_final.pth`). Chip size, model input size and normalisation default to what the head
recorded; scenes whose bands differ from the head's, and a backbone other than the head's, are refused before any
work. One run at a time writes a folder; finished scenes are reused while nothing that decides them changed.
Errors are one line (exit status 2); `panopticon --debug predict ...` shows the traceback.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from dinov2.utils.cli_help import OneSpellingHelpFormatter

EPILOG = """examples:
  panopticon predict runs/mine/eval_model_final/seg/my_task scenes.yaml --output-dir maps/
  panopticon predict my_task/model_final.pth S2.tif --sensor sentinel2 --bands B02,B03,B04 \\
      --model runs/mine --chip-size 96 --model-input 56 --output-dir maps/
"""


def build_parser() -> argparse.ArgumentParser:
    from dinov2.run.embed import add_scene_arguments

    p = argparse.ArgumentParser(prog="panopticon predict", description=__doc__, epilog=EPILOG,
                                formatter_class=OneSpellingHelpFormatter)
    p.add_argument("head", help="segmentation task folder or its model_final.pth")
    add_scene_arguments(p)
    p.add_argument("--output-dir", "-o", required=True, help="folder for the class and probability maps")
    p.add_argument("--model", help="backbone: training run folder, checkpoint, weights file or hub name (default: "
                   "the run the task folder belongs to)")
    p.add_argument("--chip-size", type=int, help="chip side in scene pixels (default: the head's training chip, "
                   "else 224)")
    p.add_argument("--overlap", type=int, help="overlap of neighbouring chips in pixels, blended with linear "
                   "cross-fades (default: an eighth of the chip, e.g. 28 px for 224 px chips)")
    p.add_argument("--model-input", type=int, help="resize chips to this many pixels before the model (default: "
                   "the head's img_size, else no resizing)")
    p.add_argument("--batch-size", type=int, default=8, help="chips per forward pass (default: %(default)s)")
    p.add_argument("--norm-stats", help="'scene', a stats file or 'dataset:<name>' (default: the statistics the "
                   "head was trained with, else 'scene')")
    p.add_argument("--force", action="store_true", help="predict even with a backbone whose weights differ from "
                   "the ones the head was trained on (warned)")
    p.add_argument("--no-probs", action="store_true", help="write only the class map")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (for GPUs)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def default_backbone(head_file: Path) -> str:
    """The training run a task folder's head belongs to (`<run>/eval_<...>/<task>/model_final.pth`)."""
    for parent in head_file.resolve().parents:
        if parent.name.startswith("eval_") or parent.name == "eval":
            return str(parent.parent)
    raise ValueError(f"cannot tell which backbone {head_file} was trained on (not inside a run's eval_* folder); "
                     "pass --model")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dinov2.run.embed import setup_logging

    setup_logging()
    import torch

    from dinov2.inference.grid import check_batch_size
    from dinov2.inference.head import load_head_state
    from dinov2.inference.predict import PredictSettings, SegmentationHead, predict_scenes
    from dinov2.inference.scene_job import output_lock
    from dinov2.run.embed import load_backbone, raster_policy, scenes_from_args

    check_batch_size(args.batch_size)
    if "://" in str(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir}: predict writes to a local folder (object storage is an "
                         "embed output)")
    head_file = Path(args.head)
    head_file = head_file / "model_final.pth" if head_file.is_dir() else head_file
    load_head_state(str(head_file))  # a missing, empty or truncated head file fails before any loading
    settings = PredictSettings(chip_size=args.chip_size, overlap=args.overlap, model_input=args.model_input,
                               batch_size=args.batch_size, norm_stats=args.norm_stats, precision=args.precision,
                               write_probs=not args.no_probs, progress=not args.no_progress, force=args.force)
    # the folder's lock first: a second run is refused before it loads or writes anything
    with output_lock(args.output_dir, "panopticon predict"):
        model = load_backbone(args.model or default_backbone(head_file))
        head = SegmentationHead(str(head_file), model.embed_dim, getattr(model, "feature_dims", None))
        if head.backbone_state is not None:  # fine-tuned: the task folder holds the tuned backbone
            try:
                model.load_state_dict(head.backbone_state, strict=True)
            except RuntimeError as e:
                raise ValueError(f"{head_file}: its tuned backbone does not fit --model {args.model}: "
                                 f"{str(e).splitlines()[0]}") from None
        scenes = scenes_from_args(args)
        device = torch.device(args.device) if args.device else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        outs = predict_scenes(scenes, model, head, args.output_dir, settings, device, raster_policy(args))
    for scene, out in zip(scenes, outs):
        print(f"{scene.name}: {', '.join(out.values())}")
    return 0


if __name__ == "__main__":  # `python -m dinov2.run.predict`: the CLI's one-line errors
    import sys

    from dinov2.run.cli import run_command

    raise SystemExit(run_command("predict", main, sys.argv[1:], prog="python -m dinov2.run.predict"))
