"""collate_data_and_cast and MaskingGenerator on augmented hand-built samples."""
import pytest
import torch

from dinov2.data.augmentations import PanopticonAugmentation
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from test_augmentations import fmow_like_views, hs_view


def _tiny_sample(value, n_global=2, n_local=3, chn=3, ids_2d=False):
    """A hand-built augmentation output whose crops are constant images `value + crop index / 10`."""
    def crop(k, size):
        ids = torch.tensor([[490.0, 20.0]] * chn) if ids_2d else torch.tensor([490, 560, 665][:chn])
        return {"imgs": torch.full((chn, size, size), value + k / 10), "chn_ids": ids,
                "spec_masks": torch.zeros(chn, dtype=torch.bool)}
    g = [crop(k, 8) for k in range(n_global)]
    return {"global_crops": g, "global_crops_teacher": g, "local_crops": [crop(k, 4) for k in range(n_local)],
            "offsets": ()}


def test_collate_shapes_dtype_and_masks_on_augmented_batch():
    aug = PanopticonAugmentation()
    B = 2
    samples = [aug(fmow_like_views()) for _ in range(B)]
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, n_tokens=256)
    g, l = out["collated_global_crops"], out["collated_local_crops"]
    assert g["imgs"].shape == (2 * B, 13, 224, 224) and g["imgs"].dtype == torch.float16
    assert g["chn_ids"].shape == (2 * B, 13) and g["spec_masks"].shape == (2 * B, 13)
    assert l["imgs"].shape == (4 * B, 4, 98, 98) and l["imgs"].dtype == torch.float16
    assert l["chn_ids"].shape == (4 * B, 4) and l["spec_masks"].dtype == torch.bool
    masks = out["collated_masks"]
    assert masks.shape == (2 * B, 256) and masks.dtype == torch.bool
    assert int((masks.sum(1) > 0).sum()) == int(2 * B * 0.5)
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    assert out["masks_weight"].shape == out["mask_indices_list"].shape
    assert out["masks_weight"].sum().item() == pytest.approx(int((masks.sum(1) > 0).sum()), rel=1e-5)
    assert int(masks.sum()) <= out["upperbound"]
    # n_tokens derivable from crop size and patch size
    out2 = collate_data_and_cast(samples, (0.1, 0.5), 0.5, "fp32", patch_size=14)
    assert out2["collated_masks"].shape == (2 * B, 256) and out2["collated_global_crops"]["imgs"].dtype == torch.float32


def test_collate_is_crop_major_and_keeps_ids():
    samples = [_tiny_sample(1.0), _tiny_sample(2.0), _tiny_sample(3.0)]
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float32, n_tokens=16)
    firsts = out["collated_global_crops"]["imgs"][:, 0, 0, 0].tolist()
    assert firsts == pytest.approx([1.0, 2.0, 3.0, 1.1, 2.1, 3.1])
    assert out["collated_local_crops"]["imgs"][:, 0, 0, 0].tolist() == pytest.approx(
        [1.0, 2.0, 3.0, 1.1, 2.1, 3.1, 1.2, 2.2, 3.2])
    assert out["collated_global_crops"]["chn_ids"].tolist() == [[490, 560, 665]] * 6


def test_collate_errors_are_clear():
    with pytest.raises(ValueError, match="ChnPad"):
        collate_data_and_cast([_tiny_sample(1.0), _tiny_sample(2.0, chn=2)], (0.1, 0.5), 0.5, torch.float32, 16)
    with pytest.raises(ValueError, match="full_spectra"):
        collate_data_and_cast([_tiny_sample(1.0), _tiny_sample(2.0, ids_2d=True)], (0.1, 0.5), 0.5,
                              torch.float32, 16)
    with pytest.raises(ValueError, match="n_tokens, mask_generator or patch_size"):
        collate_data_and_cast([_tiny_sample(1.0)], (0.1, 0.5), 0.5, torch.float32)
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast([_tiny_sample(1.0)], (0.1, 0.5), 0.5, torch.float32, n_tokens=16,
                              mask_generator=MaskingGenerator(8))
    with pytest.raises(ValueError, match="mask_ratio_tuple"):
        collate_data_and_cast([_tiny_sample(1.0)], (0.6, 0.5), 0.5, torch.float32, n_tokens=16)


def test_simulated_hyperspectral_batch_collates_with_full_spectra():
    aug = PanopticonAugmentation(global_hs_modes_probs=[0.5, 0.5], local_hs_modes_probs=[0.5, 0.5],
                                 global_crops_size=28, local_crops_size=14)
    samples = [aug([hs_view()]) for _ in range(2)]
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, patch_size=14)
    glob, loc = out["collated_global_crops"], out["collated_local_crops"]
    assert glob["chn_ids"].shape == (4, 13, 2) and loc["chn_ids"].shape == (8, 4, 2)
    # value oracle: crop-major stacking (crop 0 of every sample, then crop 1, ...); images cast to fp16, ids and
    # masks unchanged; every real channel is a (mu, sigma) pair inside the cube's 400-2500 nm
    for family, batch, n in (("global_crops", glob, 2), ("local_crops", loc, 4)):
        order = [s[family][c] for c in range(n) for s in samples]
        assert torch.equal(batch["imgs"], torch.stack([c["imgs"] for c in order]).half())
        assert batch["imgs"].dtype == torch.float16
        assert torch.equal(batch["chn_ids"], torch.stack([c["chn_ids"] for c in order]))
        assert torch.equal(batch["spec_masks"], torch.stack([c["spec_masks"] for c in order]))
        real = batch["chn_ids"][~batch["spec_masks"]]
        assert ((real[:, 0] >= 400) & (real[:, 0] <= 2500) & (real[:, 1] > 0)).all()


def test_mask_statistics_within_ratio_bounds():
    N, lo, hi, p = 256, 0.1, 0.5, 0.5
    samples = [_tiny_sample(float(k)) for k in range(40)]  # 80 global crops
    out = collate_data_and_cast(samples, (lo, hi), p, torch.float32, n_tokens=N)
    counts = out["collated_masks"].sum(1)
    masked = counts[counts > 0]
    assert masked.numel() == int(80 * p)
    assert (masked <= int(N * hi)).all() and (masked >= 0.8 * int(N * lo)).all()
    ratios = masked.float() / N
    assert lo * 0.8 <= ratios.mean() <= hi and ratios.max() > 0.4 and ratios.min() < 0.2  # spans the range
    assert int(counts.sum()) <= out["upperbound"]


def test_masking_generator_and_mask_determinism():
    gen = MaskingGenerator((16, 16), max_num_patches=128)
    assert gen(0).shape == (16, 16) and not gen(0).any()
    for target in (10, 50, 128):
        m = gen(target)
        assert m.dtype == torch.bool and 0.8 * target <= int(m.sum()) <= target
    samples = [_tiny_sample(1.0), _tiny_sample(2.0)]
    torch.manual_seed(4)
    a = collate_data_and_cast(samples, (0.1, 0.5), 1.0, torch.float32, n_tokens=256)["collated_masks"]
    torch.manual_seed(4)
    b = collate_data_and_cast(samples, (0.1, 0.5), 1.0, torch.float32, n_tokens=256)["collated_masks"]
    assert torch.equal(a, b) and a.any()
