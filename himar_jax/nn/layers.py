"""Shared layer factories: float32 params with logical axis names, bfloat16 matmuls, float32 norms."""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

DEFAULT_COMPUTE_DTYPE = jnp.bfloat16


def with_axes(init, axes: Sequence[str | None]):
  return nnx.with_partitioning(init, tuple(axes))


def dense(in_features: int, out_features: int, axes: Sequence[str | None], *, rngs: nnx.Rngs,
          use_bias: bool = True, dtype=DEFAULT_COMPUTE_DTYPE,
          kernel_init=nnx.initializers.xavier_uniform(), bias_init=nnx.initializers.zeros_init()) -> nnx.Linear:
  """nnx.Linear with float32 params annotated `axes` (kernel) / `axes[-1]` (bias), computing in `dtype`."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=with_axes(kernel_init, axes), bias_init=with_axes(bias_init, (axes[-1],)),
                    rngs=rngs)


def layer_norm(features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6, affine: bool = True) -> nnx.LayerNorm:
  """LayerNorm computed in float32 (PyTorch eps convention: added to the variance)."""
  return nnx.LayerNorm(features, epsilon=epsilon, use_bias=affine, use_scale=affine, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


def embed(num_embeddings: int, features: int, *, rngs: nnx.Rngs, axes=("vocab", "embed"),
          init=nnx.initializers.normal(0.02)) -> nnx.Embed:
  return nnx.Embed(num_embeddings, features, dtype=jnp.float32, param_dtype=jnp.float32,
                   embedding_init=with_axes(init, axes), rngs=rngs)


class Mlp(nnx.Module):
  """Linear -> GELU -> Linear (timm Mlp); `approximate` picks tanh GELU (DiT) or exact erf GELU (timm/MAR)."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs, approximate_gelu: bool = False,
               dropout: float = 0.0, dtype=DEFAULT_COMPUTE_DTYPE):
    self.fc1 = dense(features, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden, features, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.approximate_gelu = approximate_gelu
    # No Rngs stored in modules: randomness comes in at call time, so models hold parameters only.
    self.drop = nnx.Dropout(dropout)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    """Dropout is active iff `rngs` is given (training)."""
    h = nnx.gelu(self.fc1(x), approximate=self.approximate_gelu)
    h = self.drop(h, deterministic=rngs is None, rngs=rngs)
    return self.drop(self.fc2(h), deterministic=rngs is None, rngs=rngs)
