"""ONNX / torch.export of the spectral backbone: parity with eager PyTorch, dynamic batch and channel count."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.export import example_inputs, export_onnx, prepare_for_export, save_program
from dinov2.models.vision_transformer import vit_small
from dinov2.run import export as export_cli

REPO = Path(__file__).resolve().parents[1]
ort = pytest.importorskip("onnxruntime")


def _tiny(img_size: int = 28):
    torch.manual_seed(0)
    return vit_small(patch_size=14, img_size=img_size, embed_dim=48, depth=2, num_heads=3,
                     embed_layer="PanopticonPE", init_values=0.1, block_chunks=0,
                     pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 4}}}).eval()


def _inputs(batch: int, channels: int, size: int = 28, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(batch, channels, size, size, generator=g) * 3000.0  # reflectance-like DN values
    ids = torch.sort(torch.rand(batch, channels, generator=g) * 2000.0 + 400.0, dim=1).values
    if channels >= 3:
        ids[:, -1] = -1.0  # one SAR band (VV) among the optical ones
    return imgs, ids


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = _tiny()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, str(path), img_size=28)
    return model, path


def test_onnx_inputs_are_imgs_then_chn_ids_with_dynamic_batch_and_channels(tiny_onnx):
    _, path = tiny_onnx
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    assert [i.name for i in inputs] == ["imgs", "chn_ids"]
    assert inputs[0].type == "tensor(float)" and inputs[1].type == "tensor(float)"
    b, c, h, w = inputs[0].shape
    assert isinstance(b, str) and isinstance(c, str) and (h, w) == (28, 28)
    assert inputs[1].shape[0] == b and inputs[1].shape[1] == c
    assert [o.name for o in sess.get_outputs()] == ["embedding"]


@pytest.mark.parametrize("channels", [3, 13, 202])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(tiny_onnx, channels, batch):
    model, path = tiny_onnx
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    imgs, ids = _inputs(batch, channels, seed=channels + batch)
    (got,) = sess.run(None, {"imgs": imgs.numpy(), "chn_ids": ids.numpy()})
    with torch.no_grad():
        want = model({"imgs": imgs, "chn_ids": ids}).numpy()
    assert got.shape == (batch, 48)
    assert np.abs(got - want).max() <= 1e-4


def test_torch_export_program_round_trips(tmp_path):
    model = _tiny()
    path = tmp_path / "tiny.pt2"
    save_program(model, str(path), img_size=28)
    loaded = torch.export.load(str(path)).module()
    for batch, channels in ((1, 3), (4, 13), (2, 202)):
        imgs, ids = _inputs(batch, channels, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(loaded(imgs, ids), model({"imgs": imgs, "chn_ids": ids}),
                                       rtol=1e-5, atol=1e-5)


def test_position_table_resampled_once_for_another_image_size():
    # stored at 70 px (5 x 5 patches) like the hub model's 518 px; exported at 42 px (3 x 3)
    model = _tiny(img_size=70)
    wrapper = prepare_for_export(model, img_size=42)
    assert tuple(wrapper.backbone.pos_embed.shape) == (1, 1 + 9, 48)
    assert tuple(model.pos_embed.shape) == (1, 1 + 25, 48)  # the original is left untouched
    imgs, ids = _inputs(2, 5, size=42)
    with torch.no_grad():
        torch.testing.assert_close(wrapper(imgs, ids), model({"imgs": imgs, "chn_ids": ids}), rtol=0, atol=1e-6)


def test_rgb_backbone_exports_imgs_only_and_bad_options_are_refused(tmp_path):
    rgb = vit_small(patch_size=14, img_size=28, embed_dim=48, depth=1, num_heads=3).eval()
    path = export_onnx(rgb, str(tmp_path / "rgb.onnx"), img_size=28)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["imgs"] and sess.get_inputs()[0].shape[1:] == [3, 28, 28]
    imgs = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"imgs": imgs.numpy()})[0], rgb(imgs).numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="spec_masks and chn_ids_dtype apply to the spectral"):
        prepare_for_export(rgb, 28, spec_masks=True)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        prepare_for_export(_tiny(), 30)
    with pytest.raises(ValueError, match="outputs .* distinct names"):
        prepare_for_export(_tiny(), 28, outputs=("embedding", "cls"))


def test_example_inputs_shapes():
    imgs, ids = example_inputs(2, 5, 28)
    assert imgs.shape == (2, 5, 28, 28) and ids.shape == (2, 5) and imgs.dtype == ids.dtype == torch.float32
    # distinct optical wavelengths from 450 to 2200 nm, the same for every image of the batch
    assert ids.tolist() == [[450.0, 887.5, 1325.0, 1762.5, 2200.0]] * 2
    # seeded standard-normal pixels: the same on every call, mean ~0 and std ~1 over 7840 values
    again, _ = example_inputs(2, 5, 28)
    assert torch.equal(imgs, again) and abs(imgs.mean().item()) < 0.05 and abs(imgs.std().item() - 1) < 0.05


def test_cli_exports_a_checkpoint_with_its_config(tmp_path, capsys):
    model = _tiny()
    ckpt = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), ckpt)
    (tmp_path / "config.yaml").write_text(
        "student:\n  arch: vit_small\n  patch_size: 14\n  embed_dim: 48\n  depth: 2\n  num_heads: 3\n"
        "  layerscale: 0.1\n  embed_layer: PanopticonPE\n  pos_emb_img_size: 28\n"
        "  pe_args: {attn_dim: 32, chnfus_cfg: {attn_cfg: {num_heads: 4}}}\n")
    rc = export_cli.main(["--model", str(ckpt), "--output", str(tmp_path / "out" / "tiny"), "--format", "both",
                          "--img-size", "28", "--check"])
    assert rc == 0
    assert (tmp_path / "out" / "tiny.onnx").is_file() and (tmp_path / "out" / "tiny.pt2").is_file()
    printed = capsys.readouterr().out
    assert "202 bands" in printed
    sess = ort.InferenceSession(str(tmp_path / "out" / "tiny.onnx"), providers=["CPUExecutionProvider"])
    imgs, ids = _inputs(2, 7)
    (got,) = sess.run(None, {"imgs": imgs.numpy(), "chn_ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model({"imgs": imgs, "chn_ids": ids}).numpy(), atol=1e-4, rtol=0)


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PANOPTICON_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # a hub name downloads the release (as load_model and embed do); offline and not cached: one line naming it
    assert export_cli.main(["--model", "panopticon_vitb14", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "offline mode" in err and "panopticon_vitb14_teacher.pth" in err and len(err.strip().splitlines()) == 1
    assert export_cli.main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "model source not found" in capsys.readouterr().err
    base = ["--model", "panopticon_vitb14", "--pretrained", "false", "--output", str(tmp_path / "x")]
    assert export_cli.main(base + ["--outputs", "embedding,cls"]) == 2
    assert "distinct names" in capsys.readouterr().err
    assert export_cli.main(base + ["--format", "safetensors", "--check"]) == 2
    assert "--check compares an ONNX export" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_cli.main(["--model", "panopticon_vitb14", "--output", "x", "--format", "tflite"])


def test_cli_help_imports_no_export_extra():
    code = ("import sys\nfrom dinov2.run.export import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "bad = [m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--weights", "--pretrained", "--output", "--format", "--img-size", "--opset",
                 "--outputs", "--dynamic-size", "--chn-ids-dtype", "--spec-masks", "--check"):
        assert flag in out.stdout


@pytest.mark.slow
def test_cli_real_vitb14_architecture_with_weights_file_at_224(tmp_path, capsys):
    """The published ViT-B/14 (random weights saved as a teacher checkpoint; position table stored at 518 px)
    exported at 224 px (20-50 s on 2 busy cores: torch.export tracing dominates)."""
    from dinov2.hub import HUB_STUDENT_CFG
    from dinov2.models import build_model

    torch.manual_seed(3)
    original, _ = build_model(dict(HUB_STUDENT_CFG), only_teacher=True, img_size=518)
    original.eval()
    weights = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in original.state_dict().items()}}, weights)
    rc = export_cli.main(["--model", "panopticon_vitb14", "--weights", str(weights), "--output",
                          str(tmp_path / "vitb14"), "--check"])
    assert rc == 0
    printed = capsys.readouterr().out
    for c in (3, 13, 202):
        assert f"224 px, {c:3d} bands" in printed
    sess = ort.InferenceSession(str(tmp_path / "vitb14.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[2:] == [224, 224]
    imgs, ids = _inputs(1, 13, size=224)
    (got,) = sess.run(None, {"imgs": imgs.numpy(), "chn_ids": ids.numpy()})
    with torch.no_grad():  # the weights in the file, not fresh random ones, were exported
        np.testing.assert_allclose(got, original({"imgs": imgs, "chn_ids": ids}).numpy(), atol=1e-4, rtol=0)


def test_torch_compile_traces_the_whole_model_without_graph_breaks():
    model = _tiny()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a graph break is an error
    imgs, ids = _inputs(2, 5)
    masks = torch.zeros(2, 5, dtype=torch.bool)
    masks[0, 2] = True
    x = {"imgs": imgs, "chn_ids": ids, "spec_masks": masks}
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
