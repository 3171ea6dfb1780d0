"""Evaluation entry point (argparse, see ``dinov2.eval.cli``), also callable from Python (training calls ``main``).

    python dinov2/eval/eval.py main --model-obj="<run dir | .pth>[;...]" --config-obj="<yaml | dir>[;...]" \
        [--output-dir=DIR] [--overwrite] [--device=cpu|cuda] [--use-wandb] [--log-file=PATH] \
        [--distribute=runs|models] [--barrier] [--optim.epochs=1 ...]

Model objects: see ``dinov2.eval.model_loading``. Config objects: ``;``-separated yaml files / folders / globs, or
names of shipped suites and tasks (``demo``, ``5min``, ``1h/geobench/so2sat``; ``dinov2.utils.config_names``);
each yaml (recursively, ``defaults/`` excluded) is a task named by its path relative to ``$CDIR/eval`` without
``.yaml``, e.g. ``5min/m-eurosat_knn`` (outside that tree: relative to the given folder's parent, or
``<parent folder>/<stem>`` for a single file, so a task keeps its name either way). Extra keyword arguments are dotted
config paths merged into every task; each must name a key of some task config (dataset sections also take new
constructor arguments), else ``ValueError`` names it and the closest key. A task whose ``results.csv`` exists is
skipped unless ``overwrite`` or its resolved config (``config.yaml``) differs from the one it would run with now.
Outputs per task folder: ``config.yaml``, ``results.csv``, ``results_eval_<type>.json``, ``plots.png``; the
``results.csv``/``results.txt`` of every folder level above are re-aggregated after each model. A task that fails
(missing dataset, bad config, ...) leaves ``error.txt`` (message and traceback) instead of ``results.csv``, appears
in the aggregated results with its error, and does not stop the other tasks; at the end a summary is logged and
``EvalTaskError`` is raised (the command line exits with status 1). Runs in a single
process on CPU or GPU without any process group; if torch.distributed is initialised, (model, task) pairs are
split over the ranks (``--distribute=runs``: round-robin over all pairs; ``models``: whole models round-robin, see
``assign_pairs``). ``--barrier``: every rank waits until all (model, task) ``results.csv`` exist (polling every 5 s,
optionally up to ``--barrier-timeout`` seconds) before the collective barrier. ``--log-file``: the 'dinov2' log
of the whole call is appended there too (besides each model's ``<output dir>/log``). Weights & Biases is optional
(``--use-wandb``; imported only then).
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__" and __package__ is None:  # `python dinov2/eval/eval.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dinov2.eval import results as res  # noqa: E402
from dinov2.eval.model_loading import ModelSpec, build_eval_backbone, resolve_model_objs  # noqa: E402
from dinov2.eval.tasks import build_task_cfg, eval_config_root, run_task  # noqa: E402
from dinov2.utils.config_names import resolve_config_obj  # noqa: E402

logger = logging.getLogger("dinov2")
DISTRIBUTE_MODES = ("runs", "models")


class EvalTaskError(RuntimeError):
    """Some (model, task) pairs failed; the others ran. ``failures``: ``{'<model output dir>/<task>': '<type>:
    <message>'}``; ``results``: what ``main`` returns for the successful pairs."""

    def __init__(self, failures: Dict[str, str], results: Any = None):
        self.failures, self.results = dict(failures), results
        lines = [f"  {k}: {v}" for k, v in self.failures.items()]
        super().__init__(f"{len(self.failures)} evaluation task(s) failed (see error.txt in each task folder):\n"
                         + "\n".join(lines))


def _flat_keys(node: Any, prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out[key] = v
            out.update(_flat_keys(v, key + "."))
    return out


def check_overrides(tasks: Sequence[Tuple[str, Path]], overrides: Dict[str, Any]) -> None:
    """Refuse dotted overrides that name no key of any task config (a typo would otherwise add a key that nothing
    reads). Keys may be new only directly inside a dataset section (``*dataset`` with an ``id``), whose entries
    are constructor arguments."""
    if not overrides:
        return
    from omegaconf import OmegaConf

    known: Dict[str, Any] = {}
    for _, path in tasks:
        try:
            # unresolved: overrides may set scratch keys (_vars, _default_augms) and mandatory ??? values
            known.update(_flat_keys(OmegaConf.to_container(build_task_cfg(path, None, resolve=False),
                                                           resolve=False)))
        except Exception:  # a task whose config is broken fails (and is recorded) when it runs
            continue
    datasets = {k for k, v in known.items() if k.split(".")[-1].endswith("dataset") and isinstance(v, dict)
                and "id" in v}
    for key in overrides:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key in known or parent in datasets:
            continue
        params = [n.replace("_", "-") for n in main.__code__.co_varnames[:main.__code__.co_argcount]]
        close = difflib.get_close_matches(key, list(known) + params, n=1, cutoff=0.6)
        hint = f"; did you mean --{close[0]}?" if close else ""
        raise ValueError(f"Unknown override --{key}: no evaluation task config has this key{hint}")


def config_changes(saved: Path, cfg: Any) -> List[str]:
    """Dotted keys whose values differ between a task's saved ``config.yaml`` and ``cfg`` (``['config.yaml']``
    when the saved one is missing or unreadable)."""
    from omegaconf import OmegaConf

    try:
        old = _flat_keys(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    except Exception:  # missing or damaged: the results cannot be attributed to any settings
        return [saved.name]
    new = _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    return sorted(k for k in set(old) | set(new)
                  if not isinstance(old.get(k), dict) and not isinstance(new.get(k), dict) and
                  (k not in old or k not in new or old[k] != new[k]))


def resolve_config_objs(config_obj: str) -> List[Tuple[str, Path]]:
    """``[(task relpath, yaml path)]`` for a ``;``-separated list of yaml files, folders or globs."""
    root = eval_config_root().resolve()
    tasks: Dict[str, Path] = {}
    for part in [s.strip() for s in str(config_obj).split(";") if s.strip()]:
        paths = resolve_config_obj(part)  # a path or glob, else a shipped suite / task name
        if not paths:
            raise FileNotFoundError(f"Config object {part!r} matches no yaml file or folder, nor a shipped "
                                    "evaluation config (`panopticon configs` lists them)")
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


def assign_pairs(n_models: int, n_tasks: int, world: int, mode: str = "runs") -> List[List[Tuple[int, int]]]:
    """The ``(model index, task index)`` pairs each rank evaluates, one list per rank.

    ``runs``: the pairs in model-major order dealt round-robin over the ranks (balances many tasks of few models);
    ``models``: model ``m`` with all its tasks goes to rank ``m % world`` (each rank loads only its backbones).
    """
    if mode not in DISTRIBUTE_MODES:
        raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}; got {mode!r}")
    if world < 1 or n_models < 0 or n_tasks < 0:
        raise ValueError(f"invalid split: {n_models} models x {n_tasks} tasks over world size {world}")
    per_rank: List[List[Tuple[int, int]]] = [[] for _ in range(world)]
    for m in range(n_models):
        for t in range(n_tasks):
            r = (m * n_tasks + t) % world if mode == "runs" else m % world
            per_rank[r].append((m, t))
    return per_rank


def wait_for_results(paths: Sequence[Path], poll_s: float = 5.0, timeout_s: Optional[float] = None) -> None:
    """Block until every file in ``paths`` exists; after ``timeout_s`` seconds raise naming the missing ones."""
    start = time.monotonic()
    while True:  # a failed task (error.txt instead of results.csv) counts as finished
        missing = [p for p in paths if not Path(p).is_file() and not (Path(p).parent / res.ERROR_FILE).is_file()]
        if not missing:
            return
        waited = time.monotonic() - start
        if timeout_s is not None and waited >= timeout_s:
            shown = ", ".join(map(str, missing[:5])) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise TimeoutError(f"barrier: {len(missing)} results.csv still missing after {waited:.0f} s: {shown}")
        logger.info("barrier: waiting for %d results.csv (e.g. %s)", len(missing), missing[0])
        time.sleep(poll_s if timeout_s is None else max(0.0, min(poll_s, timeout_s - waited)))


class _LogToFile:
    """Append the 'dinov2' logger to a file (``<output_dir>/log`` while a model is evaluated)."""

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
                   task_indices: Optional[Sequence[int]] = None,
                   failures: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, float]]:
    """Run (or reuse) the tasks of one model (those in ``task_indices``, default all); returns
    ``{task relpath: {metric: value}}`` of the tasks that succeeded. A failing task is recorded (``error.txt``) and
    the next one runs; failures go into ``failures`` (``{task relpath: error}``) when given, else
    ``EvalTaskError`` is raised at the end."""
    out: Dict[str, Dict[str, float]] = {}
    failed: Dict[str, str] = {} if failures is None else failures
    backbone, backbone_error = None, None
    wanted = set(range(len(tasks)) if task_indices is None else task_indices)
    if not wanted:
        return out
    with _LogToFile(output_dir / "log"):
        for i, (rel, path) in enumerate(tasks):
            if i not in wanted:
                continue
            task_dir = output_dir / rel
            try:
                cfg = build_task_cfg(path, overrides)
                if (task_dir / "results.csv").is_file() and not overwrite:
                    changed = config_changes(task_dir / "config.yaml", cfg)
                    if not changed:
                        logger.info("skipping finished task %s (%s)", rel, task_dir / "results.csv")
                        out[rel] = res.read_task_csv(task_dir / "results.csv")
                        continue
                    logger.info("re-running task %s: its results were computed with other settings (%s)", rel,
                                ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else ""))
                res.clear_task_outputs(task_dir)
                if backbone_error is not None:
                    raise backbone_error
                if backbone is None:
                    logger.info("loading backbone from %s", spec.ckpt_path)
                    try:
                        backbone = build_eval_backbone(spec)
                    except Exception as e:
                        backbone_error = e
                        raise
                logger.info("running task %s -> %s", rel, task_dir)
                out[rel] = run_task(cfg, backbone, task_dir, device)
                logger.info("%s: %s", rel, out[rel])
            except Exception as e:  # one broken task (missing dataset, bad config) must not stop the suite
                logger.error("task %s failed: %s: %s", rel, type(e).__name__, e, exc_info=True)
                res.write_task_error(task_dir, e)
                failed[rel] = f"{type(e).__name__}: {e}".replace("\n", " ")
    if failures is None and failed:
        raise EvalTaskError({f"{output_dir}/{k}": v for k, v in failed.items()}, out)
    return out


def _upload_wandb(spec: ModelSpec, results: Dict[str, Dict[str, float]], mode: str, only_avg: bool) -> None:
    from dinov2.eval.wandb_upload import upload_results

    upload_results(spec.run_dir, results, mode=mode, only_avg=only_avg)


def main(model_obj: str, config_obj: Optional[str] = None, output_dir: Optional[str] = None,
         overwrite: bool = False, device: Optional[str] = None, use_wandb: bool = False, wandb_mode: str = "api",
         only_avg: bool = False, log_file: Optional[str] = None, distribute: str = "runs", barrier: bool = False,
         barrier_timeout: Optional[float] = None, **overrides) -> Dict[str, Any]:
    """Evaluate models on tasks.

    Returns ``{task relpath: {metric: value}}`` when ``model_obj`` resolves to one model (the training case),
    else ``{model output dir: {task relpath: {metric: value}}}``.
    """
    if distribute not in DISTRIBUTE_MODES:
        raise ValueError(f"distribute must be one of {', '.join(DISTRIBUTE_MODES)}; got {distribute!r}")
    if log_file is None:
        return _main(model_obj, config_obj, output_dir, overwrite, device, use_wandb, wandb_mode, only_avg,
                     distribute, barrier, barrier_timeout, overrides)
    with _LogToFile(Path(os.path.expanduser(str(log_file)))):
        return _main(model_obj, config_obj, output_dir, overwrite, device, use_wandb, wandb_mode, only_avg,
                     distribute, barrier, barrier_timeout, overrides)


def _main(model_obj, config_obj, output_dir, overwrite, device, use_wandb, wandb_mode, only_avg, distribute,
          barrier, barrier_timeout, overrides) -> Dict[str, Any]:
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
    check_overrides(tasks, overrides)
    rank, world = _dist_info()
    mine = assign_pairs(len(specs), len(tasks), world, distribute)[rank]
    logger.info("eval: rank %d/%d runs %d of %d (model, task) pairs (distribute=%s)", rank, world, len(mine),
                len(specs) * len(tasks), distribute)
    all_results: Dict[str, Dict[str, Dict[str, float]]] = {}
    failures: Dict[str, str] = {}
    for m, spec in enumerate(specs):
        out_dir = Path(spec.output_dir)
        failed: Dict[str, str] = {}
        all_results[str(out_dir)] = evaluate_model(spec, tasks, out_dir, overwrite, overrides, device,
                                                   task_indices=[t for mm, t in mine if mm == m], failures=failed)
        failures.update({f"{out_dir}/{rel}": err for rel, err in failed.items()})
    if barrier:
        wait_for_results([Path(s.output_dir) / rel / "results.csv" for s in specs for rel, _ in tasks],
                         timeout_s=barrier_timeout)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    n_pairs = len(mine)
    if rank == 0:  # after the barrier every rank's pairs are finished: rank 0 reports them all
        n_pairs = len(specs) * len(tasks)
        for m, spec in enumerate(specs):
            out_dir = Path(spec.output_dir)
            res.collect_csv(out_dir)
            merged = {rel: res.read_task_csv(out_dir / rel / "results.csv") for rel, _ in tasks
                      if (out_dir / rel / "results.csv").is_file()}
            failures.update({f"{out_dir}/{rel}": res.read_task_error(out_dir / rel) for rel, _ in tasks
                             if rel not in merged and (out_dir / rel / res.ERROR_FILE).is_file()})
            all_results[str(out_dir)] = merged
            if use_wandb:
                _upload_wandb(spec, merged, wandb_mode, only_avg)
    result = next(iter(all_results.values())) if len(specs) == 1 else all_results
    logger.info("eval summary (rank %d): %d (model, task) pairs succeeded, %d failed", rank,
                n_pairs - len(failures), len(failures))
    for pair, err in failures.items():
        logger.error("eval FAILED %s: %s", pair, err)
    if failures:
        raise EvalTaskError(failures, result)
    return result


if __name__ == "__main__":  # the script entry: the command line of dinov2.eval.cli (exit status as documented)
    from dinov2.eval.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:], prog="dinov2/eval/eval.py main"))
