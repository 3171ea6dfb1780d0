"""Loading pretrained weights with include / exclude / prefix_map selection, and atomic checkpoint writes."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger("dinov2")


def _split_patterns(patterns: Union[None, str, Iterable[str]]) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p.strip() for p in patterns.split(",") if p.strip()]
    return [str(p) for p in patterns]


def load_checkpoint_file(path: str, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a local checkpoint file or an http(s) URL (downloaded once into the torch hub cache)."""
    if str(path).startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(str(path), map_location=map_location, weights_only=True)
    path = os.path.expandvars(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated downloads and non-checkpoint files end up here
        raise RuntimeError(f"could not read checkpoint {path}: {exc}") from exc


def select_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    include: Union[None, str, Iterable[str]] = None,
    exclude: Union[None, str, Iterable[str]] = None,
    prefix_map: Optional[Mapping[str, str]] = None,
) -> Dict[str, torch.Tensor]:
    """Keep keys matching any `include` regex, drop keys matching any `exclude` regex, then rename prefixes.

    With a `prefix_map`, only keys starting with one of its old prefixes are kept (renamed to the new prefix).
    """
    inc, exc = _split_patterns(include), _split_patterns(exclude)
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if inc and not any(re.search(p, key) for p in inc):
            continue
        if exc and any(re.search(p, key) for p in exc):
            continue
        if prefix_map:
            for old, new in prefix_map.items():
                if key.startswith(old):
                    out[new + key[len(old):]] = value
                    break
        else:
            out[key] = value
    return out


def load_pretrained_weights(
    model: nn.Module, cfg_list: Iterable[Mapping[str, Any]], checkpoint_key: Optional[str] = "model"
) -> Tuple[List[str], List[str]]:
    """Merge the selected parts of several checkpoints and load them non-strictly (reference §5.2).

    Each entry: `path` (file or URL), optional `checkpoint_key`, `include`, `exclude`, `prefix_map`.
    Returns (missing_keys, unexpected_keys); an entry that selects no key at all raises ValueError.
    """
    merged: Dict[str, torch.Tensor] = {}
    for entry in cfg_list:
        entry = dict(entry)
        if "path" not in entry:
            raise ValueError(f"pretrained_weights entry without 'path': {entry}")
        ckpt = load_checkpoint_file(entry["path"])
        key = entry.get("checkpoint_key", checkpoint_key)
        if key is not None and isinstance(ckpt, Mapping) and key in ckpt:
            ckpt = ckpt[key]
        elif key is not None:
            logger.info("checkpoint %s has no key %r; using its top level as the state dict", entry["path"], key)
        selected = select_state_dict(ckpt, entry.get("include"), entry.get("exclude"), entry.get("prefix_map"))
        if not selected:
            raise ValueError(
                f"pretrained_weights entry {entry} selected no parameter from {entry['path']} "
                f"(first keys there: {list(ckpt)[:5]})"
            )
        merged.update(selected)
    own = model.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in merged.items() if k in own and own[k].shape != v.shape]
    if shape_errors:
        raise ValueError(f"shape mismatch loading pretrained weights: {shape_errors[:5]}")
    result = model.load_state_dict(merged, strict=False)
    logger.info("loaded %d pretrained tensors; missing %d, unexpected %d", len(merged), len(result.missing_keys),
                len(result.unexpected_keys))
    return list(result.missing_keys), list(result.unexpected_keys)


def write_atomic(path: str, write: Callable[[str], None], suffix: str = "") -> str:
    """Call `write(tmp_path)` for a temp file in `path`'s folder, fsync it, then `os.replace` it onto `path`:
    readers never see a partial file, and concurrent writers of the same content simply replace each other."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_atomic(obj: Any, path: str) -> None:
    """`torch.save` to a temp file in the same folder, then `os.replace`: readers never see a partial file."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp), suffix=".pth")
