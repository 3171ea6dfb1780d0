"""Model inputs: dtypes, empty batches, NaN/inf/huge pixels, spectral masks (issue: hostile inputs, item 8)."""
import pytest
import torch

from dinov2.models.input_checks import MAX_ABS_PIXEL, is_tracing
from dinov2.models.vision_transformer import vit_small

IDS = [450.0, 550.0, 650.0, 850.0, 1610.0]


def _spectral(impl: str = "fused"):
    torch.manual_seed(0)
    return vit_small(patch_size=14, img_size=28, embed_dim=48, depth=1, num_heads=3, embed_layer="PanopticonPE",
                     pe_args={"attn_dim": 32, "impl": impl, "chnfus_cfg": {"attn_cfg": {"num_heads": 4}}}).eval()


def _rgb():
    torch.manual_seed(0)
    return vit_small(patch_size=14, img_size=28, embed_dim=48, depth=1, num_heads=3).eval()


def _batch(b: int = 2, c: int = 5, scale: float = 100.0):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, int(scale), (b, c, 28, 28), generator=g).float()  # integer-valued: exact in any dtype
    return imgs, torch.tensor(IDS[:c]).expand(b, c).contiguous()


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16,
                                   torch.bfloat16, torch.float64])
def test_any_real_dtype_gives_the_float32_result(dtype):
    model = _spectral()
    imgs, ids = _batch()  # values 0..99: representable exactly in every dtype above
    want = model({"imgs": imgs, "chn_ids": ids})
    got = model({"imgs": imgs.to(dtype), "chn_ids": ids})
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_rgb_model_accepts_uint8_and_refuses_nan():
    model = _rgb()
    imgs = torch.randint(0, 255, (2, 3, 28, 28), dtype=torch.uint8)
    torch.testing.assert_close(model(imgs), model(imgs.float()), rtol=0, atol=1e-6)
    bad = imgs.float()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="image 1 channel 2 has NaN"):
        model(bad)


@torch.no_grad()
def test_bf16_model_takes_float32_images():
    want = _spectral()({"imgs": _batch()[0], "chn_ids": _batch()[1]})  # the fp32 model on the same inputs
    model = _spectral().to(torch.bfloat16)
    imgs, ids = _batch()
    out = model({"imgs": imgs, "chn_ids": ids})
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    # bf16 keeps 8 mantissa bits: per-image relative error of a few 1e-3, far below what a wrong input cast gives
    err = (out.float() - want).norm(dim=1) / want.norm(dim=1)
    assert err.max() < 3e-2, err
    assert torch.nn.functional.cosine_similarity(out.float(), want).min() > 0.999


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64])
def test_bool_and_complex_images_refused(dtype):
    imgs, ids = _batch()
    with pytest.raises(ValueError, match="real floating or integer dtype"):
        _spectral()({"imgs": imgs.to(dtype), "chn_ids": ids})


def test_empty_batch_refused():
    with pytest.raises(ValueError, match="empty batch"):
        _spectral()({"imgs": torch.zeros(0, 5, 28, 28), "chn_ids": torch.zeros(0, 5)})
    with pytest.raises(ValueError, match="empty batch"):
        _rgb()(torch.zeros(0, 3, 28, 28))


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (float("inf"), "infinite"),
                                        (-float("inf"), "infinite"), (1e30, "pixels of magnitude 1e\\+30")])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bad_pixels_refused_naming_image_and_channel(value, what, impl):
    imgs, ids = _batch()
    imgs[1, 3, 10, 20] = value
    with pytest.raises(ValueError, match=f"image 1 channel 3 has {what}"):
        _spectral(impl)({"imgs": imgs, "chn_ids": ids})


@torch.no_grad()
def test_large_but_allowed_pixels_give_finite_output():
    imgs, ids = _batch()
    imgs[0, 1] = MAX_ABS_PIXEL  # a whole saturated band at the documented limit
    imgs[1, 0] = -MAX_ABS_PIXEL
    out = _spectral()({"imgs": imgs, "chn_ids": ids})
    assert bool(torch.isfinite(out).all())


@torch.no_grad()
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 3e38, -1e30, 1234.5])
def test_masked_channel_never_influences_output(impl, fill):
    model = _spectral(impl)
    imgs, ids = _batch()
    keep = [0, 1, 3, 4]
    # independent reference: the same images without channel 2 at all
    want = model({"imgs": imgs[:, keep], "chn_ids": ids[:, keep]})
    imgs[:, 2] = fill
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[:, 2] = True
    got = model({"imgs": imgs, "chn_ids": ids, "spec_masks": masks})
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_float_and_int_masks_equal_bool_masks():
    model = _spectral()
    imgs, ids = _batch()
    masks = torch.tensor([[0, 0, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = model({"imgs": imgs, "chn_ids": ids, "spec_masks": masks})
    for dtype in (torch.float32, torch.float64, torch.int64, torch.uint8):
        got = model({"imgs": imgs, "chn_ids": ids, "spec_masks": masks.to(dtype)})
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), 0.5, 2.0, -1.0])
def test_float_masks_must_be_zero_or_one(bad):
    imgs, ids = _batch()
    masks = torch.zeros(2, 5)
    masks[0, 1] = bad
    with pytest.raises(ValueError, match="spec_masks must hold 0/1"):
        _spectral()({"imgs": imgs, "chn_ids": ids, "spec_masks": masks})


def test_fully_masked_image_refused():
    imgs, ids = _batch()
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[1] = True
    with pytest.raises(ValueError, match="every channel of image 1 is masked"):
        _spectral()({"imgs": imgs, "chn_ids": ids, "spec_masks": masks})


def test_checks_run_in_eager_mode_and_are_skipped_while_tracing():
    assert not is_tracing()
    seen = []

    def probe(x):
        seen.append(is_tracing())
        return x * 2

    torch.jit.trace(probe, torch.ones(2), check_trace=False)
    assert seen == [True]
    seen.clear()
    torch.compile(probe, backend="eager")(torch.ones(3))
    assert seen == [True]


def test_float64_pixels_beyond_float32_range_reported_by_magnitude():
    imgs, ids = _batch()
    imgs = imgs.double()
    imgs[0, 4, 0, 0] = 1e300
    with pytest.raises(ValueError, match="image 0 channel 4 has pixels of magnitude 1e\\+300"):
        _spectral()({"imgs": imgs, "chn_ids": ids})
