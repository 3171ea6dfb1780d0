"""Building blocks of the spectral augmentation and the eval transforms, on hand-built views / x_dicts."""
import pytest
import torch
import torchvision.transforms as T

from dinov2.data.transforms import (
    CenterCrop,
    ChnPad,
    ChnSelect,
    ColorJitterRS,
    ListChnMask,
    ListRandomResizeCrop,
    RandomHVFlip,
    RandomResizedCrop,
    Resize,
)

# A bright square on the ground, rows [24, 40) x cols [16, 32) in 10 m pixels of a 640 m x 640 m scene.
SQ_ROWS, SQ_COLS = (240.0, 400.0), (160.0, 320.0)  # metres


def _square(gsd: float, extent: float = 640.0) -> torch.Tensor:
    n = int(extent / gsd)
    img = torch.zeros(n, n)
    img[int(SQ_ROWS[0] / gsd):int(SQ_ROWS[1] / gsd), int(SQ_COLS[0] / gsd):int(SQ_COLS[1] / gsd)] = 1.0
    return img


def _scene_view():
    """One scene at 10 m (2 bands), 20 m (2 bands) and 40 m (1 band), all with the same bright square."""
    g10, g20, g40 = _square(10), _square(20), _square(40)
    return {
        "imgs": [torch.stack([g10, g10]), torch.stack([g20, g20]), g40[None]],
        "chn_ids": [torch.tensor([492, 559], dtype=torch.int16), torch.tensor([704, 740], dtype=torch.int16),
                    torch.tensor([945], dtype=torch.int16)],
    }


def _centroid(img: torch.Tensor):
    m = img > 0.5
    if m.sum() == 0:
        return None
    ys, xs = m.nonzero(as_tuple=True)
    return ys.float().mean().item(), xs.float().mean().item()


@pytest.mark.parametrize("seed", range(8))
def test_crop_footprint_agrees_across_resolutions(seed):
    view = _scene_view()
    S, scale, ratio = 64, (0.6, 1.0), (3 / 4, 4 / 3)
    crop = ListRandomResizeCrop(S, scale=scale, ratio=ratio)
    torch.manual_seed(seed)  # replay the box the crop will draw on the 10 m group
    i, j, h, w = T.RandomResizedCrop.get_params(view["imgs"][0], list(scale), list(ratio))
    torch.manual_seed(seed)
    out = crop(view)
    assert out["imgs"].shape == (5, S, S)
    assert out["chn_ids"].tolist() == [492, 559, 704, 740, 945]
    # expected square centre in output pixels, from the 10 m box
    cy = ((SQ_ROWS[0] + SQ_ROWS[1]) / 20 - i) * S / h - 0.5
    cx = ((SQ_COLS[0] + SQ_COLS[1]) / 20 - j) * S / w - 0.5
    fully_inside = i <= 24 and i + h >= 40 and j <= 16 and j + w >= 32
    for c, gsd in zip(range(5), (10, 10, 20, 20, 40)):
        cen = _centroid(out["imgs"][c])
        if not fully_inside:
            continue
        assert cen is not None, f"square lost in channel {c}"
        f = 10 / gsd  # box edges of a coarser group are within half of ITS pixel of the exact footprint
        tol_y, tol_x = 0.5 * S / (h * f) + 1.0, 0.5 * S / (w * f) + 1.0
        assert abs(cen[0] - cy) <= tol_y and abs(cen[1] - cx) <= tol_x, (c, cen, (cy, cx))


def test_full_frame_crop_is_exactly_aligned():
    out = ListRandomResizeCrop(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(_scene_view())
    cens = [_centroid(out["imgs"][c]) for c in range(5)]
    for cen in cens[1:]:
        assert cen == pytest.approx(cens[0], abs=0.51)


@pytest.mark.parametrize("low,high", [(4, 13), (1, 4)])
def test_channel_mask_bounds_and_ids_travel(low, high):
    ids = [torch.arange(10, 18), torch.arange(30, 36), torch.arange(50, 57)]  # 21 channels in 3 groups
    view = {"imgs": [i.float()[:, None, None].expand(-1, 4, 4).clone() for i in ids], "chn_ids": ids}
    counts = set()
    for s in range(40):
        torch.manual_seed(s)
        out = ListChnMask(low, high)(view)
        n = sum(img.shape[0] for img in out["imgs"])
        counts.add(n)
        assert low <= n <= high
        for img, cid in zip(out["imgs"], out["chn_ids"]):
            assert img.shape[0] == cid.shape[0] > 0  # emptied groups are dropped
            assert torch.equal(img[:, 0, 0], cid.float())
    assert len(counts) > 1
    small = {"imgs": [torch.zeros(2, 4, 4)], "chn_ids": [torch.tensor([1, 2])]}
    assert ListChnMask(4, 13)(small)["chn_ids"][0].tolist() == [1, 2]  # fewer than low: keep everything


@pytest.mark.parametrize("two_d", [False, True])
def test_chnpad_zero_masked_repeats_last_id(two_d):
    ids = torch.tensor([[490.0, 30.0], [560.0, 20.0], [665.0, 15.0]]) if two_d else torch.tensor([490, 560, 665])
    x = {"imgs": torch.randn(3, 5, 5), "chn_ids": ids}
    out = ChnPad(6)(x)
    assert out["imgs"].shape == (6, 5, 5)
    assert torch.equal(out["imgs"][:3], x["imgs"]) and (out["imgs"][3:] == 0).all()
    assert out["spec_masks"].tolist() == [False] * 3 + [True] * 3
    assert all(torch.equal(out["chn_ids"][k], ids[-1]) for k in range(3, 6))
    assert ChnPad(3)(x)["spec_masks"].tolist() == [False] * 3
    with pytest.raises(ValueError, match="ChnPad"):
        ChnPad(2)(x)


def test_jitter_does_not_clip_normalised_data():
    x = {"imgs": torch.linspace(-3, 5, 2 * 8 * 8).reshape(2, 8, 8), "chn_ids": torch.tensor([1, 2])}
    out = ColorJitterRS(p=1.0, brightness=0.1, contrast=0.0)(x)["imgs"]
    factor = (out / x["imgs"]).flatten()
    assert torch.allclose(factor, factor[0].expand_as(factor), atol=1e-5) and 0.9 <= factor[0] <= 1.1
    assert out.min() < -2.5 and out.max() > 4.5  # far outside [0, 1]
    out = ColorJitterRS(p=1.0, brightness=0.1, contrast=0.1)(x)["imgs"]
    assert out.min() < -2 and out.max() > 4
    const = {"imgs": torch.full((1, 4, 4), 7.0), "chn_ids": torch.tensor([1])}
    assert torch.allclose(ColorJitterRS(p=1.0, brightness=0.0, contrast=0.1)(const)["imgs"], const["imgs"])
    assert torch.equal(ColorJitterRS(p=0.0)(x)["imgs"], x["imgs"])
    with pytest.raises(ValueError, match="saturation"):
        ColorJitterRS(saturation=0.2)


def test_flip_and_no_mutation():
    img = torch.arange(16.0).reshape(1, 4, 4)
    x = {"imgs": img, "chn_ids": torch.tensor([5])}
    out = RandomHVFlip(p=1.0)(x)
    assert torch.equal(out["imgs"], img.flip(-1).flip(-2))
    assert torch.equal(x["imgs"], torch.arange(16.0).reshape(1, 4, 4))
    assert torch.equal(RandomHVFlip(p=0.0)(x)["imgs"], img)


def test_eval_transforms_on_xdict():
    x = {"imgs": torch.randn(3, 40, 60), "chn_ids": torch.tensor([664, 559, 492])}
    assert Resize(32)(x)["imgs"].shape == (3, 32, 32)  # int -> exact square, not shorter side
    assert Resize("(20, 30)")(x)["imgs"].shape == (3, 20, 30)
    assert CenterCrop(24)(x)["imgs"].shape == (3, 24, 24)
    assert torch.equal(CenterCrop(24)(x)["imgs"], x["imgs"][:, 8:32, 18:42])
    assert RandomResizedCrop(16, scale=[0.2, 1.0])(x)["imgs"].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="size"):
        Resize("big")


def test_chnselect_by_index_and_wavelength():
    ids = torch.tensor([443, 492, 559, 664, -1, -2])
    x = {"imgs": ids.float()[:, None, None].expand(-1, 2, 2).clone(), "chn_ids": ids}
    out = ChnSelect(idxs=[3, 2, 1])(x)
    assert out["chn_ids"].tolist() == [664, 559, 492] and out["imgs"][:, 0, 0].tolist() == [664, 559, 492]
    out = ChnSelect(wavelengths=[-2, 559.4])(x)
    assert out["chn_ids"].tolist() == [-2, 559] and out["imgs"][:, 0, 0].tolist() == [-2, 559]
    full = {"imgs": x["imgs"], "chn_ids": torch.stack([ids.float(), torch.full((6,), 20.0)], dim=1)}
    assert ChnSelect(wavelengths=[664])(full)["chn_ids"].tolist() == [[664.0, 20.0]]
    with pytest.raises(ValueError, match="no channel within"):
        ChnSelect(wavelengths=[1000])(x)
    with pytest.raises(ValueError, match="out of range"):
        ChnSelect(idxs=[9])(x)
    with pytest.raises(ValueError, match="exactly one"):
        ChnSelect()
