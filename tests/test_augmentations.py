"""PanopticonAugmentation and the hyperspectral channel simulation on hand-built views (contract format)."""
import pytest
import torch
from omegaconf import OmegaConf

from dinov2.data.augmentations import PanopticonAugmentation, make_augmentation
from dinov2.data.channel_sim import ChannelSimulator, derive_sigmas, srf_weights

WV23 = [427, 478, 546, 608, 659, 724, 831, 908]
S2_10M, S2_20M, S2_60M = [492, 559, 664, 832], [704, 740, 782, 864, 1613, 2202], [442, 945, 1373]
NO_JITTER = dict(p=0.0)


def _const(ids, hw):
    """Each channel is a constant image whose value is the channel's id."""
    return torch.tensor(ids, dtype=torch.float32)[:, None, None].expand(-1, *hw).clone()


def fmow_like_views():
    """Two views of one place: WorldView (8 bands, 1 group) and Sentinel-2 (13 bands at 10/20/60 m)."""
    wv = {"imgs": [_const(WV23, (96, 96))], "chn_ids": [torch.tensor(WV23, dtype=torch.int16)]}
    s2 = {"imgs": [_const(S2_10M, (36, 36)), _const(S2_20M, (18, 18)), _const(S2_60M, (6, 6))],
          "chn_ids": [torch.tensor(x, dtype=torch.int16) for x in (S2_10M, S2_20M, S2_60M)]}
    return [wv, s2]


def hs_view(n=120, lo=400.0, hi=2500.0, full_spectra=True, value=None):
    mu = torch.linspace(lo, hi, n)
    img = mu[:, None, None].expand(-1, 8, 8).clone() if value is None else torch.full((n, 8, 8), value)
    ids = torch.stack([mu, torch.full((n,), 8.0)], dim=1) if full_spectra else mu.to(torch.int64)
    return {"imgs": [img], "chn_ids": [ids]}


def _real(crop):
    keep = ~crop["spec_masks"]
    return crop["imgs"][keep], crop["chn_ids"][keep]


def _check_crop(crop, size, pad, bounds):
    assert crop["imgs"].shape == (pad, size, size) and crop["imgs"].dtype == torch.float32
    assert crop["spec_masks"].shape == (pad,) and crop["spec_masks"].dtype == torch.bool
    n = int((~crop["spec_masks"]).sum())
    assert bounds[0] <= n <= bounds[1]
    assert not crop["spec_masks"][:n].any() and crop["spec_masks"][n:].all()  # padding is at the end
    assert (crop["imgs"][n:] == 0).all()
    assert all(torch.equal(crop["chn_ids"][k], crop["chn_ids"][n - 1]) for k in range(n, pad))


def test_defaults_shapes_bounds_padding_and_ids_travel():
    aug = PanopticonAugmentation(color_jitter_args=NO_JITTER)
    views = fmow_like_views()
    seen = set()
    for s in range(6):
        torch.manual_seed(s)
        out = aug(views)
        assert out["global_crops_teacher"] is out["global_crops"] and out["offsets"] == ()
        assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
        for crop in out["global_crops"]:
            _check_crop(crop, 224, 13, (4, 13))
        for crop in out["local_crops"]:
            _check_crop(crop, 98, 4, (1, 4))
        for crop in out["global_crops"] + out["local_crops"]:
            imgs, ids = _real(crop)
            # every channel still carries the constant value of its own id
            assert torch.allclose(imgs.mean(dim=(1, 2)), ids.float(), rtol=1e-4)
            assert torch.allclose(imgs.amin(dim=(1, 2)), imgs.amax(dim=(1, 2)), rtol=1e-4)
            seen.add(int((~crop["spec_masks"]).sum()))
        # the two global crops come from the two different views
        sets = [set(_real(c)[1].tolist()) for c in out["global_crops"]]
        s2 = set(S2_10M + S2_20M + S2_60M)
        assert sorted([sets[0] <= set(WV23), sets[1] <= set(WV23)]) == [False, True]
        assert sets[0] <= s2 or sets[1] <= s2
    assert len(seen) > 2


def test_single_view_multi_resolution_sample_gives_two_globals():
    view = fmow_like_views()[1]  # one GeoTIFF scene with three resolution groups
    torch.manual_seed(3)
    out = PanopticonAugmentation(color_jitter_args=NO_JITTER)([view])
    for crop in out["global_crops"]:
        _check_crop(crop, 224, 13, (4, 13))
        assert set(_real(crop)[1].tolist()) <= set(S2_10M + S2_20M + S2_60M)
    g0, g1 = out["global_crops"]
    assert not torch.equal(g0["chn_ids"], g1["chn_ids"]) or not torch.equal(g0["imgs"], g1["imgs"])
    cube = hs_view(full_spectra=False)  # a single hyperspectral cube with the default (masking-only) modes
    out = PanopticonAugmentation(color_jitter_args=NO_JITTER)([cube])
    for crop in out["global_crops"]:
        _check_crop(crop, 224, 13, (4, 13))
        assert set(_real(crop)[1].tolist()) <= set(cube["chn_ids"][0].tolist())


def test_determinism_given_seed():
    aug = PanopticonAugmentation()
    views = fmow_like_views()
    views[0]["imgs"][0] = torch.randn(8, 96, 96)

    def run(seed):
        torch.manual_seed(seed)
        return aug(views)

    a, b, c = run(11), run(11), run(12)
    for fam in ("global_crops", "local_crops"):
        for x, y in zip(a[fam], b[fam]):
            assert all(torch.equal(x[k], y[k]) for k in ("imgs", "chn_ids", "spec_masks"))
    assert any(not torch.equal(x["imgs"], y["imgs"]) for x, y in zip(a["local_crops"], c["local_crops"]))


def test_input_views_not_mutated():
    views = fmow_like_views()
    before = [[t.clone() for t in v["imgs"]] + [t.clone() for t in v["chn_ids"]] for v in views]
    PanopticonAugmentation()(views)
    after = [v["imgs"] + v["chn_ids"] for v in views]
    assert all(torch.equal(x, y) for bv, av in zip(before, after) for x, y in zip(bv, av))


def test_simulated_flat_spectrum_gives_flat_bands():
    sim = ChannelSimulator([4, 13], [[418, 1282], [1530, 1728], [1977, 2445]], [(5, 40)])
    for full in (True, False):
        out = sim(hs_view(full_spectra=full, value=0.7))
        assert torch.allclose(out["imgs"][0], torch.full_like(out["imgs"][0], 0.7), atol=1e-5)
        assert out["chn_ids"][0].dtype == torch.float32 and out["chn_ids"][0].shape[1] == 2
        assert 4 <= out["chn_ids"][0].shape[0] <= 13


def test_simulated_bands_follow_linear_spectrum_and_valid_ranges():
    ranges = [[418, 1282], [1530, 1728], [1977, 2445]]
    sim = ChannelSimulator([13, 13], ranges, [(5, 40)])
    torch.manual_seed(0)
    out = sim(hs_view())  # pixel value = wavelength
    mu, sigma = out["chn_ids"][0][:, 0], out["chn_ids"][0][:, 1]
    assert ((sigma >= 5) & (sigma <= 40)).all()
    inside = torch.zeros(13, dtype=torch.bool)
    for lo, hi in ranges:  # the target SRF's +-3 sigma lies within one valid range
        inside |= (mu - 3 * sigma >= lo - 1e-3) & (mu + 3 * sigma <= hi + 1e-3)
    assert inside.all()
    assert torch.allclose(out["imgs"][0].mean(dim=(1, 2)), mu, atol=2.0)  # Gaussian-weighted mean of a line


def test_srf_weights_analytic_case():
    # two sources symmetric around the target with equal sigmas get equal weights
    w = srf_weights(torch.tensor([500.0, 520.0]), torch.tensor([10.0, 10.0]), torch.tensor([510.0]),
                    torch.tensor([20.0]))
    assert torch.allclose(w, torch.tensor([[0.5, 0.5]], dtype=w.dtype))
    sig = derive_sigmas(torch.tensor([400.0, 410.0, 420.0]))
    assert torch.allclose(sig, torch.full((3,), 10.0 / 2.3548), atol=1e-3)


@pytest.mark.parametrize("full_spectra", [True, False])
def test_hyperspectral_sample_with_simulation_mode(full_spectra):
    aug = PanopticonAugmentation(global_hs_modes_probs=[0, 1], local_hs_modes_probs=[0.5, 0.5],
                                 color_jitter_args=NO_JITTER)
    torch.manual_seed(5)
    out = aug([hs_view(full_spectra=full_spectra, value=0.25)])
    for crop in out["global_crops"]:
        _check_crop(crop, 224, 13, (4, 13))
        assert torch.allclose(_real(crop)[0], torch.tensor(0.25), atol=1e-5)
    for crop in out["local_crops"]:
        _check_crop(crop, 98, 4, (1, 4))
    for crop in out["global_crops"] + out["local_crops"]:  # one id format for every crop -> collatable
        if full_spectra:
            assert crop["chn_ids"].dtype == torch.float32 and crop["chn_ids"].shape[1:] == (2,)
        else:
            assert crop["chn_ids"].dim() == 1 and crop["chn_ids"].dtype == torch.int64


def test_bad_inputs_raise_clear_errors():
    aug = PanopticonAugmentation()
    mixed = fmow_like_views()
    mixed[1] = hs_view(n=13, full_spectra=True)
    with pytest.raises(ValueError, match="full_spectra"):
        aug(mixed)
    with pytest.raises(ValueError, match="chn_ids"):
        aug([{"imgs": [torch.zeros(3, 8, 8)], "chn_ids": [torch.zeros(2)]}])
    with pytest.raises(ValueError, match="optical channels"):
        PanopticonAugmentation(global_hs_modes_probs=[0, 1])([hs_view(n=40)])
    with pytest.raises(ValueError, match="global_crops_number"):
        PanopticonAugmentation(global_crops_number=3)
    with pytest.raises(ValueError, match="n_channels_range"):
        ChannelSimulator([13], [[400, 900]], [(5, 40)])  # published wiring fault: single-element range


def test_make_augmentation_from_config():
    cfg = OmegaConf.create([
        {"id": "ChnSelect", "idxs": [2, 1, 0]},
        [{"id": "Resize", "size": 32}, {"id": "CenterCrop", "size": 24}],
        {"id": "RandomHVFlip", "p": 0.0},
    ])
    tf = make_augmentation(cfg)
    x = {"imgs": torch.randn(3, 40, 40), "chn_ids": torch.tensor([492, 559, 664])}
    out = tf(x)
    assert out["imgs"].shape == (3, 24, 24) and out["chn_ids"].tolist() == [664, 559, 492]
    pre = make_augmentation([{"id": "PanopticonAugmentation", "local_crops_number": 2, "local_crops_size": 28,
                              "global_crops_size": 56}])
    res = pre(fmow_like_views())
    assert res["global_crops"][0]["imgs"].shape == (13, 56, 56) and len(res["local_crops"]) == 2
    with pytest.raises(ValueError, match="unknown augmentation id 'Nope'.*PanopticonAugmentation"):
        make_augmentation([{"id": "Nope"}])
    with pytest.raises(ValueError, match="bad arguments"):
        make_augmentation([{"id": "Resize", "bogus": 1}])
