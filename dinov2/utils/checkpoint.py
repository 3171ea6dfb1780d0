"""Loading pretrained weights with include / exclude / prefix_map selection, and atomic checkpoint writes."""
from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from dinov2.weights_cache import WeightsError

logger = logging.getLogger("dinov2")


def _split_patterns(patterns: Union[None, str, Iterable[str]]) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [p.strip() for p in patterns.split(",") if p.strip()]
    return [str(p) for p in patterns]


SAFETENSORS_SUFFIX = ".safetensors"


def read_safetensors(path: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Tensors and header metadata of a `.safetensors` file (needs the `safetensors` package, extra `hub`)."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ModuleNotFoundError(f"reading {path} needs safetensors: pip install 'panopticon[hub]'") from exc
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # a truncated or foreign file: safetensors raises its own error types
        raise WeightsError(f"could not read safetensors file {path}: {exc}") from exc


def is_safetensors(path: str) -> bool:
    """True when the file is in the safetensors format (by content: an 8-byte header length, then JSON), whatever
    its name (the Hugging Face cache stores files under content hashes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)
    except OSError:
        return False


def load_checkpoint_file(path: str, map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a local checkpoint (`.pth` or `.safetensors`) or an http(s) URL (downloaded once into the weights
    cache, keyed by the URL: `dinov2.weights_cache`)."""
    if str(path).startswith(("http://", "https://")):
        from dinov2.weights_cache import cached_download

        path = cached_download(str(path))
    path = os.path.expandvars(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(SAFETENSORS_SUFFIX) or is_safetensors(path):
        tensors, _ = read_safetensors(path)
        return {k: v.to(map_location) for k, v in tensors.items()}
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated downloads and non-checkpoint files end up here
        raise WeightsError(f"could not read checkpoint {path}: {exc}") from exc


BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.")


def backbone_state_dict(obj: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The backbone state dict inside a loaded checkpoint: a hub-format teacher file as is; a training checkpoint
    (`{"model": ...}` or `{"teacher": ...}` wrapping `teacher.backbone.*` / `backbone.*` keys) unwrapped."""
    state = obj
    for key in ("teacher", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"expected a state dict (mapping of names to tensors), got {type(state).__name__}")
    for prefix in BACKBONE_PREFIXES:
        if any(str(k).startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


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


def conform_state_dict(state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                       source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Fit a checkpoint's tensors to this code's shapes where only the layout differs, else raise.

    Training checkpoints of the published code store the iBOT center as (1, 1, K); here every loss center is
    (1, K). A `*center` buffer with the same number of elements is reshaped; any other shape mismatch raises
    ValueError naming the keys and shapes. Keys the model does not have are passed through unchanged."""
    out: Dict[str, torch.Tensor] = {}
    errors = []
    for k, v in state_dict.items():
        if k in own and torch.is_tensor(v) and tuple(own[k].shape) != tuple(v.shape):
            if k.rsplit(".", 1)[-1] == "center" and v.numel() == own[k].numel():
                v = v.reshape(own[k].shape)
            else:
                errors.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        out[k] = v
    if errors:
        raise ValueError(f"shape mismatch loading {source}: {'; '.join(errors[:5])}"
                         + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))
    return out


def _prefix_hint(keys: Iterable[str]) -> str:
    heads = sorted({k.split(".", 2)[0] + "." + k.split(".", 2)[1] + "." for k in keys if k.count(".") >= 2})
    heads = [h for h in heads if h.startswith(("student.", "teacher."))]
    if not heads:
        return ""
    return (f"; it looks like a training checkpoint (prefixes {heads[:4]}): select a part with e.g. "
            f"prefix_map: {{'{heads[0]}': ''}}")


def load_pretrained_weights(
    model: nn.Module, cfg_list: Iterable[Mapping[str, Any]], checkpoint_key: Optional[str] = "model"
) -> Tuple[List[str], List[str]]:
    """Merge the selected parts of several checkpoints and load them non-strictly.

    Each entry: `path` (file or URL), optional `checkpoint_key`, `include`, `exclude` (comma-separated regexes),
    `prefix_map` ({old prefix: new prefix}; only keys with one of the old prefixes are kept). Training checkpoints
    of the published code load as they are (see `conform_state_dict`). Returns (missing_keys, unexpected_keys); an
    entry that selects no key, or selections of which no key belongs to `model`, raise ValueError.
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
    if merged and not any(k in own for k in merged):
        raise ValueError(f"pretrained_weights: none of the {len(merged)} selected keys (e.g. {list(merged)[:3]}) is a "
                         f"key of the model (e.g. {list(own)[:3]}){_prefix_hint(merged)}")
    merged = conform_state_dict(merged, own, "pretrained weights")
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


# safetensors header metadata: the `student` config section (JSON) that rebuilds the backbone
STUDENT_METADATA_KEY = "panopticon.student"


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str,
                     metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write `state_dict` as `.safetensors` atomically (tensors made contiguous; shared storage copied)."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise ModuleNotFoundError(f"writing {path} needs safetensors: pip install 'panopticon[hub]'") from exc
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta), suffix=SAFETENSORS_SUFFIX)


def save_backbone_safetensors(state_dict: Mapping[str, torch.Tensor], path: str,
                              student_cfg: Optional[Mapping[str, Any]] = None,
                              metadata: Optional[Mapping[str, str]] = None) -> str:
    """A backbone as `.safetensors` with the `student` config that rebuilds it, in the file's header and in a
    `config.yaml` beside it (the Hugging Face Hub convention; an existing `config.yaml` with other content is an
    error, checked before anything is written)."""
    import json

    import yaml

    meta = dict(metadata or {})
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.yaml")
    text = None
    if student_cfg is not None:
        student = json.loads(json.dumps(dict(student_cfg)))  # plain types, as they will be read back
        meta[STUDENT_METADATA_KEY] = json.dumps(student)
        text = yaml.safe_dump({"student": student}, sort_keys=False)
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                if f.read() != text:
                    raise ValueError(f"{cfg_path} exists with another config; write the safetensors file to "
                                     "another folder")
    save_safetensors(state_dict, path, meta)
    if text is not None:
        def write_text(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.write(text)

        write_atomic(cfg_path, write_text, suffix=".yaml")
    return path
