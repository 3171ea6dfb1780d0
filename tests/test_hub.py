"""torch.hub entry points, one-time download into the hub cache, strict loading, weight selection."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading
from functools import partial

import pytest
import torch

import hubconf
from conftest import ROOT, tiny_student_cfg
from dinov2.models import build_model
from dinov2.utils.checkpoint import load_pretrained_weights, save_atomic, select_state_dict
from dinov2.weights_cache import cache_path, read_record, write_record


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
    assert model.pos_embed.shape == (1, 1370, 384) and len(model.blocks) == 12  # ViT-S/14 at 518 px
    assert model.blocks[0].ls1.gamma[0].item() == 1.0
    # value oracle: timm's independent DINOv2 ViT-S/14 with the same weights computes the same function
    timm = pytest.importorskip("timm", reason="timm is in the baselines extra")
    ours = hubconf.dinov2_vits14(pretrained=False, depth=2, img_size=28).eval()
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, depth=2, num_classes=0)
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and unexpected == ["mask_token"]  # every parameter has its counterpart
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, want = ours.forward_features(x), ref.eval().forward_features(x)
    torch.testing.assert_close(out["x_norm_clstoken"], want[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], want[:, 1:], rtol=0, atol=1e-5)


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
    for var in hubconf.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    torch.hub.set_dir(str(tmp_path / "hub"))
    src = hubconf.dinov2_vits14(pretrained=False, depth=1, img_size=28)
    torch.save(src.state_dict(), serve / "tiny.pth")
    url = f"{base}/tiny.pth"
    a = hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    b = hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    assert _Handler.requests == [("GET", "/tiny.pth")]  # one download; the cached copy needs no request at all
    assert torch.equal(a.pos_embed, src.pos_embed) and torch.equal(b.blocks[0].mlp.fc1.weight,
                                                                  src.blocks[0].mlp.fc1.weight)
    cached = cache_path(url)  # keyed by the URL, not the release's place
    assert os.path.dirname(os.path.dirname(cached)) == os.path.join(torch.hub.get_dir(), "checkpoints", "sources")
    digest = hashlib.sha256((serve / "tiny.pth").read_bytes()).hexdigest()
    assert read_record(cached) == {"sha256": digest, "source": url}  # recorded at download
    # a corrupted cached copy (digest differs from the recorded one) is downloaded again
    with open(cached, "r+b") as f:
        f.truncate(100)
    hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    assert [r for r in _Handler.requests if r[0] == "GET"] == [("GET", "/tiny.pth")] * 2
    # strict: a checkpoint for another architecture is refused
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        hubconf.dinov2_vits14(weights=url, depth=2, img_size=28, progress=False)
    # a digest given by the caller (or in the file name) is checked on download and on load
    with pytest.raises(RuntimeError, match="SHA-256"):
        hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False, sha256="0" * 64)
    named = f"tiny-{digest[:10]}.pth"
    (serve / named).write_bytes((serve / "tiny.pth").read_bytes())
    hubconf.dinov2_vits14(weights=f"{base}/{named}", depth=1, img_size=28, progress=False)
    wrong = "tiny-0123456789.pth"
    (serve / wrong).write_bytes((serve / "tiny.pth").read_bytes())
    with pytest.raises(RuntimeError, match="expected 0123456789: removed it"):
        hubconf.dinov2_vits14(weights=f"{base}/{wrong}", depth=1, img_size=28, progress=False)
    assert not os.path.exists(cache_path(f"{base}/{wrong}"))


@pytest.mark.parametrize("variable", ["PANOPTICON_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_mode_never_touches_the_network(tmp_path, file_server, monkeypatch, variable):
    serve, base = file_server
    torch.hub.set_dir(str(tmp_path / "hub"))
    src = hubconf.dinov2_vits14(pretrained=False, depth=1, img_size=28)
    torch.save(src.state_dict(), serve / "tiny.pth")
    monkeypatch.setenv(variable, "1")
    with pytest.raises(RuntimeError, match=r"offline mode .*tiny.pth is not cached.*weights="):
        hubconf.dinov2_vits14(weights=f"{base}/tiny.pth", depth=1, img_size=28, progress=False)
    # a file placed in the cache by hand has no record of its source: refused, naming what to delete
    url = f"{base}/tiny.pth"
    path = cache_path(url)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write((serve / "tiny.pth").read_bytes())
    with pytest.raises(RuntimeError, match=r"offline mode .*no record of its source.*Delete .*tiny.pth and "):
        hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    # ... unless the caller names its digest, which proves the content
    digest = hashlib.sha256((serve / "tiny.pth").read_bytes()).hexdigest()
    m = hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False, sha256=digest)
    assert torch.equal(m.cls_token, src.cls_token)
    # a recorded copy that was changed afterwards (partial, corrupted) is refused too
    write_record(path, digest, url)
    assert torch.equal(hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False).cls_token,
                       src.cls_token)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(RuntimeError, match="offline mode .*differs from the one recorded"):
        hubconf.dinov2_vits14(weights=url, depth=1, img_size=28, progress=False)
    assert _Handler.requests == []


def test_mirror_download_never_serves_the_release(tmp_path, file_server, monkeypatch):
    """A file fetched from a mirror with the release's file name is cached under the mirror: an offline load of the
    release afterwards is an error, not the mirror's weights; the release's cached copy never serves the mirror."""
    serve, base = file_server
    torch.hub.set_dir(str(tmp_path / "hub"))
    for var in hubconf.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    tiny = dict(depth=1, pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}})
    mirror_model = hubconf.panopticon_vitb14(pretrained=False, **tiny)
    torch.save(mirror_model.state_dict(), serve / "panopticon_vitb14_teacher.pth")
    mirror = f"{base}/panopticon_vitb14_teacher.pth"
    loaded = hubconf.panopticon_vitb14(weights=mirror, progress=False, **tiny)
    assert torch.equal(loaded.cls_token, mirror_model.cls_token)
    monkeypatch.setenv("PANOPTICON_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="offline mode .*lewaldm/panopticon.* is not cached"):
        hubconf.panopticon_vitb14(progress=False, **tiny)
    # the reverse: a recorded copy of the release never serves the mirror's URL
    release = cache_path(hubconf.PANOPTICON_URL)
    os.makedirs(os.path.dirname(release), exist_ok=True)
    other = hubconf.panopticon_vitb14(pretrained=False, **tiny)
    torch.save(other.state_dict(), release)
    write_record(release, hashlib.sha256(open(release, "rb").read()).hexdigest(), hubconf.PANOPTICON_URL)
    assert torch.equal(hubconf.panopticon_vitb14(progress=False, **tiny).cls_token, other.cls_token)
    os.remove(cache_path(mirror))
    with pytest.raises(RuntimeError, match="offline mode .*127.0.0.1.* is not cached"):
        hubconf.panopticon_vitb14(weights=mirror, progress=False, **tiny)
    assert _Handler.requests == [("GET", "/panopticon_vitb14_teacher.pth")]


def test_offline_error_explains_local_file(tmp_path, monkeypatch):
    for var in hubconf.OFFLINE_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    torch.hub.set_dir(str(tmp_path / "hub"))
    with pytest.raises(RuntimeError, match="weights="):
        hubconf.cached_download("http://127.0.0.1:9/panopticon_vitb14_teacher.pth", progress=False)


_FOREIGN_THEN_HUB = r"""
import os, sys, torch
foreign_root, repo = sys.argv[1], sys.argv[2]
sys.path.insert(0, foreign_root)
import dinov2, dinov2.models.vision_transformer as foreign_vt
assert dinov2.__file__.startswith(foreign_root)
before = {k: v for k, v in sys.modules.items() if k == "dinov2" or k.startswith("dinov2.")}
model = torch.hub.load(repo, "panopticon_vitb14", source="local", pretrained=False, depth=1,
                       pe_args={"attn_dim": 32, "chnfus_cfg": {"attn_cfg": {"num_heads": 2}}})
calls_during_load = list(foreign_vt.CALLS)
after = {k: v for k, v in sys.modules.items() if k == "dinov2" or k.startswith("dinov2.")}
x = {"imgs": torch.randn(1, 3, 28, 28), "chn_ids": torch.tensor([[664, 559, 493]])}
with torch.no_grad():
    out = model(x)
print("RESULT", type(model).__name__, tuple(out.shape), after == before, calls_during_load,
      type(model).forward.__code__.co_filename.startswith(repo), dinov2.models.vision_transformer.vit_base("x"))
"""


def test_hub_load_after_a_foreign_dinov2_runs_this_repository(tmp_path):
    """A process that already imported another `dinov2` (as after loading facebookresearch/dinov2) gets this
    repository's model; the other package stays imported and none of its code runs."""
    pkg = tmp_path / "foreign" / "dinov2"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("FOREIGN = True\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "vision_transformer.py").write_text(
        "CALLS = []\n"
        "def vit_base(*args, **kwargs):\n    CALLS.append('vit_base')\n    return 'foreign'\n"
        "vit_small = vit_large = vit_giant2 = vit_base\n"
        "class DinoVisionTransformer:\n    pass\n")
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", _FOREIGN_THEN_HUB, str(tmp_path / "foreign"), str(ROOT)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    # this repository's class and code; the foreign modules are the same objects as before, none of their code
    # ran during the load, and they still work afterwards
    assert line == "RESULT DinoVisionTransformer (1, 768) True [] True foreign", line


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
