"""Index samplers: endless shuffled streams for training, finite epochs for evaluation.

All samplers are deterministic for a seed (own `torch.Generator`, never the global RNG) and sharded by rank:
rank r of a world of w takes positions r, r+w, r+2w, ... of the global stream (`dinov2.distributed`, falling back
to an initialised `torch.distributed` process group).
"""
from __future__ import annotations

import itertools
from typing import Iterator, Optional, Tuple

import torch
from torch.utils.data import Sampler


def rank_and_world() -> Tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    try:
        from dinov2 import distributed

        return distributed.get_rank(), distributed.get_world_size()
    except ImportError:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1


def _shard(start: Optional[int], step: Optional[int]) -> Tuple[int, int]:
    rank, world = rank_and_world()
    start = rank if start is None else int(start)
    step = world if step is None else int(step)
    if step < 1 or not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start}, step={step}")
    return start, step


class InfiniteSampler(Sampler):
    """Endless index stream: a fresh `randperm` per pass (or 0..n-1 repeated if not shuffled), sharded by rank.
    `advance` skips that many of this rank's indices (exact resume after `advance` samples).

    With `with_positions` it yields `(index, position)` pairs, `position` being the index's place in the global
    (all-rank) stream: unique per drawn sample and independent of data-loader workers, so per-sample randomness
    can be derived from it (`dinov2.data.sample_stream`)."""

    def __init__(self, sample_count: int, shuffle: bool = True, seed: int = 0, start: Optional[int] = None,
                 step: Optional[int] = None, advance: int = 0, with_positions: bool = False):
        if sample_count < 1:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got sample_count={sample_count}")
        if advance < 0:
            raise ValueError(f"advance must be >= 0, got {advance}")
        self.n, self.shuffle, self.seed, self.advance = int(sample_count), shuffle, int(seed), int(advance)
        self.start, self.step = _shard(start, step)
        self.with_positions = bool(with_positions)

    def _global_stream(self, first_pass: int) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        for p in itertools.count():
            perm = torch.randperm(self.n, generator=gen) if self.shuffle else None
            if p < first_pass:
                continue  # the permutation was drawn to keep the generator state exact
            yield from (perm.tolist() if perm is not None else range(self.n))

    def __iter__(self) -> Iterator:
        skip = self.start + self.advance * self.step  # global position of this rank's first index
        first_pass, offset = divmod(skip, self.n)
        indices = itertools.islice(self._global_stream(first_pass), offset, None, self.step)
        if not self.with_positions:
            return indices
        return zip(indices, itertools.count(skip, self.step))


class EpochSampler(Sampler):
    """One pass of `size` indices (the dataset tiled/cut to `size`, default its length), shuffled per epoch with
    seed + epoch if `shuffle`, sharded by rank without padding (no duplicated samples in evaluation)."""

    def __init__(self, sample_count: int, size: Optional[int] = None, shuffle: bool = False, seed: int = 0,
                 start: Optional[int] = None, step: Optional[int] = None):
        self.n, self.size = int(sample_count), int(sample_count if size is None else size)
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0
        self.start, self.step = _shard(start, step)

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle of the next pass."""
        self.epoch = int(epoch)

    def _indices(self) -> torch.Tensor:
        idx = torch.arange(self.size) % max(self.n, 1)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = idx[torch.randperm(self.size, generator=gen)]
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start::self.step].tolist())

    def __len__(self) -> int:
        return len(range(self.start, self.size, self.step))
