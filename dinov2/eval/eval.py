"""Evaluation CLI (python-fire), also callable from Python (training calls ``main``).

    python dinov2/eval/eval.py main --model-obj="<run dir | .pth>[;...]" --config-obj="<yaml | dir>[;...]" \
        [--output-dir=DIR] [--overwrite] [--device=cpu|cuda] [--use-wandb] [--optim.epochs=1 ...]

Model objects: see ``dinov2.eval.model_loading``. Config objects: ``;``-separated yaml files / folders / globs;
each yaml (recursively, ``defaults/`` excluded) is a task named by its path relative to ``$CDIR/eval`` without
``.yaml``, e.g. ``5min/m-eurosat_knn`` (outside that tree: relative to the given folder's parent, or
``<parent folder>/<stem>`` for a single file, so a task keeps its name either way). Extra keyword arguments are dotted
config paths merged into every task. A task whose ``results.csv`` exists is skipped unless ``overwrite``.
Outputs per task folder: ``config.yaml``, ``results.csv``, ``results_eval_<type>.json``, ``plots.png``; the
``results.csv``/``results.txt`` of every folder level above are re-aggregated after each model. Runs in a single
process on CPU or GPU without any process group; if torch.distributed is initialised, (model, task) pairs are
split round-robin over the ranks. Weights & Biases is optional (``--use-wandb``; imported only then).
"""
from __future__ import annotations

import glob
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

if __name__ == "__main__" and __package__ is None:  # `python dinov2/eval/eval.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dinov2.eval import results as res  # noqa: E402
from dinov2.eval.model_loading import ModelSpec, build_eval_backbone, resolve_model_objs  # noqa: E402
from dinov2.eval.tasks import build_task_cfg, eval_config_root, run_task  # noqa: E402

logger = logging.getLogger("dinov2")


def resolve_config_objs(config_obj: str) -> List[Tuple[str, Path]]:
    """``[(task relpath, yaml path)]`` for a ``;``-separated list of yaml files, folders or globs."""
    root = eval_config_root().resolve()
    tasks: Dict[str, Path] = {}
    for part in [s.strip() for s in str(config_obj).split(";") if s.strip()]:
        part = os.path.expanduser(os.path.expandvars(part))
        paths = [part] if os.path.exists(part) else sorted(glob.glob(part))
        if not paths:
            raise FileNotFoundError(f"Config object {part!r} matches no yaml file or folder")
        for p in map(lambda s: Path(s).resolve(), paths):
            if p.is_dir():
                files = [f for f in sorted(p.rglob("*.yaml")) if "defaults" not in f.relative_to(p).parts]
                base = root if root in p.parents or p == root else p.parent
            elif p.suffix in (".yaml", ".yml"):
                files, base = [p], (root if root in p.parents else p.parent.parent)
            else:
                raise ValueError(f"Config object {p} is neither a folder nor a yaml file")
            for f in files:
                tasks[f.relative_to(base).with_suffix("").as_posix()] = f
    if not tasks:
        raise FileNotFoundError(f"No task yaml found in {config_obj!r}")
    return sorted(tasks.items())


def _dist_info() -> Tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LogToFile:
    """Append the 'dinov2' logger to ``<output_dir>/log`` while a model is evaluated."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(self.handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        logger.removeHandler(self.handler)
        self.handler.close()


def evaluate_model(spec: ModelSpec, tasks: List[Tuple[str, Path]], output_dir: Path, overwrite: bool = False,
                   overrides: Optional[Dict[str, Any]] = None, device: Optional[str] = None,
                   rank: int = 0, world: int = 1, offset: int = 0) -> Dict[str, Dict[str, float]]:
    """Run (or reuse) every task for one model; returns ``{task relpath: {metric: value}}``."""
    out: Dict[str, Dict[str, float]] = {}
    backbone = None
    with _LogToFile(output_dir / "log"):
        for i, (rel, path) in enumerate(tasks):
            if (offset + i) % world != rank:
                continue
            task_dir = output_dir / rel
            if (task_dir / "results.csv").is_file() and not overwrite:
                logger.info("skipping finished task %s (%s)", rel, task_dir / "results.csv")
                out[rel] = res.read_task_csv(task_dir / "results.csv")
                continue
            cfg = build_task_cfg(path, overrides)
            if backbone is None:
                logger.info("loading backbone from %s", spec.ckpt_path)
                backbone = build_eval_backbone(spec)
            logger.info("running task %s -> %s", rel, task_dir)
            out[rel] = run_task(cfg, backbone, task_dir, device)
            logger.info("%s: %s", rel, out[rel])
    return out


def _upload_wandb(spec: ModelSpec, results: Dict[str, Dict[str, float]], mode: str, only_avg: bool) -> None:
    from dinov2.eval.wandb_upload import upload_results

    upload_results(spec.run_dir, results, mode=mode, only_avg=only_avg)


def main(model_obj: str, config_obj: Optional[str] = None, output_dir: Optional[str] = None,
         overwrite: bool = False, device: Optional[str] = None, use_wandb: bool = False, wandb_mode: str = "api",
         only_avg: bool = False, **overrides) -> Dict[str, Any]:
    """Evaluate models on tasks.

    Returns ``{task relpath: {metric: value}}`` when ``model_obj`` resolves to one model (the training case),
    else ``{model output dir: {task relpath: {metric: value}}}``.
    """
    from dotenv import load_dotenv

    load_dotenv()
    if config_obj is None:
        config_obj = str(eval_config_root() / "5min")
    specs = resolve_model_objs(str(model_obj))
    if output_dir is not None:
        if len(specs) != 1:
            raise ValueError(f"--output-dir needs exactly one model, {model_obj!r} resolved to {len(specs)}")
        specs[0].output_dir = str(output_dir)
    tasks = resolve_config_objs(str(config_obj))
    rank, world = _dist_info()
    all_results: Dict[str, Dict[str, Dict[str, float]]] = {}
    for m, spec in enumerate(specs):
        out_dir = Path(spec.output_dir)
        all_results[str(out_dir)] = evaluate_model(spec, tasks, out_dir, overwrite, overrides, device,
                                                   rank, world, offset=m * len(tasks))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        for m, spec in enumerate(specs):
            out_dir = Path(spec.output_dir)
            res.collect_csv(out_dir)
            merged = {rel: res.read_task_csv(out_dir / rel / "results.csv") for rel, _ in tasks
                      if (out_dir / rel / "results.csv").is_file()}
            all_results[str(out_dir)] = merged
            if use_wandb:
                _upload_wandb(spec, merged, wandb_mode, only_avg)
    if len(specs) == 1:
        return next(iter(all_results.values()))
    return all_results


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire({"main": main})
