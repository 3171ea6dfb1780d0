"""torch.hub entry points: `torch.hub.load('<repo or dir>', 'panopticon_vitb14')`.

The entry points live in the package (`dinov2/hub_entries.py`, so an installed package has them too); this file
re-exports them. Imports torch and this repository's `dinov2.models` only. If the process already imported another
package named `dinov2` (e.g. facebookresearch/dinov2 through torch.hub), this repository's package is imported
beside it and the other one is put back afterwards, so the user's modules keep working and no foreign code runs.

Weights are downloaded once into `<torch hub dir>/checkpoints/` (keyed by the URL they came from) and verified by
SHA-256 on every load; a cached file is used without any network request. `PANOPTICON_OFFLINE=1` (or
`HF_HUB_OFFLINE=1`) never touches the network. See docs/hub.md.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

dependencies = ["torch"]
_HERE = os.path.dirname(os.path.abspath(__file__))


def _is_own(module) -> bool:
    """Whether an imported `dinov2` package is the one next to this hubconf.py."""
    paths = list(getattr(module, "__path__", []) or [])
    own = os.path.realpath(os.path.join(_HERE, "dinov2"))
    return bool(paths) and all(os.path.realpath(p) == own for p in paths)


@contextlib.contextmanager
def _own_dinov2() -> Iterator[None]:
    """Within the block `import dinov2...` gives this repository's package (its folder goes first on the import
    path). A different `dinov2` already in `sys.modules` is set aside and restored afterwards; this repository's
    modules stay reachable through the objects imported in the block."""
    loaded = sys.modules.get("dinov2")
    foreign = {}
    if loaded is not None and not _is_own(loaded):
        names = [k for k in sys.modules if k == "dinov2" or k.startswith("dinov2.")]
        foreign = {k: sys.modules.pop(k) for k in names}
    sys.path.insert(0, _HERE)
    try:
        yield
    finally:
        sys.path.remove(_HERE)
        if foreign:
            for k in [k for k in sys.modules if k == "dinov2" or k.startswith("dinov2.")]:
                del sys.modules[k]
            sys.modules.update(foreign)


with _own_dinov2():
    import dinov2 as _dinov2

    if not _is_own(_dinov2):
        raise ImportError(
            f"hubconf.py in {_HERE} needs its own `dinov2` package, but `import dinov2` resolves to "
            f"{list(getattr(_dinov2, '__path__', []))} (another project with the same package name, installed "
            f"ahead of it on the import path). Load from a clean process or uninstall the other package.")
    from dinov2.hub_entries import (  # noqa: F401  (re-exported: torch.hub lists the callables of this module)
        DINOV2_URL,
        PANOPTICON_URL,
        _load_weights,
        _panopticon_vitb14,
        dinov2_vitb14,
        dinov2_vitg14,
        dinov2_vitl14,
        dinov2_vits14,
        panopticon_vitb14,
    )
    from dinov2.weights_cache import (  # noqa: F401
        KNOWN_SHA256,
        OFFLINE_VARIABLES,
        cached_download,
        offline,
        sha256_of,
    )
