"""Conversion to and from torchgeo's Panopticon layout (timm `vit_base_patch14_dinov2` keys under `model.`)."""
import importlib.util

import pytest
import torch

import hubconf
from dinov2.interop import from_torchgeo, resize_pos_embed, to_torchgeo
from dinov2.run.convert import main as convert_main


def timm_vit_base_patch14_dinov2_layout(img_size: int = 224) -> dict:
    """Key -> shape of timm's vit_base_patch14_dinov2 without head (width 768, 12 blocks, 12 heads, MLP ratio 4,
    LayerScale, class token, no register tokens), written out from its documented architecture."""
    d, hidden, grid = 768, 4 * 768, img_size // 14
    layout = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(12):
        b = f"blocks.{i}."
        layout.update({
            b + "norm1.weight": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "ls1.gamma": (d,),
            b + "norm2.weight": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,),
            b + "ls2.gamma": (d,),
        })
    return layout


@pytest.fixture(scope="module")
def released():
    """A state dict in the released panopticon_vitb14 layout (random weights; mask_token made non-zero)."""
    torch.manual_seed(0)
    sd = hubconf._panopticon_vitb14().state_dict()
    sd["mask_token"] = torch.randn_like(sd["mask_token"])
    return sd


def test_to_torchgeo_matches_timm_layout(released):
    tg = to_torchgeo(released, img_size=224)
    assert all(k.startswith("model.") for k in tg)
    keys = {k[len("model."):]: tuple(v.shape) for k, v in tg.items()}
    vit = {k: s for k, s in keys.items() if not k.startswith("patch_embed.")}
    assert vit == timm_vit_base_patch14_dinov2_layout(224)
    # the spectral patch embedding keeps the released names and sizes (12,847,872 parameters)
    pe = {k: v for k, v in tg.items() if k.startswith("model.patch_embed.")}
    assert {k[len("model."):] for k in pe} == {k for k in released if k.startswith("patch_embed.")}
    assert sum(v.numel() for v in pe.values()) == 12_847_872
    assert "model.mask_token" not in tg
    assert to_torchgeo(released, img_size=448)["model.pos_embed"].shape == (1, 1 + 32 * 32, 768)


def test_pos_embed_resize_by_hand():
    # a constant grid stays constant under (antialiased) bicubic resizing; the class token is untouched
    pe = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 37 * 37, 4), 0.25)], dim=1)
    out = resize_pos_embed(pe, 16)
    assert out.shape == (1, 257, 4) and torch.all(out[:, 0] == 7.0)
    assert torch.allclose(out[:, 1:], torch.full((1, 256, 4), 0.25), atol=1e-6)
    # a 2x2 grid upsampled to 4x4: bicubic with align_corners=False keeps the mean of a symmetric pattern
    pe = torch.tensor([[0.0], [1.0], [3.0], [5.0], [7.0]]).reshape(1, 5, 1)
    up = resize_pos_embed(pe, 4)[:, 1:].reshape(4, 4)
    assert up.mean().item() == pytest.approx(4.0, abs=1e-5)  # mean of 1, 3, 5, 7
    assert up[0, 0] < up[0, 3] < up[3, 3]  # keeps the orientation: rows then columns
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 1 + 10, 4), 4)


def test_round_trip_is_exact_on_the_same_grid(released):
    back = from_torchgeo(to_torchgeo(released, img_size=518), img_size=518, mask_token=released["mask_token"])
    assert set(back) == set(released)
    assert all(torch.equal(back[k], released[k]) for k in released)
    # default: the dropped mask token comes back as zeros (it only serves the iBOT training objective)
    assert torch.equal(from_torchgeo(to_torchgeo(released, 518))["mask_token"], torch.zeros(1, 768))


def test_chunked_blocks_and_refused_layouts():
    from dinov2.models.vision_transformer import vit_small

    flat = vit_small(patch_size=14, img_size=56, depth=4, block_chunks=0, embed_layer="PanopticonPE",
                     pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}}).state_dict()
    chunked = {}
    for k, v in flat.items():  # what block_chunks=2 produces: blocks.<chunk>.<global index>.
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{i}." + k.split(".", 2)[2]
        chunked[k] = v
    assert set(to_torchgeo(chunked, img_size=56)) == set(to_torchgeo(flat, img_size=56))
    with pytest.raises(ValueError, match="register tokens"):
        to_torchgeo(dict(flat, register_tokens=torch.zeros(1, 4, 384)))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        to_torchgeo(flat, img_size=100)
    with pytest.raises(ValueError, match="not a ViT backbone"):
        to_torchgeo({"teacher.dino_head.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="without a counterpart"):
        from_torchgeo(dict(to_torchgeo(flat, 56), **{"model.head.weight": torch.zeros(2, 384)}))


_SMALL = dict(patch_size=14, img_size=518, depth=2, block_chunks=0, embed_layer="PanopticonPE", init_values=1e-5,
              pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}})
_SMALL_CONFIG = ("student:\n  arch: vit_small\n  patch_size: 14\n  depth: 2\n  embed_layer: PanopticonPE\n"
                 "  pos_emb_img_size: 518\n  pe_args: {attn_dim: 32, chnfus_cfg: {attn_cfg: {num_heads: 2}}}\n")


def test_convert_cli_training_checkpoint_and_back(tmp_path, capsys):
    from dinov2.models.vision_transformer import vit_small

    torch.manual_seed(1)
    model = vit_small(**_SMALL)
    sd = model.state_dict()
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": {"teacher.backbone." + k: v for k, v in sd.items()}, "iteration": 5}, ckpt)
    (tmp_path / "config.yaml").write_text(_SMALL_CONFIG)
    tg_path, back_path = tmp_path / "tg.pth", tmp_path / "back.pth"
    # not ViT-B/14: torchgeo's panopticon_vitb14 cannot load it, so it takes --force
    assert convert_main([str(tmp_path), str(tg_path)]) == 2
    assert "not a ViT-B/14 Panopticon" in capsys.readouterr().err and not tg_path.exists()
    assert convert_main([str(tmp_path), str(tg_path), "--force"]) == 0  # a run folder: its model_final.pth
    assert "panopticon -> torchgeo layout, position grid 16x16" in capsys.readouterr().out
    tg = torch.load(tg_path, weights_only=True)
    assert tg["model.pos_embed"].shape == (1, 257, 384)
    assert convert_main([str(tg_path), str(back_path), "--to", "panopticon"]) == 2  # checked as ViT-B/14
    assert "wrong shapes" in capsys.readouterr().err and not back_path.exists()
    back = from_torchgeo(tg, img_size=518)
    assert set(back) == set(sd) and back["pos_embed"].shape == sd["pos_embed"].shape
    assert all(torch.equal(back[k], sd[k]) for k in sd if k not in ("pos_embed", "mask_token"))
    assert convert_main([str(tg_path), str(tmp_path / "x.pth"), "--to", "torchgeo"]) == 2
    assert "already in the torchgeo layout" in capsys.readouterr().err
    # the converted-back weights load strictly through the hub entry point's loader
    torch.save(back, back_path)
    loaded = vit_small(**_SMALL)
    hubconf._load_weights(loaded, str(back_path), "unused", progress=False)
    x = {"imgs": torch.randn(1, 3, 28, 28), "chn_ids": torch.tensor([[664, 559, 493]])}
    with torch.no_grad():
        assert model.eval()(x).shape == loaded.eval()(x).shape


def test_convert_refuses_wrong_shapes_and_non_finite_values(released, tmp_path, capsys):
    """Every key, shape and value is checked before anything is written."""
    path = tmp_path / "teacher.pth"
    broken = dict(released)
    broken["blocks.3.attn.qkv.weight"] = broken["blocks.3.attn.qkv.weight"][:, :700].clone()
    torch.save(broken, path)
    for target in ("torchgeo", "panopticon"):
        out = tmp_path / f"out_{target}.safetensors"
        assert convert_main([str(path), str(out), "--to", target]) == 2
        err = capsys.readouterr().err
        assert "blocks.3.attn.qkv.weight has shape (2304, 700), expected (2304, 768)" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    nan = dict(released)
    nan["norm.weight"] = nan["norm.weight"].clone()
    nan["norm.weight"][5] = float("nan")
    torch.save(nan, path)
    assert convert_main([str(path), str(tmp_path / "tg.pth")]) == 2
    assert "NaN or infinite values in: model.norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "tg.pth").exists()


def test_convert_to_safetensors_keeps_the_config_and_loads(released, tmp_path, capsys):
    from dinov2 import load_model

    src = tmp_path / "panopticon_vitb14_teacher.pth"
    torch.save(released, src)
    out = tmp_path / "repo" / "model.safetensors"
    assert convert_main([str(src), str(out), "--to", "panopticon"]) == 0  # format only, grid unchanged
    assert "panopticon -> panopticon layout, position grid 37x37" in capsys.readouterr().out
    assert (tmp_path / "repo" / "config.yaml").is_file()
    model = load_model(str(out))
    assert all(torch.equal(model.state_dict()[k], released[k]) for k in released)
    tg = tmp_path / "tg.safetensors"
    assert convert_main([str(out), str(tg)]) == 0
    from safetensors.torch import load_file

    assert load_file(str(tg))["model.pos_embed"].shape == (1, 257, 768)


@pytest.mark.skipif(importlib.util.find_spec("torchgeo") is None or importlib.util.find_spec("timm") is None,
                    reason="torchgeo and timm are not installed")
def test_equal_outputs_with_torchgeo(released):
    from torchgeo.models import panopticon_vitb14

    tg_model = panopticon_vitb14(weights=None, img_size=224).eval()
    tg_model.load_state_dict(to_torchgeo(released, img_size=224), strict=True)
    ours = hubconf._panopticon_vitb14(img_size=224)
    ours.load_state_dict(from_torchgeo(to_torchgeo(released, img_size=224), img_size=224), strict=True)
    x = {"imgs": torch.randn(2, 4, 224, 224), "chn_ids": torch.tensor([[664, 559, 493, 842]] * 2)}
    with torch.no_grad():
        torch.testing.assert_close(tg_model(x), ours.eval()(x), atol=1e-4, rtol=1e-4)


def test_torchgeo_position_table_difference_is_the_table_alone():
    """torchgeo resamples the stored table once (antialiased) for its image size; this model interpolates it per
    forward pass. Equal on the stored grid; at another size the class tokens differ, and the difference is the
    table alone: given the table this model would interpolate, the converted model agrees again."""
    from dinov2.interop import torchgeo_table_difference
    from dinov2.models import build_model

    cfg = dict(arch="vit_small", embed_dim=48, depth=2, num_heads=3, patch_size=14, layerscale=1.0,
               embed_layer="PanopticonPE", pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}})
    torch.manual_seed(0)
    model, _ = build_model(cfg, only_teacher=True, img_size=518)
    grid = torch.linspace(0, 6.28, 37)  # a smooth table of trained magnitude, as a learned one is
    table = torch.sin(grid[:, None, None] * torch.arange(1, 49) / 8) * torch.cos(grid[None, :, None] * 3)
    with torch.no_grad():
        model.pos_embed[0, 1:] = table.reshape(37 * 37, 48)
    sd = model.state_dict()
    x = {"imgs": torch.randn(2, 4, 224, 224), "chn_ids": torch.tensor([[490, 560, 665, 842]] * 2)}
    at_224 = torchgeo_table_difference(sd, x, cfg)
    assert at_224 > 1e-3
    x518 = {"imgs": torch.randn(1, 4, 518, 518), "chn_ids": torch.tensor([[490, 560, 665, 842]])}
    assert torchgeo_table_difference(sd, x518, cfg) == 0.0
    with torch.no_grad():
        own_table = model.interpolate_pos_encoding(torch.zeros(1, 257, 48), 16, 16)
    small, _ = build_model(cfg, only_teacher=True, img_size=224)
    small.load_state_dict(dict(sd, pos_embed=own_table))
    with torch.no_grad():
        assert (small.eval()(x) - model.eval()(x)).abs().max() < 1e-5


def test_forward_resampled_table_makes_the_converted_model_agree(tmp_path):
    """`convert --pos-resample forward`: the torchgeo-layout table is the one this model interpolates at that
    size, so the converted model (built at 224 px, table used as is) gives this model's outputs."""
    from dinov2.models.vision_transformer import vit_small

    torch.manual_seed(2)
    model = vit_small(**dict(_SMALL, init_values=1.0)).eval()
    with torch.no_grad():
        model.pos_embed.mul_(50)  # a table of trained magnitude
    path = tmp_path / "model_final.pth"
    torch.save({"model": {"teacher.backbone." + k: v for k, v in model.state_dict().items()}}, path)
    (tmp_path / "config.yaml").write_text(_SMALL_CONFIG.replace("student:\n", "student:\n  layerscale: 1.0\n"))
    x = {"imgs": torch.randn(2, 3, 224, 224), "chn_ids": torch.tensor([[664, 559, 493]] * 2)}
    outputs = {}
    for resample in ("antialias", "forward"):
        out = tmp_path / f"{resample}.pth"
        assert convert_main([str(path), str(out), "--force", "--pos-resample", resample]) == 0
        converted = vit_small(**dict(_SMALL, init_values=1.0, img_size=224)).eval()
        converted.load_state_dict(from_torchgeo(torch.load(out), img_size=224, mask_token=model.mask_token.data))
        with torch.no_grad():
            outputs[resample] = (converted(x) - model(x)).abs().max().item()
    assert outputs["forward"] < 1e-5 < 1e-3 < outputs["antialias"], outputs
