"""Official MAR / Hi-MAR checkpoints (`checkpoint-last.pth`, entries 'model' and 'model_ema') -> himar_jax params.

Backbone keys (both models; Hi-MAR-only ones marked *):
  class_emb.weight -> class_emb.embedding         fake_latent, mask_token -> same names
  z_proj, cond_proj*, cond_z_proj*, decoder_embed (Linear) -> same names (weight (out, in) -> kernel (in, out))
  z_proj_ln, encoder_norm, decoder_norm (LayerNorm weight / bias) -> scale / bias
  cond_tokens* -> cond_tokens
  {encoder,decoder}_pos_embed_learned -> {encoder,decoder}_pos_embed
  diffusion_pos_embed_learned -> diffusion_pos_embed
  {encoder,decoder}_blocks.i.{norm1,norm2,attn.qkv,attn.proj,mlp.fc1,mlp.fc2} -> same names
  {encoder,decoder}_blocks.i.adaLN_{scale,shift}* -> {encoder,decoder}_blocks.i.adaln_{scale,shift}
  {encoder,decoder}_task_emb.weight* -> {encoder,decoder}_phase_embed.embedding
  {encoder,decoder}_blocks_ada.1* -> {encoder,decoder}_phase_ada
Heads (himar_jax.convert.heads): diffloss.net.* -> diffusion_head.* (MLP head),
  cond_diffloss.net.* -> dit_head.* (Hi-MAR's DiT head; its fixed pos_embed is checked, c_pos_embed dropped).

The checkpoint is read with torch.load(weights_only=True, mmap=True); the official files also pickle the
training `args` (an argparse.Namespace), which is the one class allowed beyond tensors and containers.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from himar_jax.convert import state_dict as sd_lib
from himar_jax.convert.heads import convert_head_state_dict
from himar_jax.convert.state_dict import CheckpointMismatchError  # noqa: F401 (re-exported)

HINT = "pick the config variant of the same family and size, e.g. configs/himar.py:himar_b for Hi-MAR-B"

KINDS = ("mar", "himar")
HEAD_PREFIXES = {"mlp": ("diffloss.net.", "diffusion_head"), "dit": ("cond_diffloss.net.", "dit_head")}
_BLOCK_PARTS = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
# (regex over the module name, our path template, is a LayerNorm)
_RULES = [
    (r"class_emb", "class_emb", False),
    (r"(z_proj|cond_proj|cond_z_proj|decoder_embed)", "{0}", False),
    (r"(z_proj_ln|encoder_norm|decoder_norm)", "{0}", True),
    (r"(encoder|decoder)_blocks\.(\d+)\.(norm1|norm2)", "{0}_blocks.{1}.{2}", True),
    (r"(encoder|decoder)_blocks\.(\d+)\." + _BLOCK_PARTS, "{0}_blocks.{1}.{2}", False),
    (r"(encoder|decoder)_blocks_ada\.1", "{0}_phase_ada", False),
    (r"(encoder|decoder)_task_emb", "{0}_phase_embed", False),
]
_PARAMS = {  # bare nn.Parameters (no module)
    "fake_latent": "fake_latent", "mask_token": "mask_token", "cond_tokens": "cond_tokens",
    "encoder_pos_embed_learned": "encoder_pos_embed", "decoder_pos_embed_learned": "decoder_pos_embed",
    "diffusion_pos_embed_learned": "diffusion_pos_embed",
}
_BLOCK_PARAMS = re.compile(r"(encoder|decoder)_blocks\.(\d+)\.adaLN_(scale|shift)")


def _as_path(dotted: str) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def backbone_param_path(key: str) -> tuple:
  """Our param path for an official backbone key; KeyError when it has no counterpart."""
  if key in _PARAMS:
    return (_PARAMS[key],)
  m = _BLOCK_PARAMS.fullmatch(key)
  if m:
    return (f"{m.group(1)}_blocks", int(m.group(2)), f"adaln_{m.group(3)}")
  module, _, leaf = key.rpartition(".")
  for pattern, template, is_norm in _RULES:
    m = re.fullmatch(pattern, module)
    if m is None:
      continue
    ours = _as_path(template.format(*m.groups()) if m.groups() else template)
    if module.endswith("task_emb") or module == "class_emb":
      if leaf == "weight":
        return ours + ("embedding",)
    elif leaf == "bias":
      return ours + ("bias",)
    elif leaf == "weight":
      return ours + ("scale" if is_norm else "kernel",)
  raise KeyError(key)


def convert_state_dict(kind: str, state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str], list[str]]:
  """Official state dict -> ({our flat path: float32 array}, dropped keys, unexpected keys)."""
  if kind not in KINDS:
    raise ValueError(f"model kind={kind!r} is not one of {KINDS}.")
  out, unexpected = {}, []
  heads = ["mlp"] + (["dit"] if kind == "himar" else [])
  dropped = []
  for head in heads:
    prefix, ours = HEAD_PREFIXES[head]
    converted, head_dropped = convert_head_state_dict(head, state_dict, prefix=prefix)
    out.update({(ours,) + path: value for path, value in converted.items()})
    dropped += head_dropped
  head_prefixes = tuple(HEAD_PREFIXES[h][0] for h in heads)
  for key in sorted(state_dict):
    if key.startswith(head_prefixes):
      continue
    try:
      path = backbone_param_path(key)
    except KeyError:
      unexpected.append(key)
      continue
    value = np.asarray(state_dict[key], np.float32)
    out[path] = value.T if path[-1] == "kernel" else value
  return out, dropped, unexpected


def check_against(flat: Mapping[tuple, np.ndarray], abstract_params: Mapping[tuple, object], *,
                  unexpected=(), what: str = "checkpoint") -> None:
  """Raises CheckpointMismatchError naming every missing / unexpected parameter and shape mismatch."""
  sd_lib.check_against(flat, abstract_params, unexpected=unexpected, what=what, hint=HINT)


def unflatten(flat: Mapping[tuple, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return tree


def abstract_param_shapes(config) -> dict:
  """{flat path: ShapeDtypeStruct} of the model a config builds (no weights allocated)."""
  from flax import nnx

  from himar_jax import models
  model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def detect(state_dict: Mapping[str, np.ndarray]) -> str:
  """'himar' or 'mar' with the encoder width / depth of an official state dict, e.g. 'himar (768 x 12)'."""
  kind = "himar" if "cond_tokens" in state_dict else "mar"
  width = np.shape(state_dict["z_proj.weight"])[0] if "z_proj.weight" in state_dict else "?"
  depth = len({k.split(".")[1] for k in state_dict if k.startswith("encoder_blocks.")})
  return f"{kind} ({width} x {depth})"


def convert_for_config(config, state_dict: Mapping[str, np.ndarray], *, what: str = "checkpoint") -> dict:
  """An official state dict -> the pure-dict params (nested, float32 NumPy) of the model `config` builds."""
  family = config.model.family
  if family not in KINDS:
    raise ValueError(f"config.model.family={family!r}: official checkpoints exist for {KINDS} "
                     "(configs/himar.py).")
  found = detect(state_dict)
  if not found.startswith(family + " "):
    raise CheckpointMismatchError(f"the {what} holds a {found} model but config.model.family={family!r}; use "
                                  f"configs/himar.py:{found.split()[0]}_<b|l|h> (width 768 / 1024 / 1280).")
  m = config.model
  if found != f"{family} ({m.encoder_dim} x {m.encoder_depth})":
    raise CheckpointMismatchError(f"the {what} holds a {found} model but the config builds {m.encoder_dim} x "
                                  f"{m.encoder_depth}; pick the variant of that size (b: 768 x 12, l: 1024 x 16, "
                                  "h: 1280 x 20).")
  flat, _, unexpected = convert_state_dict(family, state_dict)
  check_against(flat, abstract_param_shapes(config), unexpected=unexpected, what=what)
  return unflatten(flat)


def read_checkpoint(path: str) -> dict[str, dict[str, np.ndarray]]:
  """{'model': state dict, 'model_ema': state dict or absent} of an official checkpoint (NumPy float32)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist; download checkpoint-last.pth of Hi-MAR-B/L/H "
                            "(HiDream-ai/Hi-MAR) or MAR-B/L/H (LTH14/mar) and pass its path.")
  import argparse
  import pickle

  import torch  # lazy: only conversion needs PyTorch
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except (pickle.UnpicklingError, RuntimeError) as e:
    raise ValueError(f"{path!r} could not be read with torch.load(weights_only=True) ({e}).") from e
  if not isinstance(obj, Mapping) or "model" not in obj:
    raise ValueError(f"{path!r} is not a MAR / Hi-MAR training checkpoint (no 'model' entry; top-level keys: "
                     f"{sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__}).")
  out = {}
  for entry in ("model", "model_ema"):
    sd = obj.get(entry)
    if sd is None:
      continue
    out[entry] = {k: (v.detach().float().numpy() if v.is_floating_point() else v.numpy()) for k, v in sd.items()}
  return out


def write_orbax(out_dir: str, params: dict, ema_params: dict, *, step: int = 0) -> str:
  """Writes <out_dir>/<step>/state with params, ema_params, buffers (none) and step, the subtrees
  `himar_jax.sampling.restore_model_for_sampling` reads."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  state_dir = os.path.join(os.path.abspath(out_dir), str(step), "state")
  if os.path.exists(state_dir):
    raise FileExistsError(f"{state_dir!r} exists; pick an empty --workdir for the converted checkpoint.")
  to_jnp = lambda tree: {k: to_jnp(v) if isinstance(v, dict) else jnp.asarray(v) for k, v in tree.items()}
  state = {"params": to_jnp(params), "ema_params": to_jnp(ema_params), "buffers": {},
           "step": jnp.asarray(step, jnp.int32)}
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(state_dir, state)
  return state_dir


def convert_checkpoint(src: str, out_dir: str, config) -> str:
  """Official checkpoint -> orbax checkpoint directory for `config`; 'model_ema' becomes ema_params (the weights
  the official evaluation uses), 'model' params (ema_params = params when the file has no EMA)."""
  entries = read_checkpoint(src)
  params = convert_for_config(config, entries["model"], what=f"'model' of {src}")
  ema = params
  if "model_ema" in entries:
    ema = convert_for_config(config, entries["model_ema"], what=f"'model_ema' of {src}")
  return write_orbax(out_dir, params, ema)


def load_into(model, kind: str, state_dict: Mapping[str, np.ndarray]) -> list[str]:
  """Copies an official state dict into a built model (MAR or HiMAR); returns the dropped head keys."""
  import jax.numpy as jnp
  from flax import nnx

  flat, dropped, unexpected = convert_state_dict(kind, state_dict)
  sd_lib.load(sd_lib.flat_variables(model, nnx.Param), flat, unexpected=unexpected, dtype=jnp.float32,
              header=f"the checkpoint does not fit the configured model ({HINT})")
  return dropped
