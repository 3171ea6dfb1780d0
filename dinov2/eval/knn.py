"""Weighted k-nearest-neighbour classification on frozen features (task id ``knn``).

Features are L2-normalised, similarity is cosine, and the k nearest training samples vote with weights
``softmax(sim / T)`` over those k neighbours. Multiclass: class score = summed weight of neighbours of that
class. Multilabel: one binary kNN per label, whose positive-class score (summed weight of neighbours carrying
the label, in [0, 1]) is that label's probability (no softmax across labels, so thresholded metrics stay
meaningful). Few-shot: the train set is subsampled to ``n`` samples per class, ``n_tries`` times, and metrics
are averaged over the tries; as in the published (DINOv2) code the k values of a few-shot run are
``sorted(set(nb_knn) | {n})`` without those above ``n`` (`few_shot_ks`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from dinov2.eval import results as res
from dinov2.eval.metrics import Metric, build_metrics, compute_metrics
from dinov2.eval.registry import register_task
from dinov2.eval.task_common import build_dataset, extract, num_classes_of, pct, plain, seed_of


def _targets_as_votes(labels: torch.Tensor, num_classes: int, multilabel: bool) -> torch.Tensor:
    if multilabel:
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ValueError(f"multilabel kNN needs (N, {num_classes}) multi-hot labels, got {tuple(labels.shape)}")
        return (labels > 0.5).float()
    if labels.ndim != 1:
        raise ValueError(f"multiclass kNN needs (N,) class labels, got shape {tuple(labels.shape)} (segmentation "
                         "masks are not supported; multi-hot labels need task.is_multilabel: true)")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"kNN labels must lie in [0, {num_classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return F.one_hot(labels, num_classes).float()


@torch.no_grad()
def knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
               ks: Sequence[int], num_classes: int, temperature: float = 0.07, multilabel: bool = False,
               chunk_size: int = 1024) -> Dict[int, torch.Tensor]:
    """Score every test sample against the train set; returns ``{k: scores (N_test, num_classes)}``."""
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"kNN needs (N, D) train/test features of equal D, got {tuple(train_feats.shape)} "
                         f"and {tuple(test_feats.shape)}")
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_feats.shape[0]} train features but {train_labels.shape[0]} train labels")
    if train_feats.shape[0] == 0:
        raise ValueError("kNN needs at least one training sample")
    votes = _targets_as_votes(train_labels, num_classes, multilabel)
    train_n = F.normalize(train_feats.float(), dim=1)
    max_k = min(max(ks), train_n.shape[0])
    out = {k: [] for k in ks}
    for start in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[start:start + chunk_size].float(), dim=1)
        sims, idx = (q @ train_n.T).topk(max_k, dim=1)
        for k in ks:
            kk = min(k, max_k)
            w = torch.softmax(sims[:, :kk] / temperature, dim=1)
            out[k].append(torch.einsum("bk,bkc->bc", w, votes[idx[:, :kk]]).clamp_(0.0, 1.0))
    empty = torch.zeros(0, num_classes)
    return {k: torch.cat(v) if v else empty for k, v in out.items()}


def few_shot_indices(labels: torch.Tensor, n_per_class: int, generator: torch.Generator,
                     multilabel: bool = False) -> torch.Tensor:
    """Pick ``n_per_class`` random training samples per class (all if a class has fewer).
    Multilabel: per label among the samples carrying it; the union is returned."""
    if multilabel:
        groups = [torch.nonzero(labels[:, c] > 0.5).flatten() for c in range(labels.shape[1])]
    else:
        labels = labels.long().reshape(-1)
        groups = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels).tolist()]
    chosen = [g[torch.randperm(g.numel(), generator=generator)[:n_per_class]] for g in groups if g.numel()]
    return torch.unique(torch.cat(chosen)) if chosen else torch.zeros(0, dtype=torch.long)


def few_shot_ks(ks: Sequence[int], n_per_class: int) -> List[int]:
    """The k values evaluated with ``n_per_class`` samples per class: the configured ks plus ``n`` itself, keeping
    only k <= n (``n_per_class < 0``, the full train set, keeps the configured ks)."""
    if n_per_class < 0:
        return [int(k) for k in ks]
    return sorted(k for k in {int(k) for k in ks} | {int(n_per_class)} if 0 < k <= n_per_class)


def run_knn(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
            test_labels: torch.Tensor, metrics: Sequence[Metric], num_classes: int, ks: Sequence[int] = (20,),
            temperature: float = 0.07, multilabel: bool = False, n_per_class_list: Sequence[int] = (-1,),
            n_tries: int = 1, seed: int = 42) -> Dict[Tuple[str, int], Dict[str, float]]:
    """All kNN classifiers of a task. Keys ``('full', k)`` or ``(n_per_class, k)``; values
    ``{metric: fraction}`` (few-shot results averaged over ``n_tries`` random subsets)."""
    results: Dict[Tuple[str, int], Dict[str, float]] = {}
    gen = torch.Generator().manual_seed(seed)
    for npc in n_per_class_list:
        tries = 1 if npc < 0 else max(1, n_tries)
        npc_ks = few_shot_ks(ks, npc)
        if not npc_ks:
            raise ValueError(f"kNN few-shot n_per_class={npc} leaves no k to evaluate (nb_knn={list(ks)})")
        acc: Dict[int, List[Dict[str, float]]] = {k: [] for k in npc_ks}
        for _ in range(tries):
            if npc < 0:
                tf, tl = train_feats, train_labels
            else:
                sel = few_shot_indices(train_labels, npc, gen, multilabel)
                tf, tl = train_feats[sel], train_labels[sel]
            scores = knn_scores(tf, tl, test_feats, npc_ks, num_classes, temperature, multilabel)
            for k in npc_ks:
                acc[k].append(compute_metrics(metrics, scores[k], test_labels))
        for k in npc_ks:
            key = ("full" if npc < 0 else str(npc), int(k))
            results[key] = {m: sum(r[m] for r in acc[k]) / len(acc[k]) for m in acc[k][0]}
    return results


def best_per_metric(results: Dict[Tuple[str, int], Dict[str, float]]) -> Dict[str, Tuple[float, str]]:
    """For each metric the best classifier over all keys (the running best is reset per metric, unlike the
    published code)."""
    best: Dict[str, Tuple[float, str]] = {}
    for key, vals in results.items():
        for m, v in vals.items():
            if m not in best or v > best[m][0]:
                best[m] = (v, str(key))
    return best


@register_task("knn", "default_eval_knn.yaml")
def run_knn_task(cfg, backbone, task_dir: Path, device: Optional[str]) -> Dict[str, float]:
    """Eval-CLI runner of ``task.id: knn``: train -> test kNN on frozen features; writes ``results_eval_knn.json``
    (every (n_per_class, k)) and ``results.csv`` (best per metric)."""
    seed = seed_of(cfg)
    b2f = cfg.task.get("backbone_to_features", {})
    spec = (int(b2f.get("use_n_blocks", 1)), str(b2f.get("pooling", "knn")))
    train_ds, test_ds = build_dataset(cfg.train_dataset, seed), build_dataset(cfg.test_dataset, seed)
    ncls = num_classes_of(train_ds, cfg)
    tr_f, tr_y = extract(backbone, train_ds, [spec], cfg, device, "knn train")
    te_f, te_y = extract(backbone, test_ds, [spec], cfg, device, "knn test")
    heads = cfg.get("heads", {})
    out = run_knn(tr_f[spec], tr_y, te_f[spec], te_y, build_metrics(plain(cfg.task.metrics)), ncls,
                  ks=[int(k) for k in heads.get("nb_knn", [20])], temperature=float(heads.get("temperature", 0.07)),
                  multilabel=bool(cfg.task.get("is_multilabel", False)),
                  n_per_class_list=[int(n) for n in heads.get("n_per_class_list", [-1])],
                  n_tries=int(heads.get("n_tries", 1)), seed=seed)
    res.write_json(task_dir / "results_eval_knn.json",
                   {str(k): {m: pct(v) for m, v in vals.items()} for k, vals in out.items()})
    best = best_per_metric(out)
    rows = [(m, pct(v), clf) for m, (v, clf) in best.items()]
    res.write_task_csv(task_dir, rows)
    res.plot_task(task_dir / "plots.png", f"kNN {task_dir.name}",
                  bars={f"{m} {k}": pct(v) for k, vals in out.items() for m, v in vals.items()})
    return {m: v for m, v, _ in rows}
