"""The DINOv2 vision transformer with a selectable patch embedding (RGB `PatchEmbed` or spectral `PanopticonPE`).

Inputs are x_dicts (`imgs` (B,C,H,W), `chn_ids` (B,C) or (B,C,2), optional `spec_masks` (B,C)); a plain tensor
is accepted for RGB models. Images of any real dtype are cast to the model's dtype; bad values (NaN/inf/huge
pixels in unmasked channels, empty batches) raise ValueError -- see `input_checks`.
A list of x_dicts (multi-crop: different sizes and channel counts) runs in one call.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.init import trunc_normal_

from ..layers import BlockChunk, Mlp, NestedTensorBlock, PatchEmbed, SwiGLUFFNFused
from ..layers.attention import MemEffAttention
from .input_checks import prepare_images
from .panopticon import PanopticonPE

logger = logging.getLogger("dinov2")

XDict = Dict[str, torch.Tensor]
EMBED_LAYERS = ("PatchEmbed", "PanopticonPE")


def _as_xdict(x) -> XDict:
    if isinstance(x, torch.Tensor):
        return {"imgs": x}
    if isinstance(x, dict):
        return x
    raise ValueError(f"model input must be an x_dict (or a tensor for RGB models), got {type(x).__name__}")


class DinoVisionTransformer(nn.Module):
    """ViT backbone; state-dict names follow DINOv2 / the released Panopticon checkpoint
    (docs/architecture.md)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: Optional[float] = None,
        embed_layer: Optional[str] = "PatchEmbed",
        act_layer=nn.GELU,
        block_fn=NestedTensorBlock,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        pe_args: Optional[Dict] = None,
    ) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        embed_layer = embed_layer or "PatchEmbed"
        pe_args = dict(pe_args or {})
        if embed_layer == "PatchEmbed":
            if pe_args:
                logger.warning("pe_args %s ignored for embed_layer='PatchEmbed'", pe_args)
            self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                          embed_dim=embed_dim)
            num_patches = self.patch_embed.num_patches
        elif embed_layer == "PanopticonPE":
            attn_dim = pe_args.pop("attn_dim", embed_dim)
            self.patch_embed = PanopticonPE(attn_dim=attn_dim, embed_dim=embed_dim, patch_size=patch_size, **pe_args)
            num_patches = (img_size // patch_size) ** 2
        else:
            raise ValueError(f"unknown embed_layer {embed_layer!r}; choose one of {EMBED_LAYERS}")

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]

        if ffn_layer == "mlp":
            ffn = Mlp
        elif ffn_layer in ("swiglufused", "swiglu"):
            ffn = SwiGLUFFNFused
        elif ffn_layer == "identity":
            ffn = lambda *args, **kwargs: nn.Identity()  # noqa: E731
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; choose mlp, swiglufused or identity")

        blocks_list = [
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                     proj_bias=proj_bias, ffn_bias=ffn_bias, drop_path=dpr[i], norm_layer=norm_layer,
                     act_layer=act_layer, ffn_layer=ffn, init_values=init_values, attn_class=MemEffAttention)
            for i in range(depth)
        ]
        if block_chunks > 0:
            self.chunked_blocks = True
            chunksize = depth // block_chunks
            chunks = [[nn.Identity()] * i + blocks_list[i: i + chunksize] for i in range(0, depth, chunksize)]
            self.blocks = nn.ModuleList([BlockChunk(c) for c in chunks])
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks_list)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positional embedding for a grid_h x grid_w patch grid (bicubic, DINOv2's +0.1 offset)."""
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and grid_h == grid_w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
        dim = x.shape[-1]
        M = int(math.sqrt(N))
        kwargs = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = ((grid_h + self.interpolate_offset) / M, (grid_w + self.interpolate_offset) / M)
        else:
            kwargs["size"] = (grid_h, grid_w)
        patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic",
                                        antialias=self.interpolate_antialias, **kwargs)
        if tuple(patch_pos_embed.shape[-2:]) != (grid_h, grid_w):
            raise RuntimeError(f"positional embedding interpolated to {tuple(patch_pos_embed.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def _prepare(self, x, masks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, int, int]:
        x_dict = _as_xdict(x)
        if not isinstance(self.patch_embed, PanopticonPE):  # PanopticonPE checks its own inputs (with masks)
            x_dict = dict(x_dict, imgs=prepare_images(x_dict.get("imgs"), self.patch_embed.proj.weight.dtype))
        tokens, gh, gw = self.patch_embed(x_dict)
        B = tokens.shape[0]
        if masks is not None:
            if tuple(masks.shape) != (B, gh * gw):
                raise ValueError(f"masks must have shape (B, N) = ({B}, {gh * gw}), got {tuple(masks.shape)}")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, gh, gw).to(tokens.dtype)
        if self.register_tokens is not None:
            tokens = torch.cat(
                (tokens[:, :1], self.register_tokens.expand(B, -1, -1).to(tokens.dtype), tokens[:, 1:]), dim=1
            )
        return tokens, gh, gw

    def prepare_tokens_with_masks(self, x, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._prepare(x, masks)[0]

    # --------------------------------------------------------------------------------------------- forward
    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x

    def _output_dict(self, x: torch.Tensor, masks: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1: r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(self, x_list: Sequence, masks_list: Sequence) -> List[Dict[str, torch.Tensor]]:
        """Multi-crop forward: each list element is a batched x_dict (its own size and channel count)."""
        if len(x_list) != len(masks_list):
            raise ValueError(f"got {len(x_list)} inputs but {len(masks_list)} mask entries")
        return [self.forward_features(x, m) for x, m in zip(x_list, masks_list)]

    def forward_features(self, x, masks: Optional[torch.Tensor] = None):
        """Normed cls / register / patch tokens, pre-norm tokens and masks (a list input gives a list)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        tokens, _, _ = self._prepare(x, masks)
        return self._output_dict(self._run_blocks(tokens), masks)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])

    # --------------------------------------------------------------------------------- intermediate layers
    def _flat_blocks(self) -> List[nn.Module]:
        if not self.chunked_blocks:
            return list(self.blocks)
        return [b for chunk in self.blocks for b in chunk if not isinstance(b, nn.Identity)]

    def get_intermediate_layers(
        self,
        x,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> Tuple:
        """Outputs of the last `n` blocks (int) or of the listed block indices.

        Returns a tuple of patch tokens `(B, N, D)` (or `(B, D, h, w)` with reshape), or of
        `(patch_tokens, cls_token)` pairs with `return_class_token`.
        """
        blocks = self._flat_blocks()
        total = len(blocks)
        take = list(range(total - n, total)) if isinstance(n, int) else list(n)
        if not take or any(i < 0 or i >= total for i in take):
            raise ValueError(f"block indices {take} out of range for a model with {total} blocks")
        tokens, gh, gw = self._prepare(x)
        outputs = []
        for i, blk in enumerate(blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        outputs = [outputs[sorted(take).index(i)] for i in take]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patch_tokens = [out[:, 1 + self.num_register_tokens:] for out in outputs]
        if reshape:
            B = patch_tokens[0].shape[0]
            patch_tokens = [p.reshape(B, gh, gw, -1).permute(0, 3, 1, 2).contiguous() for p in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens))
        return tuple(patch_tokens)


# ---------------------------------------------------------------------------------------------------- presets
def _vit(preset: Tuple[int, int, int], patch_size: int, num_register_tokens: int, **kwargs):
    defaults = dict(embed_dim=preset[0], depth=preset[1], num_heads=preset[2], mlp_ratio=4)
    defaults.update(kwargs)  # explicit overrides (tiny test models) win over the preset
    return DinoVisionTransformer(patch_size=patch_size, num_register_tokens=num_register_tokens, **defaults)


def vit_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return _vit((192, 12, 3), patch_size, num_register_tokens, **kwargs)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return _vit((384, 12, 6), patch_size, num_register_tokens, **kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return _vit((768, 12, 12), patch_size, num_register_tokens, **kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    return _vit((1024, 24, 16), patch_size, num_register_tokens, **kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """Close to ViT-giant with embed_dim 1536 and 24 heads (embed_dim per head 64)."""
    return _vit((1536, 40, 24), patch_size, num_register_tokens, **kwargs)


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large,
         "vit_giant2": vit_giant2}
