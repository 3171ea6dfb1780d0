"""Shared pytest setup: tiny models, single-threaded torch, deterministic seeds."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_student_cfg(**overrides):
    """A tiny Panopticon student config section (fast on CPU)."""
    cfg = dict(arch="vit_small", embed_dim=32, depth=2, num_heads=2, patch_size=8, embed_layer="PanopticonPE",
               pe_args=dict(attn_dim=32, chnfus_cfg=dict(attn_cfg=dict(num_heads=2))), drop_path_rate=0.0,
               layerscale=1e-5)
    cfg.update(overrides)
    return cfg


@pytest.fixture
def tiny_cfg():
    return tiny_student_cfg()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
