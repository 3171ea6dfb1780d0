"""Tar shards in the webdataset layout, streamed from local paths, ``https://`` or ``s3://`` URLs.

A shard folder holds ``<prefix>-NNNNNN.tar`` files and one index ``dataset.yaml`` whose ``nsamples_per_shard``
maps every shard's file name to its sample count (the published shard builders' layout); samples are the tar
members that share a key (``<key>.<field>``). ``ShardStream`` is an ``IterableDataset`` built from the webdataset
library's stages (tar expansion, grouping by key, buffered shuffling); shards are opened by ``open_url``:
local files directly, remote objects through obstore (streamed range reads; S3 credentials, region and endpoint
from the usual ``AWS_*`` environment variables, plain-http endpoints allowed for local test servers). Which shards
a dataset uses is decided from the index alone, so a remote folder needs no listing.
"""
from __future__ import annotations

import fnmatch
import io
import logging
import os
import random
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch

logger = logging.getLogger("dinov2")
INDEX_NAME = "dataset.yaml"
REMOTE_SCHEMES = ("http://", "https://", "s3://")


def is_remote(url: str) -> bool:
    return str(url).startswith(REMOTE_SCHEMES)


def _split(url: str) -> Tuple[str, str]:
    head, _, name = str(url).rstrip("/").rpartition("/")
    return head, name


class _Reader(io.RawIOBase):
    """File-like view of an obstore reader (``read`` returns obstore ``Bytes``; tarfile wants ``bytes``)."""

    def __init__(self, reader):
        self.reader = reader

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = memoryview(self.reader.read(len(buf)))
        buf[:len(data)] = data
        return len(data)


def _remote_store(folder: str):
    import obstore.store

    return obstore.store.from_url(folder, client_options={"allow_http": True})


def open_url(url: str) -> io.BufferedIOBase:
    """A binary stream of ``url`` (local path, ``https://`` or ``s3://``); ``FileNotFoundError`` naming it when
    the object does not exist."""
    if not is_remote(url):
        path = os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard file not found: {path}")
        return open(path, "rb")
    import obstore

    folder, name = _split(url)
    try:
        return io.BufferedReader(_Reader(obstore.open_reader(_remote_store(folder), name)), 1 << 20)
    except FileNotFoundError:
        raise FileNotFoundError(f"no object at {url}") from None
    except Exception as e:  # obstore reports network and credential problems with multi-line messages
        raise OSError(f"cannot open {url}: {str(e).splitlines()[0]}") from None


def read_url(url: str) -> bytes:
    with open_url(url) as fh:
        return fh.read()


def resolve_shards(url: str, index_name: str = INDEX_NAME) -> Tuple[List[str], Dict[str, int], Dict[str, Any]]:
    """``(shard URLs, {shard URL: samples}, index)`` of ``url``: a shard folder (every shard of its index), one
    shard, a glob (``<folder>/dataset-*.tar``) or a brace range (``<folder>/dataset-{000000..000009}.tar``);
    the shards are those of ``<folder>/dataset.yaml`` that the pattern matches, in index order."""
    import yaml

    url = os.path.expandvars(str(url))
    if "$" in url:
        raise ValueError(f"shard url {url!r} names an environment variable that is not set")
    folder, pattern = _split(url)
    if not pattern.endswith(".tar"):
        folder, pattern = url.rstrip("/"), "*.tar"
    index_url = f"{folder}/{index_name}"
    try:
        index = yaml.safe_load(read_url(index_url))
    except FileNotFoundError:
        raise FileNotFoundError(f"shard index {index_url} not found (a shard folder holds {index_name} with "
                                "nsamples_per_shard)") from None
    counts = index.get("nsamples_per_shard") if isinstance(index, dict) else None
    if not isinstance(counts, dict) or not counts:
        raise ValueError(f"{index_url}: expected a mapping 'nsamples_per_shard: {{<shard>.tar: <samples>}}'")
    names = [str(n) for n in counts]
    if "{" in pattern:
        from braceexpand import braceexpand

        wanted = set(braceexpand(pattern))
        picked = [n for n in names if n in wanted]
    else:
        picked = [n for n in names if fnmatch.fnmatch(n, pattern)]
    if not picked:
        raise FileNotFoundError(f"{url}: no shard of {index_url} matches {pattern!r} (index lists {names[:3]} ...)")
    bad = {n: counts[n] for n in picked if isinstance(counts[n], bool) or not isinstance(counts[n], int)
           or counts[n] < 0}
    if bad:
        raise ValueError(f"{index_url}: sample counts must be non-negative integers, got {bad}")
    shards = [f"{folder}/{n}" for n in picked]
    return shards, {s: int(counts[n]) for s, n in zip(shards, picked)}, index


def select_shards(shards: Sequence[str], subset: Any, seed: int) -> List[str]:
    """A seeded random choice of shards: ``subset`` -1/None/1.0 keeps all, a fraction in (0, 1) keeps that share
    (at least one), an integer k that many (the published shard subsetting); kept shards stay in index order."""
    n = len(shards)
    if subset is None or subset == -1 or (isinstance(subset, float) and subset == 1.0):
        return list(shards)
    if isinstance(subset, float) and not subset.is_integer():
        if not 0.0 < subset < 1.0:
            raise ValueError(f"a fractional subset must be in (0, 1), got {subset}")
        k = max(1, round(subset * n))
    else:
        k = int(subset)
        if not 1 <= k <= n:
            raise ValueError(f"subset={subset} shards, but the folder has {n}")
    keep = set(random.Random(int(seed)).sample(range(n), k))
    return [s for i, s in enumerate(shards) if i in keep]


def _open_stage(src: Iterator[Dict[str, Any]]) -> Iterator[Dict[str, Any]]:
    for item in src:
        yield {**item, "stream": open_url(item["url"])}


class ShardStream(torch.utils.data.IterableDataset):
    """Samples ``make_sample(members)`` of ``shards`` (``members``: ``{'__key__', '<field>': bytes}``), each
    pass in a new seeded order when ``shuffle`` (shards shuffled, then a ``shuffle_buffer``-sample buffer), else
    in index order; ``endless`` streams pass after pass (pretraining). DataLoader workers split the shards between
    them. ``len()`` is the number of samples of one pass."""

    def __init__(self, shards: Sequence[str], counts: Dict[str, int], make_sample: Callable[[Dict], Any],
                 shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0, endless: bool = False):
        super().__init__()
        self.shards, self.counts, self.make_sample = list(shards), dict(counts), make_sample
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, int(shuffle_buffer), int(seed)
        self.endless = endless
        self._passes = 0

    def __len__(self) -> int:
        return sum(self.counts[s] for s in self.shards)

    def _pass_seed(self) -> str:
        info = torch.utils.data.get_worker_info()
        self._passes += 1
        # in a loader worker: the base seed the loader drew when it was iterated (equal in all its workers) and the
        # worker's own pass count; in the main process: the pass count
        base = (info.seed - info.id) if info is not None else 0
        return f"{self.seed}:{base}:{self._passes}"

    def __iter__(self):
        while True:
            yield from self._one_pass()
            if not self.endless:
                return

    def _one_pass(self):
        import webdataset as wds
        from webdataset.tariterators import group_by_keys, tar_file_expander

        rng = random.Random(self._pass_seed())
        shards = list(self.shards)
        if self.shuffle:
            rng.shuffle(shards)
        stages: List[Any] = [wds.SimpleShardList(shards), wds.split_by_worker, _open_stage, tar_file_expander,
                             group_by_keys]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))
        stages.append(wds.map(self.make_sample))
        return iter(wds.DataPipeline(*stages))


def load_npy(data: bytes, what: str):
    """A ``.npy`` member as an array (never unpickled)."""
    import numpy as np

    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{what}: not a plain .npy array ({e})") from None
