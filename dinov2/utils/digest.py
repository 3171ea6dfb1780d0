"""Content digests: what decides whether a stored result may be reused.

A digest names *content*, never a path: the same weights loaded from two files (or built from a seed) give the
same digest, and new weights written over an old file give a new one. Imports torch only.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Union

import torch

DIGEST_BYTES = 32  # hex characters kept: 128 bits, far beyond any accidental collision


def state_dict_digest(state: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """SHA-256 over every entry of a state dict (key, dtype, shape and the raw bytes), in sorted key order."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"|{t.dtype}|{tuple(t.shape)}|".encode())
            # bytes of the storage as is (bf16/fp16 included); a view of uint8 never copies twice
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"|{value!r}|".encode())
    return h.hexdigest()[:DIGEST_BYTES]


def file_digest(path: str, block: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex, truncated like `state_dict_digest`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()[:DIGEST_BYTES]
