"""Training-config assembly: defaults -> config file -> env yaml -> CLI dotlist -> fastdevrun, then resolve and
check (unknown keys, types, impossible values: `config_schema`).

Resolvers: OmegaConf's built-ins (`${oc.env:VAR}`, `${oc.env:VAR,default}`) plus `${env:VAR}` (error naming the
variable if unset; `${env:VAR,default}` allowed), `${int:x}`, `${list:a,b}` and `${dict:k=v,...}`. `.env` in
the working directory (or the repo root) is loaded with python-dotenv; `$CDIR` defaults to this package's
`configs/` folder so `${env:CDIR}` always points at the shipped configs.
"""
from __future__ import annotations

import logging
import math
import warnings
import os
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dinov2.utils.config_schema import (TRAIN_FREE_FORM, eval_override_problems, find_bad_values, find_unknown_keys,
                                        raise_if_problems, unknown_override_keys)

logger = logging.getLogger("dinov2")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
REPO_ROOT = CONFIG_DIR.parents[1]
DEFAULT_CONFIG = CONFIG_DIR / "defaults" / "pretrain_default.yaml"
FASTDEVRUN_CONFIG = CONFIG_DIR / "defaults" / "fastdevrun.yaml"
EVAL_DEFAULTS_DIR = CONFIG_DIR / "eval" / "defaults"


def _env(name: str, default: Any = None) -> Any:
    if name in os.environ:
        return os.environ[name]
    if default is not None:
        return default
    raise KeyError(f"environment variable {name!r} is not set (needed by ${{env:{name}}} in the config; "
                   f"set it or put it in .env)")


def _dict(*items: str) -> dict:
    out = {}
    for it in items:
        if "=" not in str(it):
            raise ValueError(f"${{dict:...}} entry {it!r} must look like key=value")
        k, v = str(it).split("=", 1)
        out[k.strip()] = v.strip()
    return out


def register_resolvers() -> None:
    """Register the custom resolvers once per process."""
    for name, fn in (("env", _env), ("int", lambda x: int(float(x))), ("list", lambda *a: list(a)),
                     ("dict", _dict)):
        if not OmegaConf.has_resolver(name):
            with warnings.catch_warnings():  # omegaconf 2.4 renamed the API; the old name still works
                warnings.simplefilter("ignore")
                OmegaConf.register_new_resolver(name, fn)


def load_env() -> None:
    """Load `.env` (cwd first, then the repo root) without overriding variables already set; default $CDIR."""
    try:
        from dotenv import load_dotenv
    except ImportError:  # python-dotenv is a train extra; configs can still use exported variables
        logger.debug("python-dotenv not installed: .env not read")
    else:
        for candidate in (Path.cwd() / ".env", REPO_ROOT / ".env"):
            if candidate.is_file():
                load_dotenv(candidate, override=False)
    os.environ.setdefault("CDIR", str(CONFIG_DIR))


_FREE_FORM = TRAIN_FREE_FORM  # subtrees whose keys are constructor kwargs (any key is legitimate)


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


def load_config(config_file: Optional[str] = None, overrides: Sequence[str] = (), env_file: Optional[str] = None,
                fastdevrun: bool = False, defaults: Optional[str] = str(DEFAULT_CONFIG),
                resolve: bool = True) -> DictConfig:
    """Assemble, check and resolve a training config; top-level keys starting with `_` are dropped after
    resolving.

    With `defaults`, every key of the config file, env file and overrides must be declared there (or sit in a
    free-form subtree, see `config_schema`), and after resolving every value must have the declared type and a
    possible value; otherwise a `ConfigError` (ValueError) lists each offending key, before anything runs.
    """
    load_env()
    register_resolvers()
    parts = []
    for path, what in ((defaults, "defaults"), (config_file, "config file"), (env_file, "env file")):
        if path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{what} {path!r} does not exist")
            parts.append((f"{what} {path}", OmegaConf.load(path)))
    overrides = [o for o in overrides if o]
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} must look like key=value")
    base = OmegaConf.merge(*[p for _, p in parts]) if parts else OmegaConf.create()
    schema = _plain(parts[0][1]) if defaults else None
    if schema is not None:
        problems = []
        for where, part in parts[1:]:
            problems += find_unknown_keys(_plain(part), schema, where)
        problems += unknown_override_keys(overrides, _plain(base), schema)
        raise_if_problems(problems, "training config")
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    if fastdevrun:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(FASTDEVRUN_CONFIG))
    if schema is not None:  # evaluation overrides fail now rather than at the first evaluation, hours later
        problems = []
        for key in ("eval.overwrites", "eval.final_model.overwrites"):
            node = OmegaConf.select(cfg, key, default=None)
            if isinstance(node, DictConfig):
                problems += eval_override_problems(_plain(node), EVAL_DEFAULTS_DIR, key)
        raise_if_problems(problems, "training config")
    if resolve:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        for k in [k for k in cfg.keys() if str(k).startswith("_")]:
            del cfg[k]
        if schema is not None:
            plain = _plain(cfg)
            raise_if_problems(find_bad_values(plain, schema), "training config")
            cfg = OmegaConf.create(plain)  # with environment strings for numbers/bools converted
    return cfg


def apply_scaling_rules(cfg: DictConfig, world_size: int) -> DictConfig:
    """Apply `optim.scaling_rule` (comma list): `sqrt_wrt_1024` / `linear_wrt_256` set `optim.lr` from
    `optim.base_lr` and the total batch (per-GPU x world x grad accumulation); `min_lr=lr` makes the lr constant;
    `find_lr` freezes every schedule at its start value (lr at `lr` without warm-up, weight decay at
    `weight_decay`, teacher momentum at `momentum_teacher`, teacher temperature at `warmup_teacher_temp`).
    Without a batch rule `lr = base_lr`."""
    rules = [r.strip() for r in str(cfg.optim.get("scaling_rule") or "").split(",") if r.strip()]
    accum = int(cfg.get("gradient_accumulation_steps", 1) or 1)
    total_bsz = int(cfg.train.batch_size_per_gpu) * world_size * accum
    base_lr = float(cfg.optim.base_lr)
    cfg.optim.lr = base_lr
    for rule in rules:
        if rule == "sqrt_wrt_1024":
            cfg.optim.lr = base_lr * math.sqrt(total_bsz / 1024.0)
        elif rule == "linear_wrt_256":
            cfg.optim.lr = base_lr * total_bsz / 256.0
        elif rule in ("min_lr=lr", "constant_lr"):
            pass  # applied below, after the batch rule fixed lr
        elif rule == "find_lr":
            pass
        else:
            raise ValueError(f"unknown optim.scaling_rule {rule!r}; known: sqrt_wrt_1024, linear_wrt_256, "
                             f"min_lr=lr, find_lr")
    if "min_lr=lr" in rules or "constant_lr" in rules:
        cfg.optim.min_lr = cfg.optim.lr
    if "find_lr" in rules:
        cfg.optim.min_lr = cfg.optim.lr
        cfg.optim.warmup_epochs = 0
        cfg.optim.weight_decay_end = cfg.optim.weight_decay
        cfg.teacher.final_momentum_teacher = cfg.teacher.momentum_teacher
        # the teacher temperature stays at the value its schedule starts from (warmup_teacher_temp)
        cfg.teacher.teacher_temp = cfg.teacher.warmup_teacher_temp
    logger.info("scaling rules %s: total batch %d -> lr %.3g", rules, total_bsz, cfg.optim.lr)
    return cfg


def write_config(cfg: DictConfig, output_dir: str, name: str = "config.yaml") -> str:
    """Write `cfg` as yaml into `output_dir` and return the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    OmegaConf.save(config=cfg, f=path)
    return path
