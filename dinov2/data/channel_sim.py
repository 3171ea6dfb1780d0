"""Hyperspectral channel simulation: synthesise new broad bands from a hyperspectral cube.

Each target band t has a Gaussian spectral response (mu_t, sigma_t). Its value is the SRF-overlap-weighted
mean of the source channels,

    band_t = sum_c w_tc x_c / sum_c w_tc,   w_tc = integral g_c(l) g_t(l) dl
           ∝ sigma_c / sqrt(sigma_c^2 + sigma_t^2) * exp(-(mu_c - mu_t)^2 / (2 (sigma_c^2 + sigma_t^2)))

with g unnormalised Gaussians; the integral is evaluated in closed form instead of on a 1000-point grid.
Normalising by the sum of weights (rather than by integral g_t as published) makes a flat spectrum give a flat
band of the same value, whatever the source band spacing.

Source sigmas come from (C,2) `[mu, sigma]` chn_ids (full_spectra). With (C,) ids sigma is derived assuming
each band's FWHM equals its local band spacing (sigma = spacing / 2.3548), which holds for contiguous imaging
spectrometers such as EnMAP. SAR channels (negative ids) are ignored.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def derive_sigmas(mus: torch.Tensor) -> torch.Tensor:
    """Sigma per band assuming FWHM = mean distance to the neighbouring band centres (min 1 nm spacing)."""
    if mus.numel() < 2:
        raise ValueError("deriving SRF sigmas needs at least 2 optical bands")
    order = torch.argsort(mus)
    gaps = torch.diff(mus[order]).clamp(min=1.0)
    spacing = torch.empty_like(mus)
    left = torch.cat([gaps[:1], gaps])
    right = torch.cat([gaps, gaps[-1:]])
    spacing[order] = (left + right) / 2
    return spacing * _FWHM_TO_SIGMA


def srf_weights(src_mu: torch.Tensor, src_sigma: torch.Tensor, tgt_mu: torch.Tensor, tgt_sigma: torch.Tensor,
                rel_cutoff: float = 1e-5) -> torch.Tensor:
    """Row-normalised (n_targets, n_sources) SRF-overlap weights (see module docstring)."""
    var = src_sigma.double()[None] ** 2 + tgt_sigma.double()[:, None] ** 2
    diff = src_mu.double()[None] - tgt_mu.double()[:, None]
    w = src_sigma.double()[None] / var.sqrt() * torch.exp(-diff ** 2 / (2 * var))
    w = torch.where(w < rel_cutoff * w.amax(dim=1, keepdim=True), torch.zeros_like(w), w)
    total = w.sum(dim=1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("channel simulation: a target band overlaps no source band")
    return w / total


class ChannelSimulator:
    """Draw random target bands and synthesise them from a hyperspectral view.

    Args:
        n_channels_range: [low, high] inclusive number of target bands (the crop family's spectral size).
        wavelength_ranges: [[lo, hi], ...] nm where target SRFs may lie (excludes water-absorption bands).
        sigma_ranges: [(lo, hi), ...] nm; one range is picked uniformly per target band.
        sigma_distribution: 'uniform' or 'normal' (truncated normal centred in the range, std = width / 4).
        min_channels: minimum number of optical source channels.
    """

    def __init__(self, n_channels_range: Sequence[int], wavelength_ranges: Sequence[Sequence[float]],
                 sigma_ranges: Sequence[Sequence[float]], sigma_distribution: str = "uniform",
                 min_channels: int = 100) -> None:
        if len(n_channels_range) != 2 or not 1 <= n_channels_range[0] <= n_channels_range[1]:
            raise ValueError(f"n_channels_range must be [low, high] with 1 <= low <= high, got {n_channels_range!r}")
        if not wavelength_ranges or any(len(r) != 2 or not r[0] < r[1] for r in wavelength_ranges):
            raise ValueError(f"wavelength_ranges must be a non-empty list of [lo, hi] with lo < hi, got "
                             f"{wavelength_ranges!r}")
        if not sigma_ranges or any(len(r) != 2 or not 0 < r[0] <= r[1] for r in sigma_ranges):
            raise ValueError(f"sigma_ranges must be a non-empty list of (lo, hi) with 0 < lo <= hi, got {sigma_ranges!r}")
        if sigma_distribution not in ("uniform", "normal"):
            raise ValueError(f"sigma_distribution must be 'uniform' or 'normal', got {sigma_distribution!r}")
        self.n_range = (int(n_channels_range[0]), int(n_channels_range[1]))
        self.wavelength_ranges = [(float(a), float(b)) for a, b in wavelength_ranges]
        self.sigma_ranges = [(float(a), float(b)) for a, b in sigma_ranges]
        self.sigma_distribution = sigma_distribution
        self.min_channels = int(min_channels)

    def _sigma(self) -> float:
        lo, hi = self.sigma_ranges[int(torch.randint(len(self.sigma_ranges), ()).item())]
        u = torch.rand((), dtype=torch.float64)
        if self.sigma_distribution == "uniform" or hi == lo:
            return float(lo + (hi - lo) * u)
        mean, std = (lo + hi) / 2, (hi - lo) / 4
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
        a, b = normal.cdf(torch.tensor((lo - mean) / std)), normal.cdf(torch.tensor((hi - mean) / std))
        return float(mean + std * torch.special.ndtri(a + (b - a) * u))

    def sample_targets(self, cover_lo: float, cover_hi: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw (mu, sigma) of the target bands inside the valid ranges clipped to [cover_lo, cover_hi]."""
        spans = [(max(a, cover_lo), min(b, cover_hi)) for a, b in self.wavelength_ranges]
        spans = [(a, b) for a, b in spans if b > a]
        if not spans:
            raise ValueError(f"channel simulation: source bands cover [{cover_lo:g}, {cover_hi:g}] nm, which does not "
                             f"intersect the valid wavelength ranges {self.wavelength_ranges}")
        widest = max(b - a for a, b in spans)
        n = int(torch.randint(self.n_range[0], self.n_range[1] + 1, ()).item())
        mus, sigmas = [], []
        for _ in range(n):
            sigma = min(self._sigma(), widest / 6.0)  # the SRF's +-3 sigma must fit inside one valid range
            room = [(a + 3 * sigma, max(b - 3 * sigma - (a + 3 * sigma), 0.0)) for a, b in spans
                    if b - a >= 6 * sigma - 1e-9]
            total = sum(length for _, length in room)
            pos = float(torch.rand((), dtype=torch.float64)) * total
            mu = room[0][0]
            for start, length in room:  # uniform over the union of admissible centre intervals
                if pos <= length:
                    mu = start + pos
                    break
                pos -= length
            mus.append(mu)
            sigmas.append(sigma)
        return torch.tensor(mus, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64)

    def __call__(self, view: Dict[str, Any]) -> Dict[str, Any]:
        """Return a one-group view of simulated bands with (n, 2) float32 `[mu, sigma]` chn_ids."""
        imgs, ids = list(view["imgs"]), list(view["chn_ids"])
        if len({tuple(img.shape[-2:]) for img in imgs}) != 1:
            raise ValueError("channel simulation needs all groups of the view at one resolution, got "
                             f"{[tuple(img.shape) for img in imgs]}")
        cube = imgs[0] if len(imgs) == 1 else torch.cat(imgs, dim=0)  # avoid copying a large single cube
        cid = torch.cat([i.double() for i in ids], dim=0)
        if cid.dim() == 2:
            mu, sigma = cid[:, 0], cid[:, 1]
            optical = (mu > 0) & (sigma > 0)
            mu, sigma = mu[optical], sigma[optical]
        else:
            optical = cid > 0
            mu = cid[optical]
            sigma = derive_sigmas(mu)
        if int(optical.sum()) < self.min_channels:
            raise ValueError(f"channel simulation needs >= {self.min_channels} optical channels, the view has "
                             f"{int(optical.sum())}")
        t_mu, t_sigma = self.sample_targets(float(mu.min()), float(mu.max()))
        w = srf_weights(mu, sigma, t_mu, t_sigma).to(torch.float32)
        src = (cube if bool(optical.all()) else cube[optical]).float()
        bands = (w @ src.reshape(src.shape[0], -1)).reshape(w.shape[0], *src.shape[1:])
        out = {k: v for k, v in view.items() if k not in ("imgs", "chn_ids")}
        out["imgs"] = [bands]
        out["chn_ids"] = [torch.stack([t_mu, t_sigma], dim=1).to(torch.float32)]
        return out
