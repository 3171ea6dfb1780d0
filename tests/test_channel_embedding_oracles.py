"""Channel embeddings against independent oracles: the optical sin-cos embedding recomputed element by element with
Python's math module, and the (mu, sigma) integrated encoding against numerical integration of sin / cos over the
Gaussian spectral response (no call into the code under test for the expected values)."""
import math

import numpy as np
import pytest
import torch

from dinov2.models.channel_embedding import ChnEmb


def sincos_oracle(nm: float, dim: int) -> list:
    """For i < dim/2: sin(nm / 10000^(i/(dim/2))); for i >= dim/2: cos of the same angle for i - dim/2."""
    half = dim // 2
    angles = [nm / 10000 ** (i / half) for i in range(half)]
    return [math.sin(a) for a in angles] + [math.cos(a) for a in angles]


_trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")  # renamed in numpy 2.0


def srf_integral_oracle(mu: float, sigma: float, dim: int, n: int = 400001) -> np.ndarray:
    """E[sin(w X)] (even d) / E[cos(w X)] (odd d) for X ~ N(mu, sigma^2), w = 10000^(-2d/dim), integrated with the
    trapezoidal rule over mu +- 12 sigma."""
    x = np.linspace(mu - 12 * sigma, mu + 12 * sigma, n)
    pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    out = []
    for d in range(dim):
        w = 10000.0 ** (-2.0 * d / dim)
        f = np.sin(w * x) if d % 2 == 0 else np.cos(w * x)
        out.append(_trapezoid(f * pdf, x))
    return np.array(out)


@pytest.mark.parametrize("dim", [8, 24, 2304])
def test_optical_embedding_is_sincos_of_floor_nm(dim):
    emb = ChnEmb(dim)
    ids = torch.tensor([664.9, 442.2, 10847.0, 0.0, 2203.99])
    out = emb(ids)
    assert out.shape == (5, dim) and out.dtype == torch.float32
    for row, nm in zip(out, [664, 442, 10847, 0, 2203]):  # the embedding uses floor(nm)
        assert row.tolist() == pytest.approx(sincos_oracle(nm, dim), abs=2e-6)


def test_optical_embedding_coarsity_and_batch_shape():
    emb = ChnEmb(16, opt_coarsity=10)
    ids = torch.tensor([[664.9, 442.2], [1613.0, 2203.0]])
    before = ids.clone()
    out = emb(ids)
    assert out.shape == (2, 2, 16)
    for (i, j), nm in {(0, 0): 66, (0, 1): 44, (1, 0): 161, (1, 1): 220}.items():  # floor(nm / 10)
        assert out[i, j].tolist() == pytest.approx(sincos_oracle(nm, 16), abs=2e-6)
    assert torch.equal(ids, before)  # the caller's ids are untouched


@pytest.mark.parametrize("mu,sigma", [(442.92, 7.2), (827.0, 36.8), (2203.0, 64.6), (559.0, 0.5), (1000.0, 2.0)])
@pytest.mark.parametrize("dim", [8, 16])
def test_integrated_encoding_matches_numerical_integration(mu, sigma, dim):
    emb = ChnEmb(dim, use_full_spectra=True)
    out = emb(torch.tensor([mu]), torch.tensor([sigma]))[0].detach().double().numpy()
    expected = srf_integral_oracle(mu, sigma, dim)
    assert np.allclose(out, expected, atol=2e-6), np.abs(out - expected).max()
    # sigma > 0 damps the high frequencies: the encoding is not the sigma -> 0 limit
    point = np.array([math.sin(mu * 10000 ** (-2 * d / dim)) if d % 2 == 0 else math.cos(mu * 10000 ** (-2 * d / dim))
                      for d in range(dim)])
    if sigma >= 7:
        assert np.abs(out - point).max() > 0.1


def test_integrated_encoding_mixes_with_sar_ids():
    emb = ChnEmb(8, use_full_spectra=True)
    with torch.no_grad():
        emb.embed_transmit.fill_(1.0)
        emb.embed_receive.fill_(2.0)
        emb.embed_orbit.fill_(3.0)
    mu, sigma = torch.tensor([664.6, -2.0]), torch.tensor([11.8, -1.0])
    out = emb(mu, sigma)
    assert np.allclose(out[0].detach().double().numpy(), srf_integral_oracle(664.6, 11.8, 8), atol=2e-6)
    assert out[1].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]  # VH, orbit unknown: mean of the orbit rows
