"""Models on the Hugging Face Hub: ``load_model("hf-hub:ORG/NAME[@REVISION]")``.

Files are fetched with ``huggingface_hub.hf_hub_download`` into its cache (``HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), from ``HF_ENDPOINT`` when set; ``@REVISION`` pins a branch, tag or commit. With
``HF_HUB_OFFLINE=1`` (or ``PANOPTICON_OFFLINE=1``) nothing is requested and only the cache is read.

A repository holds the weights as ``model.safetensors`` (what ``panopticon export --format safetensors`` writes:
the backbone state dict, with the config that rebuilds it in the header) or as the released
``panopticon_vitb14_teacher.pth``, and optionally a ``config.yaml`` with a ``student`` section beside them; without
either config the published ViT-B/14 configuration is used. Needs the ``hub`` extra (huggingface_hub, safetensors).
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from dinov2.weights_cache import offline

PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "panopticon_vitb14_teacher.pth")
CONFIG_FILE = "config.yaml"
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hf_source(source: str) -> bool:
    """True for ``hf-hub:...`` model sources."""
    return str(source).startswith(PREFIX)


def parse_source(source: str) -> Tuple[str, Optional[str]]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (repo id, revision or None)."""
    body = str(source)[len(PREFIX):]
    repo, _, revision = body.partition("@")
    if not _REPO.fullmatch(repo) or (revision == "" and "@" in body):
        raise ValueError(f"model source {source!r} must look like hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def _hub():
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ModuleNotFoundError("hf-hub: sources need huggingface_hub: pip install 'panopticon[hub]'") from exc
    return huggingface_hub


def _fetch(repo: str, filename: str, revision: Optional[str], required: bool) -> Optional[str]:
    """Local path of `filename` in the repository (None when the repository has no such file and not `required`)."""
    hub = _hub()
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    where = f"{repo}@{revision}" if revision else repo
    if offline():  # the cache only, including its record of files the repository does not have
        cached = hub.try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(cached, str):
            return cached
        if cached is None:
            raise FileNotFoundError(f"offline mode: {filename} of hf-hub:{where} is not in the Hugging Face cache "
                                    f"({hub.constants.HF_HUB_CACHE}); load it once with network")
        if required:
            raise FileNotFoundError(f"hf-hub:{where} has no {filename} (recorded in the Hugging Face cache)")
        return None
    try:
        return _download(hub, repo, filename, revision)
    except EntryNotFoundError:
        if required:
            raise FileNotFoundError(f"hf-hub:{where} has no {filename}") from None
        return None
    except RevisionNotFoundError:
        raise ValueError(f"hf-hub:{where}: revision {revision!r} not found") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"hf-hub:{repo}: repository not found (or private without a token)") from None


def _download(hub, repo: str, filename: str, revision: Optional[str]) -> str:
    """`hf_hub_download`, with its progress bars only on a terminal (a plain line otherwise, see
    `dinov2.utils.progress`)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from dinov2.utils.progress import bars_allowed, progress_line

    def fetch() -> str:
        return hub.hf_hub_download(repo, filename, revision=revision, endpoint=os.environ.get("HF_ENDPOINT") or None)

    if bars_allowed() or are_progress_bars_disabled():
        return fetch()
    progress_line(f"fetching {filename} of hf-hub:{repo}" + (f"@{revision}" if revision else ""))
    disable_progress_bars()
    try:
        return fetch()
    finally:
        enable_progress_bars()


def fetch_model_files(source: str, filename: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(weights path, config.yaml path or None) of an ``hf-hub:`` source, from the Hugging Face cache or fetched
    into it. `filename` names the weights file in the repository (default: the first of ``WEIGHT_FILES`` found)."""
    repo, revision = parse_source(source)
    if filename is not None:
        weights = _fetch(repo, filename, revision, required=True)
    else:
        weights = None
        for name in WEIGHT_FILES:
            weights = _fetch(repo, name, revision, required=False)
            if weights is not None:
                break
        if weights is None:
            raise FileNotFoundError(f"{source}: the repository holds none of {', '.join(WEIGHT_FILES)}; name the "
                                    "file with load_model(source, weights='<file in the repository>')")
    config = _fetch(repo, CONFIG_FILE, revision, required=False)
    return weights, config
