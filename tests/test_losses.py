"""DINO (centering / Sinkhorn-Knopp), iBOT and KoLeo losses on small tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss


def test_dino_loss_matches_cross_entropy_and_center_ema():
    torch.manual_seed(0)
    loss = DINOLoss(8, student_temp=0.1, center_momentum=0.9)
    t_out = torch.randn(6, 8)
    targets = loss.softmax_center_teacher(t_out, teacher_temp=0.04)
    assert torch.allclose(targets.sum(-1), torch.ones(6))
    s = torch.randn(6, 8)
    val = loss([s], [targets])
    expected = -(targets * F.log_softmax(s / 0.1, -1)).sum(-1).mean()
    assert torch.allclose(val, expected)
    loss.update_center(t_out)
    assert torch.allclose(loss.center, 0.1 * t_out.mean(0, keepdim=True), atol=1e-6)
    # a centred teacher output is shifted by the center before the softmax
    t2 = loss.softmax_center_teacher(t_out, 0.04)
    assert torch.allclose(t2, F.softmax((t_out - loss.center) / 0.04, -1))


def test_dino_loss_sums_over_all_pairs_and_rejects_bad_shapes():
    loss = DINOLoss(5)
    s1, s2, t = torch.randn(3, 5), torch.randn(3, 5), F.softmax(torch.randn(3, 5), -1)
    assert torch.allclose(loss([s1, s2], [t, t]), 2 * (loss([s1], [t]) + loss([s2], [t])))
    with pytest.raises(ValueError, match="teacher targets"):
        loss([s1], [F.softmax(torch.randn(4, 5), -1)])


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(1)
    loss = DINOLoss(16)
    q = loss.sinkhorn_knopp_teacher(torch.randn(64, 16) * 0.3, teacher_temp=0.1, n_iterations=20)
    assert torch.allclose(q.sum(-1), torch.ones(64), atol=1e-4)  # each sample a distribution
    col = q.sum(0)
    assert torch.allclose(col, torch.full((16,), 64 / 16), rtol=1e-3)  # equal mass per prototype
    # huge logits do not overflow (global max subtracted)
    assert torch.isfinite(loss.sinkhorn_knopp_teacher(torch.randn(8, 16) * 1e3, 0.04)).all()


def test_ibot_loss_uses_only_masked_tokens_with_weights():
    torch.manual_seed(0)
    loss = iBOTPatchLoss(6)
    masks = torch.zeros(3, 4, dtype=torch.bool)
    masks[0, :2] = True
    masks[2, 1] = True
    n = int(masks.sum())
    s, t = torch.randn(n, 6), F.softmax(torch.randn(n, 6), -1)
    val = loss.forward_masked(s, t, masks)
    ce = -(t * F.log_softmax(s / 0.1, -1)).sum(-1)
    w = torch.tensor([0.5, 0.5, 1.0])  # 1/#masked patches of each token's image
    assert torch.allclose(val, (ce * w).sum() / 3)
    with pytest.raises(ValueError, match="masked patches"):
        loss.forward_masked(s[:2], t[:2], masks)
    loss.update_center(t)
    assert torch.allclose(loss.center, 0.1 * t.mean(0, keepdim=True), atol=1e-6)
    before = loss.center.clone()
    loss.update_center(t[:0])  # nothing masked anywhere: center unchanged
    assert torch.equal(before, loss.center)


def test_koleo_decreases_when_points_spread():
    koleo = KoLeoLoss()
    close = torch.tensor([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0], [0.01, 0.99]])
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert koleo(spread) < koleo(close)
    assert math.isclose(float(koleo(spread)), -math.log(math.sqrt(2)), rel_tol=1e-5)
    x = torch.randn(5, 3, requires_grad=True)
    koleo(x).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="B>=2"):
        koleo(torch.randn(1, 3))
