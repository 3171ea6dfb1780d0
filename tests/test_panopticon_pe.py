"""PanopticonPE: the published computation, invariances, validation, and the fused path against it."""
import pytest
import torch

from dinov2.models.channel_embedding import ChnEmb
from dinov2.models.panopticon import PanopticonPE


def make_pe(attn_dim=48, embed_dim=40, patch=7, heads=4, impl="fused", layer_norm=False, **chnemb):
    torch.manual_seed(0)
    pe = PanopticonPE(attn_dim, embed_dim, patch, impl=impl,
                      chnfus_cfg=dict(layer_norm=layer_norm, attn_cfg=dict(num_heads=heads), chnemb_cfg=chnemb))
    with torch.no_grad():  # the published init leaves SAR embeddings at zero; make them distinct for the tests
        for p in (pe.chnfus.chnemb.embed_transmit, pe.chnfus.chnemb.embed_receive, pe.chnfus.chnemb.embed_orbit):
            p.normal_()
        for lin in (pe.chnfus.xattn.inproj_k, pe.chnfus.xattn.inproj_v):
            lin.weight.normal_(0, 0.05)
    return pe


def run(pe, x, impl):
    pe.impl = impl
    return pe(x)[0]


def xdict(B=2, C=13, S=28, sar=True, masks=False, pairs=False):
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([442, 492, 559, 664, 704, 740, 782, 827, 864, 945, 1373, 1613, 2203] * 16)[:C].float()
    if sar and C >= 3:
        ids[1], ids[2] = -1, -10
    ids = ids.repeat(B, 1)
    if pairs:
        ids = torch.stack([ids, torch.rand(B, C, generator=g) * 30 + 5], dim=-1)
    x = {"imgs": torch.randn(B, C, S, S, generator=g), "chn_ids": ids}
    if masks:
        m = torch.zeros(B, C, dtype=torch.bool)
        m[0, -2:] = True
        m[1, :1] = True
        x["spec_masks"] = m
    return x


def reference_by_hand(pe, x):
    """The published algorithm written out with explicit loops over heads (independent oracle for 'reference')."""
    imgs, ids = x["imgs"], x["chn_ids"]
    B, C, H, W = imgs.shape
    P, A = pe.patch_size, pe.attn_dim
    xa = pe.chnfus.xattn
    tok = torch.nn.functional.conv3d(imgs[:, None], pe.conv3d.conv3d.weight, pe.conv3d.conv3d.bias,
                                     stride=(1, P, P))  # (B, A, C, h, w)
    tok = tok.flatten(3).permute(0, 3, 2, 1)  # (B, L, C, A)
    emb = pe.chnfus.chnemb(ids[..., 0] if ids.ndim == 3 else ids, ids[..., 1] if ids.ndim == 3 else None)
    tok = tok + emb[:, None]
    k = tok @ xa.inproj_k.weight.t()
    v = tok @ xa.inproj_v.weight.t()
    q = pe.chnfus.query.reshape(A)
    d = A // xa.num_heads
    outs = []
    for h in range(xa.num_heads):
        sl = slice(h * d, (h + 1) * d)
        logits = (k[..., sl] @ q[sl]) * d ** -0.5  # (B, L, C)
        if "spec_masks" in x:
            logits = logits.masked_fill(x["spec_masks"][:, None, :], float("-inf"))
        a = logits.softmax(-1)
        outs.append((a[..., None] * v[..., sl]).sum(2))
    out = torch.cat(outs, -1)
    if pe.chnfus.layer_norm is not None:
        out = pe.chnfus.layer_norm(out)
    return pe.proj(out)


@pytest.mark.parametrize("C", [1, 3, 13, 202])
def test_fused_matches_reference(C):
    pe = make_pe()
    x = xdict(C=C, masks=C >= 3, sar=C >= 3)
    ref = run(pe, x, "reference")
    fused = run(pe, x, "fused")
    assert ref.shape == (2, 16, 40)
    assert (fused - ref).abs().max().item() < 1e-4


def test_reference_matches_hand_written_algorithm():
    pe = make_pe()
    x = xdict(C=6, masks=True)
    assert torch.allclose(run(pe, x, "reference"), reference_by_hand(pe, x), atol=1e-5)


def test_full_spectra_ids_and_layer_norm():
    pe = make_pe(layer_norm=True, use_full_spectra=True)
    x = xdict(C=9, pairs=True, masks=True)
    assert (run(pe, x, "fused") - run(pe, x, "reference")).abs().max() < 1e-4
    assert torch.allclose(run(pe, x, "reference"), reference_by_hand(pe, x), atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_channel_permutation_and_masked_padding_invariance(impl):
    pe = make_pe(impl=impl)
    x = xdict(C=7)
    base = pe(x)[0]
    perm = torch.randperm(7)
    y = pe({"imgs": x["imgs"][:, perm], "chn_ids": x["chn_ids"][:, perm]})[0]
    assert torch.allclose(base, y, atol=1e-5)
    padded = {
        "imgs": torch.cat([x["imgs"], torch.zeros(2, 3, 28, 28)], 1),
        "chn_ids": torch.cat([x["chn_ids"], x["chn_ids"][:, -1:].repeat(1, 3)], 1),
        "spec_masks": torch.tensor([[False] * 7 + [True] * 3] * 2),
    }
    assert torch.allclose(base, pe(padded)[0], atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_inputs_not_mutated(impl):
    pe = make_pe(impl=impl)
    x = xdict(C=5, masks=True)
    ids = x["chn_ids"]
    x["chn_ids"] = torch.where(ids > 0, ids + 0.7, ids)  # float wavelengths: the published code floored them in place
    before = {k: v.clone() for k, v in x.items()}
    pe(x)
    for k in before:
        assert torch.equal(before[k], x[k])


def test_gradients_match_for_every_parameter():
    pe = make_pe()
    x = xdict(C=13, masks=True)
    grads = {}
    for impl in ("reference", "fused"):
        pe.zero_grad()
        pe.impl = impl
        (pe(x)[0] ** 2).sum().backward()
        grads[impl] = {n: p.grad.clone() for n, p in pe.named_parameters()}
    assert set(grads["fused"]) == {n for n, _ in pe.named_parameters()}
    for n, g in grads["reference"].items():
        gf = grads["fused"][n]
        assert torch.allclose(gf, g, rtol=1e-3, atol=1e-5 * max(1.0, g.abs().max().item())), n


def test_bf16_autocast_close_to_fp32():
    pe = make_pe()
    x = xdict(C=13)
    ref = run(pe, x, "fused")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(pe, x, "fused")
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2


def test_sar_embedding_table():
    emb = ChnEmb(12)
    with torch.no_grad():
        emb.embed_transmit.copy_(torch.tensor([[1.0] * 4, [2.0] * 4]))
        emb.embed_receive.copy_(torch.tensor([[3.0] * 4, [4.0] * 4]))
        emb.embed_orbit.copy_(torch.tensor([[5.0] * 4, [7.0] * 4]))
    table = emb(torch.arange(-1, -13, -1).float())
    # VV both, VH both, HH both, HV both
    assert table[0].tolist() == [1.0] * 4 + [3.0] * 4 + [6.0] * 4
    assert table[1].tolist() == [1.0] * 4 + [4.0] * 4 + [6.0] * 4
    assert table[2].tolist() == [2.0] * 4 + [4.0] * 4 + [6.0] * 4
    assert table[3].tolist() == [2.0] * 4 + [3.0] * 4 + [6.0] * 4
    assert table[4, 8:].tolist() == [5.0] * 4  # VV ascending
    assert table[9, :8].tolist() == [1.0] * 4 + [4.0] * 4 and table[9, 8:].tolist() == [7.0] * 4  # VH descending


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda x: x.update(imgs=x["imgs"][0]), "4-D"),
        (lambda x: x.update(chn_ids=x["chn_ids"][:, :3]), "chn_ids must have shape"),
        (lambda x: x.update(chn_ids=x["chn_ids"][0]), "chn_ids must have shape"),
        (lambda x: x["chn_ids"].__setitem__((0, 0), -13), "SAR chn_id"),
        (lambda x: x["chn_ids"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda x: x.update(spec_masks=torch.ones(2, 5, dtype=torch.bool)), "every channel"),
        (lambda x: x.update(imgs=x["imgs"][..., :5, :5]), "smaller than one"),
        (lambda x: x.update(spec_masks=torch.zeros(2, 4, dtype=torch.bool)), "spec_masks must have shape"),
    ],
)
def test_bad_input_raises_clear_errors(mutate, message):
    pe = make_pe()
    x = xdict(C=5)
    x["chn_ids"] = x["chn_ids"].clone()
    mutate(x)
    with pytest.raises(ValueError, match=message):
        pe(x)


def test_unknown_impl_rejected():
    with pytest.raises(ValueError, match="impl"):
        PanopticonPE(16, 16, 4, impl="fast")


def test_inference_cache_follows_weight_updates():
    pe = make_pe()
    x = xdict(C=5)
    with torch.no_grad():
        first = run(pe, x, "fused")
        assert torch.equal(first, run(pe, x, "fused"))  # recomputed: deterministic
        pe.chnfus.xattn.inproj_k.weight.mul_(3.0)  # in-place update bumps the version counter
        pe.load_state_dict(pe.state_dict())
        updated = run(pe, x, "fused")
        reference = run(pe, x, "reference")
    assert not torch.allclose(first, updated)
    assert (updated - reference).abs().max() < 1e-4


def test_fused_chunked_over_patch_rows_matches_reference(monkeypatch):
    import dinov2.models.panopticon as panopticon

    monkeypatch.setattr(panopticon, "CHUNK_BYTES", 1)  # one patch row per chunk
    pe = make_pe()
    x = xdict(C=13, S=30, masks=True)  # 4 x 4 patches of 7 px; 2 px cropped, as the conv does
    assert pe._rows_per_chunk(2, 13, 4) == 1
    assert (run(pe, x, "fused") - run(pe, x, "reference")).abs().max() < 1e-4
    grads = []
    for impl in ("reference", "fused"):
        pe.zero_grad()
        (run(pe, x, impl) ** 2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in pe.named_parameters()})
    for n, g in grads[0].items():
        assert torch.allclose(grads[1][n], g, rtol=1e-3, atol=1e-5 * max(1.0, g.abs().max().item())), n
