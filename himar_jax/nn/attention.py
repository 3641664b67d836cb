"""The one attention entry point. Layout (batch, length, heads, head_dim), like jax.nn.dot_product_attention.

implementation:
  'xla'    float32 softmax reference (any mask; runs everywhere; the numerics every other path is tested against)
  'cudnn'  jax.nn.dot_product_attention(implementation='cudnn') (GPU; a boolean mask becomes a dense bias)
  None     'cudnn' on GPU when dtype and head_dim allow, else 'xla'
Block-sparse scale layouts (VAR / HMAR): pass `layout=` (a himar_jax.kernels.ScaleLayout) instead of a mask; then
  None / 'pallas_gpu' / 'pallas_tpu'  himar_jax.kernels.block_sparse_attention (Pallas kernels that skip empty tiles)
  'xla' / 'cudnn'                     the layout's dense mask through the paths above
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(q, k, v, mask=None, *, scale: float | None = None):
  """Reference attention: logits and softmax in float32, mask broadcastable to (B, H, Lq, Lk), True = attend."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def _cudnn_ok(q) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


def dot_product_attention(q, k, v, mask=None, *, scale: float | None = None, implementation: str | None = None,
                          layout=None):
  """Attention of (B, L, H, D) q, k, v; `mask` (True = attend) or a block-sparse scale `layout`, not both."""
  if layout is not None:
    if mask is not None:
      raise ValueError("pass either mask= or layout= to dot_product_attention, not both (the layout is the mask).")
    if implementation in (None, "pallas_gpu", "pallas_tpu"):
      from himar_jax.kernels.block_sparse import block_sparse_attention  # kernels import this module
      return block_sparse_attention(q, k, v, layout, scale=scale, implementation=implementation)
    mask = jnp.asarray(layout.dense_mask())[None, None]
  if implementation is None:
    implementation = "cudnn" if _cudnn_ok(q) else "xla"
  if implementation == "xla":
    return xla_attention(q, k, v, mask, scale=scale)
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  raise ValueError(f"attention implementation={implementation!r} is not one of 'xla', 'cudnn', 'pallas_gpu', "
                   "'pallas_tpu' (the last two with layout=) or None (auto).")
