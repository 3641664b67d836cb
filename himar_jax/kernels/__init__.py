"""Attention kernels: block-sparse attention over VAR / HMAR scale layouts (Pallas Mosaic GPU, Triton and Mosaic TPU;
XLA reference)."""
from himar_jax.kernels.block_sparse import block_sparse_attention
from himar_jax.kernels.layout import PATCH_NUMS_256, PATCH_NUMS_512, PATCH_NUMS_1024, ScaleLayout, plan_tiles

__all__ = ["block_sparse_attention", "ScaleLayout", "plan_tiles", "PATCH_NUMS_256", "PATCH_NUMS_512",
           "PATCH_NUMS_1024"]
