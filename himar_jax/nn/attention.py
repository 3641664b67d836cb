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

import logging

import jax
import jax.numpy as jnp

from himar_jax.parallel.sharding import per_shard


def xla_attention(q, k, v, mask=None, *, scale: float | None = None):
  """Reference attention: logits and softmax in float32, mask broadcastable to (B, H, Lq, Lk), True = attend."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


_FALLBACKS_LOGGED: set[str] = set()


def _log_fallback_once(reason: str) -> None:
  if reason not in _FALLBACKS_LOGGED:
    _FALLBACKS_LOGGED.add(reason)
    logging.getLogger(__name__).warning(reason)


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
      from himar_jax.kernels import block_sparse  # kernels import this module
      kernel = lambda q, k, v: block_sparse.block_sparse_attention(q, k, v, layout, scale=scale,
                                                                   implementation=implementation)
      # Per shard over batch and heads under a sharded step: a Pallas call is opaque to the SPMD partitioner.
      return per_shard(kernel, q, k, v, logical=("batch", None, "heads", None))
    mask = jnp.asarray(layout.dense_mask())[None, None]
  auto = implementation is None
  if auto:
    implementation = "cudnn" if _cudnn_ok(q) else "xla"
  if implementation == "xla":
    return xla_attention(q, k, v, mask, scale=scale)
  if implementation == "cudnn":
    if mask is not None and (q.shape[1] % 2 or k.shape[1] % 2):
      # cudnn's masked backward needs even lengths, and it checks only when the backward is traced (under
      # jax.checkpoint, outside this function): pad one query row / one masked-out key, drop the extra row.
      lq, lk = q.shape[1], k.shape[1]
      pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n % 2), (0, 0), (0, 0)))
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
      # The extra key is masked out; the extra query row attends everywhere (a fully masked row would give NaNs
      # whose zero cotangents still poison dk / dv).
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, lk % 2)), constant_values=False)
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, lq % 2), (0, 0)), constant_values=True)
      out = dot_product_attention(pad(q, lq), pad(k, lk), pad(v, lk), mask, scale=scale,
                                  implementation=None if auto else "cudnn")
      return out[:, :lq]
    if mask is not None:
      # cudnn takes the mask as a bias of shape (B or 1, H or 1, Lq, Lk): no broadcasting over the two lengths.
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    except (NotImplementedError, ValueError) as e:
      if not auto:
        raise
      # cudnn rejects some shapes at trace time (e.g. odd lengths with a mask): the reference computes them.
      _log_fallback_once(f"cudnn attention unavailable for q {q.shape}, k {k.shape}: {e}; using 'xla'")
      return xla_attention(q, k, v, mask, scale=scale)
  raise ValueError(f"attention implementation={implementation!r} is not one of 'xla', 'cudnn', 'pallas_gpu', "
                   "'pallas_tpu' (the last two with layout=) or None (auto).")
