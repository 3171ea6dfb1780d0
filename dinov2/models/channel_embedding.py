"""Channel embeddings of the spectral patch embedding: what a band *is*, as a vector.

Optical bands (id >= 0) are described by their centre wavelength in nm and get a fixed sin-cos embedding of
floor(nm); with (mu, sigma) ids and `use_full_spectra=True` an integrated (Gaussian-SRF) encoding is used instead.
SAR bands (ids -1..-12) get a learned [transmit | receive | orbit] embedding (ids in docs/data.md).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .input_checks import is_tracing

NUM_SAR_CODES = 12


def sincos_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D sin-cos embedding: first half sin(v * w_i), second half cos(v * w_i), w_i = 10000^(-i/(dim/2))."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    half = dim // 2
    omega = torch.arange(half, dtype=torch.float64, device=values.device) / half
    omega = 1.0 / (10000.0 ** omega)
    angles = values.to(torch.float64)[..., None] * omega
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(torch.float32)


def integrated_embedding(mu: torch.Tensor, sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Integrated positional encoding of a Gaussian SRF N(mu, sigma^2).

    For d in 0..dim-1 with w_d = 10000^(-2d/dim): exp(-(w_d sigma)^2 / 2) * (sin(w_d mu) if d even else cos(w_d mu)).
    """
    d = torch.arange(dim, dtype=torch.float64, device=mu.device)
    omega = 1.0 / (10000.0 ** (2.0 * d / dim))
    mu64, sigma64 = mu.to(torch.float64)[..., None], sigma.to(torch.float64)[..., None]
    damp = torch.exp(-0.5 * (omega * sigma64) ** 2)
    phase = omega * mu64
    even = (torch.arange(dim, device=mu.device) % 2) == 0
    return (damp * torch.where(even, torch.sin(phase), torch.cos(phase))).to(torch.float32)


class ChnEmb(nn.Module):
    """Channel embedding `(…, C) or (…, C, 2) ids -> (…, C, dim)`; never mutates the ids."""

    def __init__(self, embed_dim: int, use_full_spectra: bool = False, opt_coarsity: int = 1) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.use_full_spectra = use_full_spectra
        self.opt_coarsity = opt_coarsity
        d3 = embed_dim // 3
        # rows: 0 = V (transmit/receive) or ascending (orbit), 1 = H or descending
        self.embed_transmit = nn.Parameter(torch.zeros(2, d3))
        self.embed_receive = nn.Parameter(torch.zeros(2, d3))
        self.embed_orbit = nn.Parameter(torch.zeros(2, embed_dim - 2 * d3))
        k = torch.arange(NUM_SAR_CODES)
        pol = k % 4  # 0 VV, 1 VH, 2 HH, 3 HV
        self.register_buffer("_sar_tx", (pol >= 2).long(), persistent=False)
        self.register_buffer("_sar_rx", ((pol == 1) | (pol == 2)).long(), persistent=False)
        self.register_buffer("_sar_orbit", k // 4, persistent=False)  # 0 both, 1 ascending, 2 descending

    def sar_table(self) -> torch.Tensor:
        """The 12 SAR embeddings `(12, dim)`, row k for id -(k+1)."""
        orbit_rows = torch.cat([self.embed_orbit.mean(0, keepdim=True), self.embed_orbit], dim=0)  # both, asc, desc
        return torch.cat(
            [self.embed_transmit[self._sar_tx], self.embed_receive[self._sar_rx], orbit_rows[self._sar_orbit]], dim=-1
        )

    def forward(self, mu: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed ids `mu (...)` (nm or SAR code) with optional SRF widths `sigma (...)` -> `(..., dim)`."""
        mu = mu.to(torch.float32)
        is_sar = mu < 0
        if sigma is not None and self.use_full_spectra:
            optical = integrated_embedding(mu, sigma.to(torch.float32), self.embed_dim)
        else:
            optical = sincos_embedding(torch.floor(mu / self.opt_coarsity), self.embed_dim)
        if not is_tracing() and not bool(is_sar.any()):  # exported graphs always take the (exact) SAR branch
            return optical
        sar_idx = (-mu - 1).clamp(0, NUM_SAR_CODES - 1).long()
        sar = self.sar_table()[sar_idx]
        return torch.where(is_sar[..., None], sar.to(optical.dtype), optical)


def check_chn_ids(chn_ids: torch.Tensor, batch: int, channels: int) -> None:
    """Validate `(B,C)` / `(B,C,2)` channel ids against an image batch; raise ValueError naming the problem."""
    if not isinstance(chn_ids, torch.Tensor):
        raise ValueError(f"chn_ids must be a tensor, got {type(chn_ids).__name__}")
    ok_shape = chn_ids.shape[:2] == (batch, channels) and (
        chn_ids.ndim == 2 or (chn_ids.ndim == 3 and chn_ids.shape[2] == 2)
    )
    if not ok_shape:
        raise ValueError(
            f"chn_ids must have shape (B, C) = ({batch}, {channels}) or (B, C, 2), got {tuple(chn_ids.shape)}"
        )
    ids = chn_ids.to(torch.float64)
    if not bool(torch.isfinite(ids).all()):
        raise ValueError("chn_ids contain non-finite values (NaN or inf)")
    mu = ids[..., 0] if chn_ids.ndim == 3 else ids
    sar = mu < 0
    if bool(sar.any()):
        bad = mu[sar & ((mu < -NUM_SAR_CODES) | (mu != torch.round(mu)))]
        if bad.numel():
            raise ValueError(
                f"SAR chn_id {bad[0].item():g} is invalid: SAR ids are the integers -1..-{NUM_SAR_CODES} "
                "(VV, VH, HH, HV x orbit both/ascending/descending)"
            )


