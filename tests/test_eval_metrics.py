"""Metrics, kNN, linear probes and retrieval on synthetic feature tensors (no backbone)."""
import numpy as np
import pytest
import torch

from dinov2.eval.features import backbone_to_features
from dinov2.eval.knn import best_per_metric, few_shot_indices, run_knn
from dinov2.eval.linear import head_name, train_linear_probes
from dinov2.eval.metrics import (build_metric, build_metrics, compute_metrics, multiclass_accuracy,
                                 multilabel_accuracy, multilabel_average_precision, multilabel_f1)
from dinov2.eval.retrieval import check_disjoint, resolve_band_subset, retrieval_metrics

ACC = [{"id": "MulticlassAccuracy", "top_k": 1, "average": "micro"},
       {"id": "MulticlassAccuracy", "top_k": 1, "average": "macro"}]


def blobs(n=400, c=5, d=16, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(c, d, generator=g)[y] * spread + torch.randn(n, d, generator=g)
    return x, y


def test_metric_key_names():
    names = [build_metric(c).name for c in [
        {"id": "MulticlassAccuracy", "top_k": 5, "average": "macro"}, {"id": "MultilabelAccuracy"},
        {"id": "MultiLabelAveragePrecision", "average": "micro"}, {"id": "MultiLabelF1Score", "average": "micro"}]]
    assert names == ["acc_top-5_macro", "MulLabAcc_top-1_micro", "MulLabAvergPrec_micro",
                     "MulLabF1ScoreMacro_micro"]
    with pytest.raises(ValueError, match="Unknown metric id 'Nope'"):
        build_metric({"id": "Nope"})
    with pytest.raises(ValueError, match="Duplicate"):
        build_metrics([ACC[0], ACC[0]])


def test_multiclass_accuracy_exact_values():
    preds = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    target = torch.tensor([0, 2, 2, 1])
    assert multiclass_accuracy(preds, target) == pytest.approx(0.5)
    # per class: c0 1/1, c1 0/1, c2 1/2 -> macro 0.5; top-2 hits: all but none missing -> 1.0
    assert multiclass_accuracy(preds, target, average="macro") == pytest.approx((1 + 0 + 0.5) / 3)
    assert multiclass_accuracy(preds, target, top_k=2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="target class ids"):
        multiclass_accuracy(preds, torch.tensor([0, 1, 2, 3]))


def test_multilabel_metrics_exact_values():
    target = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]]).float()
    preds = torch.tensor([[0.9, 0.2], [0.4, 0.8], [0.3, 0.7], [0.1, 0.6]])
    # label 0: ranking 0.9(+),0.4(-),0.3(+),0.1(-) -> AP = (1 + 2/3)/2; label 1: 0.8(+),0.7(+),0.6(-),0.2(-) -> 1
    assert multilabel_average_precision(preds, target) == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert multilabel_average_precision(target, target, average="micro") == pytest.approx(1.0)
    # threshold 0.5: predicted [[1,0],[0,1],[0,1],[0,1]] -> 6/8 correct
    assert multilabel_accuracy(preds, target) == pytest.approx(6 / 8)
    # F1 micro: tp 3, fp 1, fn 1 -> 6/8
    assert multilabel_f1(preds, target, average="micro") == pytest.approx(6 / 8)
    with pytest.raises(ValueError, match="multilabel target"):
        multilabel_f1(preds, target[:, :1])


def test_knn_separable_vs_shuffled():
    x, y = blobs()
    metrics = build_metrics(ACC)
    res = run_knn(x[:300], y[:300], x[300:], y[300:], metrics, 5, ks=[1, 20])
    assert res[("full", 20)]["acc_top-1_micro"] > 0.98
    y_shuf = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    res = run_knn(x[:300], y_shuf[:300], x[300:], y_shuf[300:], metrics, 5, ks=[20])
    assert abs(res[("full", 20)]["acc_top-1_micro"] - 0.2) < 0.12
    best = best_per_metric({("full", 1): {"a": 0.5, "b": 0.9}, ("full", 2): {"a": 0.7, "b": 0.1}})
    assert best == {"a": (0.7, "('full', 2)"), "b": (0.9, "('full', 1)")}


def test_knn_few_shot_and_multilabel():
    x, y = blobs()
    idx = few_shot_indices(y, 3, torch.Generator().manual_seed(0))
    assert len(idx) == 15 and torch.bincount(y[idx]).tolist() == [3] * 5
    res = run_knn(x[:300], y[:300], x[300:], y[300:], build_metrics(ACC), 5, ks=[5], n_per_class_list=[-1, 2],
                  n_tries=3)
    assert set(res) == {("full", 5), ("2", 2)} and res[("2", 2)]["acc_top-1_micro"] > 0.9  # few-shot k <= n
    g = torch.Generator().manual_seed(0)
    Y = (torch.rand(400, 6, generator=g) < 0.3).float()
    X = Y @ torch.randn(6, 16, generator=g) * 3 + 0.3 * torch.randn(400, 16, generator=g)
    ml = build_metrics([{"id": "MultiLabelAveragePrecision", "average": "macro"}, {"id": "MultilabelAccuracy"}])
    good = run_knn(X[:300], Y[:300], X[300:], Y[300:], ml, 6, ks=[10], multilabel=True)[("full", 10)]
    bad = run_knn(X[:300], Y[torch.randperm(400, generator=g)][:300], X[300:], Y[300:], ml, 6, ks=[10],
                  multilabel=True)[("full", 10)]
    assert good["MulLabAvergPrec_macro"] > 0.9 and bad["MulLabAvergPrec_macro"] < 0.5
    assert good["MulLabAcc_top-1_micro"] > 0.9


def test_linear_probes_separable_vs_shuffled():
    x, y = blobs(seed=3)
    metrics = build_metrics(ACC)

    def fit(labels):
        feats = lambda s: {(1, "cls"): x[s], (1, "avgpool"): torch.cat([x[s], -x[s]], 1)}  # noqa: E731
        return train_linear_probes((feats(slice(0, 250)), labels[:250]), (feats(slice(250, 320)), labels[250:320]),
                                   {"test": (feats(slice(320, 400)), labels[320:])}, 5, metrics, [1e-3, 0.1, 1.0],
                                   epochs=10, batch_size=32)

    out = fit(y)
    assert out["test"]["test"]["acc_top-1_micro"] > 0.97
    assert out["best_classifier"] in {head_name(1, p, lr) for p in ("cls", "avgpool") for lr in (1e-3, 0.1, 1.0)}
    assert len(out["all_val"]) == 6 and out["val_curve"][-1][0] == out["max_iter"]
    shuffled = fit(y[torch.randperm(400, generator=torch.Generator().manual_seed(5))])
    assert shuffled["test"]["test"]["acc_top-1_micro"] < 0.4
    assert head_name(4, "avgpool", 0.0005) == "classifier_4_blocks_pooling_avgpool_lr_0_00050"


def test_retrieval_metrics():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 32, generator=g)
    same = retrieval_metrics(emb, emb * 2.0)
    assert same["recall@1"] == 100.0 and same["recall@5"] == 100.0 and same["mean_pair_cosine"] == pytest.approx(1)
    assert same["median_rank"] == 1.0
    noise = retrieval_metrics(emb, torch.randn(300, 32, generator=g))
    assert noise["recall@1"] < 3.0 and noise["recall@5"] < 6.0 and abs(noise["mean_pair_cosine"]) < 0.1
    assert 100 < noise["median_rank"] < 200  # chance: about N / 2
    const = retrieval_metrics(torch.ones(10, 4), torch.ones(10, 4))  # ties never count as hits
    assert const["recall@1"] == 0.0
    with pytest.raises(ValueError, match="equal shape"):
        retrieval_metrics(emb, emb[:5])


def test_band_subsets():
    ids = torch.tensor([442, 492, 559, 664, 704, 827, 1613, -1], dtype=torch.int16)
    assert resolve_band_subset({"wavelength_nm": [400, 700]}, ids) == [0, 1, 2, 3]
    assert resolve_band_subset({"wavelength_nm": [701, 2500]}, ids) == [4, 5, 6]
    assert resolve_band_subset({"wavelength_nm": [-12, -1]}, ids) == [7]
    assert resolve_band_subset({"channels": [1, 2]}, torch.stack([ids.float(), ids.float()], 1)) == [1, 2]
    with pytest.raises(ValueError, match="selects no channel"):
        resolve_band_subset({"wavelength_nm": [3000, 4000]}, ids)
    with pytest.raises(ValueError, match="out of range"):
        resolve_band_subset({"channels": [9]}, ids)
    with pytest.raises(ValueError, match="overlap in channels \\[2\\]"):
        check_disjoint([1, 2], [2, 3])


def test_backbone_to_features_poolings():
    norm = torch.nn.LayerNorm(8)
    blocks = [(torch.randn(2, 4, 8), torch.randn(2, 8)) for _ in range(3)]
    assert backbone_to_features(blocks, 1, "avgpool", norm).shape == (2, 16)
    assert backbone_to_features(blocks, 3, "avgpool", norm).shape == (2, 32)
    assert backbone_to_features(blocks, 2, "cls", norm).shape == (2, 16)
    knn = backbone_to_features(blocks, 1, "knn", norm)
    assert torch.allclose(knn.norm(dim=1), torch.ones(2))
    assert torch.allclose(backbone_to_features(blocks, 1, "lin", norm), norm(blocks[-1][1]))
    assert torch.allclose(backbone_to_features(blocks, 1, "DOFA_globalpool", norm), norm(blocks[-1][0].mean(1)))
    with pytest.raises(ValueError, match="use_n_blocks=4"):
        backbone_to_features(blocks, 4, "cls", norm)
    with pytest.raises(ValueError, match="Unknown pooling"):
        backbone_to_features(blocks, 1, "max", norm)


def test_label_shape_errors():
    x, y = blobs(n=20)
    with pytest.raises(ValueError, match="segmentation"):
        run_knn(x, torch.zeros(20, 4, 4), x, y, build_metrics(ACC), 5)
    with pytest.raises(ValueError, match=r"multilabel linear probing needs labels of shape \(N, 5\)"):
        train_linear_probes(({(1, "cls"): x}, y), ({(1, "cls"): x}, y), {}, 5, build_metrics(ACC), [0.1],
                            multilabel=True)


# ------------------------------------------------------------------- metrics against independent numpy oracles
def np_topk_hit(preds, target, k):
    return (np.argsort(-preds, axis=1)[:, :k] == target[:, None]).any(axis=1)


def np_multiclass_acc(preds, target, k, average, present_only=False):
    hit = np_topk_hit(preds, target, min(k, preds.shape[1]))
    if average == "micro":
        return hit.mean()
    classes = [c for c in range(preds.shape[1]) if not present_only or (target == c).any()]
    return np.mean([hit[target == c].mean() if (target == c).any() else 0.0 for c in classes])


def np_decisions(preds, top_k=None):
    if top_k:
        out = np.zeros_like(preds, dtype=int)
        np.put_along_axis(out, np.argsort(-preds, axis=1)[:, :top_k], 1, axis=1)
        return out
    probs = 1 / (1 + np.exp(-preds)) if preds.min() < 0 or preds.max() > 1 else preds
    return (probs > 0.5).astype(int)


def np_average_precision(scores, t):
    """Mean of the precision at the rank of each positive (valid without tied scores)."""
    t = t[np.argsort(-scores)]
    precision = np.cumsum(t) / np.arange(1, len(t) + 1)
    return (precision * t).sum() / t.sum()


def np_f1(pred, target, average):
    tp, fp, fn = (pred * target).sum(0), (pred * (1 - target)).sum(0), ((1 - pred) * target).sum(0)
    if average == "micro":
        return 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())
    denom = 2 * tp + fp + fn
    return np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_metrics_match_oracle_with_absent_classes(seed):
    rng = np.random.default_rng(seed)
    preds = rng.normal(size=(50, 7)).astype(np.float32)
    target = rng.integers(0, 5, size=50)  # classes 5 and 6 never occur in the targets
    preds[:, 6] -= 10.0  # ... and class 6 is never predicted either
    cfg = [{"id": "MulticlassAccuracy", "top_k": k, "average": a} for k in (1, 3, 9) for a in ("micro", "macro")]
    got = compute_metrics(build_metrics(cfg), torch.from_numpy(preds), torch.from_numpy(target))
    for k in (1, 3, 9):
        assert got[f"acc_top-{k}_micro"] == pytest.approx(np_multiclass_acc(preds, target, k, "micro"), abs=1e-6)
        assert got[f"acc_top-{k}_macro"] == pytest.approx(np_multiclass_acc(preds, target, k, "macro"), abs=1e-6)
        assert got[f"acc_top-{k}_macro_present_classes"] == pytest.approx(
            np_multiclass_acc(preds, target, k, "macro", present_only=True), abs=1e-6)
    assert got["acc_top-9_micro"] == 1.0  # top_k beyond the class count is clipped


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scores", ["logits", "probabilities"])
def test_multilabel_metrics_match_oracle_with_absent_labels(seed, scores):
    rng = np.random.default_rng(seed)
    target = (rng.random((60, 6)) < 0.3).astype(int)
    target[:, 2] = 0  # a label without any positive
    preds = rng.normal(size=(60, 6)).astype(np.float32)
    if scores == "probabilities":
        preds = 1 / (1 + np.exp(-preds))
    cfg = ([{"id": "MultilabelAccuracy", "top_k": k, "average": a} for k in (1, 2) for a in ("micro", "macro")]
           + [{"id": i, "average": a} for i in ("MultiLabelAveragePrecision", "MultiLabelF1Score")
              for a in ("micro", "macro")])
    got = compute_metrics(build_metrics(cfg), torch.from_numpy(preds), torch.from_numpy(target).float())
    thr, top2 = np_decisions(preds), np_decisions(preds, top_k=2)
    for avg, axis in (("micro", None), ("macro", 0)):
        acc = np.mean(np.mean(thr == target, axis=axis))
        assert got[f"MulLabAcc_top-1_{avg}"] == pytest.approx(acc, abs=1e-6)
        assert got[f"MulLabAcc_top-2_{avg}"] == pytest.approx(acc, abs=1e-6)  # published: top_k ignored
        assert got[f"MulLabAcc_top-2_{avg}_topk_applied"] == pytest.approx(np.mean(np.mean(top2 == target, axis=axis)),
                                                                            abs=1e-6)
        assert got[f"MulLabF1ScoreMacro_{avg}"] == pytest.approx(np_f1(thr, target, avg), abs=1e-6)
    per_label = [np_average_precision(preds[:, c], target[:, c]) for c in range(6) if target[:, c].any()]
    assert len(per_label) == 5
    assert got["MulLabAvergPrec_macro"] == pytest.approx(np.mean(per_label), abs=1e-6)
    assert got["MulLabAvergPrec_micro"] == pytest.approx(np_average_precision(preds.ravel(), target.ravel()),
                                                         abs=1e-6)
    assert "MulLabAcc_top-1_micro_topk_applied" not in got


def test_published_quirks_by_hand():
    # multilabel accuracy: threshold 0.5 -> [[1,1,1],[0,0,0]]: 2 of 6 right, for top_k 1 and 2 alike (published);
    # the 2 best labels -> [[1,1,0],[1,1,0]]: 3 of 6 right
    preds = torch.tensor([[0.9, 0.8, 0.7], [0.2, 0.3, 0.1]])
    target = torch.tensor([[1, 0, 0], [0, 1, 1]])
    m = build_metric({"id": "MultilabelAccuracy", "top_k": 2, "average": "micro"})
    assert m.compute(preds, target) == pytest.approx({"MulLabAcc_top-2_micro": 2 / 6,
                                                      "MulLabAcc_top-2_micro_topk_applied": 3 / 6})
    # macro accuracy with class 3 absent from targets and predictions: recalls 1, 0, 1/2 (and 0 for class 3)
    preds = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.2, 0.5, 0.3, 0.0], [0.1, 0.3, 0.6, 0.0], [0.5, 0.4, 0.1, 0.0]])
    m = build_metric({"id": "MulticlassAccuracy", "average": "macro"})
    assert m.compute(preds, torch.tensor([0, 2, 2, 1])) == pytest.approx(
        {"acc_top-1_macro": 1.5 / 4, "acc_top-1_macro_present_classes": 1.5 / 3})
    # tied scores form one threshold: precision 1/2 at recall 1/2, 2/3 at recall 1 -> AP = 0.25 + 1/3
    ap = multilabel_average_precision(torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.1, 0.1]]),
                                      torch.tensor([[1, 1], [0, 0], [1, 1]]))
    assert ap == pytest.approx(0.25 + 1 / 3)
    with pytest.raises(ValueError, match="no label has a positive"):
        multilabel_average_precision(torch.rand(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="empty"):
        multiclass_accuracy(torch.zeros(0, 3), torch.zeros(0))
