"""Export a backbone as ONNX, a torch.export program and/or safetensors weights (``panopticon export``).

The exported graph takes ``imgs`` (B, C, H, W) float32 and ``chn_ids`` (B, C) (band centre wavelengths in nm, SAR
codes -1..-12; float32, or int64 with --chn-ids-dtype int64), plus ``spec_masks`` (B, C) bool with --spec-masks,
with any batch size and any channel count, and returns the --outputs: ``embedding`` (B, D), the normed class token,
and/or ``patch_tokens`` (B, N, D), the normed patch tokens. H = W = --img-size (default 224; the position table is
resampled to it once), or any multiple of the patch size with --dynamic-size. --format safetensors writes the
weights with the config that rebuilds them (for `load_model` and the Hugging Face Hub). See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from dinov2.utils.cli_help import OneSpellingHelpFormatter

FORMATS = ("onnx", "torch-export", "both", "safetensors")
SUFFIXES = (".onnx", ".pt2", ".safetensors")
TOLERANCE = 1e-4

EPILOG = """examples:
  # the released ViT-B/14 (downloaded once into the weights cache), CLS embedding at 224 px
  panopticon export --model panopticon_vitb14 --output panopticon_vitb14.onnx --check
  # dense: class and patch tokens, any image size (multiples of 14), checked with onnxruntime
  panopticon export --model panopticon_vitb14 --pretrained false --output /tmp/dense.onnx \\
      --outputs embedding,patch_tokens --dynamic-size --check
  # the teacher of a training run, as safetensors with its config (load_model / Hugging Face Hub)
  panopticon export --model runs/mine --format safetensors --output hf_repo/model.safetensors
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
                                formatter_class=OneSpellingHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a hub name (panopticon_vitb14, dinov2_vits14, ...; the released weights unless --weights "
                        "or --pretrained false), hf-hub:ORG/NAME[@REVISION], a training run folder, or a "
                        ".pth/.safetensors checkpoint")
    p.add_argument("--weights", default=None,
                   help="weights of a hub name (a local file or URL), or the weights file inside an hf-hub repo")
    p.add_argument("--pretrained", type=_bool, default=True, metavar="true|false",
                   help="with a hub name: false exports random weights (architecture tests); default true")
    p.add_argument("--output", required=True,
                   help="output path; .onnx / .pt2 / .safetensors is appended (with --format both, both files "
                        "share the stem)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (default), torch-export (a .pt2 program for torch.export.load), both, or "
                        "safetensors (the weights, with the config that rebuilds them in the header and in a "
                        "config.yaml beside the file)")
    p.add_argument("--img-size", "--img_size", dest="img_size", type=int, default=224,
                   help="image height = width of the exported graph in pixels (multiple of the patch size); with "
                        "--dynamic-size the size of the tracing example and of --check")
    p.add_argument("--outputs", type=str, default="embedding", metavar="NAMES",
                   help="comma-separated graph outputs: embedding (B, D, the normed class token) and/or "
                        "patch_tokens (B, N, D, the normed patch tokens); default embedding")
    p.add_argument("--dynamic-size", "--dynamic_size", dest="dynamic_size", action="store_true",
                   help="height and width dynamic (multiples of the patch size); the position table is "
                        "interpolated in the graph as the eager model does")
    p.add_argument("--chn-ids-dtype", "--chn_ids_dtype", dest="chn_ids_dtype", choices=("float32", "int64"),
                   default="float32", help="dtype of the chn_ids input (default float32)")
    p.add_argument("--spec-masks", "--spec_masks", dest="spec_masks", action="store_true",
                   help="add a third input spec_masks (B, C) bool, True = ignore that channel")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset version (default 18)")
    p.add_argument("--check", action="store_true",
                   help=f"after an ONNX export, compare onnxruntime with PyTorch on 3, 13 and 202 bands (at "
                        f"--img-size, and twice that with --dynamic-size); fails on a difference above "
                        f"{TOLERANCE:g} or any non-finite value")
    return p


def output_paths(output: str, fmt: str) -> Dict[str, Path]:
    """{'onnx'|'torch-export'|'safetensors': path} for `--output` and `--format`."""
    out = Path(output)
    stem = out.with_suffix("") if out.suffix in SUFFIXES else out
    wanted = {"both": ("onnx", "torch-export")}.get(fmt, (fmt,))
    suffix = {"onnx": ".onnx", "torch-export": ".pt2", "safetensors": ".safetensors"}
    return {f: stem.with_name(stem.name + suffix[f]) for f in wanted}


def load_backbone(model: str, weights: Optional[str] = None, pretrained: bool = True):
    """The backbone (eval mode) named by `model`, through `dinov2.load_model`."""
    from dinov2.hub import hub_names, load_model

    if weights is not None and model not in hub_names() and not model.startswith("hf-hub:"):
        raise ValueError("--weights is only for hub names and hf-hub: repositories; give the checkpoint itself as "
                         "--model")
    return load_model(model, pretrained=pretrained, weights=weights)


def _check_finite(backbone) -> None:
    import torch

    bad = [k for k, v in backbone.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the model's weights hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]}); "
                         "refusing to export them")


def write_safetensors(backbone, path: Path) -> None:
    """The backbone state dict as safetensors, its config in the header and in `config.yaml` beside it."""
    from dinov2.utils.checkpoint import save_backbone_safetensors

    student = getattr(getattr(backbone, "info", None), "config", None)
    if student is None:
        raise ValueError("the model's architecture config is unknown; export a run folder, checkpoint or hub model")
    save_backbone_safetensors(backbone.state_dict(), str(path), student)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon export` entry point; anticipated errors (bad model, weights, options) -> one line, exit 2."""
    args = build_parser().parse_args(argv)
    from dinov2.weights_cache import WeightsError

    try:
        return _export(args)
    except (ValueError, FileNotFoundError, WeightsError, ModuleNotFoundError) as exc:
        print(f"panopticon export: error: {exc}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    outputs = [t.strip() for t in str(args.outputs).split(",") if t.strip()]
    t0 = time.time()
    print(f"[export] loading {args.model}", flush=True)
    backbone = load_backbone(args.model, args.weights, args.pretrained)
    _check_finite(backbone)
    import torch

    from dinov2.export import check_options, export_onnx, onnx_parity, save_program

    dtype = {"float32": torch.float32, "int64": torch.int64}[args.chn_ids_dtype]
    graph = dict(outputs=outputs, dynamic_size=args.dynamic_size, chn_ids_dtype=dtype, spec_masks=args.spec_masks)
    paths = output_paths(args.output, args.format)
    if "safetensors" not in paths:
        check_options(backbone, args.img_size, **graph)
    elif args.check:
        raise ValueError("--check compares an ONNX export with PyTorch; use --format onnx or both")
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    size = "dynamic size" if args.dynamic_size else f"{args.img_size} px"
    if "safetensors" in paths:
        print(f"[export] safetensors weights -> {paths['safetensors']} (+ config.yaml)", flush=True)
        write_safetensors(backbone, paths["safetensors"])
    if "torch-export" in paths:
        print(f"[export] torch.export program ({size}, outputs {','.join(outputs)}) -> {paths['torch-export']}",
              flush=True)
        save_program(backbone, str(paths["torch-export"]), img_size=args.img_size, **graph)
    if "onnx" in paths:
        print(f"[export] ONNX (opset {args.opset}, {size}, outputs {','.join(outputs)}) -> {paths['onnx']}",
              flush=True)
        export_onnx(backbone, str(paths["onnx"]), img_size=args.img_size, opset=args.opset, **graph)
        if args.check:
            sizes = (args.img_size, 2 * args.img_size) if args.dynamic_size else (args.img_size,)
            diffs = onnx_parity(backbone, str(paths["onnx"]), sizes=sizes, batch=1, outputs=outputs,
                                chn_ids_dtype=dtype, spec_masks=args.spec_masks)
            for (px, c), d in diffs.items():
                print(f"[export] onnxruntime vs PyTorch, {px} px, {c:3d} bands: max |diff| = {d:.2e}")
            failed = [k for k, d in diffs.items() if not d <= TOLERANCE]  # NaN fails too
            if failed:
                print(f"panopticon export: error: ONNX output differs from PyTorch by more than {TOLERANCE:g} or is "
                      f"not finite at (px, bands) {failed}", file=sys.stderr)
                return 1
    print(f"[export] done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
