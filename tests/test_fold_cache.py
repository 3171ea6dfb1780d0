"""The fused patch embedding never serves stale folded weights: `.data` updates, address reuse, FSDP2 refills of
unsharded parameters (teacher after an EMA update), and the explicit opt-in inference cache with its invalidation.

Expected outputs come from the published computation (`impl='reference'`), which has no folded weights at all."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_panopticon_pe import make_pe, run, xdict

from dinov2.models.panopticon import PanopticonPE, frozen_fused_cache

ROOT = Path(__file__).resolve().parents[1]


def _reference(pe, x):
    with torch.no_grad():
        out = run(pe, x, "reference")
    pe.impl = "fused"
    return out


def _count_folds(monkeypatch):
    calls = []
    orig = PanopticonPE._compute_folded

    def counting(self):
        calls.append(1)
        return orig(self)

    monkeypatch.setattr(PanopticonPE, "_compute_folded", counting)
    return calls


def test_inplace_data_update_without_version_bump_is_seen():
    pe = make_pe().eval()
    x = xdict(C=5)
    w = pe.chnfus.xattn.inproj_k.weight
    with torch.no_grad():
        first = run(pe, x, "fused")
        version = w._version
        w.data.mul_(3.0)  # the EMA idiom: `.data` shares storage but not the version counter
        pe.chnfus.query.data.add_(0.5)
        assert w._version == version  # the update is invisible to version-counter checks
        after = run(pe, x, "fused")
    assert not torch.allclose(first, after)
    assert (after - _reference(pe, x)).abs().max() < 1e-4


def test_new_tensor_at_the_same_address_is_seen():
    pe = make_pe().eval()
    x = xdict(C=5)
    w = pe.chnfus.xattn.inproj_v.weight
    with torch.no_grad():
        first = run(pe, x, "fused")
        ptr, version = w.data_ptr(), w._version
        # a fresh tensor object on the same memory (what an allocator handing back a freed block produces)
        alias = torch.empty(0).set_(w.untyped_storage(), w.storage_offset(), w.shape, w.stride())
        alias.normal_(0, 0.05)
        w.data = alias
        assert (w.data_ptr(), w._version) == (ptr, version)
        after = run(pe, x, "fused")
        assert not torch.allclose(first, after)
        assert (after - _reference(pe, x)).abs().max() < 1e-4
        # the real allocator: free the weight and allocate a new one of the same size, several times
        for i in range(3):
            shape = w.shape
            w.data = torch.empty(0)
            w.data = torch.randn(shape) * 0.05 * (i + 2)
            out = run(pe, x, "fused")
            assert (out - _reference(pe, x)).abs().max() < 1e-4


def test_default_recomputes_every_call(monkeypatch):
    calls = _count_folds(monkeypatch)
    pe = make_pe().eval()
    x = xdict(C=4)
    with torch.no_grad():
        run(pe, x, "fused")
        run(pe, x, "fused")
    assert len(calls) == 2 and not pe.fused_cache_frozen


def test_frozen_cache_is_opt_in_and_invalidated(monkeypatch):
    calls = _count_folds(monkeypatch)
    pe = make_pe()
    x = xdict(C=4)
    with pytest.raises(RuntimeError, match="eval"):
        pe.freeze_fused_cache()  # training mode
    pe.eval()
    with torch.no_grad():
        with frozen_fused_cache(pe):
            a = run(pe, x, "fused")
            b = run(pe, x, "fused")
            assert len(calls) == 1 and torch.equal(a, b)  # computed once, reused
            pe.load_state_dict(pe.state_dict())  # any parameter load drops the cache
            run(pe, x, "fused")
            assert len(calls) == 2
            pe.to(torch.float32)  # device / dtype moves drop it
            run(pe, x, "fused")
            assert len(calls) == 3
            pe.eval()  # train()/eval() drop it too
            run(pe, x, "fused")
            assert len(calls) == 4
        assert not pe.fused_cache_frozen  # the context ends frozen mode
        run(pe, x, "fused")
        run(pe, x, "fused")
        assert len(calls) == 6

    # loading new weights while frozen is seen
    pe.freeze_fused_cache()
    new = make_pe()
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.5)
        stale = run(pe, x, "fused")
        pe.load_state_dict(new.state_dict())
        fresh = run(pe, x, "fused")
    assert not torch.allclose(stale, fresh)
    assert (fresh - _reference(pe, x)).abs().max() < 1e-4

    # a pass that needs gradients never uses a cached (detached) tensor
    n = len(calls)
    out = run(pe, x, "fused")
    assert len(calls) == n + 1
    out.sum().backward()
    assert pe.chnfus.xattn.inproj_k.weight.grad is not None and pe.chnfus.query.grad.abs().sum() > 0

    # filled under inference_mode, still usable by a later no-grad call outside it
    pe.unfreeze_fused_cache().freeze_fused_cache()
    with torch.inference_mode():
        a = run(pe, x, "fused")
    with torch.no_grad():
        b = run(pe, x, "fused")
    assert torch.equal(a, b)
    # ... and by a pass that differentiates w.r.t. the input of a frozen model (e.g. saliency maps)
    for p in pe.parameters():
        p.requires_grad_(False)
    xg = dict(x, imgs=x["imgs"].clone().requires_grad_(True))
    n = len(calls)
    run(pe, xg, "fused").sum().backward()
    assert len(calls) == n and torch.isfinite(xg["imgs"].grad).all() and xg["imgs"].grad.abs().sum() > 0
    for p in pe.parameters():
        p.requires_grad_(True)

    pe.train()  # back to training ends frozen mode
    assert not pe.fused_cache_frozen


def _fsdp_teacher_worker(out_dir: str) -> None:
    """Two ranks, FSDP2 over gloo: the teacher's output after an EMA update equals an unsharded model loaded
    with the same (gathered) weights."""
    from test_train_common import tiny_cfg

    from dinov2 import distributed
    from dinov2 import fsdp as dp
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.utils import fix_random_seeds

    distributed.enable()
    cfg = tiny_cfg(Path(out_dir))
    fix_random_seeds(0)
    model = SSLMetaArch(cfg)
    plain = SSLMetaArch(cfg).teacher.backbone.eval()  # unsharded twin that receives the gathered weights
    model.configure_precision(torch.device("cpu"))
    model.prepare_for_distributed_training("fsdp", allow_cpu_fsdp=True)
    model.train()
    assert dp.is_sharded(model.teacher)
    g = torch.Generator().manual_seed(5)
    x = {"imgs": torch.randn(2, 4, 28, 28, generator=g), "chn_ids": torch.tensor([[492, 559, 664, 832]] * 2)}

    def teacher_out():
        with torch.no_grad():
            return model.teacher.backbone(x, is_training=True)["x_norm_clstoken"].clone()

    before = teacher_out()
    with torch.no_grad():  # move the student's shards, then the EMA moves the teacher's shards
        for p in model.student.parameters():
            dp.local_tensor(p).add_(0.3 * torch.randn_like(dp.local_tensor(p)))
    model.update_teacher(0.5)
    after = teacher_out()
    full = dp.full_state_dict(model.teacher)  # gathered on rank 0 only
    if distributed.is_main_process():
        plain.load_state_dict({k[len("backbone."):]: v for k, v in full.items() if k.startswith("backbone.")})
        with torch.no_grad():
            expected = plain(x, is_training=True)["x_norm_clstoken"]
        torch.save({"before": before, "after": after, "expected": expected}, os.path.join(out_dir, "teacher.pth"))
    distributed.barrier()
    distributed.disable()


def test_fsdp2_teacher_output_follows_ema_update(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("PANOPTICON_DEVICE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = torch.load(tmp_path / "teacher.pth", weights_only=True)
    assert (r["after"] - r["before"]).abs().max() > 1e-3  # the update changed the teacher
    assert (r["after"] - r["expected"]).abs().max() < 1e-4, (r["after"] - r["expected"]).abs().max()


if __name__ == "__main__":
    _fsdp_teacher_worker(sys.argv[1])
