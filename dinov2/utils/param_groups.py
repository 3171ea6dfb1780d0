"""Optimiser parameter groups: layer-wise lr decay, lr multipliers and freezing by name regex, wd exemptions."""
from __future__ import annotations

import logging
import re
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

logger = logging.getLogger("dinov2")

# embedding-level parameters of the backbone sit at layer 0 (they get the strongest decay)
_EMBED_KEYS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def parse_regex_values(spec, what: str) -> List[Tuple[str, float]]:
    """`'blocks=0.2,patch_embed=0.5'` (or a dict / list of such strings) -> [(regex, value)]."""
    if spec is None or spec == "":
        return []
    if isinstance(spec, dict) or hasattr(spec, "items"):
        items = [f"{k}={v}" for k, v in spec.items()]
    elif isinstance(spec, str):
        items = [s for s in spec.split(",") if s.strip()]
    else:
        items = [str(s) for s in spec]
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"{what}: entry {item!r} must look like 'regex=value'")
        pattern, value = item.rsplit("=", 1)
        try:
            re.compile(pattern.strip())
            out.append((pattern.strip(), float(value)))
        except re.error as e:
            raise ValueError(f"{what}: bad regex {pattern!r}: {e}") from None
        except ValueError:
            raise ValueError(f"{what}: value of {item!r} is not a number") from None
    return out


def layer_id(name: str, n_blocks: int) -> int:
    """0 for backbone embeddings/tokens, i+1 for backbone block i (chunked or not), n_blocks+1 otherwise."""
    if not name.startswith("backbone."):
        return n_blocks + 1
    rest = name[len("backbone."):]
    if rest.startswith(_EMBED_KEYS):
        return 0
    m = re.match(r"blocks\.(\d+)\.(\d+)\.", rest)  # chunked blocks: blocks.<chunk>.<i>.
    if m:
        return int(m.group(2)) + 1
    m = re.match(r"blocks\.(\d+)\.", rest)
    if m:
        return int(m.group(1)) + 1
    return n_blocks + 1


def wd_multiplier(name: str) -> float:
    """No weight decay on biases, norm parameters and layer-scale gammas."""
    return 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0


def get_param_groups(named_params: Iterable[Tuple[str, nn.Parameter]], n_blocks: int, layerwise_decay: float = 1.0,
                     lr_multiplier="", freeze_weights="") -> List[Dict]:
    """Parameter groups fused by identical (lr_multiplier, wd_multiplier, freeze_epochs).

    Names are `<student module key>.<param name>` (e.g. `backbone.blocks.3.attn.qkv.weight`). Each group carries
    `lr_multiplier`, `wd_multiplier`, `freeze_epochs` and the member `names`; the training loop sets `lr`/`weight_decay`.
    """
    lr_rules = parse_regex_values(lr_multiplier, "optim.lr_multiplier")
    freeze_rules = parse_regex_values(freeze_weights, "optim.freeze_weights")
    groups: Dict[Tuple[float, float, float], Dict] = {}
    used = set()
    for name, p in named_params:
        if not p.requires_grad:
            continue
        lr_mult = layerwise_decay ** (n_blocks + 1 - layer_id(name, n_blocks))
        for i, (pattern, factor) in enumerate(lr_rules):
            if re.search(pattern, name):
                lr_mult *= factor
                used.add(("lr", i))
        freeze = 0.0
        for i, (pattern, epochs) in enumerate(freeze_rules):
            if re.search(pattern, name):
                freeze = max(freeze, epochs)
                used.add(("fr", i))
        key = (lr_mult, wd_multiplier(name), freeze)
        g = groups.setdefault(key, dict(params=[], names=[], lr_multiplier=key[0], wd_multiplier=key[1],
                                        freeze_epochs=key[2]))
        g["params"].append(p)
        g["names"].append(name)
    for tag, rules, what in (("lr", lr_rules, "lr_multiplier"), ("fr", freeze_rules, "freeze_weights")):
        for i, (pattern, _) in enumerate(rules):
            if (tag, i) not in used:
                logger.warning("optim.%s pattern %r matches no trainable parameter", what, pattern)
    logger.info("%d parameter groups", len(groups))
    return list(groups.values())


def apply_optim_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, epoch: float) -> None:
    """Set each group's lr (0 while `epoch < freeze_epochs`) and weight decay for the current iteration."""
    for g in optimizer.param_groups:
        frozen = epoch < g.get("freeze_epochs", 0.0)
        g["lr"] = 0.0 if frozen else lr * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = wd * g.get("wd_multiplier", 1.0)
