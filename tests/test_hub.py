"""torch.hub entry points, one-time download into the hub cache, strict loading, weight selection."""
import http.server
import os
import threading
from functools import partial

import pytest
import torch

import hubconf
from conftest import ROOT, tiny_student_cfg
from dinov2.models import build_model
from dinov2.utils.checkpoint import load_pretrained_weights, save_atomic, select_state_dict


def test_published_configuration_matches_reference_state_dict():
    model = torch.hub.load(str(ROOT), "panopticon_vitb14", source="local", pretrained=False)
    sd = model.state_dict()
    assert len(sd) == 183
    assert sum(v.numel() for v in sd.values()) == 98_976_000
    assert sum(v.numel() for k, v in sd.items() if k.startswith("patch_embed.")) == 12_847_872
    assert sd["pos_embed"].shape == (1, 1370, 768)
    assert sd["patch_embed.conv3d.conv3d.weight"].shape == (2304, 1, 1, 14, 14)
    assert sd["patch_embed.chnfus.xattn.inproj_k.weight"].shape == (2304, 2304)
    assert sd["patch_embed.chnfus.chnemb.embed_orbit"].shape == (2, 768)
    assert "blocks.11.ls2.gamma" in sd and "mask_token" in sd
    x = {"imgs": torch.randn(1, 3, 224, 224), "chn_ids": torch.tensor([[664, 559, 493]])}
    with torch.no_grad():
        blocks = model.get_intermediate_layers(x, n=[3, 5, 7, 11], return_class_token=True)
        assert model(x).shape == (1, 768)
    assert blocks[0][0].shape == (1, 256, 768) and blocks[0][1].shape == (1, 768)


def test_panopticon_file_roundtrip_strict(tmp_path):
    """A teacher file saved from one model loads strictly through hubconf into another; outputs match."""
    src = hubconf.panopticon_vitb14(pretrained=False)
    path = tmp_path / "panopticon_vitb14_teacher.pth"
    torch.save(src.state_dict(), path)
    torch.manual_seed(123)
    dst = hubconf.panopticon_vitb14(weights=str(path))
    x = {"imgs": torch.randn(1, 4, 70, 84), "chn_ids": torch.tensor([[664, 559, -1, 1613]])}
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    del src, dst


def test_dinov2_backbones_build():
    model = hubconf.dinov2_vits14(pretrained=False)
    assert model.pos_embed.shape == (1, 1370, 384)
    assert model.blocks[0].ls1.gamma[0].item() == 1.0


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        _Handler.requests.append(("GET", self.path))
        super().do_GET()

    def do_HEAD(self):
        _Handler.requests.append(("HEAD", self.path))
        super().do_HEAD()


@pytest.fixture
def file_server(tmp_path):
    serve = tmp_path / "served"
    serve.mkdir()
    _Handler.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(serve)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield serve, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_once_then_reuse_and_strict_load(tmp_path, file_server, monkeypatch):
    serve, base = file_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    src = hubconf.dinov2_vits14(pretrained=False, depth=1, img_size=28)
    torch.save(src.state_dict(), serve / "tiny.pth")
    url = f"{base}/tiny.pth"
    a = hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    b = hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    gets = [r for r in _Handler.requests if r[0] == "GET"]
    assert len(gets) == 1, _Handler.requests
    assert torch.equal(a.pos_embed, src.pos_embed) and torch.equal(b.blocks[0].mlp.fc1.weight,
                                                                  src.blocks[0].mlp.fc1.weight)
    # a truncated cached copy (size differs from the server's) is downloaded again
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", "tiny.pth")
    with open(cached, "r+b") as f:
        f.truncate(100)
    hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    assert len([r for r in _Handler.requests if r[0] == "GET"]) == 2
    # strict: a checkpoint for another architecture is refused
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        hubconf.dinov2_vits14(weights=url, depth=2, img_size=28, progress=False)


def test_offline_error_explains_local_file(tmp_path, monkeypatch):
    torch.hub.set_dir(str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="weights="):
        hubconf.cached_download("http://127.0.0.1:9/panopticon_vitb14_teacher.pth", progress=False)


def test_local_weights_file_and_training_checkpoint_formats(tmp_path):
    src = hubconf.dinov2_vits14(pretrained=False, depth=1, img_size=28)
    raw = tmp_path / "raw.pth"
    torch.save(src.state_dict(), raw)
    wrapped = tmp_path / "train.pth"
    torch.save({"model": {"teacher.backbone." + k: v for k, v in src.state_dict().items()}}, wrapped)
    for path in (raw, wrapped):
        m = hubconf.dinov2_vits14(weights=str(path), depth=1, img_size=28)
        assert torch.equal(m.cls_token, src.cls_token)
    with pytest.raises(FileNotFoundError):
        hubconf.dinov2_vits14(weights=str(tmp_path / "missing.pth"))


def test_load_pretrained_weights_include_exclude_prefix(tmp_path):
    student, teacher, _ = build_model(tiny_student_cfg(), img_size=32)
    ckpt = tmp_path / "rgb.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    target, _ = build_model(tiny_student_cfg(), only_teacher=True, img_size=32)
    wrapper = torch.nn.ModuleDict({"teacher": torch.nn.ModuleDict({"backbone": target})})
    missing, unexpected = load_pretrained_weights(
        wrapper, [{"path": str(ckpt), "exclude": "pos_embed,patch_embed", "prefix_map": {"": "teacher.backbone."}}]
    )
    assert torch.equal(target.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)
    assert not torch.equal(target.pos_embed, teacher.pos_embed)
    assert "teacher.backbone.pos_embed" in missing and not unexpected
    sel = select_state_dict({"a.x": 1, "b.x": 2, "b.y": 3}, include="^b", exclude="y$", prefix_map={"b.": "c."})
    assert sel == {"c.x": 2}
    with pytest.raises(ValueError, match="selected no parameter"):
        load_pretrained_weights(wrapper, [{"path": str(ckpt), "include": "nothing_matches"}])


def test_save_atomic_leaves_no_partial_file(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_atomic({"a": torch.ones(2)}, str(path))
    assert torch.load(path)["a"].sum() == 2

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"a": Boom()}, str(path))
    assert torch.load(path)["a"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]
