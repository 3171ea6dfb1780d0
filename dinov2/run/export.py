"""Export a Panopticon backbone as ONNX and/or a torch.export program (``panopticon export``).

The exported model takes ``imgs`` (B, C, H, W) float32 and ``chn_ids`` (B, C) float32 (band centre wavelengths in
nm, SAR codes -1..-12), with any batch size and any channel count, and returns ``embedding`` (B, D), the normed
class token. H = W = --img-size (default 224); the positional embedding is resampled to it once at export.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

HUB_MODELS = ("panopticon_vitb14",)
FORMATS = ("onnx", "torch-export", "both")
RELEASE_URL = "https://huggingface.co/lewaldm/panopticon/resolve/main/panopticon_vitb14_teacher.pth"

EPILOG = f"""examples:
  # the released ViT-B/14 (download {RELEASE_URL} first)
  python -m dinov2.run.export --model panopticon_vitb14 --weights panopticon_vitb14_teacher.pth \\
      --output panopticon_vitb14 --format both
  # random weights (architecture only), checked against PyTorch with onnxruntime on 3, 13 and 202 bands
  python -m dinov2.run.export --model panopticon_vitb14 --pretrained false --output /tmp/vitb14 --check
  # the teacher of a training run (folder with model_final.pth and config.yaml, or a .pth checkpoint)
  panopticon export --model outputs/my_run --output my_run.onnx
"""


def _bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon export", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help=f"a hub model name ({', '.join(HUB_MODELS)}; needs --weights unless --pretrained false), "
                        "a training run folder (model_final.pth + config.yaml), or a .pth checkpoint")
    p.add_argument("--weights", default=None,
                   help="weights file of a hub model (the released teacher .pth, or a hub-format state dict)")
    p.add_argument("--pretrained", type=_bool, default=True, metavar="true|false",
                   help="with a hub model name: false exports random weights (architecture tests); default true")
    p.add_argument("--output", required=True,
                   help="output path; .onnx / .pt2 is appended (with --format both, both files share the stem)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default), torch-export (a .pt2 program for torch.export.load) or both")
    p.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=224,
                   help="image height = width of the exported model in pixels (multiple of the patch size, 14)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    p.add_argument("--check", action="store_true",
                   help="after an ONNX export, compare onnxruntime with PyTorch on 3, 13 and 202 bands")
    return p


def _weights_entry(path: str) -> dict:
    """How to find the backbone in a weights file: a raw backbone state dict (the release), a teacher checkpoint
    ``{'teacher': {backbone.*}}`` or a training checkpoint ``{'model': {teacher.backbone.*}}``."""
    from dinov2.utils.checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("teacher"), dict):
        return {"path": path, "checkpoint_key": "teacher", "prefix_map": {"backbone.": ""}}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return {"path": path, "checkpoint_key": "model", "prefix_map": {"teacher.backbone.": ""}}
    return {"path": path, "checkpoint_key": None}


def load_model(model: str, weights: Optional[str] = None, pretrained: bool = True):
    """The backbone (eval mode) named by `model`: a hub name, a run folder or a checkpoint file."""
    from dinov2.eval.model_loading import HUB_STUDENT_CFG, ModelSpec, build_eval_backbone, resolve_model_objs
    from dinov2.models import build_model

    if model in HUB_MODELS:
        if weights is None:
            if pretrained:
                raise ValueError(f"--model {model} needs --weights <file> (download {RELEASE_URL}) "
                                 "or --pretrained false for random weights")
            backbone, _ = build_model(dict(HUB_STUDENT_CFG), only_teacher=True,
                                      img_size=int(HUB_STUDENT_CFG["pos_emb_img_size"]))
            return backbone.eval()
        if not Path(weights).is_file():
            raise FileNotFoundError(f"--weights {weights!r} does not exist")
        spec = ModelSpec(str(weights), dict(HUB_STUDENT_CFG), [_weights_entry(str(weights))], output_dir="",
                         kind="hub")
        return build_eval_backbone(spec).backbone.eval()  # every backbone parameter must be in the file
    if weights is not None:
        raise ValueError("--weights is only for hub model names; give the checkpoint itself as --model")
    if not Path(model).exists():
        raise FileNotFoundError(f"--model {model!r} is neither a hub name ({', '.join(HUB_MODELS)}) nor an "
                                "existing run folder or checkpoint")
    specs = resolve_model_objs(str(model))
    if len(specs) != 1:
        raise ValueError(f"--model {model!r} resolves to {len(specs)} checkpoints; name one of "
                         f"{[s.ckpt_path for s in specs][:5]}")
    return build_eval_backbone(specs[0]).backbone.eval()


def output_paths(output: str, fmt: str) -> Tuple[Optional[Path], Optional[Path]]:
    """(onnx path, .pt2 path) for `--output` and `--format`."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix in (".onnx", ".pt2") else out
    onnx_path = stem.with_name(stem.name + ".onnx") if fmt in ("onnx", "both") else None
    pt2_path = stem.with_name(stem.name + ".pt2") if fmt in ("torch-export", "both") else None
    return onnx_path, pt2_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from dinov2.export import check_onnx, export_onnx, save_program

    t0 = time.time()
    print(f"[export] loading {args.model}", flush=True)
    try:
        backbone = load_model(args.model, args.weights, args.pretrained)
    except (ValueError, FileNotFoundError) as exc:
        print(f"panopticon export: error: {exc}", file=sys.stderr)
        return 2
    onnx_path, pt2_path = output_paths(args.output, args.format)
    for path in (onnx_path, pt2_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if pt2_path is not None:
        print(f"[export] torch.export program at {args.img_size} px -> {pt2_path}", flush=True)
        save_program(backbone, str(pt2_path), img_size=args.img_size)
    if onnx_path is not None:
        print(f"[export] ONNX (opset {args.opset}) at {args.img_size} px -> {onnx_path}", flush=True)
        export_onnx(backbone, str(onnx_path), img_size=args.img_size, opset=args.opset)
        if args.check:
            diffs = check_onnx(backbone, str(onnx_path), img_size=args.img_size, batch=1)
            for c, d in diffs.items():
                print(f"[export] onnxruntime vs PyTorch, {c:3d} bands: max |diff| = {d:.2e}")
            if max(diffs.values()) > 1e-4:
                print("panopticon export: error: ONNX output differs from PyTorch by more than 1e-4",
                      file=sys.stderr)
                return 1
    print(f"[export] done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
