"""CLIP's text Transformer (ViT-L/14: 77 tokens, width 768, 12 layers, 12 heads) in NNX, with import of Hugging Face
`CLIPTextModel` / `CLIPModel` safetensors weights (`text_model.*`).

What it computes (transformers `CLIPTextTransformer`): token embedding + learned position embedding -> pre-LN
blocks (LayerNorm eps 1e-5, causal self-attention with q / k / v / out biases, MLP width 4x with quick_gelu
x sigmoid(1.702 x)) -> final LayerNorm = last hidden states (B, 77, D); the pooled vector is the final state at
the first end-of-text token of each row (HF's argmax over ids for ViT-L/14, whose end token has the largest id).
No padding mask: pad tokens follow the end token and, with the causal mask, never change the tokens before them
(Stable Diffusion / U-ViT take all 77 states as context this way).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.nn.attention import dot_product_attention
from himar_jax.nn.layers import dense, embed, layer_norm, with_axes
from himar_jax.text.tokenizer import CONTEXT_LENGTH, ClipTokenizer


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  vocab_size: int = 49408
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_width: int = 3072
  context_length: int = CONTEXT_LENGTH
  eps: float = 1e-5
  eos_token_id: int = 49407

  @classmethod
  def from_hf(cls, cfg: dict) -> ClipTextConfig:
    """From a Hugging Face config.json dict (CLIPModel's `text_config` or a CLIPTextModel config)."""
    if "text_config" in cfg or "text_config_dict" in cfg:  # a CLIPModel config; older files split the text part
      cfg = {**(cfg.get("text_config") or {}), **(cfg.get("text_config_dict") or {})}
    act = cfg.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
      raise ValueError(f"CLIP text config has hidden_act={act!r}; this encoder implements quick_gelu (OpenAI CLIP).")
    eos = cfg.get("eos_token_id", 49407)
    # ViT-L/14's config says eos_token_id=2 (legacy): HF then pools at argmax(ids) = the end token 49407.
    if eos == 2:
      eos = cfg.get("vocab_size", 49408) - 1
    return cls(vocab_size=cfg.get("vocab_size", 49408), width=cfg.get("hidden_size", 512),
               layers=cfg.get("num_hidden_layers", 12), heads=cfg.get("num_attention_heads", 8),
               mlp_width=cfg.get("intermediate_size", 2048),
               context_length=cfg.get("max_position_embeddings", CONTEXT_LENGTH),
               eps=cfg.get("layer_norm_eps", 1e-5), eos_token_id=eos)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class ClipAttention(nnx.Module):
  """Causal multi-head self-attention; fused qkv (output columns [q | k | v], each (heads, head_dim))."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
    if width % heads:
      raise ValueError(f"CLIP width {width} is not divisible by heads={heads}.")
    self.heads = heads
    self.qkv = dense(width, 3 * width, ("embed", "heads"), rngs=rngs, dtype=dtype)
    self.out = dense(width, width, ("heads", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    b, l, d = x.shape
    qkv = self.qkv(x).reshape(b, l, 3, self.heads, d // self.heads)
    causal = jnp.tril(jnp.ones((l, l), bool))[None, None]
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal)
    return self.out(out.reshape(b, l, d))


class ClipLayer(nnx.Module):

  def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
    self.norm1 = layer_norm(cfg.width, rngs=rngs, epsilon=cfg.eps)
    self.attn = ClipAttention(cfg.width, cfg.heads, rngs=rngs, dtype=dtype)
    self.norm2 = layer_norm(cfg.width, rngs=rngs, epsilon=cfg.eps)
    self.fc1 = dense(cfg.width, cfg.mlp_width, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = dense(cfg.mlp_width, cfg.width, ("mlp", "embed"), rngs=rngs, dtype=dtype)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x)).astype(jnp.float32)
    return x + self.fc2(quick_gelu(self.fc1(self.norm2(x)))).astype(jnp.float32)


class ClipTextEncoder(nnx.Module):
  """ids (B, context_length) int -> (last hidden states (B, L, width) float32, pooled end-token states (B, width))."""

  def __init__(self, cfg: ClipTextConfig = ClipTextConfig(), *, rngs: nnx.Rngs, dtype=jnp.bfloat16):
    self.config = cfg
    self.token_embedding = embed(cfg.vocab_size, cfg.width, rngs=rngs)
    self.position_embedding = nnx.Param(with_axes(nnx.initializers.normal(0.01), ("length", "embed"))(
        rngs.params(), (cfg.context_length, cfg.width), jnp.float32))
    self.layers = nnx.List([ClipLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.layers)])
    self.final_norm = layer_norm(cfg.width, rngs=rngs, epsilon=cfg.eps)

  def __call__(self, ids):
    if ids.ndim != 2 or ids.shape[1] != self.config.context_length:
      raise ValueError(f"CLIP text ids must be (B, {self.config.context_length}); got {ids.shape} (tokenize with "
                       "ClipTokenizer.tokenize, which pads and truncates).")
    x = self.token_embedding(ids) + self.position_embedding[...][None]
    for layer in self.layers:
      x = layer(x)
    x = self.final_norm(x)
    eos = jnp.argmax(ids == self.config.eos_token_id, axis=-1)  # first end token
    return x, x[jnp.arange(x.shape[0]), eos]


# ---- weights ---------------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16", "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str, *, prefixes: tuple[str, ...] = ("",)) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file whose names start with one of `prefixes`, as NumPy (float32 for 16-bit
  floats). Memory-mapped: only the selected tensors are read (the text half of a full CLIP checkpoint)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path!r} is not a safetensors file (shorter than its 8-byte header length).")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path!r} is not a safetensors file ({e}).") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__" or not name.startswith(prefixes):
      continue
    kind = _SAFETENSORS_DTYPES.get(info["dtype"])
    if kind is None:
      raise ValueError(f"{path!r}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know.")
    start, end = info["data_offsets"]
    raw = np.asarray(data[start:end])
    if kind == "bf16":
      arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
      arr = raw.view(kind)
      if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    out[name] = arr.reshape(info["shape"])
  return out


class ClipWeightsError(ValueError):
  """Weights that do not fit the encoder (missing / unexpected names, wrong shapes)."""


def _hf_to_ours(sd: dict[str, np.ndarray], layers: int) -> dict[tuple, np.ndarray]:
  """HF `text_model.*` names -> our parameter paths (Linear weights transposed, q / k / v fused)."""
  p = "text_model."
  out = {("token_embedding", "embedding"): sd[p + "embeddings.token_embedding.weight"],
         ("position_embedding",): sd[p + "embeddings.position_embedding.weight"],
         ("final_norm", "scale"): sd[p + "final_layer_norm.weight"],
         ("final_norm", "bias"): sd[p + "final_layer_norm.bias"]}
  for i in range(layers):
    h = f"{p}encoder.layers.{i}."
    attn = h + "self_attn."
    out[("layers", i, "attn", "qkv", "kernel")] = np.concatenate(
        [sd[f"{attn}{x}_proj.weight"].T for x in "qkv"], axis=1)
    out[("layers", i, "attn", "qkv", "bias")] = np.concatenate([sd[f"{attn}{x}_proj.bias"] for x in "qkv"])
    out[("layers", i, "attn", "out", "kernel")] = sd[attn + "out_proj.weight"].T
    out[("layers", i, "attn", "out", "bias")] = sd[attn + "out_proj.bias"]
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
      out[("layers", i, ours, "scale")] = sd[f"{h}{theirs}.weight"]
      out[("layers", i, ours, "bias")] = sd[f"{h}{theirs}.bias"]
    for fc in ("fc1", "fc2"):
      out[("layers", i, fc, "kernel")] = sd[f"{h}mlp.{fc}.weight"].T
      out[("layers", i, fc, "bias")] = sd[f"{h}mlp.{fc}.bias"]
  return out


def expected_hf_names(layers: int) -> set[str]:
  p = "text_model."
  names = {p + "embeddings.token_embedding.weight", p + "embeddings.position_embedding.weight",
           p + "final_layer_norm.weight", p + "final_layer_norm.bias"}
  for i in range(layers):
    h = f"{p}encoder.layers.{i}."
    for leaf in ("weight", "bias"):
      names |= {f"{h}self_attn.{x}_proj.{leaf}" for x in ("q", "k", "v", "out")}
      names |= {f"{h}{n}.{leaf}" for n in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")}
  return names


# Buffers HF checkpoints may carry that are not weights.
_IGNORED = ("text_model.embeddings.position_ids",)


# transformers >= 5 saves a CLIPTextModel without the `text_model.` prefix; the hub's CLIPModel files keep it.
_BARE_PREFIXES = ("embeddings.", "encoder.", "final_layer_norm.")


def text_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The `text_model.*` tensors of a CLIPModel / CLIPTextModel state dict (bare names get the prefix)."""
  if not any(k.startswith("text_model.") for k in sd):
    sd = {"text_model." + k: v for k, v in sd.items() if k.startswith(_BARE_PREFIXES)}
  return {k: v for k, v in sd.items() if k.startswith("text_model.") and k not in _IGNORED}


def load_hf_weights(model: ClipTextEncoder, sd: dict[str, np.ndarray]) -> None:
  """Copies HF `text_model.*` tensors into `model` (in place). Keys outside `text_model.` (vision tower,
  projections, logit scale) are ignored; missing or unexpected text keys and wrong shapes raise by name."""
  text = text_state_dict(sd)
  want = expected_hf_names(model.config.layers)
  missing, unexpected = sorted(want - set(text)), sorted(set(text) - want)
  if missing or unexpected:
    raise ClipWeightsError(f"CLIP text weights do not fit a {model.config.layers}-layer encoder: missing "
                           f"{missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected "
                           f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)}); use "
                           "openai/clip-vit-large-patch14's model.safetensors with its config.json.")
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for path, value in _hf_to_ours(text, model.config.layers).items():
    node = pure
    for part in path[:-1]:
      node = node[part]
    have = tuple(np.shape(node[path[-1]]))
    if have != value.shape:
      raise ClipWeightsError(f"CLIP weight for {'/'.join(map(str, path))} has shape {value.shape}, the encoder "
                             f"expects {have}; the config.json does not describe these weights.")
    node[path[-1]] = jnp.asarray(value, jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)


def _weights_file(path: str) -> str:
  if os.path.isfile(path):
    return path
  for name in ("model.safetensors", "text_model.safetensors"):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(f"no CLIP weights at {path!r}: pass a model.safetensors file or a folder holding one "
                          "(huggingface.co/openai/clip-vit-large-patch14).")


def load_clip_text(path: str, *, dtype=jnp.float32) -> tuple[ClipTokenizer, ClipTextEncoder]:
  """Tokenizer and encoder from a Hugging Face folder (vocab.json, merges.txt, config.json, model.safetensors),
  e.g. a download of openai/clip-vit-large-patch14. Without config.json the encoder is ViT-L/14's."""
  tokenizer = ClipTokenizer.from_dir(path)
  cfg = ClipTextConfig()
  cfg_path = os.path.join(path, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      cfg = ClipTextConfig.from_hf(json.load(f))
  if cfg.context_length != tokenizer.context_length:
    tokenizer = ClipTokenizer.from_dir(path, context_length=cfg.context_length)
  if cfg.eos_token_id != tokenizer.end_id:
    where = cfg_path if os.path.isfile(cfg_path) else f"ViT-L/14's defaults (no {cfg_path})"
    raise ClipWeightsError(f"{where} pools at token id {cfg.eos_token_id} but the tokenizer's end token "
                           f"<|endoftext|> is {tokenizer.end_id}; the tokenizer and weights do not belong together.")
  # Shapes only (no random init, which costs seconds on a CPU): every weight comes from the file.
  model = nnx.eval_shape(lambda: ClipTextEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
  load_hf_weights(model, read_safetensors(_weights_file(path), prefixes=("text_model.",) + _BARE_PREFIXES))
  return tokenizer, model


class TextEmbedder:
  """Prompts -> CLIP (last hidden states (B, L, D), pooled (B, D)) float32 NumPy, in jitted fixed-size batches."""

  def __init__(self, tokenizer: ClipTokenizer, encoder: ClipTextEncoder, *, batch_size: int = 64):
    self.tokenizer, self.batch_size = tokenizer, batch_size
    graphdef, state = nnx.split(encoder)
    self._state = state
    self._run = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    self.context_length, self.width = encoder.config.context_length, encoder.config.width

  @classmethod
  def from_dir(cls, path: str, *, dtype=jnp.float32, batch_size: int = 64) -> TextEmbedder:
    return cls(*load_clip_text(path, dtype=dtype), batch_size=batch_size)

  def encode_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden, pooled = [], []
    for s in range(0, len(ids), self.batch_size):
      chunk = ids[s:s + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:  # one compiled shape
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      h, p = jax.device_get(self._run(self._state, jnp.asarray(chunk)))
      hidden.append(np.asarray(h[:n], np.float32))
      pooled.append(np.asarray(p[:n], np.float32))
    if not hidden:
      return np.zeros((0, self.context_length, self.width), np.float32), np.zeros((0, self.width), np.float32)
    return np.concatenate(hidden), np.concatenate(pooled)

  def __call__(self, prompts, *, warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    return self.encode_ids(self.tokenizer.tokenize(list(prompts), warn=warn))
