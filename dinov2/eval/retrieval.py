"""Cross-band retrieval (task id ``retrieval``): a label-free check of spectral invariance, usable on any
dataset.

Each eval sample is embedded twice, from two disjoint band subsets (e.g. visible vs. NIR/SWIR). For every
query embedding (subset A) we rank the key embeddings (subset B) of all samples by cosine similarity and count
how often the same sample is among the top k. Results: ``recall@k`` (in %, chance = k/N·100), ``median_rank``
of the true pair (1 = first, chance ~ N/2),
``mean_pair_cosine`` (mean cosine of the true pairs) and ``mean_other_cosine`` (mean cosine of all wrong pairs)
so the gap between the two is visible, plus ``n_samples``.

Band subsets are given per task in one of these forms, so one task file works for any sensor and band count:

- ``{wavelength_nm: [lo, hi]}`` or ``{wavelength_nm: [[lo, hi], [lo2, hi2], ...]}``: all channels whose chn_id
  lies in one of the ranges (nm; SAR ids are negative);
- ``{alternate: even}`` / ``{alternate: odd}``: every other channel in wavelength order (ranks 0, 2, 4, ... or
  1, 3, 5, ... of the channels sorted by chn_id), two interleaved halves of any stack with at least 2 bands;
- ``{sensor: <registry name>, bands: [<band key or name>, ...]}``: the channels whose chn_id is that of the named
  bands of that sensor (e.g. ``{sensor: landsat8, bands: [red, nir]}``);
- ``{channels: [i, ...]}``: fixed indices into the sample's channels (only for stacks of known layout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dinov2.eval import results as res
from dinov2.eval.features import select_channels
from dinov2.eval.registry import register_task
from dinov2.eval.task_common import build_dataset, extract, plain, seed_of

SUBSET_KEYS = ("channels", "wavelength_nm", "alternate", "bands")


def _ranges(value, what: str) -> List[Sequence[float]]:
    """``[lo, hi]`` or a list of such pairs, checked."""
    vals = list(value) if isinstance(value, (list, tuple)) else [value]
    pairs = vals if vals and isinstance(vals[0], (list, tuple)) else [vals]
    out = []
    for pair in pairs:
        pair = [float(v) for v in pair]
        if len(pair) != 2 or pair[0] > pair[1]:
            raise ValueError(f"{what}: wavelength_nm needs [lo, hi] ranges with lo <= hi, got {value}")
        out.append(pair)
    return out


def resolve_band_subset(spec: Mapping, chn_ids: torch.Tensor, what: str = "band subset") -> List[int]:
    """Channel indices selected by ``spec`` for a sample whose channel ids are ``chn_ids`` ((C,) or (C,2))."""
    ids = chn_ids[..., 0] if chn_ids.ndim == 2 else chn_ids
    ids = ids.float()
    n_ch = ids.shape[0]
    keys = set(spec) & set(SUBSET_KEYS)
    extra = set(spec) - set(SUBSET_KEYS) - {"sensor"}
    if len(keys) != 1 or extra or (("sensor" in spec) != ("bands" in spec)):
        raise ValueError(f"{what} must give exactly one of 'wavelength_nm', 'alternate', 'sensor' + 'bands' or "
                         f"'channels', got {dict(spec)}")
    if "channels" in spec:
        idx = [int(i) for i in spec["channels"]]
        bad = [i for i in idx if not 0 <= i < n_ch]
        if bad:
            raise ValueError(f"{what}: channel indices {bad} out of range for {n_ch} channels (chn_ids "
                             f"{ids.tolist()}); select by wavelength_nm, alternate or sensor + bands instead")
    elif "wavelength_nm" in spec:
        ranges = _ranges(spec["wavelength_nm"], what)
        idx = [i for i in range(n_ch) if any(lo <= float(ids[i]) <= hi for lo, hi in ranges)]
    elif "alternate" in spec:
        parity = str(spec["alternate"]).lower()
        if parity not in ("even", "odd"):
            raise ValueError(f"{what}: alternate must be 'even' or 'odd', got {spec['alternate']!r}")
        order = sorted(range(n_ch), key=lambda i: (float(ids[i]), i))
        idx = sorted(order[0 if parity == "even" else 1::2])
    else:
        from dinov2.data.sensors import band_chn_ids

        # compare integer ids (what the model embeds), so (mu, sigma) samples match too
        wanted = set(band_chn_ids(str(spec["sensor"]), [str(b) for b in spec["bands"]]).tolist())
        idx = [i for i in range(n_ch) if int(ids[i]) in wanted]
    if not idx:
        raise ValueError(f"{what} {dict(spec)} selects no channel of chn_ids {ids.tolist()}")
    return idx


def check_disjoint(idx_a: Sequence[int], idx_b: Sequence[int]) -> None:
    """The two subsets must not share channels (otherwise the task would be trivial)."""
    common = sorted(set(idx_a) & set(idx_b))
    if common:
        raise ValueError(f"Retrieval band subsets overlap in channels {common}; they must be disjoint")


@torch.no_grad()
def retrieval_metrics(emb_a: torch.Tensor, emb_b: torch.Tensor, ks: Sequence[int] = (1, 5),
                      chunk_size: int = 1024) -> Dict[str, float]:
    """Row i of ``emb_a`` should retrieve row i of ``emb_b`` among all rows of ``emb_b``.

    Ties count against the query (a true pair only counts at rank r if fewer than r keys score strictly higher
    and no tie pushes it out), so constant embeddings give chance-level recall, not 100%.
    """
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2:
        raise ValueError(f"Retrieval needs two (N, D) embeddings of equal shape, got {tuple(emb_a.shape)} and "
                         f"{tuple(emb_b.shape)}")
    n = emb_a.shape[0]
    if n < 2:
        raise ValueError(f"Retrieval needs at least 2 samples, got {n}")
    a = F.normalize(emb_a.float(), dim=1)
    b = F.normalize(emb_b.float(), dim=1)
    ranks, pair_cos, other_sum = [], [], 0.0
    for s in range(0, n, chunk_size):
        sims = a[s:s + chunk_size] @ b.T
        rows = torch.arange(sims.shape[0])
        true = sims[rows, rows + s]
        higher = (sims > true[:, None]).sum(1)
        ties = (sims == true[:, None]).sum(1) - 1  # other keys with exactly the same score
        ranks.append(higher + ties)  # pessimistic rank (0 = retrieved first)
        pair_cos.append(true)
        other_sum += float(sims.sum() - true.sum())
    rank = torch.cat(ranks)
    out = {f"recall@{k}": round(float((rank < k).float().mean()) * 100, 2) for k in ks}
    out["median_rank"] = float((rank + 1).float().median())  # 1 = the true pair is retrieved first
    out["mean_pair_cosine"] = round(float(torch.cat(pair_cos).mean()), 4)
    out["mean_other_cosine"] = round(other_sum / (n * (n - 1)), 4)
    out["n_samples"] = n
    return out


@register_task("retrieval", "default_eval_retrieval.yaml")
def run_retrieval_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Eval-CLI runner of ``task.id: retrieval``."""
    ds = build_dataset(cfg.test_dataset, seed_of(cfg))
    b2f = cfg.task.get("backbone_to_features", {})
    spec = (int(b2f.get("use_n_blocks", 1)), str(b2f.get("pooling", "knn")))
    query_spec, key_spec = plain(cfg.task.query_bands), plain(cfg.task.key_bands)
    seen: Dict[Tuple[tuple, tuple], int] = {}  # (query ids, key ids) -> number of samples (mixed sensors)

    def subset(which: str):
        def fn(x):  # one group of samples sharing channel ids
            ids = x["chn_ids"][0]
            idx_a = resolve_band_subset(query_spec, ids, "query_bands")
            idx_b = resolve_band_subset(key_spec, ids, "key_bands")
            check_disjoint(idx_a, idx_b)
            if which == "query":
                flat = ids[..., 0] if ids.ndim == 2 else ids
                pair = (tuple(flat[idx_a].tolist()), tuple(flat[idx_b].tolist()))
                seen[pair] = seen.get(pair, 0) + x["imgs"].shape[0]
            return select_channels(x, idx_a if which == "query" else idx_b)
        return fn

    fa, _ = extract(backbone, ds, [spec], cfg, device, "retrieval query", subset("query"))
    fb, _ = extract(backbone, ds, [spec], cfg, device, "retrieval key", subset("key"))
    ks = [int(k) for k in cfg.task.get("ks", [1, 5])]
    out = retrieval_metrics(fa[spec], fb[spec], ks)
    subsets = [{"query_chn_ids": list(q), "key_chn_ids": list(k), "n_samples": n} for (q, k), n in seen.items()]
    res.write_json(task_dir / "results_eval_retrieval.json",
                   dict(out, band_subsets=subsets, chance_recall_at_1=round(100.0 / out["n_samples"], 2)))
    first = subsets[0]
    note = f"query={first['query_chn_ids']} key={first['key_chn_ids']}"
    if len(subsets) > 1:
        note += f" (+{len(subsets) - 1} other sensor band sets)"
    rows = [(m, v, note) for m, v in out.items()]
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"cross-band retrieval {task_dir.name}",
                  bars={m: v for m, v in out.items() if m.startswith("recall@")})
    return dict(out)
