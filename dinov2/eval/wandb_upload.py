"""Optional upload of evaluation results to the training run's Weights & Biases run (wandb imported lazily).

Keys: ``<task relpath>/<metric>`` = value, ``_avg`` = mean of all values, and each group of
``configs/eval/defaults/wandb_averages.yaml`` = mean of its listed keys that are present.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Dict, Optional

from dinov2.eval.metrics import is_corrected_key
from dinov2.eval.tasks import PKG_EVAL_CFG, eval_config_root

logger = logging.getLogger("dinov2")


def summary_entries(results: Dict[str, Dict[str, float]], only_avg: bool = False) -> Dict[str, float]:
    """Flatten results and add the averages."""
    import yaml

    flat = {f"{task}/{m}": float(v) for task, vals in results.items() for m, v in vals.items()}
    out: Dict[str, float] = {} if only_avg else dict(flat)
    published = [v for k, v in flat.items() if not is_corrected_key(k)]  # keeps _avg comparable to published runs
    if published:
        out["_avg"] = round(sum(published) / len(published), 2)
    path = eval_config_root() / "defaults" / "wandb_averages.yaml"
    if not path.is_file():
        path = PKG_EVAL_CFG / "defaults" / "wandb_averages.yaml"
    groups = yaml.safe_load(path.read_text()) if path.is_file() else {}
    for name, keys in (groups or {}).items():
        vals = [flat[k] for k in keys or [] if k in flat]
        if vals:
            out[name] = round(sum(vals) / len(vals), 2)
    return out


def _run_id(run_dir: Path) -> Optional[str]:
    latest = run_dir / "wandb" / "latest-run"
    if not latest.exists():
        return None
    for f in latest.iterdir():
        m = re.match(r"run-(\w+)\.wandb$", f.name)
        if m:
            return m.group(1)
    return None


def upload_results(run_dir: Optional[str], results: Dict[str, Dict[str, float]], mode: str = "api",
                   only_avg: bool = False) -> bool:
    """Write the summary entries into the wandb run found in ``<run_dir>/wandb``; False if there is none."""
    run_id = _run_id(Path(run_dir)) if run_dir else None
    if run_id is None:
        logger.warning("use_wandb: no wandb run found under %s/wandb; nothing uploaded", run_dir)
        return False
    try:
        import wandb
    except ImportError as e:
        raise ImportError("--use-wandb needs the wandb package (pip install 'panopticon[wandb]')") from e
    entries = summary_entries(results, only_avg)
    project = os.environ.get("WANDB_PROJECT", "panopticon")
    if mode == "api":
        entity = os.environ.get("WANDB_ENTITY") or wandb.Api().default_entity
        run = wandb.Api().run(f"{entity}/{project}/{run_id}")  # full path (the published code passed the id only)
        for k, v in entries.items():
            run.summary[k] = v
        run.summary.update()
    elif mode == "resume":
        run = wandb.init(id=run_id, project=project, dir=run_dir, resume="must")
        run.summary.update(entries)
        run.finish()
    else:
        raise ValueError(f"wandb_mode must be 'api' or 'resume', got {mode!r}")
    return True
