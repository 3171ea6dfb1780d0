"""Worker-independent randomness and bad-sample replacement for the training stream.

The training sampler yields `(index, position)` pairs, `position` being the sample's place in the global stream
(see `InfiniteSampler(with_positions=True)`). Every sample's augmentation runs with the python, numpy and torch
CPU RNGs seeded from `(seed, position, attempt)`, and every batch's collate (iBOT masks) from `(seed, position of
its first sample)`. The result therefore depends neither on the number of data-loader workers nor on which worker
loaded a sample, and a resumed run that restarts the stream at the right position draws exactly the same crops.

A sample whose files cannot be read is replaced by another index drawn from `(seed, position, attempt)` (so the
replacement is the same after a resume), and the failure travels with the batch (`batch['bad_samples']`) to the
training loop, which records it (`dinov2.train.bad_samples`).
"""
from __future__ import annotations

import random
import re
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

SAMPLE, COLLATE, REPLACE = 0, 1, 2  # salts: independent streams for augmentation, collate and replacement
BAD_SAMPLES_KEY = "bad_samples"
# errors a corrupt/unreadable file produces (decoders, shape checks, dataset retry exhaustion); programming
# errors (TypeError, KeyError, AttributeError, ...) are not treated as bad data and stop the run
BAD_SAMPLE_ERRORS = (OSError, ValueError, RuntimeError, EOFError)
_UNREADABLE_LIST = re.compile(r"unreadable: ([^,]+)")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy SeedSequence hashing: nearby inputs give unrelated seeds)."""
    entropy = [int(p) % (1 << 64) for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with python `random`, numpy's global RNG and torch's CPU generator seeded from `seed`. In the
    training process their previous states are restored afterwards (its RNG streams are left untouched); in a
    data-loader worker, where every sample and batch is seeded afresh, the save/restore is skipped (it costs more
    than the seeding)."""
    from torch.utils.data import get_worker_info

    saved = None if get_worker_info() is not None else (random.getstate(), np.random.get_state(),
                                                          torch.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.default_generator.manual_seed(seed)  # CPU only: CUDA generators of the training process stay as they are
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


def failing_file(error: BaseException) -> Optional[str]:
    """The file named by an error (its `path`/`filename`, a cause's, or a dataset's 'unreadable: <path>' list)."""
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for attr in ("path", "filename"):
            val = getattr(e, attr, None)
            if isinstance(val, (str, bytes)) and val:
                return val if isinstance(val, str) else val.decode(errors="replace")
        m = _UNREADABLE_LIST.search(str(e))
        if m:
            return m.group(1).strip()
        e = e.__cause__ or e.__context__
    return None


class StreamItem(NamedTuple):
    """One loaded sample with its stream position and the failures replaced on the way to it."""
    sample: Any
    position: int
    failures: List[Dict[str, Any]]


class TooManyReplacementsError(RuntimeError):
    """Every replacement of one stream position failed as well."""


class PositionedSamples(Dataset):
    """Wraps a map-style dataset for a sampler yielding `(index, position)`: seeds each sample from its position
    and replaces unreadable samples (up to `max_replacements` in a row) deterministically."""

    def __init__(self, dataset: Dataset, seed: int, max_replacements: int = 10):
        if max_replacements < 0:
            raise ValueError(f"max_replacements must be >= 0, got {max_replacements}")
        self.dataset, self.seed, self.max_replacements = dataset, int(seed), int(max_replacements)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> StreamItem:
        try:
            idx, pos = (int(k) for k in key)
        except (TypeError, ValueError):
            raise TypeError(f"PositionedSamples expects (index, position) keys from InfiniteSampler("
                            f"with_positions=True), got {key!r}") from None
        failures: List[Dict[str, Any]] = []
        for attempt in range(self.max_replacements + 1):
            try:
                with seeded_rng(derive_seed(self.seed, SAMPLE, pos, attempt)):
                    return StreamItem(self.dataset[idx], pos, failures)
            except BAD_SAMPLE_ERRORS as e:
                if isinstance(e, TooManyReplacementsError):
                    raise
                failures.append({"index": idx, "position": pos, "file": failing_file(e),
                                 "error": f"{type(e).__name__}: {e}"})
            with seeded_rng(derive_seed(self.seed, REPLACE, pos, attempt)):
                idx = int(torch.randint(len(self.dataset), ()).item())
        listed = "; ".join(f"index {f['index']}: {f['error']}" for f in failures)
        raise TooManyReplacementsError(f"stream position {pos}: the sample and {self.max_replacements} "
                                       f"replacements all failed: {listed}")


class SeededCollate:
    """Collate `StreamItem`s with the RNGs seeded from the batch's first position; the replaced samples' failure
    records go into the batch dict under `'bad_samples'`."""

    def __init__(self, collate_fn: Optional[Callable], seed: int):
        self.collate_fn, self.seed = collate_fn, int(seed)

    def __call__(self, items: List[StreamItem]) -> Dict[str, Any]:
        from torch.utils.data import default_collate

        fn = self.collate_fn or default_collate
        with seeded_rng(derive_seed(self.seed, COLLATE, items[0].position)):
            batch = fn([it.sample for it in items])
        if not isinstance(batch, dict):
            raise TypeError(f"the training collate must return a dict, got {type(batch).__name__}")
        batch[BAD_SAMPLES_KEY] = [f for it in items for f in it.failures]
        return batch
