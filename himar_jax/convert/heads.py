"""Official PyTorch diffusion-head weights -> `himar_jax.models.heads` params (a rename plus layout changes).

MLP head (MAR `SimpleMLPAdaLN`, key prefix `diffloss.net.` in MAR / Hi-MAR checkpoints):
  time_embed.mlp.{0,2}            -> time_embed.{fc1,fc2}
  cond_embed / input_proj         -> cond_embed / input_proj
  res_blocks.i.in_ln              -> res_blocks.i.norm (weight -> scale)
  res_blocks.i.mlp.{0,2}          -> res_blocks.i.{fc1,fc2}
  res_blocks.i.adaLN_modulation.1 -> res_blocks.i.adaln
  final_layer.{linear, adaLN_modulation.1} -> final_layer.{linear, adaln}
DiT head (Hi-MAR `DiT`, key prefix `cond_diffloss.net.`):
  x_embedder.proj / c_embedder.proj (1x1 convs) -> x_embedder / c_embedder (dense kernels)
  t_embedder.mlp.{0,2}            -> t_embedder.{fc1,fc2}
  blocks.i.attn.{qkv,proj}, blocks.i.mlp.{fc1,fc2} -> same names; blocks.i.adaLN_modulation.1 -> blocks.i.adaln
  final_layer.{linear, adaLN_modulation.1} -> final_layer.{linear, adaln}
  pos_embed                       -> not stored: checked against the fixed 2D sin-cos table, then dropped
  c_pos_embed                     -> dropped: registered by the official class but never used by its forward
Linear weights (out, in) become kernels (in, out); 1x1 conv weights (out, in, 1, 1) become (in, out).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.convert import state_dict as sd_lib
from himar_jax.models.heads import sincos_pos_embed_2d

HEAD_KINDS = ("mlp", "dit")
# (regex over the key without prefix, our path template with {i} for the block index)
_RULES = {
    "mlp": [
        (r"time_embed\.mlp\.0", "time_embed.fc1"),
        (r"time_embed\.mlp\.2", "time_embed.fc2"),
        (r"cond_embed", "cond_embed"),
        (r"input_proj", "input_proj"),
        (r"res_blocks\.(\d+)\.in_ln", "res_blocks.{i}.norm"),
        (r"res_blocks\.(\d+)\.mlp\.0", "res_blocks.{i}.fc1"),
        (r"res_blocks\.(\d+)\.mlp\.2", "res_blocks.{i}.fc2"),
        (r"res_blocks\.(\d+)\.adaLN_modulation\.1", "res_blocks.{i}.adaln"),
        (r"final_layer\.linear", "final_layer.linear"),
        (r"final_layer\.adaLN_modulation\.1", "final_layer.adaln"),
    ],
    "dit": [
        (r"x_embedder\.proj", "x_embedder"),
        (r"c_embedder\.proj", "c_embedder"),
        (r"t_embedder\.mlp\.0", "t_embedder.fc1"),
        (r"t_embedder\.mlp\.2", "t_embedder.fc2"),
        (r"blocks\.(\d+)\.attn\.qkv", "blocks.{i}.attn.qkv"),
        (r"blocks\.(\d+)\.attn\.proj", "blocks.{i}.attn.proj"),
        (r"blocks\.(\d+)\.mlp\.fc1", "blocks.{i}.mlp.fc1"),
        (r"blocks\.(\d+)\.mlp\.fc2", "blocks.{i}.mlp.fc2"),
        (r"blocks\.(\d+)\.adaLN_modulation\.1", "blocks.{i}.adaln"),
        (r"final_layer\.linear", "final_layer.linear"),
        (r"final_layer\.adaLN_modulation\.1", "final_layer.adaln"),
    ],
}
_DROPPED = {"dit": ("pos_embed", "c_pos_embed")}
_NORMS = {"mlp": ("norm",)}


def _as_path(dotted: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def head_param_path(kind: str, key: str, value_ndim: int) -> tuple | None:
  """Our param path for one official key (no prefix); None for keys that are dropped; KeyError if unknown."""
  if kind not in HEAD_KINDS:
    raise ValueError(f"head kind={kind!r} is not one of {HEAD_KINDS}.")
  if key in _DROPPED.get(kind, ()):
    return None
  module, _, leaf = key.rpartition(".")
  for pattern, template in _RULES[kind]:
    m = re.fullmatch(pattern, module)
    if m is None:
      continue
    ours = template.format(i=m.group(1)) if m.groups() else template
    is_norm = ours.rsplit(".", 1)[-1] in _NORMS.get(kind, ())
    if leaf == "bias":
      return _as_path(ours) + ("bias",)
    if leaf == "weight":
      return _as_path(ours) + ("scale" if is_norm and value_ndim == 1 else "kernel",)
  raise KeyError(f"official {kind} head key {key!r} has no counterpart in himar_jax.models.heads.")


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return value
  if value.ndim == 4:  # 1x1 conv (out, in, 1, 1) -> per-token dense (in, out)
    if value.shape[2:] != (1, 1):
      raise ValueError(f"only 1x1 patch embeddings are supported (patch_size 1); got a conv of {value.shape}.")
    value = value[:, :, 0, 0]
  return value.T


def convert_head_state_dict(kind: str, state_dict: Mapping[str, np.ndarray], *, prefix: str = ""
                            ) -> tuple[dict[tuple, np.ndarray], list[str]]:
  """Official head weights (keys under `prefix`) -> ({our path: array}, [keys under prefix that were dropped]).

  Keys outside `prefix` are ignored (a whole MAR / Hi-MAR checkpoint can be passed). DiT's `pos_embed` is
  verified against the fixed sin-cos table before being dropped.
  """
  out, dropped = {}, []
  for full_key in sorted(state_dict):
    if not full_key.startswith(prefix):
      continue
    key = full_key[len(prefix):]
    value = np.asarray(state_dict[full_key], dtype=np.float32)
    path = head_param_path(kind, key, value.ndim)
    if path is None:
      if key == "pos_embed":
        _check_pos_embed(value, full_key)
      dropped.append(full_key)
      continue
    out[path] = _to_ours(value, path[-1])
  if not out:
    raise ValueError(f"no {kind} head weights under prefix {prefix!r}; official checkpoints use 'diffloss.net.' "
                     "(MLP head) and 'cond_diffloss.net.' (Hi-MAR DiT head).")
  return out, dropped


def _check_pos_embed(value: np.ndarray, key: str):
  _, length, width = value.shape
  grid = int(round(length ** 0.5))
  expected = sincos_pos_embed_2d(width, grid)
  if grid * grid != length or not np.allclose(value[0], expected, atol=1e-5):
    raise ValueError(f"{key!r} {value.shape} is not the fixed 2D sin-cos embedding of a {grid}x{grid} grid; "
                     "this checkpoint's DiT head is not the published Hi-MAR one.")


def load_head_state_dict(head: nnx.Module, kind: str, state_dict: Mapping[str, np.ndarray], *,
                         prefix: str = "") -> list[str]:
  """Copies official head weights into `head` (MlpHead for 'mlp', DiTHead for 'dit'); returns the dropped keys.

  Raises CheckpointMismatchError (a ValueError) naming every missing parameter, unexpected key and shape mismatch.
  """
  converted, dropped = convert_head_state_dict(kind, state_dict, prefix=prefix)
  sd_lib.load(sd_lib.flat_variables(head, nnx.Param), converted, dtype=jnp.float32,
              header=f"the {kind} head checkpoint (prefix {prefix!r}) does not fit the model (check width, depth, "
                     "token / condition channels, learn_sigma)")
  return dropped
