"""Dense export: class and patch tokens, dynamic image size, int64 channel ids and spectral masks as inputs; the
parity check fails on non-finite values."""
import numpy as np
import pytest
import torch

from dinov2.export import export_onnx, onnx_parity, save_program
from dinov2.run import export as export_cli
from test_export import _tiny as tiny_export_model

ort = pytest.importorskip("onnxruntime")


def _tiny(img_size: int = 70):
    """Position table stored at 70 px (5 x 5 patches), like the hub model's 518 px table."""
    return tiny_export_model(img_size)


def _inputs(batch, channels, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(batch, channels, h, w, generator=g)
    ids = torch.sort(torch.rand(batch, channels, generator=g) * 2000.0 + 400.0, dim=1).values.round()
    return imgs, ids


def _eager(model, x):
    with torch.no_grad():
        f = model.forward_features(x)
    return f["x_norm_clstoken"].numpy(), f["x_norm_patchtokens"].numpy()


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("dense") / "dense.onnx"
    export_onnx(model, str(path), img_size=42, outputs=("embedding", "patch_tokens"), dynamic_size=True)
    return model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def test_dense_graph_signature(dense_onnx):
    _, sess, _ = dense_onnx
    ins, outs = sess.get_inputs(), sess.get_outputs()
    assert [i.name for i in ins] == ["imgs", "chn_ids"] and [i.type for i in ins] == ["tensor(float)"] * 2
    assert all(isinstance(d, str) for d in ins[0].shape)  # batch, channels, height and width all dynamic
    assert [o.name for o in outs] == ["embedding", "patch_tokens"]
    assert outs[0].shape[1] == 48 and outs[1].shape[2] == 48 and isinstance(outs[1].shape[1], str)


@pytest.mark.parametrize("batch,channels,h,w", [(1, 3, 70, 70), (2, 13, 42, 42), (1, 5, 28, 98), (2, 202, 112, 56)])
def test_dense_dynamic_size_matches_pytorch(dense_onnx, batch, channels, h, w):
    """Sizes below, at (70 px: the stored table, used as is) and above the stored grid, and non-square."""
    model, sess, _ = dense_onnx
    imgs, ids = _inputs(batch, channels, h, w, seed=channels)
    emb, patches = sess.run(None, {"imgs": imgs.numpy(), "chn_ids": ids.numpy()})
    want_emb, want_patches = _eager(model, {"imgs": imgs, "chn_ids": ids})
    assert patches.shape == (batch, (h // 14) * (w // 14), 48)
    assert np.abs(emb - want_emb).max() <= 1e-4 and np.abs(patches - want_patches).max() <= 1e-4


def test_int64_ids_and_spec_masks_inputs(tmp_path):
    model = _tiny()
    path = export_onnx(model, str(tmp_path / "m.onnx"), img_size=28, outputs=("patch_tokens",),
                       chn_ids_dtype=torch.int64, spec_masks=True)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [
        ("imgs", "tensor(float)"), ("chn_ids", "tensor(int64)"), ("spec_masks", "tensor(bool)")]
    imgs, ids = _inputs(2, 6, 28, 28)
    masks = torch.zeros(2, 6, dtype=torch.bool)
    masks[0, 1] = masks[1, 4] = True
    imgs[0, 1] = 1e6  # garbage in masked channels never reaches the output
    (got,) = sess.run(None, {"imgs": imgs.numpy(), "chn_ids": ids.long().numpy(), "spec_masks": masks.numpy()})
    _, want = _eager(model, {"imgs": imgs, "chn_ids": ids.long(), "spec_masks": masks})
    assert np.abs(got - want).max() <= 1e-4


def test_torch_export_program_with_dynamic_size(tmp_path):
    model = _tiny()
    path = save_program(model, str(tmp_path / "m.pt2"), img_size=42, outputs=("embedding", "patch_tokens"),
                        dynamic_size=True)
    loaded = torch.export.load(path).module()
    for h, w, c in ((42, 42, 3), (84, 56, 13)):
        imgs, ids = _inputs(2, c, h, w)
        with torch.no_grad():
            emb, patches = loaded(imgs, ids)
        want_emb, want_patches = _eager(model, {"imgs": imgs, "chn_ids": ids})
        np.testing.assert_allclose(emb.numpy(), want_emb, atol=1e-5, rtol=0)
        np.testing.assert_allclose(patches.numpy(), want_patches, atol=1e-5, rtol=0)


def test_parity_is_nan_when_outputs_are_not_finite(dense_onnx):
    model, _, path = dense_onnx
    assert all(d <= 1e-4 for d in onnx_parity(model, str(path), sizes=(42,), channels=(3,), batch=1,
                                              outputs=("embedding", "patch_tokens")).values())
    poisoned = _tiny()
    with torch.no_grad():
        poisoned.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    diffs = onnx_parity(poisoned, str(path), sizes=(42,), channels=(3,), batch=1)
    assert all(np.isnan(d) for d in diffs.values())


def _write_checkpoint(model, folder):
    folder.mkdir()
    torch.save(model.state_dict(), folder / "backbone.pth")
    (folder / "config.yaml").write_text(
        "student:\n  arch: vit_small\n  patch_size: 14\n  embed_dim: 48\n  depth: 2\n  num_heads: 3\n"
        "  layerscale: 0.1\n  embed_layer: PanopticonPE\n  pos_emb_img_size: 70\n"
        "  pe_args: {attn_dim: 32, chnfus_cfg: {attn_cfg: {num_heads: 4}}}\n")
    return folder / "backbone.pth"


def test_cli_dense_dynamic_export_checked(tmp_path, capsys):
    ckpt = _write_checkpoint(_tiny(), tmp_path / "w")
    rc = export_cli.main(["--model", str(ckpt), "--output", str(tmp_path / "dense"), "--img-size", "28",
                          "--outputs", "embedding,patch_tokens", "--dynamic-size", "--check"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "28 px, 202 bands" in printed and "56 px,   3 bands" in printed


def test_cli_check_refuses_a_model_with_a_nan_weight(tmp_path, capsys):
    model = _tiny()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[3, 3] = float("nan")
    ckpt = _write_checkpoint(model, tmp_path / "w")
    rc = export_cli.main(["--model", str(ckpt), "--output", str(tmp_path / "nan"), "--img-size", "28", "--check"])
    assert rc != 0
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "nan.onnx").exists()
