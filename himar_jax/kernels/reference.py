"""XLA reference for block-sparse attention: the layout's dense mask through the float32 reference attention."""
from __future__ import annotations

import jax.numpy as jnp

from himar_jax.kernels.layout import ScaleLayout
from himar_jax.nn.attention import xla_attention


def reference_attention(q, k, v, layout: ScaleLayout, *, scale: float | None = None):
  """(B, L, H, D) attention with the layout's (L, L) mask; logits and softmax in float32."""
  mask = jnp.asarray(layout.dense_mask())[None, None]
  return xla_attention(q, k, v, mask, scale=scale)
