"""Pre-LN Transformer block (timm `Block`: qkv bias, exact GELU) with optional scale-aware adaLN (Hi-MAR).

With `num_phases > 0` the block follows Hi-MAR's scale-aware block: a phase embedding v (shared by all blocks of
a stack, computed once per forward) is turned into (scale_msa, gate_msa, scale_mlp, gate_mlp) by a per-block,
per-phase affine map c = v * a[phase] + b[phase], with a = 0 and b = [0, 1, 0, 1] at init, so every block starts
as the plain block: no shift, LayerNorm keeps its affine parameters, gates start at 1 (the paper says
"adaLN-Zero" and a 6-term modulation; the official code does this, and the checkpoints depend on it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from himar_jax.nn.attention import dot_product_attention
from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE, Dropout, Mlp, dense, layer_norm
from himar_jax.parallel.sharding import constrain


# Activation checkpointing of one block call: which intermediate values the backward pass keeps (the rest are
# recomputed from the block's input). "dots" keeps the weight matmuls' outputs and recomputes norms,
# activations and attention; "full" keeps only the block inputs (one more forward of the block in the backward).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_remat(policy: str) -> str:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat policy {policy!r} is not one of {sorted(REMAT_POLICIES)}.")
  return policy


def _split_kwargs(kwargs: dict) -> tuple[dict, dict]:
  """(array keyword arguments, the rest): arrays are passed into jax.checkpoint / lax.scan bodies explicitly,
  the rest (phase indices, flags) stay static."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  return arrays, {k: v for k, v in kwargs.items() if k not in arrays}


def call_checkpointed(module: nnx.Module, policy: str, *args, method=None, rngs: nnx.Rngs | None = None,
                      **kwargs):
  """module(*args, rngs=rngs, **kwargs) (or method(module, ...)) with the backward pass keeping only what
  `policy` saves.

  The module is split into a pure state and called through `jax.checkpoint`; array arguments are passed
  explicitly (not closed over). Dropout draws one key from `rngs` per call, so the recomputation reuses the same
  dropout mask. Outside differentiation the call is an ordinary one; the module is not mutated.
  """
  check_remat(policy)
  call = method or (lambda m, *a, **k: m(*a, **k))
  # One key per call for every policy, so a policy never changes which dropout masks are drawn.
  key = None if rngs is None else rngs.dropout()
  if policy == "none":
    return call(module, *args, **kwargs) if key is None else call(module, *args, rngs=nnx.Rngs(dropout=key),
                                                                   **kwargs)
  graphdef, state = nnx.split(module)
  arrays, static = _split_kwargs(kwargs)

  def run(state, key, args, arrays):
    inner = nnx.merge(graphdef, state)
    extra = {} if key is None else {"rngs": nnx.Rngs(dropout=key)}
    return call(inner, *args, **arrays, **static, **extra)

  return jax.checkpoint(run, policy=REMAT_POLICIES[policy])(state, key, args, arrays)


def stack_states(blocks, *, same_graph: bool = True):
  """(graph of blocks[0], the blocks' states stacked on a new leading axis): the xs of a lax.scan over a block
  stack. None when the blocks' graphs differ (static attributes) and same_graph is set; callers that pass the
  differing attributes as data themselves use same_graph=False (the states must still share one structure)."""
  splits = [nnx.split(block) for block in blocks]
  graphdef = splits[0][0]
  if same_graph and any(g != graphdef for g, _ in splits[1:]):
    return None
  return graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *[state for _, state in splits])


def run_blocks(blocks, x, policy: str, *args, rngs: nnx.Rngs | None = None, scan: bool = False, **kwargs):
  """x through every block of `blocks` in order, each block call checkpointed with `policy` (call_checkpointed).

  scan=True runs one `lax.scan` over the blocks' states stacked at call time (the parameter tree is unchanged:
  checkpoints, converters and sharding rules see the same per-block params; the stack is an activation-sized copy
  of the weights per call). XLA then compiles one block body instead of len(blocks) copies, which is what makes
  deep stacks compile in a fraction of the time. The same dropout keys are drawn in the same order as unrolled,
  so both ways give the same result. Blocks of different structure fall back to the unrolled loop.
  """
  if not scan or len(blocks) < 2:
    for block in blocks:
      x = call_checkpointed(block, policy, constrain(x), *args, rngs=rngs, **kwargs)
    return constrain(x)
  check_remat(policy)
  stacked = stack_states(blocks)
  if stacked is None:
    return run_blocks(blocks, x, policy, *args, rngs=rngs, scan=False, **kwargs)
  graphdef, stacked = stacked
  keys = None if rngs is None else jnp.stack([rngs.dropout() for _ in blocks])  # the unrolled loop's keys
  arrays, static = _split_kwargs(kwargs)

  def call(block, x, key, args, arrays):
    extra = {} if key is None else {"rngs": nnx.Rngs(dropout=key)}
    return block(x, *args, **arrays, **static, **extra)

  return scan_stack(graphdef, stacked, x, keys, call, policy, args, arrays)


def scan_stack(graphdef, stacked, x, per_block, call, policy: str, *operands):
  """x through one lax.scan over a block stack's stacked states (stack_states): per block,
  x = call(block, x, its slice of per_block, *operands), checkpointed with `policy` and pinned to the batch axes
  (constrain) on both sides, as the unrolled stacks are. per_block: arrays with a leading block axis (dropout keys,
  per-block rates) or None; operands (arrays shared by every block) are passed explicitly, not closed over."""
  def body(x, state, per, operands):
    return call(nnx.merge(graphdef, state), x, per, *operands)

  if REMAT_POLICIES[check_remat(policy)] is not None:
    body = jax.checkpoint(body, policy=REMAT_POLICIES[policy])

  def step(x, xs):
    state, per = xs
    return constrain(body(constrain(x), state, per, operands)), None

  x, _ = jax.lax.scan(step, x, (stacked, per_block))
  return x


def _linear(linear: nnx.Linear, x, kernel, bias):
  """x @ kernel (+ bias) computed as `linear` computes itself (its dtype promotion and precision), for a kernel and
  bias derived from its own (a slice, a folded bias)."""
  x, kernel, bias = linear.promote_dtype((x, kernel, bias), dtype=linear.dtype)
  y = linear.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=linear.precision)
  return y if bias is None else y + bias


class SelfAttention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection laid out (3, heads, head_dim) as timm's.

  The key and value biases are applied where they cost nothing, exactly in real arithmetic (rounding aside):
  k's bias adds q . b_k to every logit of a query row, which softmax ignores, so k is projected without it; v's
  bias adds b_v to every output row (the probabilities sum to 1), which the output projection maps to
  b_v @ W_proj, folded into its bias. This saves two elementwise passes per layer (the bias adds of k and v, which
  XLA cannot fuse into the attention kernel's operands; bench/notes.md v8). Holds as long as no attention
  probabilities are dropped (they are not: see __call__)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, qkv_bias: bool = True, dropout: float = 0.0,
               dropout_bits: str = "random", dtype=DEFAULT_COMPUTE_DTYPE, implementation: str | None = None):
    if dim % num_heads:
      raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}.")
    self.num_heads = num_heads
    self.qkv = dense(dim, 3 * dim, ("embed", "heads"), rngs=rngs, use_bias=qkv_bias, dtype=dtype)
    self.proj = dense(dim, dim, ("heads", "embed"), rngs=rngs, dtype=dtype)
    self.drop = Dropout(dropout, bits=dropout_bits)
    self.implementation = implementation

  def _project(self, x, index: int, use_bias: bool = True):
    """q, k or v (index 0, 1, 2): x times its third of the fused qkv kernel, as self.qkv(x) computes it. Three
    matmuls write q, k and v as separate arrays; slicing one fused output into them cost a copy of all three per
    layer (on the H100 ~0.14 ms per DiT-B block at sampling batch 256, 6% of a Hi-MAR-B sampling run)."""
    d = x.shape[-1]
    kernel = self.qkv.kernel[...][:, index * d:(index + 1) * d]
    bias = None if self.qkv.bias is None or not use_bias else self.qkv.bias[...][index * d:(index + 1) * d]
    return _linear(self.qkv, x, kernel, bias)

  def __call__(self, x, *, key_mask=None, rngs: nnx.Rngs | None = None):
    """x (B, L, D); key_mask (B, L) True where a token may be attended to."""
    b, l, d = x.shape
    q, k, v = (self._project(x, i, use_bias=i == 0).reshape(b, l, self.num_heads, d // self.num_heads)
               for i in range(3))  # k and v without their biases: see the class docstring
    mask = None if key_mask is None else key_mask[:, None, None, :]
    # timm also drops attention probabilities (MAR: attn_drop 0.1 in training); the fused attention paths have no
    # probability dropout, so only the projection output is dropped here (inference and parity are unaffected).
    out = dot_product_attention(q, k, v, mask, implementation=self.implementation).reshape(b, l, d)
    return self.drop(self._project_out(out), deterministic=rngs is None, rngs=rngs)

  def _project_out(self, out):
    """self.proj(out + b_v): the output projection with v's bias folded into its bias (float32, rounded once).

    The fold maps b_v through the kernel as the layer's matmul sees it (rounded to its compute dtype, as b_v's
    share of the output goes through it unfolded), so a kernel held in that dtype already
    (nn/layers.with_compute_dtype_kernels) gives the same bias bit for bit."""
    if self.qkv.bias is None:
      return self.proj(out)
    d = out.shape[-1]
    proj = self.proj
    kernel = proj.kernel[...]
    v_bias = self.qkv.bias[...][2 * d:].astype(jnp.float32)
    compute_kernel = kernel if proj.dtype is None else kernel.astype(proj.dtype)
    bias = proj.bias[...].astype(jnp.float32) + jnp.dot(v_bias, compute_kernel.astype(jnp.float32),
                                                        precision=jax.lax.Precision.HIGHEST)
    return _linear(proj, out, kernel, bias)


class Block(nnx.Module):

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, mlp_ratio: float = 4.0, dropout: float = 0.0,
               dropout_bits: str = "random", num_phases: int = 0, dtype=DEFAULT_COMPUTE_DTYPE, eps: float = 1e-6,
               fused_mlp: bool = False):
    self.norm1 = layer_norm(dim, rngs=rngs, epsilon=eps)
    self.attn = SelfAttention(dim, num_heads, rngs=rngs, dropout=dropout, dropout_bits=dropout_bits, dtype=dtype)
    self.norm2 = layer_norm(dim, rngs=rngs, epsilon=eps)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, dropout=dropout, dropout_bits=dropout_bits, dtype=dtype,
                   fused_gelu=fused_mlp)
    self.num_phases = num_phases
    if num_phases:
      init_shift = jnp.tile(jnp.array([0.0, 1.0, 0.0, 1.0]).repeat(dim), (num_phases, 1))
      self.adaln_scale = nnx.Param(jnp.zeros((num_phases, 1, 1, 4 * dim)))
      self.adaln_shift = nnx.Param(init_shift[:, None, None, :])

  def __call__(self, x, *, phase_embedding=None, phase: int = 0, key_mask=None, rngs: nnx.Rngs | None = None):
    if not self.num_phases:
      x = x + self.attn(self.norm1(x), key_mask=key_mask, rngs=rngs)
      return x + self.mlp(self.norm2(x), rngs=rngs)
    c = phase_embedding[:, None, :] * self.adaln_scale[phase] + self.adaln_shift[phase]
    scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(c, 4, axis=-1)
    x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa), key_mask=key_mask, rngs=rngs)
    return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp), rngs=rngs)
