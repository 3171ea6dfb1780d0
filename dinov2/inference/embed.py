"""Embed whole scenes: stream chips a batch at a time, run the backbone, blend overlapping patch embeddings chip
by chip, write a patch-embedding COG per scene and a GeoParquet part of chip embeddings per scene (the chip table
``<out>/chips.parquet/``, see `dinov2.inference.chips_table`) — resumable and shardable over ranks, with memory
that does not grow with the scene.

The streaming core is `dinov2.inference.stream` (one output pixel per model patch here), the resumable scene job
`dinov2.inference.scene_job`, one scene's embedding `dinov2.inference.scene_embedder`, outputs in a local folder
or object storage `dinov2.inference.output_store`. One run at a time writes a folder (``<out>/.panopticon.lock``;
for object storage the local work folder's).

Under torch.distributed (torchrun, SLURM), with n scenes and w ranks, the first n - n mod w scenes are split over
the ranks (scene i on rank i mod w: each embedded exactly once, each rank writing its own scenes' outputs) and the
last n mod w are embedded by all ranks together (every rank embeds every w-th chip, rank 0 blends and writes, so
the output equals a single-process run) — one big scene uses every rank, many scenes run one per rank.

A finished scene is skipped without opening its inputs when its done marker holds this run's `request_key`
(weights, settings and the inputs' identity: size and mtime, or ETag for URLs); otherwise its full signature is
checked after opening it (see `dinov2.inference.provenance`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

import torch

from dinov2.data.raster_open import RasterPolicy
from dinov2.inference.chips_table import check_compatible, part_rows
from dinov2.inference.output_store import OutputStore, open_output
from dinov2.inference.provenance import FORMAT_VERSION, checked_digest, input_identity
from dinov2.inference.scene_embedder import (EmbedSettings, SceneEmbedder, check_settings,  # noqa: F401
                                             output_paths, part_meta, required_outputs)
from dinov2.inference.scene_job import output_lock
from dinov2.inference.sources import SceneSource, collect_scenes
from dinov2.inference.stream import agree, broadcast, dist_info, gather
from dinov2.inference.writers import bounded_gdal_cache

logger = logging.getLogger("dinov2")
EMBED_FIELDS = ("chip_size", "overlap", "min_valid", "norm_stats", "precision", "embedding_dtype")


def request_key(scene: SceneSource, settings: EmbedSettings, digest: str, patch_size: int) -> str:
    """Digest of what decides a scene's values and is known without opening its inputs: weights, patch size,
    settings, bands and channel ids, no-data override, statistics given as values (a stats file by content),
    mask, clip box and the inputs' identity (one HEAD request per URL)."""
    norm = settings.norm_stats
    if os.path.isfile(norm):
        with open(norm, "rb") as f:
            norm = f"{norm}:{hashlib.sha256(f.read()).hexdigest()}"
    key = {"format": FORMAT_VERSION, "weights": digest, "patch_size": patch_size, "norm": norm,
           "settings": {k: getattr(settings, k) for k in EMBED_FIELDS},
           "channels": [[c.index, c.band, c.chn_id] for c in scene.channels], "nodata": scene.nodata,
           "mean": scene.mean, "std": scene.std, "mask": scene.mask.signature() if scene.mask else None,
           "clip": scene.clip, "inputs": input_identity(scene.input_files)}
    if not settings.patch_map:  # as in the scene signature: only when off
        key["settings"]["patch_map"] = False
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _finished(store: OutputStore, scene: SceneSource, key: str, patch_map: bool = True) -> Optional[Dict[str, Any]]:
    """The scene's done marker when it records `key` and every output exists (in the store), else None."""
    marker = store.read_json(os.path.join(store.root, ".embed", f"{scene.name}.done.json"))
    if marker and marker.get("request") == key and all(map(store.exists, required_outputs(store.root, scene.name,
                                                                                           patch_map))):
        return marker
    return None


def _pmap(fn, items: Sequence[Any], parallel: bool) -> List[Any]:
    """`fn` of every item, in threads when `parallel` (remote inputs or outputs: each call waits on the network);
    the first error is raised."""
    if not parallel or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(fn, items))


def _count(store: OutputStore, name: str, marker: Optional[Dict[str, Any]]) -> int:
    """Chips of a finished scene, from its done marker (or, for markers of earlier versions, its local part)."""
    n = (marker or {}).get("n_chips")
    if n is None and not store.remote:
        n = part_rows(output_paths(store.root, name)[2])
    return int(n or 0)


def embed_scenes(scenes: Sequence[SceneSource], model: torch.nn.Module, output_dir: str,
                 settings: Optional[EmbedSettings] = None, device: Optional[torch.device] = None,
                 policy: Optional[RasterPolicy] = None, work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Embed `scenes` into `output_dir` (a folder, or ``s3://`` / ``gs://`` / ``az://`` computed in `work_dir`),
    reusing finished scenes whose signature matches; returns the outputs' locations and counts (chip count on
    rank 0). Holds the folder's lock for the run (see `dinov2.utils.folder_lock`)."""
    from dinov2.models.panopticon import frozen_fused_cache

    settings = settings or EmbedSettings()
    check_settings(settings)
    if not hasattr(model, "info"):
        raise ValueError("the model must come from dinov2.load_model (it needs model.info)")
    if not model.info.any_sensor:
        raise ValueError(f"model {model.info.source!r} is an RGB DINOv2 backbone; embedding needs a Panopticon "
                         "(any-sensor) model")
    rank, world = dist_info()
    store = open_output(output_dir, work_dir)
    root = store.root
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    digest = checked_digest(model, f"model {model.info.source}")  # once per run: decides reuse of stored scenes
    ps = int(model.info.patch_size)
    n = len(scenes)
    split = n - n % world  # scenes [0, split): one rank each; the rest: all ranks together
    own = [i for i in range(split) if i % world == rank]
    together = list(range(split, n))
    names = {f"{s.name}.parquet" for s in scenes}
    skipped, counts = [], 0
    with output_lock(root, "panopticon embed", rank, world):
        error = None
        if rank == 0:
            try:
                _chips_dataset(root)
                check_compatible([p for p in store.parts() if os.path.basename(p) not in names],
                                 part_meta(model, digest, settings.embedding_dtype), info_of=store.part_info)
            except (ValueError, OSError) as e:
                error = e
        agree(error, world)
        os.makedirs(os.path.join(root, ".embed"), exist_ok=True)
        os.makedirs(os.path.join(root, "chips.parquet"), exist_ok=True)

        # finished scenes are skipped without opening them; every other scene's settings are checked before any work
        keys: Dict[str, str] = {}
        markers: Dict[int, Optional[Dict[str, Any]]] = {}
        parallel = store.remote or any(s.urls for s in scenes)

        def check(i: int) -> None:
            keys[scenes[i].name] = request_key(scenes[i], settings, digest, ps)
            markers[i] = _finished(store, scenes[i], keys[scenes[i].name], settings.patch_map)

        def make(i: int) -> SceneEmbedder:
            job = SceneEmbedder(scenes[i], model, root, settings, device, digest, policy)
            job.reader.close()  # reopened when the scene runs
            job.store, job.request = store, keys.get(scenes[i].name)
            job.progress = settings.progress and rank == 0
            return job

        error = None
        try:
            _pmap(check, own + (together if rank == 0 else []), parallel)
        except (ValueError, OSError) as e:
            error = e
        agree(error, world)
        quick = broadcast({i: markers[i] is not None for i in together} if rank == 0 else None, world)
        jobs: Dict[int, SceneEmbedder] = {}
        try:
            todo = [i for i in own if markers[i] is None] + [i for i in together if not quick[i]]
            jobs = dict(zip(todo, _pmap(make, todo, any(scenes[i].urls for i in todo))))
        except (ValueError, OSError) as e:
            error = e
        agree(error, world)
        for i in own + together:
            emb, name = jobs.get(i), scenes[i].name
            r, w = (0, 1) if i in own else (rank, world)
            try:
                finished = emb is None or broadcast(emb.is_done() if r == 0 else None, w)
                if finished:
                    skipped.append(name)
                    logger.info("embed: %s already finished, skipped", name)
                else:
                    # weights are fixed here: fold the patch embedding once per scene
                    with frozen_fused_cache(model), bounded_gdal_cache():
                        emb.run(r, w)
                    if r == 0:
                        logger.info("embed: %s done%s (%s)", name, f" on rank {rank}/{world}" if world > 1 and
                                    w == 1 else "", emb.report)
                if r == 0:  # the rank that wrote (or would have written) the scene counts its chips
                    counts += _count(store, name, markers.get(i) or (emb.marker if finished else emb.marker_extra))
            finally:
                if emb is not None:
                    emb.reader.close()
        total = sum(gather(counts, rank, world))
        skipped = sorted({s for part in gather(skipped, rank, world) for s in part}) if world > 1 else skipped
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
    maps = [store.location(output_paths(root, s.name)[0]) for s in scenes] if settings.patch_map else []
    return {"patches": maps, "skipped": skipped,
            "chips": store.location(os.path.join(root, "chips.parquet")), "n_chips": total if rank == 0 else 0}


def _chips_dataset(output_dir: str) -> str:
    """``<out>/chips.parquet/``, the folder of chip-table parts; a single-file table left by an earlier version is
    moved aside (``chips_v2.parquet``), never deleted."""
    path = os.path.join(output_dir, "chips.parquet")
    if os.path.isfile(path):
        old = os.path.join(output_dir, "chips_v2.parquet")
        os.replace(path, old)
        logger.warning("embed: %s was a single-file chip table of an earlier version; moved to %s, chips are "
                       "now written as one part per scene in %s/", path, old, path)
    os.makedirs(path, exist_ok=True)
    return path


def embed(inputs, model="panopticon_vitb14", output_dir: str = "embeddings", sensor: Optional[str] = None,
          bands: Optional[Sequence[str]] = None, wavelengths_nm: Optional[Sequence[float]] = None,
          nodata: Optional[float] = None, device: Optional[str] = None, allow_vrt: bool = False,
          work_dir: Optional[str] = None, **settings) -> Dict[str, Any]:
    """Python entry point: ``embed('scene.tif', model='panopticon_vitb14', output_dir='out', sensor=..., ...)``.

    `inputs`: a path, URL or list of them (GeoTIFFs, folders, scenes YAMLs, STAC item JSONs); `model`: anything
    `dinov2.load_model` takes, or a loaded model; `output_dir`: a folder or ``s3://``/``gs://``/``az://`` prefix
    (computed in `work_dir`); `allow_vrt`: read VRT inputs (see `dinov2.data.raster_open`); `settings`: fields of
    `EmbedSettings`."""
    from dinov2.distributed import get_device
    from dinov2.hub import load_model

    policy = RasterPolicy(allow_vrt=allow_vrt)
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    scenes = collect_scenes([str(p) for p in paths], sensor, bands, wavelengths_nm, nodata, policy)
    net = load_model(model) if isinstance(model, (str, os.PathLike)) else model
    return embed_scenes(scenes, net, output_dir, EmbedSettings(**settings),
                        torch.device(device) if device else get_device(), policy, work_dir)
