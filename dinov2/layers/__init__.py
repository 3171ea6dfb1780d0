"""Transformer building blocks (DINOv2 layout). Imports torch only."""
from .attention import Attention, MemEffAttention
from .block import Block, BlockChunk, NestedTensorBlock
from .dino_head import DINOHead
from .drop_path import DropPath
from .layer_scale import LayerScale
from .mlp import Mlp
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

__all__ = [
    "Attention", "MemEffAttention", "Block", "BlockChunk", "NestedTensorBlock", "DINOHead", "DropPath",
    "LayerScale", "Mlp", "PatchEmbed", "SwiGLUFFN", "SwiGLUFFNFused",
]
