"""Strict checking of configs against their defaults: unknown keys, value types and impossible values.

The defaults YAML is the schema: every key a config may set is declared there with its default. A key declared
as ``null`` accepts any value, and the subtrees named in ``free_form`` (constructor kwargs such as dataset dicts,
``pe_args``, augmentation settings) accept any key. Top-level keys starting with ``_`` are scratch space for
interpolations. Every problem found is reported at once in one :class:`ConfigError` (a ``ValueError``) naming the
key, where it came from and, for unknown keys, the closest declared key.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

# training-config subtrees whose keys are constructor kwargs / free structures
TRAIN_FREE_FORM = ("pe_args", "dataset", "pretrain_augm", "overwrites", "pretrained_weights")

# evaluation task sections with free structure: dataset dicts (constructor kwargs, transforms), interpolation
# scratch, and band-subset / loss specs whose keys select a variant
EVAL_FREE_FORM = ("_vars", "_default_augms", "train_dataset", "val_dataset", "test_dataset", "test_datasets_list",
                  "query_bands", "key_bands", "criterion_cfg")

# integer-declared keys that take fractions: epoch counts (the loop multiplies them by the epoch length)
FRACTIONAL = frozenset({
    "optim.epochs", "optim.warmup_epochs", "optim.hold_epochs", "optim.break_at_epochs", "train.saveckp_freq",
    "teacher.warmup_teacher_temp_epochs", "eval.eval_period_epoch",
})

_Rule = Tuple[Callable[[float], bool], str]
_POS = (lambda v: v > 0, "> 0")
_NONNEG = (lambda v: v >= 0, ">= 0")
_ATLEAST1 = (lambda v: v >= 1, ">= 1")
_PROB = (lambda v: 0 <= v <= 1, "in [0, 1]")
_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")

# impossible values of training keys (a None value is refused for these too)
TRAIN_RULES: Dict[str, _Rule] = {
    "optim.epochs": _POS, "optim.base_lr": _NONNEG, "optim.lr": _NONNEG, "optim.min_lr": _NONNEG,
    "optim.warmup_epochs": _NONNEG, "optim.hold_epochs": _NONNEG, "optim.weight_decay": _NONNEG,
    "optim.weight_decay_end": _NONNEG, "optim.clip_grad": _NONNEG, "optim.layerwise_decay": (lambda v: 0 < v <= 1,
                                                                                             "in (0, 1]"),
    "optim.adamw_beta1": _BETA, "optim.adamw_beta2": _BETA,
    "train.batch_size_per_gpu": _ATLEAST1, "train.num_workers": _NONNEG, "train.saveckp_freq": _POS,
    "train.max_to_keep": _ATLEAST1, "train.log_every_n_steps": _ATLEAST1, "train.seed": _NONNEG,
    "train.OFFICIAL_EPOCH_LENGTH": (lambda v: v == -1 or v >= 1, "-1 (from the dataset size) or >= 1"),
    "gradient_accumulation_steps": _ATLEAST1,
    "student.patch_size": _ATLEAST1, "student.pos_emb_img_size": _ATLEAST1, "student.drop_path_rate": _BETA,
    "student.num_register_tokens": _NONNEG, "student.block_chunks": _NONNEG, "student.in_chans": _ATLEAST1,
    "teacher.momentum_teacher": _PROB, "teacher.final_momentum_teacher": _PROB,
    "teacher.teacher_temp": _POS, "teacher.warmup_teacher_temp": _POS, "teacher.warmup_teacher_temp_epochs": _NONNEG,
    "dino.loss_weight": _NONNEG, "dino.koleo_loss_weight": _NONNEG, "dino.head_n_prototypes": _ATLEAST1,
    "dino.head_bottleneck_dim": _ATLEAST1, "dino.head_nlayers": _ATLEAST1, "dino.head_hidden_dim": _ATLEAST1,
    "ibot.loss_weight": _NONNEG, "ibot.mask_sample_probability": _PROB, "ibot.head_n_prototypes": _ATLEAST1,
    "ibot.head_bottleneck_dim": _ATLEAST1, "ibot.head_nlayers": _ATLEAST1, "ibot.head_hidden_dim": _ATLEAST1,
}

TRAIN_CHOICES: Dict[str, Sequence[str]] = {
    "compute_precision.dtype": ("fp16", "float16", "half", "bf16", "bfloat16", "fp32", "float32", "float"),
    "compute_precision.distributed": ("ddp", "fsdp"),
    "train.centering": ("centering", "sinkhorn_knopp"),
    "train.wandb_mode": ("online", "offline", "disabled"),
    "student.ffn_layer": ("mlp", "swiglufused", "swiglu", "identity"),
}


class ConfigError(ValueError):
    """A config names unknown keys or holds values of the wrong type or range."""


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def dotted_keys(schema: Mapping, path: str = "") -> Iterator[str]:
    """Every declared key of `schema` in dotted form (dict nodes and leaves)."""
    for k, v in schema.items():
        key = _join(path, k)
        yield key
        if isinstance(v, Mapping):
            yield from dotted_keys(v, key)


def _node(schema: Mapping, path: str) -> Optional[Mapping]:
    node: Any = schema
    for part in [p for p in path.split(".") if p]:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def closest_key(key: str, schema: Mapping) -> Optional[str]:
    """The declared key nearest to `key`: a sibling with a similar name, else any key with a similar last part
    (a key put in the wrong section), else a similar full dotted key."""
    parent, _, leaf = key.rpartition(".")
    siblings = _node(schema, parent)
    if siblings:
        match = difflib.get_close_matches(leaf, [str(k) for k in siblings], n=1, cutoff=0.6)
        if match:
            return _join(parent, match[0])
    everything = list(dotted_keys(schema))
    by_leaf: Dict[str, str] = {}
    for k in everything:
        by_leaf.setdefault(k.rpartition(".")[2], k)
    match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if match:
        return by_leaf[match[0]]
    match = difflib.get_close_matches(key, everything, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_msg(key: str, schema: Mapping, where: str) -> str:
    near = closest_key(key, schema)
    hint = f"; did you mean {near!r}?" if near else ""
    return f"{where}: unknown key {key!r}{hint}"


def find_unknown_keys(cfg: Mapping, schema: Mapping, where: str,
                      free_form: Sequence[str] = TRAIN_FREE_FORM) -> List[str]:
    """Messages for keys of `cfg` (a plain nested dict) that `schema` does not declare."""
    out: List[str] = []

    def walk(node: Mapping, declared_node: Mapping, path: str) -> None:
        for k, v in node.items():
            key = _join(path, k)
            if (not path and str(k).startswith("_")) or str(k) in free_form:
                continue
            if k not in declared_node:
                out.append(_unknown_msg(key, schema, where))
                continue
            declared = declared_node[k]
            if isinstance(v, Mapping) and isinstance(declared, Mapping):
                walk(v, declared, key)

    walk(cfg, schema, "")
    return out


def eval_override_problems(overrides: Mapping, defaults_dir, where: str) -> List[str]:
    """Messages for evaluation overrides (nested dict) declared by none of the task defaults
    (`<defaults_dir>/default_eval_*.yaml`): one override applies to every task of a suite, whatever its type."""
    if not overrides:
        return []
    from pathlib import Path

    from omegaconf import OmegaConf

    files = sorted(Path(defaults_dir).glob("default_eval_*.yaml"))
    union = OmegaConf.to_container(OmegaConf.merge(*[OmegaConf.load(f) for f in files]), resolve=False) if files \
        else {}
    return find_unknown_keys(overrides, union, where, free_form=EVAL_FREE_FORM)


def unknown_override_keys(overrides: Sequence[str], base: Mapping, schema: Mapping,
                          free_form: Sequence[str] = TRAIN_FREE_FORM) -> List[str]:
    """Messages for `key=value` overrides whose key neither `base` (the merged files) nor `schema` declares."""
    out = []
    for ov in overrides:
        key = ov.split("=", 1)[0].strip().lstrip("+")
        parts = key.split(".")
        if (parts[0].startswith("_")) or any(p in free_form for p in parts[:-1]):
            continue
        if _declared(base, parts) or _declared(schema, parts):
            continue
        out.append(_unknown_msg(key, schema, f"override {ov!r}"))
    return out


def _declared(tree: Mapping, parts: Sequence[str]) -> bool:
    node: Any = tree
    for p in parts:
        if node is None:
            return True  # under a key declared null: any structure
        if not isinstance(node, Mapping) or p not in node:
            return False
        node = node[p]
    return True


def _from_text(value: Any, default: Any) -> Any:
    """Strings from environment interpolations (`${oc.env:X}`) for number / bool keys -> number / bool."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    text = value.strip()
    if isinstance(default, bool):
        return {"true": True, "false": False}.get(text.lower(), value)
    if isinstance(default, (int, float)):
        try:
            number = float(text)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number
    return value


def _type_problem(key: str, value: Any, default: Any) -> Optional[str]:
    if value is None or default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number" if key in FRACTIONAL else "must be an integer"
        if isinstance(value, float) and key not in FRACTIONAL and not value.is_integer():
            return "must be an integer"
        return None
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "must be a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "must be a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, (list, tuple)) else "must be a list"
    if isinstance(default, Mapping):
        return None if isinstance(value, Mapping) else "must be a mapping of keys to values"
    return None


def find_bad_values(cfg: Dict[str, Any], schema: Mapping, rules: Mapping[str, _Rule] = TRAIN_RULES,
                    choices: Mapping[str, Sequence[str]] = TRAIN_CHOICES,
                    free_form: Sequence[str] = TRAIN_FREE_FORM, path: str = "") -> List[str]:
    """Messages for values of the wrong type (judged by the declared default) or out of range (`rules`,
    `choices`) in a resolved, plain `cfg`. Numeric / boolean strings (from environment interpolations) are
    converted in place."""
    out: List[str] = []
    for k in list(cfg):
        key = _join(path, k)
        if str(k) in free_form or not isinstance(schema, Mapping) or k not in schema:
            continue
        default = schema[k]
        value = cfg[k] = _from_text(cfg[k], default)
        problem = _type_problem(key, value, default)
        if problem is None and key in rules:
            ok, text = rules[key]
            if value is None:
                problem = f"must be a number {text}"
            elif not (math.isfinite(float(value)) and ok(float(value))):
                problem = f"must be {text}"
        if problem is None and key in choices and value is not None and str(value).lower() not in choices[key]:
            problem = f"must be one of {', '.join(choices[key])}"
        if problem is not None:
            out.append(f"{key}={value!r}: {problem}")
        elif isinstance(value, dict) and isinstance(default, Mapping):
            out.extend(find_bad_values(value, default, rules, choices, free_form, key))
    return out


def raise_if_problems(problems: Sequence[str], what: str, hint: str = "") -> None:
    """Raise one ConfigError listing every problem (no-op when there are none)."""
    if problems:
        lines = "\n  ".join(problems)
        tail = f"\n({hint})" if hint else ""
        raise ConfigError(f"invalid {what} ({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n  {lines}"
                          f"{tail}")
