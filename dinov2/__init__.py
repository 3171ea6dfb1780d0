"""Panopticon: an any-sensor foundation model for Earth observation, built on the DINOv2 codebase layout.

``from dinov2 import load_model`` is resolved lazily (module ``__getattr__``), so ``import dinov2`` stays
free of torch and optional libraries.
"""

__version__ = "0.1.0"

_LAZY = {"load_model": "dinov2.hub", "ModelInfo": "dinov2.hub"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dinov2' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
