"""Shared layer factories: float32 params with logical axis names, bfloat16 matmuls, float32 norms."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.kernels import fused_dense
from himar_jax.nn.activations import gelu_erf

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


def with_compute_dtype_kernels(module: nnx.Module) -> nnx.Module:
  """A copy of `module` (same arrays, new module objects) whose nnx.Linear kernels are held in their layer's
  compute dtype: what every call casts them to, so the layers compute exactly what they did. For sampling loops:
  XLA does not hoist the casts of loop-invariant weights out of a while loop, so each diffusion step re-converted
  every kernel (bench/notes.md v8); cast once before the loop instead. Biases and norm parameters keep their
  dtype (the fused epilogues add biases in float32)."""
  graphdef, state = nnx.split(module)
  copy = nnx.merge(graphdef, state, copy=True)  # new Variables: mutable at the current trace level
  for _, layer in nnx.iter_modules(copy):
    if isinstance(layer, nnx.Linear) and layer.dtype is not None:
      layer.kernel.set_value(layer.kernel.get_value().astype(layer.dtype))
  return copy


def layer_norm(features: int, *, rngs: nnx.Rngs, epsilon: float = 1e-6, affine: bool = True) -> nnx.LayerNorm:
  """LayerNorm computed in float32 (PyTorch eps convention: added to the variance)."""
  return nnx.LayerNorm(features, epsilon=epsilon, use_bias=affine, use_scale=affine, dtype=jnp.float32,
                       param_dtype=jnp.float32, rngs=rngs)


def embed(num_embeddings: int, features: int, *, rngs: nnx.Rngs, axes=("vocab", "embed"),
          init=nnx.initializers.normal(0.02)) -> nnx.Embed:
  return nnx.Embed(num_embeddings, features, dtype=jnp.float32, param_dtype=jnp.float32,
                   embedding_init=with_axes(init, axes), rngs=rngs)


# How dropout draws its keep/drop bits from the key it is given:
#   random: jax.random.bernoulli (the key's own generator, threefry or rbg; what nnx.Dropout does);
#   hash:   a counter-based hash of each element's index, seeded by the key (see counter_hash_bits). Same keep
#           probability (to 2^-32), masks still a function of the key alone, but computed inside the fusion
#           that applies them: no random-bit tensor is written or read (on the H100 jax.random's bits for
#           Hi-MAR-B's dropout cost ~30 ms of a ~290 ms training step).
DROPOUT_BITS = ("random", "hash")


def _mix32(h):
  """A bijection of uint32 with full avalanche (Chris Wellons' `lowbias32` integer hash)."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x7FEB352D)
  h = h ^ (h >> 15)
  h = h * np.uint32(0x846CA68B)
  return h ^ (h >> 16)


def counter_hash_bits(key, shape) -> jax.Array:
  """uint32 bits of `shape`: element i gets mix(mix(i ^ s0) + s1) for the key's first two data words (s0, s1).

  For a fixed key this is a fixed pseudo-random permutation of the element indices (< 2^32 elements), so the
  bits are uniform and distinct keys give unrelated masks; everything is elementwise integer arithmetic on an
  iota, which XLA fuses into the consumer (the dropout select) instead of materialising the bits.
  """
  size = int(np.prod(shape))
  if size >= 2 ** 32:
    raise ValueError(f"counter_hash_bits: {size} elements exceed the 2^32 counter; split the tensor.")
  words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _mix32(_mix32(index ^ words[0]) + words[1 % words.shape[0]])


# How a training step turns its dropout key into the stream its Dropout layers draw from (config
# model.dropout_rng), and the bits those layers then use. Each is a function of the step key alone, with
# different masks (the official code's masks are not reproducible either way); sampling draws no dropout.
#   threefry: the key as is, jax.random bits;  rbg: re-keyed as an RBG key (4 words drawn from the key), bits
#   from XLA's RngBitGenerator;  hash: the key as is, counter-hash bits (no random-bit tensors at all).
DROPOUT_RNGS = ("threefry", "rbg", "hash")


def dropout_bits_for(impl: str) -> str:
  """The Dropout `bits` that a model's layers use under model.dropout_rng = impl."""
  return "hash" if impl == "hash" else "random"


def dropout_rngs(key, impl: str = "threefry") -> nnx.Rngs:
  """The dropout stream of one training step from its (threefry) key, for model.dropout_rng = impl."""
  if impl == "rbg":
    key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  return nnx.Rngs(dropout=key)


class Dropout(nnx.Module):
  """Inverted dropout (x / keep where kept, 0 elsewhere) drawing one key from `rngs.dropout` per call, like
  nnx.Dropout; `bits` picks how the mask is made from that key (DROPOUT_BITS). Active iff deterministic is False
  and rate > 0."""

  def __init__(self, rate: float, *, bits: str = "random"):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"dropout rate {rate} must be in [0, 1).")
    if bits not in DROPOUT_BITS:
      raise ValueError(f"dropout bits={bits!r} is not one of {DROPOUT_BITS}.")
    self.rate, self.bits = rate, bits

  def __call__(self, x, *, deterministic: bool, rngs: nnx.Rngs | None = None):
    if deterministic or self.rate == 0.0:
      return x
    if rngs is None:
      raise ValueError("Dropout in training mode needs rngs with a 'dropout' stream.")
    key, keep = rngs.dropout(), 1.0 - self.rate
    if self.bits == "hash":
      mask = counter_hash_bits(key, x.shape) >= np.uint32(round(self.rate * 2.0 ** 32))
    else:
      mask = jax.random.bernoulli(key, p=keep, shape=x.shape)
    return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


class Mlp(nnx.Module):
  """Linear -> GELU -> Linear (timm Mlp); `approximate` picks tanh GELU (DiT) or exact erf GELU (timm/MAR)."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs, approximate_gelu: bool = False,
               dropout: float = 0.0, dropout_bits: str = "random", dtype=DEFAULT_COMPUTE_DTYPE,
               fused_gelu: bool = False):
    self.fc1 = dense(features, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = dense(hidden, features, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.approximate_gelu = approximate_gelu
    # fused_gelu: fc1's bias and GELU (either form) in the matmul's epilogue (kernels/fused_dense) where that
    # kernel runs, at inference; opt-in, see bench/notes.md
    self.fused_gelu = fused_gelu
    # No Rngs stored in modules: randomness comes in at call time, so models hold parameters only.
    self.drop = Dropout(dropout, bits=dropout_bits)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    """Dropout is active iff `rngs` is given (training)."""
    h = None
    if self.fused_gelu:
      h = fused_dense.fused_or_none(x.astype(self.fc1.dtype), self.fc1.kernel[...], self.fc1.bias[...],
                                    self.approximate_gelu)
    if h is None:
      h = self.fc1(x)
      h = nnx.gelu(h, approximate=True) if self.approximate_gelu else gelu_erf(h)
    h = self.drop(h, deterministic=rngs is None, rngs=rngs)
    return self.drop(self.fc2(h), deterministic=rngs is None, rngs=rngs)
