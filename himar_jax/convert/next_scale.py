"""Official VAR (`var_d{16,20,24,30}.pth`) and HMAR (`hmar-d{16,20,24,30}.pth`) state dicts -> next_scale params.

Both files are plain state dicts (read with torch.load(weights_only=True)). Key map (Linear weight (out, in) ->
kernel (in, out)):
  word_embed.{weight,bias} -> word_embed.{kernel,bias}     word_embed_bias (HMAR) -> word_embed_bias
  class_emb.weight -> class_emb      pos_start, pos_1LC -> same      lvl_embed.weight -> lvl_embed
  mask_embed.weight (HMAR) -> mask_embed
  {blocks,base_blocks,ns_blocks,mask_blocks}.i.ada_lin.1 -> <stack>.i.ada_lin
  <stack>.i.attn.{mat_qkv,proj} -> same; attn.{q_bias,v_bias} -> same; attn.scale_mul_1H11 (1,H,1,1) -> scale_mul (H,)
  <stack>.i.ffn.{fc1,fc2} -> same
  head_nm.ada_lin.1 / head -> head.head_nm.ada_lin / head.head (VAR); {ns,mask}_head_nm / {ns,mask}_head ->
  {ns,mask}_head.head_nm.ada_lin / {ns,mask}_head.head (HMAR)
Dropped buffers (constants rebuilt here): attn_bias_for_masking, lvl_1L, <stack>.i.attn.zero_k_bias.
The VQ tokenizer (vae_ch160v4096z32.pth) is a separate file: `tokenizer_arrays` takes its codebook and phi convs
for the model's frozen `vq` (config.convert.tokenizer).
"""
from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import numpy as np

from himar_jax.convert import state_dict as sd_lib
from himar_jax.convert.himar import unflatten
from himar_jax.convert.state_dict import CheckpointMismatchError

HINT = "pick the configs/next_scale.py variant of the checkpoint's kind and depth, e.g. var_d16 or hmar_d16"
from himar_jax.convert.tokenizers import load_torch_state_dict, map_key

_DROPPED = re.compile(r"(attn_bias_for_masking|lvl_1L|.*\.attn\.zero_k_bias)")
_STACK = re.compile(r"(blocks|base_blocks|ns_blocks|mask_blocks)\.(\d+)\.(.+)")
_HEAD = re.compile(r"(|ns_|mask_)head(_nm\.ada_lin\.1)?\.(weight|bias)")
_TABLES = {"class_emb.weight": ("class_emb",), "pos_start": ("pos_start",), "pos_1LC": ("pos_1LC",),
           "lvl_embed.weight": ("lvl_embed",), "mask_embed.weight": ("mask_embed",),
           "word_embed_bias": ("word_embed_bias",)}


def _linear(prefix: tuple, leaf: str) -> tuple:
  return prefix + ("kernel" if leaf == "weight" else "bias",)


def param_path(key: str) -> tuple:
  """Our param path for an official key; KeyError when it has no counterpart."""
  if key in _TABLES:
    return _TABLES[key]
  if key in ("word_embed.weight", "word_embed.bias"):
    return _linear(("word_embed",), key.split(".")[-1])
  m = _STACK.fullmatch(key)
  if m:
    stack, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if rest in ("attn.q_bias", "attn.v_bias"):
      return (stack, i, "attn", rest.split(".")[1])
    if rest == "attn.scale_mul_1H11":
      return (stack, i, "attn", "scale_mul")
    mm = re.fullmatch(r"(ada_lin\.1|attn\.mat_qkv|attn\.proj|ffn\.fc1|ffn\.fc2)\.(weight|bias)", rest)
    if mm:
      module = ("ada_lin",) if mm.group(1) == "ada_lin.1" else tuple(mm.group(1).split("."))
      return _linear((stack, i) + module, mm.group(2))
    raise KeyError(key)
  m = _HEAD.fullmatch(key)
  if m:
    head = m.group(1) + "head"
    inner = ("head_nm", "ada_lin") if m.group(2) else ("head",)
    return _linear((head,) + inner, m.group(3))
  raise KeyError(key)


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str], list[str]]:
  """-> ({path: float32 array in our layout}, dropped buffer keys, unexpected keys)."""
  out, dropped, unexpected = {}, [], []
  for key, value in state_dict.items():
    if _DROPPED.fullmatch(key):
      dropped.append(key)
      continue
    try:
      path = param_path(key)
    except KeyError:
      unexpected.append(key)
      continue
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
      value = value.T
    elif path[-1] == "scale_mul":
      value = value.reshape(-1)
    out[path] = value
  return out, dropped, unexpected


def detect(state_dict: Mapping[str, np.ndarray]) -> tuple[str, int, int]:
  """(kind, depth, width) of an official state dict."""
  kind = "hmar" if "mask_embed.weight" in state_dict else "var"
  stacks = ("blocks",) if kind == "var" else ("base_blocks", "ns_blocks")
  depth = sum(len({k.split(".")[1] for k in state_dict if k.startswith(s + ".")}) for s in stacks)
  width = int(np.shape(state_dict["class_emb.weight"])[1]) if "class_emb.weight" in state_dict else -1
  return kind, depth, width


def convert_for_config(config, state_dict: Mapping[str, np.ndarray], *, what: str = "checkpoint") -> dict:
  """Official state dict -> nested pure-dict params of the model `config` builds (missing / unexpected keys
  and shape mismatches named in the error)."""
  from himar_jax.convert.himar import abstract_param_shapes

  m = config.model
  kind, depth, width = detect(state_dict)
  if (kind, depth, width) != (m.kind, m.depth, m.width):
    raise CheckpointMismatchError(
        f"the {what} holds a {kind.upper()} model of depth {depth} (width {width}) but the config builds "
        f"{m.kind.upper()} depth {m.depth} (width {m.width}); use configs/next_scale.py:{kind}_d{depth}.")
  flat, _, unexpected = convert_state_dict(state_dict)
  sd_lib.check_against(flat, abstract_param_shapes(config), unexpected=unexpected, what=what, hint=HINT)
  return unflatten(flat)


def tokenizer_arrays(vae_state_dict: Mapping[str, np.ndarray]) -> dict:
  """Codebook and phi weights of a VQ-pyramid state dict (official `quantize.*` keys or the fixture's bare
  `embedding.weight` / `quant_resi.*`) as {path under model.vq: array}."""
  out = {}
  for key, value in vae_state_dict.items():
    full = key if key.startswith("quantize.") else "quantize." + key
    if not (full.startswith("quantize.embedding") or full.startswith("quantize.quant_resi")):
      continue
    mapped = map_key(full, np.asarray(value, np.float32))
    if mapped is not None:
      out[mapped[0][1:]] = mapped[1]
  if ("embedding", "embedding") not in out:
    raise CheckpointMismatchError("the tokenizer state dict has no quantize.embedding.weight (pass "
                                  "vae_ch160v4096z32.pth).")
  return out


def load_into(model, state_dict: Mapping[str, np.ndarray], vae_state_dict: Mapping[str, np.ndarray] | None = None):
  """Copies an official state dict (and optionally the tokenizer's codebook / phi) into a built model."""
  from flax import nnx

  flat, _, unexpected = convert_state_dict(state_dict)
  sd_lib.load(sd_lib.flat_variables(model, nnx.Param), flat, unexpected=unexpected,
              header=f"the checkpoint does not fit the configured model ({HINT})")
  if vae_state_dict is not None:
    load_tokenizer_arrays(model, tokenizer_arrays(vae_state_dict))


def load_tokenizer_arrays(model, arrays: Mapping[tuple, np.ndarray]) -> None:
  """Codebook / phi arrays {path under model.vq: array} into the model's frozen `vq` (shapes checked)."""
  from himar_jax.models.next_scale import TokenizerWeight
  targets = {("vq",) + path: var for path, var in sd_lib.flat_variables(model.vq, TokenizerWeight).items()}
  sd_lib.load(targets, {("vq",) + tuple(path): value for path, value in arrays.items()}, what="tokenizer",
              header="the tokenizer does not fit the model's VQ settings (vocab_size, z_channels, share_quant_resi)")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist; download var_d16.pth (FoundationVision/var on "
                            "Hugging Face) or hmar-d16.pth (nvidia/HMAR) and pass its path.")
  return load_torch_state_dict(path)


@functools.lru_cache(maxsize=2)
def read_tokenizer(path: str) -> dict:
  """Codebook / phi arrays for model.vq from a converted tokenizer directory (`convert` with configs/vq_pyramid.py)
  or an official VQ-VAE file (vae_ch160v4096z32.pth). Cached: builds under eval_shape and jit read it once."""
  if os.path.isdir(path):
    from flax import nnx

    from himar_jax.convert.tokenizers import load_tokenizer
    tok, _ = load_tokenizer(path)
    quant = getattr(tok, "quantize", None)
    if quant is None:
      raise ValueError(f"{path!r} holds a {type(tok).__name__}, not a VQ pyramid; convert "
                       "vae_ch160v4096z32.pth with configs/vq_pyramid.py.")
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(quant, nnx.Param))}
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer {path!r} does not exist; pass vae_ch160v4096z32.pth or a converted "
                            "tokenizer directory as config.model.tokenizer.")
  return tokenizer_arrays(load_torch_state_dict(path))


def write_orbax(out_dir: str, params: dict, buffers: dict, *, step: int = 0) -> str:
  """<out_dir>/<step>/state with params = ema_params (the official files hold one set), buffers and step."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  state_dir = os.path.join(os.path.abspath(out_dir), str(step), "state")
  if os.path.exists(state_dir):
    raise FileExistsError(f"{state_dir!r} exists; pick an empty --workdir for the converted checkpoint.")
  to_jnp = lambda tree: {k: to_jnp(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
  state = {"params": to_jnp(params), "ema_params": to_jnp(params), "buffers": to_jnp(buffers),
           "step": jnp.asarray(step, jnp.int32)}
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(state_dir, state)
  return state_dir


def convert_checkpoint(src: str, out_dir: str, config) -> str:
  """Official var_d*.pth / hmar-d*.pth + the tokenizer (config.model.tokenizer) -> an orbax checkpoint that
  `sample --checkpoint=OUT` restores."""
  from flax import nnx

  from himar_jax import models
  if not config.model.get("tokenizer", ""):
    raise ValueError("config.model.tokenizer is empty; pass --config.model.tokenizer=vae_ch160v4096z32.pth (or a "
                     "converted tokenizer directory): the sampler needs the codebook and phi convs.")
  params = convert_for_config(config, read_state_dict(src), what=src)
  model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  _, _, abstract_buffers = nnx.split(model, nnx.Param, ...)
  arrays = read_tokenizer(config.model.tokenizer)
  buffers = {}
  for path, var in nnx.to_flat_state(abstract_buffers):
    value = arrays.get(path[1:]) if path[0] == "vq" else None
    node = buffers
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value if value is not None else np.zeros(var.get_value().shape, var.get_value().dtype)
  return write_orbax(out_dir, params, buffers)
