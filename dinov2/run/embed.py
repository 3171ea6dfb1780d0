"""`panopticon embed`: georeferenced embeddings of GeoTIFF/COG scenes with any Panopticon model.

Inputs: local files, their http(s)/s3/gs/az URLs, scenes YAMLs, STAC items, or the items of a STAC API search
(--stac-api); cloud masks (--mask-*). Writes, in --output-dir (a folder, or s3:// gs:// az:// object storage),
`<scene>_patches.tif` (Cloud-Optimised GeoTIFF, one band per embedding dimension, one pixel per model patch, the
input's CRS, bands named emb_000...) and `chips.parquet/<scene>.parquet` (the chip table: a GeoParquet dataset
with one part per scene and one row per chip: WGS84 footprint and bbox, footprint in the scene's CRS, CLS and
mean-pooled patch embeddings, source, sensor, bands, time). One run at a time writes an output; re-running
reuses finished scenes whose weights, settings, statistics and inputs are unchanged and recomputes the others.
Only the files and URLs named (and, with --allow-vrt, the files their VRTs reference) are read. Under torchrun
or --cluster slurm, scenes are split over ranks (docs/embed.md, "Many machines"). Errors are one line (exit
status 2); `panopticon --debug embed ...` shows the traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from dinov2.run.submit import (add_launcher_arguments, launcher_options_given, set_rank_environment, submit_job,
                               without_launcher_arguments)
from dinov2.utils.cli_help import OneSpellingHelpFormatter

RANK_TIMEOUT_MINUTES = 6 * 60

EPILOG = """examples:
  panopticon embed scenes.yaml --output-dir out/
  panopticon embed S2_stack.tif --sensor sentinel2 --bands B02,B03,B04,B08 --output-dir out/
  panopticon embed item.json --model runs/mine --chip-size 2240m --overlap 280m --output-dir out/
  panopticon embed hyper.tif --wavelengths 450,550,650,850 --output-dir out/
  torchrun --nproc_per_node 4 -m dinov2.run.embed scenes/ --sensor sentinel2 --bands B02,B03,B04 --output-dir out/
  panopticon embed --stac-api https://earth-search.aws.element84.com/v1 --collections sentinel-2-l2a \\
      --bbox 11.0,46.0,11.2,46.2 --datetime 2024-07-01/2024-07-31 --query '{"eo:cloud_cover": {"lt": 20}}' \\
      --assets blue,green,red,nir --mask-asset scl --mask-values 0,1,3,8,9,10 --output-dir s3://bucket/emb/
  panopticon embed --cluster slurm --nodes 4 --ngpus 8 --partition gpu --stac-api ... --output-dir s3://bucket/emb/
"""


def add_scene_arguments(p: argparse.ArgumentParser) -> None:
    """Input scenes and their band description (shared by `embed` and `predict`)."""
    p.add_argument("inputs", nargs="*", help="GeoTIFF/COG files or their http(s):// s3:// gs:// az:// URLs, folders, "
                   "scenes YAMLs (as training uses; entries may give {file, wavelengths_nm} and a mask) or STAC item "
                   "JSONs (local or URLs; bands from eo:bands)")
    p.add_argument("--sensor", help="registry sensor of plain GeoTIFF inputs (e.g. sentinel2)")
    p.add_argument("--bands", help="comma-separated band keys/names of plain GeoTIFF inputs, in file order")
    p.add_argument("--wavelengths", help="comma-separated centre wavelengths in nm of plain GeoTIFF inputs "
                   "(sensors not in the registry)")
    p.add_argument("--nodata", type=float, help="no-data value overriding the files' own")
    p.add_argument("--allow-vrt", action="store_true", help="read GDAL VRT inputs (XML files that make GDAL read "
                   "other files; each referenced file must be a local GeoTIFF/JPEG 2000; refused by default)")
    g = p.add_argument_group("STAC items and searches (docs/embed.md: Embed a region from a STAC catalog)")
    g.add_argument("--stac-api", metavar="URL", help="search this STAC API and embed every matching item whole "
                   "(scene name = item id); narrowed by the flags below")
    g.add_argument("--collections", help="comma-separated collection ids to search")
    g.add_argument("--bbox", help="W,S,E,N in degrees: items intersecting it")
    g.add_argument("--datetime", help="START/END (ISO dates or times, '..' = open end) or one date")
    g.add_argument("--query", metavar="JSON", help="STAC query extension, e.g. '{\"eo:cloud_cover\": {\"lt\": 20}}'")
    g.add_argument("--filter", metavar="CQL2-JSON", help="STAC filter extension (CQL2 JSON)")
    g.add_argument("--max-items", type=int, help="at most this many items")
    g.add_argument("--clip", action="store_true", help="embed only the part of each item inside --bbox (default: "
                   "whole items)")
    g.add_argument("--assets", help="comma-separated asset keys of STAC items to embed, in band order (default: "
                   "every GeoTIFF asset with eo:bands)")
    m = p.add_argument_group("masks (docs/embed.md: Cloud masks)")
    m.add_argument("--mask-asset", metavar="KEY", help="STAC items: the asset that is the mask (e.g. scl)")
    m.add_argument("--mask-file", metavar="PATH", help="a mask raster for the one plain GeoTIFF input (same CRS; "
                   "any grid covering the scene: resampled nearest)")
    m.add_argument("--mask-band", type=int, metavar="N", help="band N of the mask asset/file (default 1); alone: "
                   "band N of the plain GeoTIFF input is the mask (not embedded; --bands lists the other bands)")
    m.add_argument("--mask-values", metavar="V,...", help="mask values that are no-data (Sentinel-2 SCL: 3,8,9,10)")
    m.add_argument("--mask-bits", metavar="B,...", help="bit positions that make a pixel no-data when set "
                   "(Landsat QA_PIXEL: 0,1,2,3,4)")


def raster_policy(args: argparse.Namespace):
    """What the input flags allow reading (`dinov2.data.raster_open.RasterPolicy`)."""
    from dinov2.data.raster_open import RasterPolicy

    return RasterPolicy(allow_vrt=bool(args.allow_vrt))


def _ints(text: Optional[str], what: str) -> tuple:
    if not text:
        return ()
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def item_options(args: argparse.Namespace):
    """STAC asset choice, mask and clip box of the command line (`dinov2.inference.stac.ItemOptions`)."""
    from dinov2.inference.scene_source import MaskFlags
    from dinov2.inference.stac import ItemOptions, parse_bbox

    mask = MaskFlags(args.mask_asset, args.mask_file, args.mask_band, _ints(args.mask_values, "--mask-values"),
                     _ints(args.mask_bits, "--mask-bits"))
    if args.clip and not args.bbox:
        raise ValueError("--clip needs --bbox (the box to clip to)")
    assets = tuple(a.strip() for a in args.assets.split(",") if a.strip()) if args.assets else None
    return ItemOptions(assets, mask, parse_bbox(args.bbox) if args.clip else None)


def _search(args: argparse.Namespace):
    """The item dicts of --stac-api (searched on rank 0, the same list on every rank), or None."""
    from dinov2.inference.stac import Search, parse_bbox, parse_datetime, search_items
    from dinov2.inference.stream import broadcast, dist_info

    search_flags = [f for f, v in (("--collections", args.collections), ("--bbox", args.bbox),
                                   ("--datetime", args.datetime), ("--query", args.query), ("--filter", args.filter),
                                   ("--max-items", args.max_items)) if v is not None]
    if not args.stac_api:
        if search_flags:
            raise ValueError(f"{', '.join(search_flags)} describe a search: add --stac-api URL")
        return None
    search = Search(args.stac_api, [c.strip() for c in (args.collections or "").split(",") if c.strip()],
                    parse_bbox(args.bbox) if args.bbox else None,
                    parse_datetime(args.datetime) if args.datetime else None, args.query, args.filter,
                    args.max_items)
    rank, world = dist_info()
    found = None
    if rank == 0:
        try:
            found = ("items", search_items(search))
        except ValueError as e:
            found = ("error", str(e))
    found = broadcast(found, world)
    if found[0] == "error":
        raise ValueError(found[1])
    return found[1]


def scenes_from_args(args: argparse.Namespace):
    """The scenes named by `add_scene_arguments` flags: inputs, then the items of a search."""
    from dinov2.inference.sources import collect_scenes

    if args.bands and args.wavelengths:
        raise ValueError("give either --bands (with --sensor) or --wavelengths, not both")
    options = item_options(args)
    items = _search(args)
    if not args.inputs and not args.stac_api:
        raise ValueError("nothing to read: give input files/URLs, or search a STAC API with --stac-api")
    bands = [b.strip() for b in args.bands.split(",")] if args.bands else None
    return collect_scenes(args.inputs, args.sensor, bands, _floats(args.wavelengths, "--wavelengths"), args.nodata,
                          raster_policy(args), options, searched=(args.stac_api, items) if items else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="panopticon embed", description=__doc__, epilog=EPILOG,
                                formatter_class=OneSpellingHelpFormatter)
    add_scene_arguments(p)
    p.add_argument("--output-dir", "-o", required=True, help="folder for <scene>_patches.tif and chips.parquet/, "
                   "or s3://bucket/prefix (also gs://, az://): scenes are computed in --work-dir and uploaded when "
                   "finished")
    p.add_argument("--work-dir", help="object-storage outputs only: the local folder where scenes are computed "
                   "(default: a folder keyed by the URL in $PANOPTICON_CACHE or ~/.cache/panopticon)")
    p.add_argument("--model", default="panopticon_vitb14", help="hub name (released weights), weights .pth, "
                   "training run folder or checkpoint (default: %(default)s)")
    p.add_argument("--random-init", action="store_true", help="hub models only: random weights instead of the "
                   "release (for testing and timing without a download), drawn from --seed")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights: equal seeds give equal "
                   "weights and outputs (default: %(default)s)")
    p.add_argument("--chip-size", default="224", help="chip side in pixels ('224') or metres ('2240m'); a "
                   "multiple of the patch size (default: %(default)s px)")
    p.add_argument("--overlap", default="28", help="overlap of neighbouring chips, pixels or metres; blended "
                   "with linear cross-fades (default: %(default)s px)")
    p.add_argument("--batch-size", type=int, default=8, help="chips per forward pass (default: %(default)s)")
    p.add_argument("--min-valid", type=float, default=0.5, help="a patch is embedded when at least this "
                   "fraction of its pixels is valid; others are no-data (default: %(default)s)")
    p.add_argument("--norm-stats", default="scene", help="'scene' (robust per-band stats of each scene, the "
                   "default), a stats file (.yaml/.json) or 'dataset:<name>'")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 autocast (for GPUs)")
    p.add_argument("--device", help="torch device (default: cuda:<local rank> when available, else cpu)")
    p.add_argument("--compress", default="zstd", choices=("zstd", "deflate", "lzw", "none"),
                   help="COG compression (default: %(default)s; deflate for the oldest GDAL readers)")
    p.add_argument("--embedding-dtype", choices=("float32", "float16", "int8"), default="float32",
                   help="storage of the chip table's embeddings: float16 halves it, int8 (with a per-vector scale) "
                   "quarters it (default: %(default)s; see docs/search.md)")
    p.add_argument("--no-patch-map", action="store_true", help="write the chip table only, no "
                   "<scene>_patches.tif (the maps are most of the output: about 1.7 GB per Sentinel-2 item)")
    p.add_argument("--read-workers", type=int, default=0, help="threads reading chips ahead of the model "
                   "(default 0: 1 for local inputs, 4 for remote ones, whose reads wait on the network)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_launcher_arguments(p, default_cluster=None)
    return p


def _floats(text: Optional[str], what: str):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def setup_logging() -> None:
    """INFO logs of this project; GDAL's own messages only from WARNING up (its errors reach the user as the
    command's one-line error, its INFO chatter is noise)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("rasterio", "botocore"):  # botocore (through rasterio's AWS session) logs found credentials
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_backbone(source: str, random_init: bool = False, seed: int = 0):
    """`load_model(source)`; with `random_init`, hub architectures get weights drawn from `seed` (the global RNG
    is left as it was), so two runs with one seed embed with equal weights."""
    import torch

    from dinov2.hub import load_model

    try:
        if not random_init:
            return load_model(source)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return load_model(source, pretrained=False)
    except RuntimeError as e:  # unreadable or mismatched checkpoints: the message names the file
        raise ValueError(f"--model {source}: {str(e).splitlines()[0]}") from e


class EmbedJob:
    """Picklable SLURM/submitit job: `panopticon embed` with `argv` on every task (ranks from the job's
    environment); requeued on timeout or preemption, when it resumes like any rerun."""

    def __init__(self, argv: Sequence[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        set_rank_environment()
        return main(self.argv)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.argv))


def launch(argv: Optional[Sequence[str]] = None):
    """Embed in this process (returns the `embed_scenes` result on rank 0, else None) or submit the same command
    to `--cluster` (returns the submitit job)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.cluster is None:
        given = launcher_options_given(args)
        if given:
            raise ValueError(f"{', '.join(given)} only apply to a submitted job: add --cluster slurm|local|debug, "
                             "or drop them to embed in this process")
        return _embed(args)
    from dinov2.inference.output_store import open_output

    root = os.path.abspath(open_output(args.output_dir, args.work_dir).root)
    if args.slurm_folder is None:
        args.slurm_folder = os.path.join(root, "slurm")
    return submit_job(EmbedJob(without_launcher_arguments(argv)), args, root, name="panopticon:embed")


def _embed(args: argparse.Namespace):
    setup_logging()
    import torch

    from dinov2 import distributed
    from dinov2.inference.embed import EmbedSettings, check_settings, embed_scenes
    from dinov2.inference.output_store import open_output
    from dinov2.inference.scene_job import output_lock
    from dinov2.inference.stream import dist_info

    settings = EmbedSettings(chip_size=args.chip_size, overlap=args.overlap, batch_size=args.batch_size,
                             min_valid=args.min_valid, norm_stats=args.norm_stats, precision=args.precision,
                             compress=args.compress, progress=not args.no_progress,
                             embedding_dtype=args.embedding_dtype, read_workers=args.read_workers,
                             patch_map=not args.no_patch_map)
    check_settings(settings)
    root = open_output(args.output_dir, args.work_dir).root
    # ranks with scenes of their own wait at the end for the others: longer than one scene may take
    distributed.enable(overwrite=True, timeout_minutes=RANK_TIMEOUT_MINUTES)
    try:
        # the folder's lock first: a second run is refused before it loads or writes anything
        with output_lock(root, "panopticon embed", *dist_info()):
            scenes = scenes_from_args(args)
            model = load_backbone(args.model, args.random_init, args.seed)
            device = torch.device(args.device) if args.device else distributed.get_device()
            result = embed_scenes(scenes, model, args.output_dir, settings, device, raster_policy(args),
                                  args.work_dir)
        if distributed.is_main_process():
            shown = ", ".join(result["patches"][:5]) + (f", ... ({len(scenes)} maps)" if len(scenes) > 5 else "")
            shown = shown or "no patch maps (--no-patch-map)"
            print(f"embedded {len(scenes)} scene(s) ({len(result['skipped'])} already finished): {shown}; "
                  f"{result['n_chips']} chips in {result['chips']}")
            return result
        return None
    finally:
        distributed.disable()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`panopticon embed` entry point; 0 once the scenes are embedded or the job is submitted."""
    launch(argv)
    return 0


if __name__ == "__main__":  # `python -m dinov2.run.embed` (e.g. under torchrun): the CLI's one-line errors
    import sys

    from dinov2.run.cli import run_command

    raise SystemExit(run_command("embed", main, sys.argv[1:], prog="python -m dinov2.run.embed"))
