"""`load_model("hf-hub:ORG/NAME[@REVISION]")` against a local Hub server (HF_ENDPOINT), revision pinning, offline
loads from the Hugging Face cache, and safetensors weights equal to the .pth they came from."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_student_cfg
from hf_server import HubRepos, start_hub

pytest.importorskip("huggingface_hub")
pytest.importorskip("safetensors")

_LOAD = r"""
import json, sys, torch
from dinov2 import load_model
out = {}
for label, source in json.loads(sys.argv[1]).items():
    try:
        model = load_model(source)
        torch.save(model.state_dict(), f"{sys.argv[2]}/{label}.pth")
        out[label] = model.info.kind
    except Exception as exc:
        out[label] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""


def _tiny(seed):
    from dinov2.models import build_model

    torch.manual_seed(seed)
    return build_model(tiny_student_cfg(pos_emb_img_size=32), only_teacher=True, img_size=32)[0].eval()


def _safetensors_bytes(model, folder):
    from dinov2.utils.checkpoint import save_backbone_safetensors

    folder.mkdir()
    save_backbone_safetensors(model.state_dict(), str(folder / "model.safetensors"),
                              tiny_student_cfg(pos_emb_img_size=32))
    return (folder / "model.safetensors").read_bytes(), (folder / "config.yaml").read_bytes()


def _load(sources, tmp_path, endpoint, offline=False):
    out = tmp_path / ("offline" if offline else "online")
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1" if offline else "0", PANOPTICON_OFFLINE="0")
    proc = subprocess.run([sys.executable, "-c", _LOAD, json.dumps(sources), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT "):]), out


def _same(path, model):
    state = torch.load(path, weights_only=True)
    return all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hf_hub_revisions_then_offline_from_the_cache(tmp_path):
    old, new, pth = _tiny(1), _tiny(2), _tiny(3)
    old_st, _ = _safetensors_bytes(old, tmp_path / "old")
    new_st, new_cfg = _safetensors_bytes(new, tmp_path / "new")
    repos = HubRepos()
    # first commit: safetensors alone (its header rebuilds the model); then weights and config.yaml, tagged v2
    first = repos.commit("org/tiny", {"model.safetensors": old_st})
    repos.commit("org/tiny", {"model.safetensors": new_st, "config.yaml": new_cfg}, refs=("main", "v2"))
    torch.save(pth.state_dict(), tmp_path / "teacher.pth")
    repos.commit("org/released", {"panopticon_vitb14_teacher.pth": (tmp_path / "teacher.pth").read_bytes(),
                                  "config.yaml": new_cfg})
    server, endpoint = start_hub(repos)
    try:
        sources = {"main": "hf-hub:org/tiny", "pinned": f"hf-hub:org/tiny@{first}", "tag": "hf-hub:org/tiny@v2",
                   "pth": "hf-hub:org/released"}
        result, out = _load(dict(sources, missing="hf-hub:org/nothing", badrev="hf-hub:org/tiny@nope"),
                            tmp_path, endpoint)
        assert {k: result[k] for k in sources} == {k: "hf-hub" for k in sources}, result
        assert _same(out / "main.pth", new) and _same(out / "tag.pth", new)
        assert _same(out / "pinned.pth", old) and _same(out / "pth.pth", pth)
        assert "repository not found" in result["missing"] and "revision 'nope' not found" in result["badrev"]
        seen = len(repos.requests)
        assert ("GET", f"/org/tiny/resolve/{first}/model.safetensors") in repos.requests
        # offline: the same sources come from the cache without a single request; an unseen revision is an error
        result, out = _load(dict(sources, unseen="hf-hub:org/tiny@v3"), tmp_path, endpoint, offline=True)
        assert {k: result[k] for k in sources} == {k: "hf-hub" for k in sources}, result
        assert _same(out / "main.pth", new) and _same(out / "pinned.pth", old) and _same(out / "pth.pth", pth)
        assert "offline mode" in result["unseen"] and "not in the Hugging Face cache" in result["unseen"]
        assert len(repos.requests) == seen
    finally:
        server.shutdown()


def test_safetensors_export_round_trip_equals_the_pth(tmp_path, capsys):
    """`panopticon export --format safetensors` of a run folder loads back bit-for-bit equal to the .pth."""
    from dinov2 import load_model
    from dinov2.run import export as export_cli

    run = tmp_path / "run"
    run.mkdir()
    model = _tiny(5)
    torch.save({"model": {"teacher.backbone." + k: v for k, v in model.state_dict().items()}, "iteration": 1},
               run / "model_final.pth")
    (run / "config.yaml").write_text(json.dumps({"student": tiny_student_cfg(pos_emb_img_size=32)}))
    out = str(tmp_path / "hf" / "m")
    assert export_cli.main(["--model", str(run), "--format", "safetensors", "--output", out]) == 0
    st = load_model(str(tmp_path / "hf" / "m.safetensors"))
    pth = load_model(str(run))
    assert st.info.config == pth.info.config
    assert st.state_dict().keys() == pth.state_dict().keys()
    assert all(torch.equal(st.state_dict()[k], v) for k, v in pth.state_dict().items())
    x = {"imgs": torch.randn(2, 4, 32, 32), "chn_ids": torch.tensor([[490, 560, 665, 842]] * 2)}
    with torch.no_grad():
        assert torch.equal(st(x), pth(x))
    # the header alone rebuilds the model: without the config.yaml beside it, the same weights load
    (tmp_path / "hf" / "config.yaml").unlink()
    assert all(torch.equal(load_model(str(tmp_path / "hf" / "m.safetensors")).state_dict()[k], v)
               for k, v in pth.state_dict().items())
