"""Next-scale Transformers on the VQ residual pyramid: VAR (block-causal) and HMAR (block-diagonal, Markovian).

One class, `NextScaleTransformer`, configured by `kind`:
  'var'   depth adaLN blocks, block-causal attention over all scales, one head; sampled with a KV cache.
  'hmar'  `base_blocks` (depth - n_layers_train, shared) -> `ns_blocks` (n_layers_train) + ns head for next-scale
          prediction, and base -> `mask_blocks` + mask head for masked refinement within a scale; block-diagonal
          attention (scale k sees only scale k), so inference runs each scale alone without a cache.
Blocks are VAR's: adaLN with six chunks (gamma1, gamma2, scale1, scale2, shift1, shift2) from SiLU(class
embedding), LayerNorm without affine (eps 1e-6), L2-normalised q and k with a learned per-head log scale clamped at
ln 100 and softmax scale 1, q and v biases (k bias zero), tanh-GELU MLP, drop path.

Tokenizer weights: the model holds the codebook and phi convs of the VQ residual pyramid (`self.vq`, a
`ResidualQuantizer` whose weights are `TokenizerWeight` variables, not `nnx.Param`): they are neither trained nor
counted (the official parameter counts are the Transformer's), travel with the model into jit, and are loaded
from a VQ pyramid with `load_tokenizer(model, vq_pyramid_or_quantizer)`. The model therefore takes batches of
token indices: {"indices": (B, L) int32 (scales concatenated, row-major), "label": (B,) int32}, and computes the
teacher-forcing inputs itself with the pyramid's `next_scale_inputs`.
Sampling returns token indices (B, L) int32; images come from the pyramid's decoder (`indices_to_img`). Options:
greedy decoding, and editing (known tokens kept at every pass, never re-masked; token_masks_from_pixels).
Training: stage 1 (VAR, HMAR next-scale) weighted CE over all tokens; HMAR stage 2 (stage=2) CE over masked tokens
of the mask branch. The trainer freezes params through the family hook `trainable(config, params)` (stage 2:
only mask_embed / mask_blocks / mask head train; stage 1: all but the unused mask branch) and starts stage 2 from
stage 1 with config.train.init_from through `adapt_restored_params` (mask branch <- next-scale branch).
Parity with the official classes: tests/test_next_scale.py (fixtures from tests/fixtures/make_next_scale.py).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.kernels.layout import ScaleLayout
from himar_jax.nn.attention import dot_product_attention
from himar_jax.nn.indexing import lookup_rows, scatter_rows
from himar_jax.nn.layers import DEFAULT_COMPUTE_DTYPE, Mlp, dense, layer_norm, with_axes
from himar_jax.nn.transformer import call_checkpointed, check_remat, scan_stack, stack_states
from himar_jax.parallel.sharding import constrain
from himar_jax.tokenizers import resize
from himar_jax.tokenizers.vq_pyramid import ResidualQuantizer, VQPyramidConfig

KINDS = ("var", "hmar")
LOSS_WEIGHTINGS = ("uniform", "normal_pdf")
_MAX_LOG_SCALE = math.log(100.0)
# HMAR's default refinement schedule (utils/sampling_arg_util.py): tokens per pass; 14 forward passes at 256 px.
HMAR_SCHEDULE_256 = ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,))
HMAR_SCHEDULE_512 = ((1,), (1, 3), (1, 1, 2, 5), (5, 11), (36,), (81,), (169,), (324,), (576,), (1024,))


class TokenizerWeight(nnx.Variable):
  """VQ pyramid weights held by a generator: frozen, not counted as model parameters."""


def trunc_normal(std: float, factor: float = 1.0):
  """torch.nn.init.trunc_normal_(std=std) (truncated at the absolute values -2, 2), times `factor`."""

  def init(key, shape, dtype=jnp.float32):
    return (std * factor) * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)

  return init


def _adaln_init(std: float, width: int, n_gamma: int, init_adaln: float, init_adaln_gamma: float):
  """ada_lin kernel (C, k*C): the first n_gamma chunks (gammas) scaled by init_adaln_gamma, the rest by init_adaln."""

  def init(key, shape, dtype=jnp.float32):
    w = trunc_normal(std)(key, shape, dtype)
    col_scale = jnp.where(jnp.arange(shape[-1]) < n_gamma * width, init_adaln_gamma, init_adaln)
    return w * col_scale.astype(dtype)

  return init


def normal_pdf_weights(patch_nums: Sequence[int]) -> np.ndarray:
  """HMAR's "lognorm" per-scale loss shares (trainer.py norm_dist_equivalent): a standard normal pdf at
  z_k = (reversed(pn)_k / pn_max - mean(r)) / std(r, ddof=1), r = pn / pn_max, normalised to sum 1."""
  pn = np.asarray(patch_nums, np.float64)
  r = pn / pn[-1]
  z = (pn[::-1] / pn[-1] - r.mean()) / r.std(ddof=1)
  w = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
  return w / w.sum()


def token_weights(patch_nums: Sequence[int], weighting: str) -> np.ndarray:
  """(L,) float32 weights of each token's CE: 'uniform' 1/L (VAR), 'normal_pdf' a scale's share split equally."""
  sizes = np.asarray([p * p for p in patch_nums])
  if weighting == "uniform":
    return np.full(sizes.sum(), 1.0 / sizes.sum(), np.float32)
  if weighting == "normal_pdf":
    return np.repeat(normal_pdf_weights(patch_nums) / sizes, sizes).astype(np.float32)
  raise ValueError(f"loss weighting {weighting!r} is not one of {LOSS_WEIGHTINGS}.")


def _drop_path(x, rate, key):
  """Stochastic depth per sample (timm DropPath, scale by keep); identity without a key or at rate 0. `rate` may
  be traced (scanned stacks): at 0 every sample is kept and scaled by 1, the same values."""
  if key is None or (isinstance(rate, (int, float)) and rate <= 0.0):
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class L2NormAttention(nnx.Module):
  """VAR's attention (attn_l2_norm=True): bias-free qkv plus q/v biases, unit q and k, q scaled per head."""

  def __init__(self, width: int, num_heads: int, *, init_std: float, proj_factor: float, rngs: nnx.Rngs,
               dtype=DEFAULT_COMPUTE_DTYPE, implementation: str | None = None):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads={num_heads}.")
    self.num_heads = num_heads
    self.mat_qkv = dense(width, 3 * width, ("embed", "heads"), rngs=rngs, use_bias=False, dtype=dtype,
                         kernel_init=trunc_normal(init_std))
    self.q_bias = nnx.Param(jnp.zeros((width,), jnp.float32))
    self.v_bias = nnx.Param(jnp.zeros((width,), jnp.float32))
    self.scale_mul = nnx.Param(jnp.full((num_heads,), math.log(4.0), jnp.float32))
    self.proj = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype,
                      kernel_init=trunc_normal(init_std, proj_factor))
    self.implementation = implementation

  def qkv(self, x):
    """(B, l, C) -> unit-norm q (times the head scale), unit k, and v, each (B, l, H, D) in the compute dtype."""
    b, l, c = x.shape
    zeros = jnp.zeros_like(self.q_bias[...])
    bias = jnp.concatenate([self.q_bias[...], zeros, self.v_bias[...]])
    qkv = (self.mat_qkv(x).astype(jnp.float32) + bias).reshape(b, l, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    unit = lambda a: a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-12)  # F.normalize
    head_scale = jnp.exp(jnp.minimum(self.scale_mul[...], _MAX_LOG_SCALE))[:, None]
    dtype = self.mat_qkv.dtype
    return (unit(q) * head_scale).astype(dtype), unit(k).astype(dtype), v.astype(dtype)

  def attend(self, q, k, v, *, layout: ScaleLayout | None = None):
    """Attention of q over k, v (all keys when `layout` is None: a KV cache or a single scale), then proj."""
    b, l = q.shape[:2]
    impl = self.implementation
    if layout is None and impl in ("pallas_gpu", "pallas_tpu"):
      impl = None
    out = dot_product_attention(q, k, v, scale=1.0, implementation=impl, layout=layout)
    return self.proj(out.reshape(b, l, -1))


class AdaLNBlock(nnx.Module):
  """VAR's AdaLNSelfAttn (not shared): x += g1 * attn(LN(x)(1+s1)+b1); x += g2 * ffn(LN(x)(1+s2)+b2)."""

  def __init__(self, width: int, num_heads: int, *, mlp_ratio: float, init_std: float, init_depth: int,
               init_adaln: float, init_adaln_gamma: float, drop_path: float, rngs: nnx.Rngs,
               dtype=DEFAULT_COMPUTE_DTYPE, implementation: str | None = None):
    self.width = width
    self.drop_path = drop_path
    proj_factor = 1.0 / math.sqrt(2 * init_depth)
    self.ada_lin = dense(width, 6 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                         kernel_init=_adaln_init(init_std, width, 2, init_adaln, init_adaln_gamma))
    self.attn = L2NormAttention(width, num_heads, init_std=init_std, proj_factor=proj_factor, rngs=rngs,
                                dtype=dtype, implementation=implementation)
    self.ffn = Mlp(width, round(width * mlp_ratio), rngs=rngs, approximate_gelu=True, dtype=dtype)
    # VAR's init_weights: every Linear trunc-normal(init_std), biases zero, fc2 / sqrt(2 depth).
    self.ffn.fc1.kernel[...] = trunc_normal(init_std)(rngs.params(), self.ffn.fc1.kernel.shape)
    self.ffn.fc2.kernel[...] = trunc_normal(init_std, proj_factor)(rngs.params(), self.ffn.fc2.kernel.shape)
    self.ln = layer_norm(width, rngs=rngs, epsilon=1e-6, affine=False)

  def modulation(self, cond):
    """(B, C) condition -> six (B, 1, C) chunks in VAR's order."""
    ada = self.ada_lin(nnx.silu(cond)).astype(jnp.float32).reshape(cond.shape[0], 1, 6, self.width)
    return [ada[:, :, i] for i in range(6)]

  def _pre(self, x, scale, shift):
    return (self.ln(x.astype(jnp.float32)) * (1.0 + scale) + shift).astype(self.ada_lin.dtype)

  def _ffn(self, x, gamma2, scale2, shift2, key, rate=None):
    h = self.ffn(self._pre(x, scale2, shift2)).astype(jnp.float32) * gamma2
    return x + _drop_path(h, self.drop_path if rate is None else rate, key)

  def __call__(self, x, cond, *, layout: ScaleLayout | None = None, key=None, drop_path=None):
    """x (B, L, C) float32 residual stream; `key` enables drop path (training) at this block's rate, or at
    `drop_path` when given (a scanned stack passes each block's rate as data)."""
    rate = self.drop_path if drop_path is None else drop_path
    g1, g2, s1, s2, b1, b2 = self.modulation(cond)
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    q, k, v = self.attn.qkv(self._pre(x, s1, b1))
    x = x + _drop_path(self.attn.attend(q, k, v, layout=layout).astype(jnp.float32) * g1, rate, k1)
    return self._ffn(x, g2, s2, b2, k2, rate)

  def cached(self, x, cond, cache, offset: int):
    """One scale of KV-cached inference: x (B, l, C) at positions [offset, offset + l); cache (k, v) each
    (B, L, H, D). Returns (x, cache) with this scale's keys written; attends to positions < offset + l."""
    g1, g2, s1, s2, b1, b2 = self.modulation(cond)
    q, k, v = self.attn.qkv(self._pre(x, s1, b1))
    end = offset + x.shape[1]
    ck = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), offset, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), offset, axis=1)
    x = x + self.attn.attend(q, ck[:, :end].astype(q.dtype), cv[:, :end].astype(q.dtype)).astype(jnp.float32) * g1
    return self._ffn(x, g2, s2, b2, None), (ck, cv)


class AdaLNBeforeHead(nnx.Module):
  """LN(x) * (1 + scale) + shift with (scale, shift) = Linear(SiLU(cond)), before the vocabulary head."""

  def __init__(self, width: int, *, init_std: float, init_adaln: float, rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.width = width
    self.ada_lin = dense(width, 2 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                         kernel_init=trunc_normal(init_std, init_adaln))
    self.ln = layer_norm(width, rngs=rngs, epsilon=1e-6, affine=False)

  def __call__(self, x, cond):
    ada = self.ada_lin(nnx.silu(cond)).astype(jnp.float32).reshape(cond.shape[0], 1, 2, self.width)
    return self.ln(x.astype(jnp.float32)) * (1.0 + ada[:, :, 0]) + ada[:, :, 1]


class VocabHead(nnx.Module):
  """AdaLNBeforeHead -> Linear(C, V); logits float32."""

  def __init__(self, width: int, vocab_size: int, *, init_std: float, init_adaln: float, init_head: float,
               rngs: nnx.Rngs, dtype=DEFAULT_COMPUTE_DTYPE):
    self.head_nm = AdaLNBeforeHead(width, init_std=init_std, init_adaln=init_adaln, rngs=rngs, dtype=dtype)
    self.head = dense(width, vocab_size, ("embed", "vocab"), rngs=rngs, dtype=dtype,
                      kernel_init=trunc_normal(init_std, init_head))

  def __call__(self, x, cond):
    return self.head(self.head_nm(x, cond).astype(self.head.dtype)).astype(jnp.float32)


def freeze_quantizer(quantizer: ResidualQuantizer) -> ResidualQuantizer:
  """Turns the quantizer's codebook and phi weights into TokenizerWeight variables (in place)."""
  quantizer.embedding.embedding = TokenizerWeight(quantizer.embedding.embedding[...])
  for phi in quantizer.phi:
    phi.conv.kernel = TokenizerWeight(phi.conv.kernel[...])
    phi.conv.bias = TokenizerWeight(phi.conv.bias[...])
  return quantizer


def load_tokenizer(model: NextScaleTransformer, source) -> None:
  """Copies the codebook and phi convs of a VQPyramid or ResidualQuantizer into the model (shapes checked)."""
  quant = getattr(source, "quantize", source)
  if not isinstance(quant, ResidualQuantizer):
    raise TypeError(f"load_tokenizer takes a VQPyramid or ResidualQuantizer, got {type(source).__name__}.")
  pairs = [(model.vq.embedding.embedding, quant.embedding.embedding)]
  if len(quant.phi) != len(model.vq.phi) or quant.phi_map != model.vq.phi_map:
    raise ValueError(f"the tokenizer has {len(quant.phi)} phi convs (map {quant.phi_map}); the model expects "
                     f"{len(model.vq.phi)} (map {model.vq.phi_map}): set config.model.share_quant_resi to match.")
  for dst, src in zip(model.vq.phi, quant.phi):
    pairs += [(dst.conv.kernel, src.conv.kernel), (dst.conv.bias, src.conv.bias)]
  for dst, src in pairs:
    if dst.shape != src.shape:
      raise ValueError(f"tokenizer weight shape {src.shape} does not match the model's {dst.shape}; build the "
                       "model with the tokenizer's vocab_size / z_channels.")
    dst[...] = jnp.asarray(src[...], jnp.float32)


@dataclasses.dataclass(frozen=True)
class Scales:
  """Static facts of a patch_nums layout."""
  patch_nums: tuple[int, ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(p * p for p in self.patch_nums)

  @property
  def starts(self) -> tuple[int, ...]:
    return tuple(int(s) for s in np.cumsum((0,) + self.sizes)[:-1])

  @property
  def length(self) -> int:
    return sum(self.sizes)

  @property
  def level(self) -> np.ndarray:
    return np.repeat(np.arange(len(self.patch_nums)), self.sizes).astype(np.int32)


class NextScaleTransformer(nnx.Module):
  """VAR / HMAR class-conditional next-scale Transformer (see the module docstring)."""

  def __init__(self, *, kind: str, depth: int, width: int, num_heads: int, num_classes: int,
               vq_config: VQPyramidConfig, rngs: nnx.Rngs, mlp_ratio: float = 4.0, cond_drop_prob: float = 0.1,
               drop_path_rate: float = 0.0, n_layers_train: int = 8, init_adaln: float = 0.5,
               init_adaln_gamma: float = 1e-5, init_head: float = 0.02, loss_weighting: str = "uniform",
               label_smoothing: float = 0.0, stage: int = 1, dtype=DEFAULT_COMPUTE_DTYPE,
               attention_implementation: str | None = None, scan_blocks: bool = False, remat: str = "none"):
    if kind not in KINDS:
      raise ValueError(f"kind={kind!r} is not one of {KINDS}.")
    if kind == "hmar" and not 0 < n_layers_train <= depth:
      raise ValueError(f"n_layers_train={n_layers_train} must lie in 1..depth={depth} (HMAR's ns/mask stacks).")
    if stage not in (1, 2) or (stage == 2 and kind != "hmar"):
      raise ValueError(f"stage={stage} must be 1, or 2 (masked refinement) for kind='hmar'.")
    self.kind, self.depth, self.width, self.num_heads = kind, depth, width, num_heads
    self.num_classes, self.vocab_size = num_classes, vq_config.vocab_size
    self.scales = Scales(tuple(int(p) for p in vq_config.patch_nums))
    self.cond_drop_prob, self.label_smoothing, self.stage = cond_drop_prob, label_smoothing, stage
    self.loss_weighting = loss_weighting
    token_weights(self.scales.patch_nums, loss_weighting)  # validates the name
    self.layout = ScaleLayout(self.scales.sizes, "block_causal" if kind == "var" else "block_diagonal")
    self.dtype = dtype
    self.scan_blocks = scan_blocks  # one lax.scan per block stack in teacher-forced passes (faster compiles)
    self.remat = check_remat(remat)  # what each block's backward keeps (nn/transformer.REMAT_POLICIES)
    std = math.sqrt(1.0 / width / 3.0)
    c, z, first_l = width, vq_config.z_channels, self.scales.sizes[0]
    self.vq = freeze_quantizer(ResidualQuantizer(vq_config, rngs=rngs))

    self.word_embed = dense(z, c, (None, "embed"), rngs=rngs, use_bias=kind == "var", dtype=jnp.float32,
                            kernel_init=trunc_normal(std))
    if kind == "hmar":
      self.word_embed_bias = nnx.Param(jnp.zeros((c,), jnp.float32))
      self.mask_embed = nnx.Param(with_axes(trunc_normal(std), (None, "embed"))(rngs.params(), (1, c)))
    self.class_emb = nnx.Param(with_axes(trunc_normal(std), ("vocab", "embed"))(rngs.params(), (num_classes + 1, c)))
    self.pos_start = nnx.Param(with_axes(trunc_normal(std), (None, None, "embed"))(rngs.params(), (1, first_l, c)))
    self.pos_1LC = nnx.Param(with_axes(trunc_normal(std), (None, "length", "embed"))(
        rngs.params(), (1, self.scales.length, c)))
    self.lvl_embed = nnx.Param(with_axes(trunc_normal(std), (None, "embed"))(rngs.params(),
                                                                             (len(self.scales.sizes), c)))
    dpr = [float(x) for x in np.linspace(0.0, drop_path_rate, depth)]
    block = lambda i: AdaLNBlock(width, num_heads, mlp_ratio=mlp_ratio, init_std=std, init_depth=depth,
                                 init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, drop_path=dpr[i],
                                 rngs=rngs, dtype=dtype, implementation=attention_implementation)
    head = lambda: VocabHead(width, self.vocab_size, init_std=std, init_adaln=init_adaln, init_head=init_head,
                             rngs=rngs, dtype=dtype)
    if kind == "var":
      self.blocks = nnx.List([block(i) for i in range(depth)])
      self.head = head()
    else:
      # As the official HMAR: drop-path rates follow each stack's own block index.
      self.base_blocks = nnx.List([block(i) for i in range(depth - n_layers_train)])
      self.ns_blocks = nnx.List([block(i) for i in range(n_layers_train)])
      self.mask_blocks = nnx.List([block(i) for i in range(n_layers_train)])
      self.ns_head = head()
      self.mask_head = head()

  # ---- embeddings ------------------------------------------------------------------------------------------
  def check_indices(self, indices):
    """Concrete index arrays outside [0, vocab_size) raise (traced ones cannot be checked)."""
    if indices.ndim != 2 or indices.shape[1] != self.scales.length:
      raise ValueError(f"indices must be (B, {self.scales.length}) for patch_nums {self.scales.patch_nums}; got "
                       f"shape {tuple(indices.shape)}.")
    try:
      concrete = np.asarray(indices)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return
    lo, hi = int(concrete.min()), int(concrete.max())
    if lo < 0 or hi >= self.vocab_size:
      raise ValueError(f"token indices span [{lo}, {hi}], outside the codebook range [0, {self.vocab_size}).")

  def split_scales(self, indices) -> list:
    return [indices[:, s:s + n] for s, n in zip(self.scales.starts, self.scales.sizes)]

  def condition(self, labels, drop=None):
    """Class embedding (B, C); `drop` (B,) bool replaces the label by the unconditional index num_classes."""
    if drop is not None:
      labels = jnp.where(drop, self.num_classes, labels)
    return lookup_rows(self.class_emb[...], labels)

  def _word(self, x):
    return self.word_embed(x.astype(jnp.float32))

  def _bias(self):
    return self.word_embed_bias[...] if self.kind == "hmar" else 0.0

  def lvl_pos(self):
    """(1, L, C) level + position embedding."""
    return jnp.take(self.lvl_embed[...], jnp.asarray(self.scales.level), axis=0)[None] + self.pos_1LC[...]

  def sequence(self, cond, x_in, word=None):
    """Teacher-forcing input (B, L, C): [sos, word_embed(x_in) (+ bias)] + level/position. `word` overrides
    the embedded tokens (HMAR masked inputs)."""
    b = cond.shape[0]
    sos = cond[:, None, :] + self.pos_start[...]
    word = self._word(x_in) + self._bias() if word is None else word
    return jnp.concatenate([jnp.broadcast_to(sos, (b, *sos.shape[1:])), word], axis=1) + self.lvl_pos()

  # ---- forward ---------------------------------------------------------------------------------------------
  def _run(self, blocks, x, cond, *, layout, key):
    """x through a block stack; each block call checkpointed with self.remat (the backward keeps what the policy
    saves and recomputes the rest: same numbers, less activation memory)."""
    keys = None if key is None else jax.random.split(key, len(blocks))
    if not self.scan_blocks or len(blocks) < 2:
      for i, blk in enumerate(blocks):
        x = call_checkpointed(blk, self.remat, constrain(x), cond, layout=layout,
                              key=None if keys is None else keys[i])
      return constrain(x)
    # One lax.scan over the blocks' states stacked at call time. The blocks differ only in their static drop-path
    # rate, so block 0's graph is used and each block's rate travels as data; same keys, same result.
    graphdef, stacked = stack_states(blocks, same_graph=False)
    rates = jnp.asarray([blk.drop_path for blk in blocks], jnp.float32)
    call = lambda blk, x, per, cond: blk(x, cond, layout=layout, key=per[1], drop_path=per[0])
    return scan_stack(graphdef, stacked, x, (rates, keys), call, self.remat, cond)

  def logits(self, labels, x_in, *, drop=None, key=None, branch: str = "ns", word=None):
    """Teacher-forced logits (B, L, V) float32. labels (B,); x_in (B, L - first_l, z) next-scale inputs;
    branch 'ns' (VAR: the only one) or 'mask' (HMAR: base -> mask_blocks -> mask head, with `word`)."""
    cond = self.condition(labels, drop)
    x = self.sequence(cond, x_in, word)
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    if self.kind == "var":
      return self.head(self._run(self.blocks, x, cond, layout=self.layout, key=k1), cond)
    x = self._run(self.base_blocks, x, cond, layout=self.layout, key=k1)
    if branch == "ns":
      return self.ns_head(self._run(self.ns_blocks, x, cond, layout=self.layout, key=k2), cond)
    return self.mask_head(self._run(self.mask_blocks, x, cond, layout=self.layout, key=k2), cond)

  def mask_inputs(self, indices):
    """HMAR stage-2 second input (idxBl_to_mask_input): for scales k >= 1, area(phi_k(bicubic(embed(gt_k))))
    at scale k's own size, concatenated (B, L - first_l, z)."""
    q = self.vq
    full = (self.scales.patch_nums[-1],) * 2
    pieces = []
    for si, idx in enumerate(self.split_scales(indices)):
      if si == 0:
        continue
      pn = self.scales.patch_nums[si]
      h = q.apply_phi(si, resize.bicubic(q.embed(idx, (pn, pn)), full))
      h = resize.area(h, (pn, pn))
      pieces.append(h.reshape(h.shape[0], -1, h.shape[-1]))
    return jnp.concatenate(pieces, axis=1)

  def masked_word(self, x_ns, x_mask, masked):
    """word_embed(x_ns) + [word_embed(x_mask) with masked positions = mask_embed] + bias; masked (B|1, L-1)."""
    masked_term = jnp.where(masked[..., None], self.mask_embed[...][0], self._word(x_mask))
    return self._word(x_ns) + masked_term + self._bias()

  # ---- training ----------------------------------------------------------------------------------------------
  def _ce(self, logits, targets):
    """Per-token CE (B, L) with PyTorch's label smoothing."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if self.label_smoothing <= 0:
      return nll
    return (1.0 - self.label_smoothing) * nll - self.label_smoothing * jnp.mean(logp, axis=-1)

  def draw_stage2_mask(self, key):
    """(L - first_l,) bool: p ~ U(0, 1) per step; per scale k >= 1, ceil(pn_k^2 p) random positions, the same
    for the whole batch (mp_trainer.py / quant.py idxBl_to_mask_input)."""
    k_p, k_perm = jax.random.split(key)
    p = jax.random.uniform(k_p, ())
    parts = []
    for si, n in enumerate(self.scales.sizes):
      if si == 0:
        continue
      count = jnp.ceil(n * p)
      rank = jnp.argsort(jax.random.uniform(jax.random.fold_in(k_perm, si), (n,)))
      parts.append(jnp.argsort(rank) < count)  # a uniformly random subset of size `count`
    return jnp.concatenate(parts), p

  def train_loss(self, batch, *, key, step=None):
    """VAR / HMAR stage 1: weighted CE over all tokens; HMAR stage 2: mean CE over the masked tokens."""
    indices = batch["indices"].astype(jnp.int32)
    labels = batch["label"].astype(jnp.int32)
    self.check_indices(indices)
    k_drop, k_net, k_mask = jax.random.split(key, 3)
    drop = jax.random.uniform(k_drop, labels.shape) < self.cond_drop_prob
    x_ns = self.vq.next_scale_inputs(self.split_scales(indices))
    if self.stage == 1:
      logits = self.logits(labels, x_ns, drop=drop, key=k_net)
      ce = self._ce(logits, indices)
      weights = jnp.asarray(token_weights(self.scales.patch_nums, self.loss_weighting))
      loss = jnp.mean(jnp.sum(ce * weights, axis=-1))
      acc = jnp.mean((jnp.argmax(logits, -1) == indices).astype(jnp.float32))
      tail = self.scales.starts[-1]
      return loss, {"ce_mean": jnp.mean(ce), "ce_tail": jnp.mean(ce[:, tail:]), "acc": acc}
    masked, p = self.draw_stage2_mask(k_mask)
    word = self.masked_word(x_ns, self.mask_inputs(indices), masked[None])
    logits = self.logits(labels, x_ns, drop=drop, key=k_net, branch="mask", word=word)
    full_mask = jnp.concatenate([jnp.zeros((self.scales.sizes[0],), bool), masked])
    ce = self._ce(logits, indices)
    n = jnp.maximum(jnp.sum(full_mask), 1)
    loss = jnp.mean(jnp.sum(jnp.where(full_mask, ce, 0.0), axis=-1) / n)
    acc = jnp.sum(jnp.where(full_mask, jnp.argmax(logits, -1) == indices, False)) / (n * indices.shape[0])
    return loss, {"ce_masked": loss, "acc_masked": acc, "mask_ratio": p}

  # ---- sampling ------------------------------------------------------------------------------------------------
  def sample(self, labels, *, keys, **kwargs):
    """Token indices (B, L) int32 for `labels` (B,), one key per row (see sample_tokens)."""
    return self.sample_tokens(labels, keys=keys, **kwargs)

  def sample_tokens(self, labels, *, keys, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                    mask_schedule=None, refine: bool = True, greedy: bool = False, known=None, known_mask=None):
    """VAR: KV-cached next-scale sampling. HMAR: each scale alone (no cache) plus, where `mask_schedule[k]` has
    more than one entry, masked refinement passes. CFG ramp t = cfg * k / (K - 1); top-k then top-p.
    greedy: argmax instead of a categorical draw (deterministic; confidences are still the filtered softmax).
    known / known_mask (B, L): editing (inpainting, outpainting, class-conditional editing): tokens where
    known_mask is True are kept from `known` at every pass and never re-masked; the rest are generated (see
    token_masks_from_pixels)."""
    edit = None
    if known is not None or known_mask is not None:
      if known is None or known_mask is None or known.shape != known_mask.shape or known.shape[1:] != (
          self.scales.length,):
        raise ValueError(f"known and known_mask must both be given with shape (B, {self.scales.length}).")
      edit = (known.astype(jnp.int32), known_mask.astype(bool))
    if self.kind == "var":
      return _sample_var(self, labels, keys, cfg=cfg, top_k=top_k, top_p=top_p, greedy=greedy, edit=edit)
    schedule = tuple(tuple(s) for s in (mask_schedule or default_schedule(self.scales.patch_nums)))
    check_schedule(schedule, self.scales.patch_nums)
    return _sample_hmar(self, labels, keys, cfg=cfg, top_k=top_k, top_p=top_p, schedule=schedule,
                        refine=refine, greedy=greedy, edit=edit)


def default_schedule(patch_nums) -> tuple:
  """HMAR's published schedules for the 256 / 512 layouts; elsewhere one pass per scale."""
  pn = tuple(patch_nums)
  for sched in (HMAR_SCHEDULE_256, HMAR_SCHEDULE_512):
    if tuple(s[-1] if len(s) == 1 else sum(s) for s in sched) == tuple(p * p for p in pn):
      return sched
  return tuple((p * p,) for p in pn)


def filter_top_k_top_p(logits, top_k: int = 0, top_p: float = 0.0):
  """VAR's sample_with_top_k_top_p_ filter: logits below the k-th largest -> -inf, then the smallest tokens whose
  cumulative probability is <= 1 - top_p -> -inf (the most likely token always kept)."""
  logits = logits.astype(jnp.float32)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p > 0:
    order = jnp.argsort(logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, -1), axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), -1)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _draw(filtered, keys, scale: int, step: int, greedy: bool = False):
  """One categorical draw per token from (B, l, V) filtered logits, each row from its own key."""
  if greedy:
    return jnp.argmax(filtered, axis=-1).astype(jnp.int32)
  row_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, scale), step))(keys)
  return jax.vmap(lambda k, lg: jax.random.categorical(k, lg, axis=-1))(row_keys, filtered).astype(jnp.int32)


def _cfg_mix(logits, t):
  b = logits.shape[0] // 2
  return (1.0 + t) * logits[:b] - t * logits[b:]


def _start(model, labels):
  b = labels.shape[0]
  cond = model.condition(jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]))
  lvl_pos = model.lvl_pos()
  first = model.scales.sizes[0]
  x = cond[:, None, :] + model.pos_start[...] + lvl_pos[:, :first]
  f_hat = jnp.zeros((b, model.scales.patch_nums[-1], model.scales.patch_nums[-1], model.vq.config.z_channels),
                    jnp.float32)
  return cond, lvl_pos, x, f_hat


def _next_input(model, lvl_pos, nxt, si):
  """Embedded input of scale si + 1 from the pyramid's next input (B, pn, pn, z), doubled for CFG."""
  s, n = model.scales.starts[si + 1], model.scales.sizes[si + 1]
  x = model._word(nxt.reshape(nxt.shape[0], -1, nxt.shape[-1])) + model._bias() + lvl_pos[:, s:s + n]
  return jnp.concatenate([x, x], axis=0)


def _ramp(si: int, num_scales: int) -> float:
  return si / max(num_scales - 1, 1)


def _keep_known(idx, edit, model, si):
  """Known tokens of scale si replace the drawn ones (editing); returns (idx, known mask of the scale or None)."""
  if edit is None:
    return idx, None
  s, n = model.scales.starts[si], model.scales.sizes[si]
  km = edit[1][:, s:s + n]
  return jnp.where(km, edit[0][:, s:s + n], idx), km


def token_masks_from_pixels(known_pixels, patch_nums) -> jax.Array:
  """(B, H, W) bool pixel mask (True = keep) -> (B, L) token mask: a token of scale k is kept when the whole
  area it covers (area-resized to pn_k x pn_k) is known."""
  m = jnp.asarray(known_pixels, jnp.float32)[..., None]
  parts = [resize.area(m, (p, p)).reshape(m.shape[0], -1) >= 1.0 - 1e-6 for p in patch_nums]
  return jnp.concatenate(parts, axis=1)


def _sample_var(model, labels, keys, *, cfg, top_k, top_p, greedy, edit=None):
  cond, lvl_pos, x, f_hat = _start(model, labels)
  two_b = x.shape[0]
  heads = model.num_heads
  shape = (two_b, model.scales.length, heads, model.width // heads)
  caches = [(jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype)) for _ in model.blocks]
  out = []
  num = len(model.scales.patch_nums)
  for si, pn in enumerate(model.scales.patch_nums):
    h = x
    new_caches = []
    for blk, cache in zip(model.blocks, caches):
      h, cache = blk.cached(h, cond, cache, model.scales.starts[si])
      new_caches.append(cache)
    caches = new_caches
    logits = _cfg_mix(model.head(h, cond), cfg * _ramp(si, num))
    idx, _ = _keep_known(_draw(filter_top_k_top_p(logits, top_k, top_p), keys, si, 0, greedy), edit, model, si)
    out.append(idx)
    f_hat, nxt = model.vq.next_autoregressive_input(si, f_hat, model.vq.embed(idx, (pn, pn)))
    if si != num - 1:
      x = _next_input(model, lvl_pos, nxt, si)
  return jnp.concatenate(out, axis=1)


def _run_scale(model, blocks, x, cond):
  for blk in blocks:
    x = blk(x, cond)  # one scale alone: block-diagonal attention is full attention within the scale
  return x


def _sample_hmar(model, labels, keys, *, cfg, top_k, top_p, schedule, refine, greedy, edit=None):
  cond, lvl_pos, x, f_hat = _start(model, labels)
  b = labels.shape[0]
  q = model.vq
  full = (model.scales.patch_nums[-1],) * 2
  out = []
  num = len(model.scales.patch_nums)
  for si, pn in enumerate(model.scales.patch_nums):
    h = _run_scale(model, model.ns_blocks, _run_scale(model, model.base_blocks, x, cond), cond)
    filtered = filter_top_k_top_p(_cfg_mix(model.ns_head(h, cond), cfg * _ramp(si, num)), top_k, top_p)
    idx, known_here = _keep_known(_draw(filtered, keys, si, 0, greedy), edit, model, si)
    # Known tokens get confidence +inf, so the lowest-confidence tokens that get re-masked are unknown ones.
    pin = (lambda c: c) if known_here is None else (lambda c: jnp.where(known_here, jnp.inf, c))
    steps = schedule[si]
    if refine and pn * pn > 1 and len(steps) > 1:
      conf = pin(jnp.take_along_axis(jax.nn.softmax(filtered, -1), idx[..., None], -1)[..., 0])
      to_mask = jnp.argsort(conf, axis=-1)[:, :sum(steps[1:])]
      s0, n0 = model.scales.starts[si], model.scales.sizes[si]
      for step in range(1, len(steps)):
        # get_next_mask_input: this scale's f_hat so far and its own tokens, both at pn x pn.
        f_int = resize.area(f_hat, (pn, pn)).reshape(b, n0, -1)
        h_int = resize.area(q.apply_phi(si, resize.bicubic(q.embed(idx, (pn, pn)), full)), (pn, pn))
        masked = scatter_rows(jnp.zeros((b, n0), bool), to_mask, jnp.ones(to_mask.shape, bool))
        inp = model.masked_word(f_int, h_int.reshape(b, n0, -1), masked) + lvl_pos[:, s0:s0 + n0]
        hm = _run_scale(model, model.mask_blocks,
                        _run_scale(model, model.base_blocks, jnp.concatenate([inp, inp], 0), cond), cond)
        # The official refinement runs CFG at t = cfg * 1e-6 (effectively off).
        filtered_m = filter_top_k_top_p(_cfg_mix(model.mask_head(hm, cond), cfg * 1e-6), top_k, top_p)
        idx_m = _draw(filtered_m, keys, si, step, greedy)
        idx = scatter_rows(idx, to_mask, jnp.take_along_axis(idx_m, to_mask, -1))
        idx, _ = _keep_known(idx, edit, model, si)
        if step != len(steps) - 1:
          conf = pin(jnp.take_along_axis(jax.nn.softmax(filtered_m, -1), idx[..., None], -1)[..., 0])
          order = jnp.argsort(jnp.take_along_axis(conf, to_mask, -1), axis=-1)[:, :sum(steps[step + 1:])]
          to_mask = jnp.take_along_axis(to_mask, order, -1)
    out.append(idx)
    f_hat, nxt = q.next_autoregressive_input(si, f_hat, q.embed(idx, (pn, pn)))
    if si != num - 1:
      x = _next_input(model, lvl_pos, nxt, si)
  return jnp.concatenate(out, axis=1)


def trainable_mask(params, stage: int):
  """Bool tree over a pure param dict: what HMAR's stage 2 trains (mask_embed, mask_blocks, mask head; the
  official freezes everything else, word embedding included); stage 1: everything. Pass it to
  optax.masked / optax.multi_transform so weight decay does not move the frozen weights either."""

  def trainable(path, _):
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    return stage == 1 or name.startswith(("mask_embed", "mask_blocks", "mask_head"))

  return jax.tree_util.tree_map_with_path(trainable, params)


def init_mask_branch_from_ns(model: NextScaleTransformer) -> None:
  """Stage 2 starts from stage 1 (MaskedPrediction loads the NSP checkpoint): mask_blocks <- ns_blocks and mask
  head <- ns head."""
  if model.kind != "hmar":
    raise ValueError("init_mask_branch_from_ns needs kind='hmar'.")
  nnx.update(model.mask_blocks, nnx.clone(nnx.state(model.ns_blocks, nnx.Param)))
  nnx.update(model.mask_head, nnx.clone(nnx.state(model.ns_head, nnx.Param)))


# ---- family interface -------------------------------------------------------------------------------------------
def trainable(config, params):
  """Trainer hook (himar_jax/train/loop.py -> make_optimizer): bool tree, True where a param trains. VAR: all.
  HMAR stage 2: the mask branch only (trainable_mask(params, 2)). HMAR stage 1: all but the mask branch, which
  stage 1 never uses (the official NSP model has none): frozen, weight decay does not shrink mask_embed before
  stage 2 starts from it."""
  m = config.model
  if m.kind != "hmar":
    return jax.tree.map(lambda _: True, params)
  stage2 = trainable_mask(params, 2)
  return stage2 if m.get("stage", 1) == 2 else jax.tree.map(lambda t: not t, stage2)


def adapt_restored_params(config, params):
  """Trainer hook for config.train.init_from: HMAR stage 2 from a stage-1 checkpoint starts mask_blocks and the
  mask head as copies of ns_blocks and the ns head (the official MaskedPrediction loads the NSP weights; set
  config.model.init_mask_from_ns=False to keep a checkpoint's own mask branch, e.g. a stage-2 run)."""
  m = config.model
  if m.kind != "hmar" or m.get("stage", 1) != 2 or not m.get("init_mask_from_ns", True):
    return params
  out = dict(params)
  out["mask_blocks"], out["mask_head"] = params["ns_blocks"], params["ns_head"]
  return out


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def vq_config_of(m) -> VQPyramidConfig:
  return VQPyramidConfig(vocab_size=m.vocab_size, z_channels=m.z_channels, quant_resi=m.quant_resi,
                         share_quant_resi=m.share_quant_resi, patch_nums=tuple(m.patch_nums))


def validate(config) -> None:
  m = config.model
  if m.kind not in KINDS:
    raise ValueError(f"config.model.kind={m.kind!r} is not one of {KINDS}.")
  for name in ("depth", "width", "num_heads", "num_classes", "vocab_size", "z_channels"):
    if int(m[name]) <= 0:
      raise ValueError(f"config.model.{name}={m[name]} must be positive.")
  if m.width % m.num_heads:
    raise ValueError(f"config.model.width={m.width} is not divisible by num_heads={m.num_heads}.")
  pn = tuple(m.patch_nums)
  if not pn or list(pn) != sorted(set(pn)):
    raise ValueError(f"config.model.patch_nums={pn} must be strictly increasing.")
  if m.loss_weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"config.model.loss_weighting={m.loss_weighting!r} is not one of {LOSS_WEIGHTINGS}.")
  if m.dtype not in _DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r} must be one of {sorted(_DTYPES)}.")
  if not 0.0 <= m.cond_drop_prob < 1.0:
    raise ValueError(f"config.model.cond_drop_prob={m.cond_drop_prob} must lie in [0, 1).")
  if m.kind == "hmar":
    sched = m.get("mask_schedule", None)
    if sched is not None:
      check_schedule(sched, pn)


def check_schedule(schedule, patch_nums) -> None:
  """A refinement schedule has one list per scale whose entries sum to that scale's token count."""
  if len(schedule) != len(patch_nums):
    raise ValueError(f"mask_schedule has {len(schedule)} scales; patch_nums {tuple(patch_nums)} has "
                     f"{len(patch_nums)}.")
  for k, (steps, p) in enumerate(zip(schedule, patch_nums)):
    if not steps or sum(steps) != p * p or min(steps) < 1:
      raise ValueError(f"mask_schedule[{k}]={list(steps)} must be positive counts summing to {p * p} (pn={p}).")


def build(config, rngs: nnx.Rngs) -> NextScaleTransformer:
  """The model; with config.model.tokenizer set (vae_ch160v4096z32.pth or a converted tokenizer directory) its
  codebook and phi convs are loaded into the frozen `vq` (training needs them; sampling restores them from the
  checkpoint's buffers)."""
  m = config.model
  model = NextScaleTransformer(
      kind=m.kind, depth=m.depth, width=m.width, num_heads=m.num_heads, num_classes=m.num_classes,
      vq_config=vq_config_of(m), rngs=rngs, mlp_ratio=m.mlp_ratio, cond_drop_prob=m.cond_drop_prob,
      drop_path_rate=m.drop_path_rate, n_layers_train=m.get("n_layers_train", 8), init_adaln=m.init_adaln,
      init_adaln_gamma=m.init_adaln_gamma, init_head=m.init_head, loss_weighting=m.loss_weighting,
      label_smoothing=m.label_smoothing, stage=m.get("stage", 1), dtype=_DTYPES[m.dtype],
      attention_implementation=m.get("attention_implementation", None), scan_blocks=m.get("scan_blocks", False),
      remat=m.get("remat", "none"))
  if m.get("tokenizer", ""):
    from himar_jax.convert import next_scale as convert_next_scale  # lazy: the converter imports this module
    convert_next_scale.load_tokenizer_arrays(model, convert_next_scale.read_tokenizer(m.tokenizer))
  return model


def sample_kwargs(config) -> dict:
  m = config.model
  out = {"cfg": m.cfg, "top_k": m.top_k, "top_p": m.top_p}
  if m.kind == "hmar":
    out["mask_schedule"] = tuple(tuple(s) for s in m.mask_schedule)
  return out
