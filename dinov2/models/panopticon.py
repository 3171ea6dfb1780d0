"""Panopticon's spectral patch embedding (`PanopticonPE`).

Every channel's P x P patch is projected to `attn_dim` by the same linear map (a 1 x P x P Conv3d), its channel
embedding is added, and a single learned query cross-attends over the channels of each patch (keys/values are
linear projections, no query/output projection); the result is projected to the ViT width. The output does not
depend on channel order, and masked (padded) channels are ignored.

Two computations of the same function share one set of parameters and the published state-dict names:
- ``impl='reference'`` follows the published computation literally: it forms key and value vectors for every
  channel token (O(C * attn_dim^2) per patch, C x L x attn_dim activations).
- ``impl='fused'`` (default) uses that everything but the softmax is linear and the query is a parameter, so the
  key projection folds into a per-head P*P filter and the value projection is applied after channel pooling
  (derivation in docs/patch_embedding.md). The folded products are formed in fp32, also under
  autocast, and gradients flow to every original parameter. The folded products are recomputed on every
  call unless inference code opts into reusing them (`freeze_fused_cache()` / `frozen_fused_cache(model)`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .channel_embedding import ChnEmb, check_chn_ids
from .input_checks import check_masks, is_tracing, prepare_images

IMPLS = ("fused", "reference")
CHUNK_BYTES = 8 * 2**20  # fused path: rearranged patches processed per chunk (cache-sized)


class Conv3dWrapper(nn.Module):
    """The per-channel P x P patch projection: (B,C,H,W) -> (B,C,L,attn_dim) (reference path)."""

    def __init__(self, attn_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.conv3d = nn.Conv3d(1, attn_dim, kernel_size=(1, patch_size, patch_size),
                                stride=(1, patch_size, patch_size))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(imgs.unsqueeze(1))  # (B, A, C, h, w)
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, C, L, A)


class CrossAttnNoQueryProj(nn.Module):
    """Multi-head cross-attention of given queries over keys/values; no query or output projection."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attn_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.inproj_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.inproj_v = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None):
        """q (N,1,A), kv (N,C,A), key_padding_mask (N,C) True = ignore -> (N,1,A)."""
        N, C, A = kv.shape
        H, d = self.num_heads, self.head_dim
        k = self.inproj_k(kv).reshape(N, C, H, d).transpose(1, 2)
        v = self.inproj_v(kv).reshape(N, C, H, d).transpose(1, 2)
        qh = q.reshape(N, 1, H, d).transpose(1, 2)
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=self.scale)
        return out.transpose(1, 2).reshape(N, 1, A)


class ChnAttn(nn.Module):
    """Channel fusion: channel embedding + learned single query + cross-attention (+ optional LayerNorm)."""

    def __init__(self, dim: int, layer_norm: bool = False, attn_cfg: Optional[Dict] = None,
                 chnemb_cfg: Optional[Dict] = None) -> None:
        super().__init__()
        attn_cfg = dict(attn_cfg or {})
        self.chnemb = ChnEmb(dim, **dict(chnemb_cfg or {}))
        self.query = nn.Parameter(torch.randn(1, 1, dim))
        self.xattn = CrossAttnNoQueryProj(dim, **attn_cfg)
        self.layer_norm = nn.LayerNorm(dim) if layer_norm else None


class PanopticonPE(nn.Module):
    """Spectral patch embedding: x_dict -> (tokens (B, L, embed_dim), grid_h, grid_w)."""

    def __init__(self, attn_dim: int, embed_dim: int, patch_size: int, chnfus_cfg: Optional[Dict] = None,
                 impl: str = "fused") -> None:
        super().__init__()
        if attn_dim % 2 != 0:
            raise ValueError(f"attn_dim must be even (sin-cos channel embedding), got {attn_dim}")
        self.attn_dim = attn_dim
        self.embed_dim = embed_dim
        self.patch_size = int(patch_size)
        self.impl = impl
        self.conv3d = Conv3dWrapper(attn_dim, self.patch_size)
        self.chnfus = ChnAttn(attn_dim, **dict(chnfus_cfg or {}))
        self.proj = nn.Linear(attn_dim, embed_dim)
        self._fold_frozen = False
        self._fold_cache: Optional[Tuple[tuple, Tuple[torch.Tensor, ...]]] = None

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"PanopticonPE impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    # ------------------------------------------------------------------------------------------------ checks
    def _validate(self, x_dict) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Structure checks here; value checks, dtype cast and masked-channel zeroing in `input_checks`."""
        if not isinstance(x_dict, dict):
            raise ValueError("PanopticonPE expects an x_dict with keys 'imgs', 'chn_ids' (and optional 'spec_masks')")
        for key in ("imgs", "chn_ids"):
            if key not in x_dict:
                raise ValueError(f"x_dict is missing the key {key!r}")
        imgs, chn_ids = x_dict["imgs"], x_dict["chn_ids"]
        if not isinstance(imgs, torch.Tensor) or imgs.ndim != 4:
            shape = tuple(imgs.shape) if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise ValueError(f"imgs must be a 4-D tensor (B, C, H, W), got {shape}")
        B, C, H, W = imgs.shape
        if H < self.patch_size or W < self.patch_size:
            raise ValueError(f"image {H}x{W} is smaller than one {self.patch_size}x{self.patch_size} patch")
        if not is_tracing():
            check_chn_ids(chn_ids, B, C)
        masks = check_masks(x_dict.get("spec_masks"), B, C, imgs.device)
        imgs = prepare_images(imgs, self.proj.weight.dtype, masks)
        return imgs, chn_ids.to(imgs.device), masks

    def forward(self, x_dict) -> Tuple[torch.Tensor, int, int]:
        imgs, chn_ids, masks = self._validate(x_dict)
        h, w = imgs.shape[-2] // self.patch_size, imgs.shape[-1] // self.patch_size
        mu = chn_ids[..., 0] if chn_ids.ndim == 3 else chn_ids
        sigma = chn_ids[..., 1] if chn_ids.ndim == 3 else None
        if self.impl == "fused":
            x = self._forward_fused(imgs, mu, sigma, masks, h, w)
        else:
            x = self._forward_reference(imgs, mu, sigma, masks)
        return self.proj(x), h, w

    # --------------------------------------------------------------------------------------------- reference
    def _forward_reference(self, imgs, mu, sigma, masks) -> torch.Tensor:
        B, C = imgs.shape[:2]
        x = self.conv3d(imgs)  # (B, C, L, A)
        L = x.shape[2]
        emb = self.chnfus.chnemb(mu, sigma).to(x.dtype)  # (B, C, A)
        x = (x + emb[:, :, None, :]).transpose(1, 2).reshape(B * L, C, self.attn_dim)
        q = self.chnfus.query.to(x.dtype).expand(B * L, 1, self.attn_dim)
        kpm = None if masks is None else masks[:, None, :].expand(B, L, C).reshape(B * L, C)
        out = self.chnfus.xattn(q, x, key_padding_mask=kpm).reshape(B, L, self.attn_dim)
        if self.chnfus.layer_norm is not None:
            out = self.chnfus.layer_norm(out)
        return out

    # ------------------------------------------------------------------------------------------------- fused
    def _channel_terms(self, mu: torch.Tensor, sigma: Optional[torch.Tensor], u: torch.Tensor, wv: torch.Tensor,
                       bias: torch.Tensor):
        """Per-channel logit offsets beta (B,C,H) and value offsets z (B,C,H,d), computed once per distinct id."""
        ids = mu if sigma is None else torch.stack([mu, sigma], dim=-1)
        flat = ids.reshape(-1, 1) if sigma is None else ids.reshape(-1, 2)
        if is_tracing():  # torch.unique has a data-dependent size: embed every (image, channel) id instead
            uniq = flat.float()
            inverse = torch.arange(flat.shape[0], device=flat.device)
        else:
            uniq, inverse = torch.unique(flat.float(), dim=0, return_inverse=True)
        emb = self.chnfus.chnemb(uniq[:, 0], None if sigma is None else uniq[:, 1]).float()  # (U, A)
        be = emb + bias  # conv bias + channel embedding
        xattn = self.chnfus.xattn
        beta = (be @ u.t()) * xattn.scale  # (U, H)
        z = (be @ wv.t()).reshape(-1, xattn.num_heads, xattn.head_dim)  # (U, H, d)
        shape = mu.shape
        return beta[inverse].reshape(*shape, -1), z[inverse].reshape(*shape, xattn.num_heads, xattn.head_dim)

    def _fold_params(self) -> Tuple[torch.Tensor, ...]:
        xattn = self.chnfus.xattn
        return (self.conv3d.conv3d.weight, xattn.inproj_k.weight, xattn.inproj_v.weight, self.chnfus.query)

    def _compute_folded(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xattn = self.chnfus.xattn
        H, d, A, P = xattn.num_heads, xattn.head_dim, self.attn_dim, self.patch_size
        wc = self.conv3d.conv3d.weight.float().reshape(A, P * P)
        q = self.chnfus.query.float().reshape(H, d)
        u = torch.einsum("hd,hda->ha", q, xattn.inproj_k.weight.float().reshape(H, d, A))
        kappa = (u @ wc) * xattn.scale
        m = torch.einsum("hda,ap->hdp", xattn.inproj_v.weight.float().reshape(H, d, A), wc)
        return u, kappa, m

    def _folded_weights(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u_h = Wk_h^T q_h (H, A); kappa_h = scale * Wc^T u_h (H, P*P); M_h = Wv_h Wc (H, d, P*P), in fp32.

        Recomputed on every forward pass (about 1 GFLOP at ViT-B, small next to the embedding itself): no
        implicit cache can tell reliably that the weights are unchanged -- `.data` updates (a common EMA idiom)
        and FSDP2's refill of unsharded parameters do not bump version counters, and a freed parameter's address
        can be reused by a new one. Reuse across calls happens only after an explicit `freeze_fused_cache()`.
        """
        if not self._fold_frozen or is_tracing():  # tracing sees fake tensors without data pointers
            return self._compute_folded()
        if self.training:
            raise RuntimeError("PanopticonPE.freeze_fused_cache() is for inference: the module is in training "
                               "mode (call .eval() before freezing)")
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._fold_params()):
            return self._compute_folded()  # a cached tensor would cut the gradient to the parameters
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self._fold_params())
        if self._fold_cache is None or self._fold_cache[0] != key:
            # plain tensors (not inference tensors), so the cache also serves calls outside inference_mode
            with torch.inference_mode(False), torch.no_grad():
                self._fold_cache = (key, self._compute_folded())
        return self._fold_cache[1]

    # ----------------------------------------------------------------------------------- opt-in fold cache
    def freeze_fused_cache(self) -> "PanopticonPE":
        """Reuse the folded weights across forward passes until `unfreeze_fused_cache()` (inference only).

        The caller promises not to change the parameters while frozen. The cache is dropped by `train()`/`eval()`
        (`train(True)` also ends frozen mode), by `load_state_dict` and by `.to()`/`.half()`-style moves; a
        forward pass that needs gradients recomputes. Returns self."""
        if self.training:
            raise RuntimeError("freeze_fused_cache() needs eval mode (call .eval() first)")
        self._fold_frozen = True
        self._fold_cache = None
        return self

    def unfreeze_fused_cache(self) -> "PanopticonPE":
        """Back to recomputing the folded weights on every forward pass (the default). Returns self."""
        self._fold_frozen = False
        self._fold_cache = None
        return self

    @property
    def fused_cache_frozen(self) -> bool:
        return self._fold_frozen

    def train(self, mode: bool = True) -> "PanopticonPE":
        self._fold_cache = None
        if mode:
            self._fold_frozen = False
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._fold_cache = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._fold_cache = None  # called for this module whenever a parent loads a state dict
        super()._load_from_state_dict(*args, **kwargs)

    def _rows_per_chunk(self, B: int, C: int, w: int) -> int:
        """Patch rows per chunk so that one chunk of rearranged patches is about CHUNK_BYTES."""
        row_bytes = B * C * w * self.patch_size * self.patch_size * 4
        return max(1, CHUNK_BYTES // max(row_bytes, 1))

    def _forward_fused(self, imgs, mu, sigma, masks, h, w) -> torch.Tensor:
        B, C = imgs.shape[:2]
        P, A = self.patch_size, self.attn_dim
        xattn = self.chnfus.xattn
        H, d = xattn.num_heads, xattn.head_dim
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            u, kappa, m = self._folded_weights()
            bias = self.conv3d.conv3d.bias.float()
            beta, z = self._channel_terms(mu, sigma, u, xattn.inproj_v.weight.float(), bias)
            if xattn.inproj_k.bias is not None:
                q = self.chnfus.query.float().reshape(H, d)
                beta = beta + (q * xattn.inproj_k.bias.float().reshape(H, d)).sum(-1) * xattn.scale
            if xattn.inproj_v.bias is not None:
                z = z + xattn.inproj_v.bias.float().reshape(H, d)

            # Work through the image a band of patch rows at a time: the rearranged patches of one band stay
            # in cache for the two matmuls that read them (the full 202-band cube does not fit).
            # (one band when tracing: a chunk count would be baked in for the example's B, C and size, and a
            # loop over a symbolic height would fix the height)
            if is_tracing():
                bands = [(0, h)]
            else:
                rows = self._rows_per_chunk(B, C, w)
                bands = [(r0, min(rows, h - r0)) for r0 in range(0, h, rows)]
            chunks = []
            for r0, r in bands:
                x = imgs[:, :, r0 * P:(r0 + r) * P, : w * P].float()
                patches = x.reshape(B, C, r, P, w, P).permute(0, 2, 4, 1, 3, 5).reshape(B, r * w, C, P * P)
                logits = torch.matmul(patches, kappa.t()).transpose(-1, -2)  # (B, l, H, C)
                logits = logits + beta.transpose(1, 2)[:, None]  # beta (B, C, H) -> (B, 1, H, C)
                if masks is not None:
                    logits = logits.masked_fill(masks[:, None, None, :], float("-inf"))
                attn = logits.softmax(dim=-1)
                pooled = torch.matmul(attn, patches)  # (B, l, H, P*P): per-head channel mix of the pixels
                chunk = torch.einsum("blhp,hdp->blhd", pooled, m)
                chunks.append(chunk + torch.einsum("blhc,bchd->blhd", attn, z))  # + sum_c a_hc z_hc
            out = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
            out = out.reshape(B, h * w, A)
            if self.chnfus.layer_norm is not None:
                out = self.chnfus.layer_norm(out)
        return out.to(imgs.dtype)


@contextmanager
def frozen_fused_cache(model: nn.Module) -> Iterator[nn.Module]:
    """Inference context: every `PanopticonPE` in `model` (which must be in eval mode) computes its folded
    weights once and reuses them; on exit they go back to recomputing. Do not update parameters inside."""
    pes = [m for m in model.modules() if isinstance(m, PanopticonPE)]
    for m in pes:
        m.freeze_fused_cache()
    try:
        yield model
    finally:
        for m in pes:
            m.unfreeze_fused_cache()
