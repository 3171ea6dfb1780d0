"""Content digests decide reuse: equal content -> equal digest, any changed value, dtype, shape or key -> new."""
import torch

from dinov2.utils.digest import file_digest, state_dict_digest


def test_state_dict_digest_follows_content():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert state_dict_digest(a) == state_dict_digest(b) == state_dict_digest(a.state_dict())
    with torch.no_grad():
        b.weight[1, 2] += 1e-6
    assert state_dict_digest(a) != state_dict_digest(b)
    sd = dict(a.state_dict())
    assert state_dict_digest({**sd, "weight": sd["weight"].double()}) != state_dict_digest(sd)
    assert state_dict_digest({**sd, "weight": sd["weight"].reshape(4, 3)}) != state_dict_digest(sd)
    assert state_dict_digest({"w2": sd["weight"], "bias": sd["bias"]}) != state_dict_digest(sd)
    mixed = {"h": torch.ones(3, dtype=torch.bfloat16), "m": torch.tensor([True, False]), "n": 3}
    assert len(state_dict_digest(mixed)) == 32


def test_file_digest(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    # SHA-256("abc"), truncated to 32 hex characters
    assert file_digest(str(p)) == "ba7816bf8f01cfea414140de5dae2223"
