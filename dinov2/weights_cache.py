"""Downloaded weights, cached once and keyed by where they came from.

The released files (the URLs in ``RELEASE_URLS``) live where torch.hub keeps them, ``<torch hub
dir>/checkpoints/<file name>``; a file fetched from any other URL (a mirror, a colleague's server) lives under
``<torch hub dir>/checkpoints/sources/<host>-<hash of the URL>/<file name>``, so a mirror's
``panopticon_vitb14_teacher.pth`` can never be taken for the release, nor the release for a mirror's file.

Every cached file has a record ``<file>.sha256``: its SHA-256 and the URL it was fetched from. A cached file is
used (without any network request) only when the record names the same URL and the file's digest matches the
record and any expected digest (``sha256=``, a published digest, or torch.hub's ``name-<hex>.pth`` prefix); with an
expected digest, a match proves the file by itself. A file without a matching record (a partial copy, one placed
by hand, or one from an older cache layout) is fetched again; offline (``PANOPTICON_OFFLINE=1`` or
``HF_HUB_OFFLINE=1``) it is an error that says which files to delete.

Imports torch only when a path is asked for (so that command-line tools can name `WeightsError` cheaply).
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.error
import urllib.parse
from typing import Dict, Optional, Set

OFFLINE_VARIABLES = ("PANOPTICON_OFFLINE", "HF_HUB_OFFLINE")
# URLs of released files: cached under their plain file name (torch.hub's layout); filled by `dinov2.hub_entries`
RELEASE_URLS: Set[str] = set()
# SHA-256 of released files whose digest is published; others are checked against the digest recorded at their
# first download (and against a `-<hex>` prefix in the file name, torch.hub's convention, when there is one).
KNOWN_SHA256: Dict[str, str] = {}


class WeightsError(RuntimeError):
    """Weights that cannot be had or trusted: a failed download, a digest mismatch, an offline cache miss, an
    unreadable file. Command-line tools report it as a one-line error."""


_NAME_HASH = re.compile(r"-([a-f0-9]{8,64})\.")
_RECORD_SOURCE = "source "


def offline() -> bool:
    """True when an offline variable (`PANOPTICON_OFFLINE`, `HF_HUB_OFFLINE`) is set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def sha256_of(path: str) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_path(url: str) -> str:
    """Where `url` is cached: released files under their name, any other source in a folder of its own."""
    import torch

    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    name = os.path.basename(urllib.parse.urlsplit(url).path) or "weights"
    if url in RELEASE_URLS:
        return os.path.join(folder, name)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", urllib.parse.urlsplit(url).hostname or "local")
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(folder, "sources", f"{host}-{key}", name)


def read_record(path: str) -> Dict[str, str]:
    """The record beside a cached file: ``{'sha256': ..., 'source': ...}`` (keys absent when not recorded)."""
    record: Dict[str, str] = {}
    try:
        with open(path + ".sha256") as f:
            lines = f.read().splitlines()
    except OSError:
        return record
    if lines and lines[0].split():
        record["sha256"] = lines[0].split()[0]
    for line in lines[1:]:
        if line.startswith(_RECORD_SOURCE):
            record["source"] = line[len(_RECORD_SOURCE):].strip()
    return record


def write_record(path: str, digest: str, url: str) -> None:
    """Record `digest` and the source `url` of a cached file (first line in `sha256sum` format)."""
    tmp = path + ".sha256.tmp"
    with open(tmp, "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n{_RECORD_SOURCE}{url}\n")
    os.replace(tmp, path + ".sha256")


def expected_digest(url: str, sha256: Optional[str]) -> Optional[str]:
    """The digest (or prefix) a file from `url` must have: given, published, or in the file name."""
    if sha256:
        return sha256.lower()
    if url in KNOWN_SHA256:
        return KNOWN_SHA256[url]
    m = _NAME_HASH.search(os.path.basename(urllib.parse.urlsplit(url).path))
    return m.group(1) if m else None


def _cached_problem(path: str, url: str, expected: Optional[str]) -> Optional[str]:
    """Why the cached `path` cannot serve `url` (None: it can). An expected digest proves the content by itself
    (the record is then rewritten); otherwise the record must name `url` and the file's digest."""
    record = read_record(path)
    if expected is not None and record.get("source") != url:
        digest = sha256_of(path)
        if digest.startswith(expected):
            write_record(path, digest, url)
            return None
        return f"its SHA-256 {digest[:12]}... does not start with the expected {expected[:12]}"
    if record.get("source") != url:
        if "source" in record:
            return f"it was fetched from {record['source']}, not from {url}"
        return "it has no record of its source (a partial copy, placed by hand, or from an older cache layout)"
    digest = sha256_of(path)
    if record.get("sha256") != digest:
        return f"its SHA-256 {digest[:12]}... differs from the one recorded at download (a partial or changed copy)"
    if expected is not None and not digest.startswith(expected):
        return f"its SHA-256 {digest[:12]}... does not start with the expected {expected[:12]}"
    return None


def cached_download(url: str, progress: bool = True, sha256: Optional[str] = None) -> str:
    """Local path of `url`: a cached copy that checks out (see the module docstring) without any network
    request; otherwise (never in offline mode) the file is downloaded, verified and recorded."""
    path = cache_path(url)
    expected = expected_digest(url, sha256)
    name = os.path.basename(path)
    if os.path.isfile(path):
        problem = _cached_problem(path, url, expected)
        if problem is None:
            return path
        if offline():
            raise WeightsError(
                f"offline mode ({'/'.join(OFFLINE_VARIABLES)}): the cached {path} cannot be used for {url}: "
                f"{problem}. Delete {path} and {path}.sha256 and fetch it again with network, or pass the file: "
                f"weights='/path/to/{name}'")
    elif offline():
        raise WeightsError(f"offline mode ({'/'.join(OFFLINE_VARIABLES)}): {url} is not cached (expected at "
                           f"{path}). Download {name} elsewhere and pass it: weights='/path/to/{name}'")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    import torch

    from dinov2.utils.progress import bars_allowed, progress_line

    bar = bars_allowed(progress)  # torch.hub's bar redraws the line: on a terminal only, else two plain lines
    if not bar:
        progress_line(f"downloading {url} to {path}", progress)
    try:
        torch.hub.download_url_to_file(url, path, progress=bar)  # writes a temp file, then renames
    except (urllib.error.URLError, OSError) as exc:
        raise WeightsError(
            f"could not download {url} ({exc}). Without network, download the file elsewhere and pass it: "
            f"weights='/path/to/{name}'") from exc
    digest = sha256_of(path)
    if expected is not None and not digest.startswith(expected):
        os.remove(path)
        raise WeightsError(f"downloaded {url} has SHA-256 {digest}, expected {expected}: removed it")
    write_record(path, digest, url)
    if not bar:
        progress_line(f"downloaded {name}: {os.path.getsize(path) / 2**20:.1f} MiB, SHA-256 {digest[:12]}...",
                      progress)
    return path
