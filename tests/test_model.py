"""The ViT backbone: shapes, multi-crop, intermediate layers, positional interpolation, masks, builders."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_student_cfg
from dinov2.models import build_model, build_model_from_cfg
from dinov2.models.vision_transformer import DinoVisionTransformer, vit_small


def tiny(**kw):
    model, _ = build_model(tiny_student_cfg(**kw), only_teacher=True, img_size=32)
    return model.eval()


def xd(B=2, C=4, S=32):
    ids = torch.tensor([664, 559, 492, 842, -1, -2, 1613, 2203] * 4)[:C]
    return {"imgs": torch.randn(B, C, S, S), "chn_ids": ids.repeat(B, 1)}


def test_forward_returns_normed_cls():
    model = tiny()
    x = xd()
    out = model(x)
    assert out.shape == (2, 32)
    feats = model.forward_features(x)
    assert torch.allclose(out, feats["x_norm_clstoken"])
    assert feats["x_norm_patchtokens"].shape == (2, 16, 32)
    assert feats["x_prenorm"].shape == (2, 17, 32)
    assert torch.allclose(model.norm(feats["x_prenorm"])[:, 0], out, atol=1e-6)


def test_multicrop_list_with_different_sizes_and_channels():
    model = tiny()
    g, l = xd(B=4, C=6, S=32), xd(B=8, C=2, S=16)
    masks = torch.zeros(4, 16, dtype=torch.bool)
    masks[:, :5] = True
    outs = model([g, l], masks=[masks, None], is_training=True)
    assert outs[0]["x_norm_patchtokens"].shape == (4, 16, 32)
    assert outs[1]["x_norm_patchtokens"].shape == (8, 4, 32)
    single = model.forward_features(l)
    assert torch.allclose(single["x_norm_clstoken"], outs[1]["x_norm_clstoken"], atol=1e-6)


def test_mask_token_replaces_masked_patches():
    model = tiny()
    x = xd(B=1)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, 3] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    plain = model.prepare_tokens_with_masks(x)
    pos = model.interpolate_pos_encoding(plain, 4, 4)
    assert torch.allclose(tokens[0, 4], model.mask_token[0] + pos[0, 4], atol=1e-6)
    assert torch.allclose(tokens[0, 5], plain[0, 5])
    with pytest.raises(ValueError, match="masks must have shape"):
        model.prepare_tokens_with_masks(x, masks[:, :3])


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (24, 40), (17, 33)])
def test_any_input_size(size):
    model = tiny()
    x = {"imgs": torch.randn(1, 3, *size), "chn_ids": torch.tensor([[664, 559, 492]])}
    layers = model.get_intermediate_layers(x, n=1, reshape=True)
    assert layers[0].shape == (1, 32, size[0] // 8, size[1] // 8)


def test_pos_embed_unchanged_at_native_size_and_interpolated_otherwise():
    model = tiny()
    tokens = torch.zeros(1, 17, 32)
    assert model.interpolate_pos_encoding(tokens, 4, 4) is model.pos_embed
    big = model.interpolate_pos_encoding(torch.zeros(1, 65, 32), 8, 8)
    assert big.shape == (1, 65, 32)
    assert torch.allclose(big[:, 0], model.pos_embed[:, 0])


def test_get_intermediate_layers_variants():
    model = tiny(depth=4)
    x = xd()
    last2 = model.get_intermediate_layers(x, n=2)
    chosen = model.get_intermediate_layers(x, n=[2, 3], return_class_token=True)
    assert len(last2) == 2 and last2[0].shape == (2, 16, 32)
    assert torch.allclose(last2[1], chosen[1][0])
    assert chosen[1][1].shape == (2, 32)
    assert torch.allclose(chosen[1][1], model(x), atol=1e-6)  # last block's normed cls == forward
    raw = model.get_intermediate_layers(x, n=1, norm=False)
    assert not torch.allclose(raw[0], last2[1])
    reshaped = model.get_intermediate_layers(x, n=[0], reshape=True, return_class_token=True)
    assert reshaped[0][0].shape == (2, 32, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[4])


def test_register_tokens_and_block_chunks():
    model = tiny(num_register_tokens=2, block_chunks=2, depth=4)
    feats = model.forward_features(xd())
    assert feats["x_norm_regtokens"].shape == (2, 2, 32)
    assert feats["x_norm_patchtokens"].shape == (2, 16, 32)
    assert any(k.startswith("blocks.1.2.") for k in model.state_dict())  # chunked naming as DINOv2
    assert len(model.get_intermediate_layers(xd(), n=4)) == 4


def test_rgb_patch_embed_accepts_tensor_and_dict():
    model = vit_small(patch_size=8, img_size=32, embed_dim=32, depth=1, num_heads=2).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model(x), model({"imgs": x}))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(2, 5, 32, 32))


def test_unknown_embed_layer_and_arch():
    with pytest.raises(ValueError, match="embed_layer"):
        DinoVisionTransformer(embed_layer="Nope")
    with pytest.raises(ValueError, match="arch"):
        build_model({"arch": "vit_huge"})


def test_build_student_teacher_and_from_cfg():
    cfg = {"student": {**tiny_student_cfg(drop_path_rate=0.1), "pos_emb_img_size": 64}}
    student, teacher, dim = build_model_from_cfg(cfg)
    assert dim == 32
    assert student.pos_embed.shape == (1, 65, 32)
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert student.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    only, dim = build_model_from_cfg(cfg, only_teacher=True)
    assert isinstance(only, DinoVisionTransformer)


def test_reference_impl_selectable_from_config():
    model = tiny(pe_args=dict(attn_dim=32, impl="reference", chnfus_cfg=dict(attn_cfg=dict(num_heads=2))))
    assert model.patch_embed.impl == "reference"


def test_model_import_is_light():
    """`import hubconf` adds nothing beyond what `import torch` already loads, numpy and the stdlib."""
    code = (
        "import sys\n"
        "import torch\n"
        "top = lambda: {m.split('.')[0] for m in sys.modules}\n"
        "before = top()\n"
        "import hubconf, dinov2.models\n"
        "new = top() - before - set(sys.stdlib_module_names) - {'hubconf', 'dinov2', 'numpy'}\n"
        "assert not new, sorted(new)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
