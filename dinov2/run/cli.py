"""The `panopticon` command: one entry point whose subcommands are the modules `dinov2.run.<name>`.

    panopticon --help
    panopticon <command> --help
    python -m dinov2 <command> ...          # the same without the console script

Each command module exposes `main(argv) -> int` built on argparse. This module imports a command's module only
when that command runs, and no command module imports an optional dependency before parsing its arguments, so
`--help` works on a core (torch-only) install. Anticipated errors (bad input, files, flags, a locked output
folder) end in one line naming the file, flag or value and exit status 2; ``--debug`` (before or after the
command) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import dinov2

# name -> (module exposing `main(argv) -> int`, one-line description)
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("dinov2.run.train", "pretrain a model in this process, or submit it to SLURM (--cluster slurm)"),
    "eval": ("dinov2.run.eval", "evaluate models on task configs (kNN, linear probes, retrieval, segmentation, "
             "regression)"),
    "demo": ("dinov2.run.demo", "pretrain and evaluate a small model on two real scenes (about 5 min on a 2-core CPU)"),
    "convert": ("dinov2.run.convert", "convert checkpoints to and from torchgeo's Panopticon (timm) layout"),
    "export": ("dinov2.run.export", "export a model to ONNX and/or a torch.export program (dynamic batch, bands)"),
    "embed": ("dinov2.run.embed", "georeferenced embeddings of GeoTIFF/COG/STAC scenes (COG + GeoParquet)"),
    "search": ("dinov2.run.search", "find the chips most similar to a chip or a point in an embed output"),
    "index": ("dinov2.run.index", "build an approximate-nearest-neighbour index over an embed output's chips"),
    "predict": ("dinov2.run.predict", "apply a trained segmentation head to scenes: class and probability COGs"),
    "configs": ("dinov2.run.configs", "list the shipped training and evaluation configs by name (--show prints one)"),
    "prepare_data": ("dinov2.run.prepare_data", "build metadata/split files and shards of downloaded datasets "
                     "(MMEarth, EuroSAT-SAR, BigEarthNet-v2 shards)"),
}

EPILOG = """examples:
  panopticon demo --output-dir outputs/demo
  panopticon configs
  panopticon train --config-file demo --output-dir runs/mine train.dataset.scenes=scenes.yaml
  panopticon eval --model-obj runs/mine --config-obj demo --test_dataset.scenes=scenes.yaml
  panopticon convert --to torchgeo runs/mine/model_final.pth panopticon_torchgeo.pth

Run `panopticon <command> --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser (help and version only; the command's own parser handles the rest)."""
    width = max(len(n) for n in COMMANDS) + 2
    listing = "\n".join(f"  {name:<{width}}{desc}" for name, (_, desc) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="panopticon", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description=f"Panopticon {dinov2.__version__}: any-sensor foundation model for Earth observation.\n\n"
                    f"commands:\n{listing}")
    p.add_argument("--version", action="version", version=f"panopticon {dinov2.__version__}")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also accepted after "
                   "the command)")
    p.add_argument("command", nargs="?", choices=sorted(COMMANDS), metavar="command",
                   help="one of: " + ", ".join(COMMANDS))
    return p


def anticipated_errors() -> Tuple[type, ...]:
    """Exception types that mean bad input or environment (files, flags, values, a folder in use), not a bug."""
    from dinov2.run.submit import SlurmUnavailableError
    from dinov2.utils.folder_lock import FolderLockedError
    from dinov2.weights_cache import WeightsError

    return ValueError, OSError, SlurmUnavailableError, FolderLockedError, WeightsError


def run_command(name: str, fn: Callable[[Sequence[str]], Optional[int]], argv: Sequence[str],
                prog: Optional[str] = None, debug: bool = False) -> int:
    """Run one command's `main` with `prog` in its usage lines; anticipated errors become a one-line message and
    exit status 2 instead of a traceback, unless `debug` (or ``--debug`` among `argv`) asks for the traceback."""
    argv = list(argv)
    debug = debug or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    saved = sys.argv[0]
    sys.argv[0] = prog or f"panopticon {name}"  # argparse takes `prog` from argv[0]
    try:
        rc = fn(argv)
    except anticipated_errors() as exc:
        if debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        print(f"{sys.argv[0]}: error: {text}", file=sys.stderr)
        return 2
    finally:
        sys.argv[0] = saved
    return rc if isinstance(rc, int) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `panopticon` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[1:] if debug else argv
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv[:1])  # --help / --version exit here; an unknown flag is an error
        parser.print_help()
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        parser.error(f"unknown command {name!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(name, module.main, rest, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
