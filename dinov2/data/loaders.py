"""Dataset factory (`make_dataset`) and DataLoader construction (`make_data_loader`)."""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from dinov2.data.samplers import EpochSampler, InfiniteSampler

logger = logging.getLogger("dinov2")
COMPOSITE_IDS = ("ConcatDataset",)


def _plain(cfg: Any) -> Any:
    """OmegaConf / mapping -> plain Python containers (deep copy)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, (DictConfig, ListConfig)):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return copy.deepcopy(cfg)


class ConcatDatasetTrf(ConcatDataset):
    """`torch.utils.data.ConcatDataset` that applies an optional transform to every sample."""

    def __init__(self, datasets: Sequence[Dataset], transform: Optional[Callable] = None):
        super().__init__(list(datasets))
        self.transform = transform

    def __getitem__(self, idx: int):
        sample = super().__getitem__(idx)
        return self.transform(sample) if self.transform is not None else sample


def subset_indices(n: int, subset: float, seed: int) -> Optional[torch.Tensor]:
    """Indices selected by a `subset` value: -1/None -> all (None); float in (0,1) -> that fraction at random;
    1.0 -> all; int k < n -> k at random (without replacement); int k >= n -> 0..n-1 tiled to length k
    (super-sampling)."""
    if subset is None or subset == -1:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    if isinstance(subset, float) and subset == 1.0:
        return None
    if isinstance(subset, float) and not float(subset).is_integer():
        if not 0.0 < subset < 1.0:
            raise ValueError(f"a fractional subset must be in (0, 1), got {subset}")
        k = max(int(subset * n), 1)
        return torch.multinomial(torch.ones(n), k, replacement=False, generator=gen)
    k = int(subset)
    if k < 1:
        raise ValueError(f"subset must be -1, a fraction in (0,1) or a positive count, got {subset}")
    if k < n:
        return torch.multinomial(torch.ones(n), k, replacement=False, generator=gen)
    return torch.arange(k) % n


def _build_transform(cfg_list: List[Any]) -> Optional[Callable]:
    if not cfg_list:
        return None
    from dinov2.data.augmentations import make_augmentation

    return make_augmentation(cfg_list)


def make_dataset(cfg: Dict[str, Any], pretrain_augm_cfg: Optional[Dict[str, Any]] = None,
                 seed: int = 42) -> Dataset:
    """Build a dataset from a config dict: `id` selects the class (`ConcatDataset` with `datasets: [...]` for a
    concatenation), `transform` is a list of augmentation configs to which the pretraining augmentation
    (`pretrain_augm_cfg` updated with `pretrain_augm_overwrites`) is appended, `subset` selects a subset, and
    all other keys are constructor arguments."""
    cfg = _plain(cfg)
    if not isinstance(cfg, dict) or "id" not in cfg:
        raise ValueError(f"dataset config needs an 'id' key, got {cfg!r}")
    ds_id = cfg.pop("id")
    transform_cfg = list(cfg.pop("transform", None) or [])
    subset = cfg.pop("subset", -1)
    overwrites = cfg.pop("pretrain_augm_overwrites", None) or {}
    if ds_id == "ConcatDataset":
        children = cfg.pop("datasets", None)
        if not children:
            raise ValueError("ConcatDataset config needs a non-empty 'datasets' list")
        if cfg:
            raise ValueError(f"unexpected ConcatDataset keys {sorted(cfg)}")
        child_augm = pretrain_augm_cfg
        if overwrites:  # overwrites at the concatenation level apply to every child's pretraining augmentation
            if pretrain_augm_cfg is None:
                raise ValueError("ConcatDataset: pretrain_augm_overwrites given without a pretraining augmentation")
            child_augm = {**_plain(pretrain_augm_cfg), **_plain(overwrites)}
        parts = [make_dataset(c, child_augm, seed) for c in children]
        dataset: Dataset = ConcatDatasetTrf(parts, _build_transform(transform_cfg))
    else:
        if pretrain_augm_cfg is not None:
            augm = dict(_plain(pretrain_augm_cfg))
            augm.update(_plain(overwrites))
            transform_cfg.append(augm)
        elif overwrites:
            raise ValueError(f"dataset {ds_id!r}: pretrain_augm_overwrites given without a pretraining augmentation")
        from dinov2.data.datasets import get_dataset_class

        cls = get_dataset_class(ds_id)
        if ds_id.startswith("geobench."):
            cfg.setdefault("ds_name", ds_id.split(".", 1)[1])
        if getattr(cls, "SHARD_SUBSET", False):  # streamed shards: `subset` picks shards (seeded), not samples
            cfg.update(subset=subset, seed=cfg.get("seed", seed))
            subset = -1
        try:
            dataset = cls(transform=_build_transform(transform_cfg), **cfg)
        except TypeError as e:
            raise TypeError(f"dataset {ds_id!r} ({cls.__name__}) rejected its config keys {sorted(cfg)}: {e}") from e
    idx = subset_indices(len(dataset), subset, seed)
    if idx is not None:
        logger.info("dataset %s: subset %s -> %d of %d samples", ds_id, subset, len(idx), len(dataset))
        dataset = Subset(dataset, idx.tolist())
    dataset.is_webdataset = isinstance(dataset, torch.utils.data.IterableDataset)
    return dataset


def make_sampler(dataset: Dataset, sampler_type: str = "infinite", shuffle: bool = True, seed: int = 0,
                 sampler_advance: int = 0, with_positions: bool = False) -> Sampler:
    """'infinite' (training) -> InfiniteSampler; 'epoch' / 'distributed' (evaluation) -> one sharded pass."""
    n = len(dataset)
    if sampler_type == "infinite":
        return InfiniteSampler(n, shuffle=shuffle, seed=seed, advance=sampler_advance, with_positions=with_positions)
    if with_positions:
        raise ValueError("stream positions (per-sample seeding) need sampler_type='infinite'")
    if sampler_type in ("epoch", "distributed"):
        if sampler_advance:
            raise ValueError(f"sampler_advance is only supported by the infinite sampler, got {sampler_advance}")
        return EpochSampler(n, shuffle=shuffle, seed=seed)
    raise ValueError(f"unknown sampler_type {sampler_type!r}; use 'infinite', 'epoch' or 'distributed'")


def make_data_loader(dataset: Dataset, batch_size: int, num_workers: int, sampler_type: str = "infinite",
                     shuffle: bool = True, seed: int = 0, sampler_advance: int = 0, drop_last: bool = True,
                     pin_memory: bool = False, persistent_workers: bool = False,
                     collate_fn: Optional[Callable] = None, per_sample_seeding: bool = False,
                     max_sample_replacements: int = 10,
                     worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """DataLoader over `dataset` with a rank-sharded, seeded sampler.

    Default: worker RNGs are derived from torch's global RNG (DataLoader default), so `torch.manual_seed` makes
    augmentations reproducible for a fixed number of workers. With `per_sample_seeding` (training; needs the
    infinite sampler) every sample and batch is seeded from `(seed, stream position)`, independent of workers,
    so a resumed stream (`sampler_advance`) is bit-identical; unreadable samples are then replaced (up to
    `max_sample_replacements` in a row) and reported in `batch['bad_samples']` (`dinov2.data.sample_stream`)."""
    if isinstance(dataset, torch.utils.data.IterableDataset):  # streamed shards order and split themselves
        if per_sample_seeding or sampler_advance:
            logger.warning("data loader: %s streams its samples; a resumed run continues with a new seeded order "
                           "(no per-sample seeding or exact stream positions)", type(dataset).__name__)
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                          pin_memory=pin_memory, worker_init_fn=worker_init_fn, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(int(seed) + int(sampler_advance)),
                          persistent_workers=persistent_workers and num_workers > 0)
    sampler = make_sampler(dataset, sampler_type, shuffle, seed, sampler_advance, with_positions=per_sample_seeding)
    generator = None
    if per_sample_seeding:
        from dinov2.data.sample_stream import PositionedSamples, SeededCollate, derive_seed
        from dinov2.data.samplers import rank_and_world

        dataset = PositionedSamples(dataset, seed, max_replacements=max_sample_replacements)
        collate_fn = SeededCollate(collate_fn, seed)
        # worker base seeds from (seed, rank, stream start), not from the training process's global RNG
        generator = torch.Generator().manual_seed(derive_seed(seed, rank_and_world()[0], sampler_advance))
    logger.info("data loader: %s sampler, batch %d, %d workers", sampler_type, batch_size, num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=drop_last, pin_memory=pin_memory, generator=generator, worker_init_fn=worker_init_fn,
                      persistent_workers=persistent_workers and num_workers > 0, collate_fn=collate_fn)
