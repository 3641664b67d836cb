"""Official PyTorch tokenizer checkpoints -> NNX state -> orbax: MAR's kl16.ckpt and VAR's vae_ch160v4096z32.pth.

Key mapping is mechanical because the NNX modules use the PyTorch attribute names (himar_jax/tokenizers/ldm.py):
  <path>.weight (conv, 4-D)     -> <path>.kernel, (out, in, kh, kw) -> (kh, kw, in, out)
  <path>.weight (GroupNorm)     -> <path>.scale
  <path>.bias                   -> <path>.bias
  LDM attention q / k / v convs -> one qkv conv, output channels concatenated [q | k | v]
  quantize.embedding.weight     -> quantize.embedding.embedding
  quantize.quant_resi.qresi_ls.i (partially shared) / .qresi (shared) / .i (non-shared) -> quantize.phi[i].conv
  quantize.ema_vocab_hit_SV     -> quantize.ema_hits (codebook-usage EMA; not a parameter)
Checkpoints are pickles: only torch.load(..., weights_only=True), safetensors or .npz are read.

A converted tokenizer is a directory: `state/` (orbax, the full NNX state) and `tokenizer.json` (kind, config,
fingerprint of the weights); `load_tokenizer(dir)` rebuilds the module from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.convert import state_dict as sd_lib
from himar_jax.convert.state_dict import CheckpointMismatchError, LoadReport  # noqa: F401 (re-exported)
from himar_jax.tokenizers import KINDS, PRESETS, build, config_from_dict, kl_vae, preset  # noqa: F401

METADATA_FILE = "tokenizer.json"


# ---- reading checkpoints -----------------------------------------------------------------------------------
def load_torch_state_dict(path: str, *, subkey: str | None = "auto") -> dict[str, np.ndarray]:
  """Reads a state dict as NumPy arrays from .pth/.ckpt (torch.load weights_only=True), .safetensors or .npz.

  subkey: entry holding the weights ("model" for MAR's kl16.ckpt); "auto" unwraps a lone "model" /
  "state_dict" entry when the top level is not itself a state dict.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of kl16.ckpt / "
                            "vae_ch160v4096z32.pth (or a .safetensors / .npz state dict).")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      obj = {k: f[k] for k in f.files}
  elif path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # lazy: optional dependency
    obj = load_file(path)
  else:
    import pickle

    import torch  # lazy: torch is only needed to read PyTorch pickles
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
      raise ValueError(f"{path!r} could not be read with torch.load(weights_only=True) ({e}); it holds objects "
                       "other than tensors. Re-save its state dict with torch.save(model.state_dict(), ...) "
                       "from a trusted environment.") from e
  if subkey == "auto":
    for candidate in ("model", "state_dict"):
      if isinstance(obj, Mapping) and candidate in obj and isinstance(obj[candidate], Mapping):
        obj = obj[candidate]
        break
  elif subkey:
    if subkey not in obj:
      raise KeyError(f"{path!r} has no entry {subkey!r}; top-level keys: {sorted(obj)[:20]}.")
    obj = obj[subkey]
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):  # torch.Tensor
      v = v.detach().cpu()
      v = v.float().numpy() if v.is_floating_point() else v.numpy()
    out[k] = np.asarray(v)
  return out


# ---- key mapping ---------------------------------------------------------------------------------------------
def _path(parts: Sequence[str]) -> tuple:
  return tuple(int(p) if p.isdigit() else p for p in parts)


def _phi_path(key: str) -> tuple | None:
  m = re.fullmatch(r"quantize\.quant_resi\.(?:qresi_ls\.(\d+)|qresi|(\d+))\.(weight|bias)", key)
  if not m:
    return None
  idx = int(m.group(1) or m.group(2) or 0)
  return ("quantize", "phi", idx, "conv", m.group(3))


def map_key(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray] | None:
  """One PyTorch key -> (NNX path, array in the NNX layout); None for keys that carry no model state."""
  if key == "quantize.ema_vocab_hit_SV":
    return ("quantize", "ema_hits"), value.astype(np.float32)
  if key == "quantize.embedding.weight":
    return ("quantize", "embedding", "embedding"), value
  parts = key.split(".")
  phi = _phi_path(key)
  if phi is not None:
    parts = [str(p) for p in phi]
  leaf = parts[-1]
  if leaf == "bias":
    return _path(parts), value
  if leaf == "weight":
    if value.ndim == 4:
      return _path(parts[:-1] + ["kernel"]), np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 1:
      return _path(parts[:-1] + ["scale"]), value
  return _path(parts), value


def _fuse_ldm_qkv(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates LDM's separate q, k, v 1x1 convs into one qkv conv (output channels [q | k | v])."""
  out = dict(sd)
  prefixes = {k[: -len(".q.weight")] for k in sd if k.endswith(".q.weight")}
  for p in sorted(prefixes):
    for leaf in ("weight", "bias"):
      names = [f"{p}.{x}.{leaf}" for x in "qkv"]
      if all(n in out for n in names):
        out[f"{p}.qkv.{leaf}"] = np.concatenate([out.pop(n) for n in names], axis=0)
  return out


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray], *, strict: bool = True,
                    prefix: str = "") -> LoadReport:
  """Copies a PyTorch-layout state dict into `model` (which may be abstract, from nnx.eval_shape).

  prefix: load only keys under this submodule name (e.g. "quantize." into a ResidualQuantizer); other keys count
  as unexpected.

  Shape mismatches always raise, naming the key and both shapes. Missing parameters raise (always: a model with
  uninitialised weights is useless); unexpected keys raise when `strict`, otherwise they are listed in the report.
  Non-parameter state missing from the checkpoint (codebook-usage EMA) is zero-filled.
  """
  sd = _fuse_ldm_qkv({k: np.asarray(v) for k, v in state_dict.items()})
  depth = len(prefix.split(".")) - 1 if prefix else 0
  outside = sorted(k for k in sd if not k.startswith(prefix))
  arrays, sources, _ = sd_lib.map_state_dict(
      {k: v for k, v in sd.items() if k.startswith(prefix)},
      lambda key, value: (lambda path, v: (path[depth:], v))(*map_key(key, value)))
  return sd_lib.load(
      sd_lib.flat_variables(model), arrays, unexpected=outside, sources=sources, originals=sd,
      allow_unexpected=not strict, fill_missing=lambda path, var: not isinstance(var, nnx.Param),
      tolerate_shape=lambda path: path[-1] == "ema_hits",  # VAR also drops a usage buffer of another layout
      header="the checkpoint does not match the model (pass the preset that matches the file: kl16, vq256, vq512; "
             "strict=False ignores unexpected keys)")


# ---- building, saving, loading -------------------------------------------------------------------------------
def fingerprint(model: nnx.Module) -> str:
  """sha256 over the parameters' names, shapes and bytes (identifies a tokenizer, e.g. in latent caches)."""
  h = hashlib.sha256()
  for path, var in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: sd_lib.path_name(kv[0])):
    arr = np.asarray(jax.device_get(var.get_value()), np.float32)
    h.update(sd_lib.path_name(path).encode())
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _pure(model: nnx.Module):
  state = nnx.state(model)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _stringify(tree):
  # orbax keeps dict keys as strings; NNX list indices are ints.
  if isinstance(tree, Mapping):
    return {str(k): _stringify(v) for k, v in tree.items()}
  return tree


def _unstringify_like(tree, like):
  if isinstance(like, Mapping):
    return {k: _unstringify_like(tree[str(k)], v) for k, v in like.items()}
  return tree


def save_tokenizer(model: nnx.Module, kind: str, out_dir: str, *, source: str | None = None) -> str:
  """Writes `out_dir/state` (orbax) and `out_dir/tokenizer.json`; refuses to overwrite an existing directory."""
  import orbax.checkpoint as ocp

  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "state")):
    raise FileExistsError(f"{out_dir}/state already exists; choose another --out directory or delete it.")
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "state"), _stringify(_pure(model)))
  ckptr.wait_until_finished()
  meta = {"kind": kind, "config": dataclasses.asdict(model.config), "fingerprint": fingerprint(model),
          "source": source, "num_params": kl_vae.count_params(model)}
  tmp = os.path.join(out_dir, METADATA_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, METADATA_FILE))
  return out_dir


def read_metadata(tokenizer_dir: str) -> dict:
  path = os.path.join(tokenizer_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: {tokenizer_dir!r} is not a converted tokenizer directory "
                            "(make one with `python -m himar_jax convert`).")
  with open(path) as f:
    return json.load(f)


def load_tokenizer(tokenizer_dir: str, *, dtype=jnp.float32) -> tuple[nnx.Module, dict]:
  """Rebuilds a tokenizer saved by save_tokenizer: returns (module, metadata)."""
  import orbax.checkpoint as ocp

  meta = read_metadata(tokenizer_dir)
  config = config_from_dict(meta["kind"], meta["config"])
  model = build(meta["kind"], config, abstract=True, dtype=dtype)
  graphdef, state = nnx.split(model)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
  restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(tokenizer_dir), "state"),
                                                _stringify(like))
  nnx.replace_by_pure_dict(state, _unstringify_like(restored, like))
  return nnx.merge(graphdef, state), meta


def convert_checkpoint(src: str, out_dir: str, *, preset_name: str | None = None, kind: str | None = None,
                       config=None, strict: bool = False) -> tuple[str, LoadReport]:
  """Converts one official checkpoint into a tokenizer directory; returns (out_dir, report)."""
  if preset_name is not None:
    kind, config = preset(preset_name)
  if kind is None or config is None:
    raise ValueError("pass preset= (kl16, vq256, vq512) or both kind= and config=.")
  model = build(kind, config, abstract=True)
  report = load_state_dict(model, load_torch_state_dict(src), strict=strict)
  save_tokenizer(model, kind, out_dir, source=os.path.abspath(src))
  return out_dir, report


def convert_main(argv: Sequence[str] | None = None) -> int:
  """`python -m himar_jax convert --preset kl16 --src kl16.ckpt --out ckpt/kl16`."""
  parser = argparse.ArgumentParser(prog="himar_jax convert", description=__doc__.splitlines()[0])
  parser.add_argument("--preset", required=True, choices=sorted(PRESETS),
                      help="kl16 (MAR kl16.ckpt), vq256 / vq512 (VAR vae_ch160v4096z32.pth, 256/512 layout)")
  parser.add_argument("--src", required=True, help="official checkpoint (.ckpt / .pth / .safetensors / .npz)")
  parser.add_argument("--out", required=True, help="output directory (state/ + tokenizer.json)")
  parser.add_argument("--strict", action="store_true", help="refuse unexpected checkpoint keys")
  args = parser.parse_args(argv)
  out, report = convert_checkpoint(args.src, args.out, preset_name=args.preset, strict=args.strict)
  print(report.summary())
  print(f"wrote {out} ({read_metadata(out)['num_params']:,} parameters)")
  return 0


def random_tokenizer(out_dir: str, kind: str, config, *, seed: int = 0) -> str:
  """Saves a randomly initialised tokenizer (smoke tests of the cache / training paths without weights)."""
  return save_tokenizer(build(kind, config, host_init=True, seed=seed), kind, out_dir, source=f"random:{seed}")


def convert_verb(flags) -> int:
  """`python -m himar_jax convert --config=configs/kl_vae.py:kl16 --config.convert.src=kl16.ckpt --workdir=OUT`.

  Converts config.convert.src for the tokenizer that config.tokenizer names into the tokenizer directory --workdir
  (state/ + tokenizer.json). src: an official checkpoint; `train:<workdir>` (the EMA tokenizer of a training run
  of this config); or `random:<seed>` (random weights, for smoke tests).
  """
  from himar_jax import tokenizers

  config, out = flags.config, flags.workdir
  if config is None or "tokenizer" not in config or "convert" not in config:
    raise ValueError("`convert` needs --config=configs/kl_vae.py:<variant> or configs/vq_pyramid.py:<variant> "
                     "(a config with `tokenizer` and `convert` blocks).")
  if not out:
    raise ValueError("`convert` needs --workdir=DIR: the tokenizer directory to write.")
  src = config.convert.src
  if not src:
    raise ValueError("config.convert.src is empty; pass --config.convert.src=/path/to/kl16.ckpt (or "
                     "vae_ch160v4096z32.pth, train:<training workdir>, random:<seed>).")
  kind, tcfg = tokenizers.from_config(config.tokenizer)
  if src.startswith("random:"):
    random_tokenizer(out, kind, tcfg, seed=int(src.split(":", 1)[1]))
    print(f"wrote random-weight {kind} to {out}")
  elif src.startswith("train:"):
    from himar_jax.tokenizers.training import export_tokenizer
    export_tokenizer(src.split(":", 1)[1], config, out)
    print(f"exported the EMA {kind} of training run {src.split(':', 1)[1]}")
  else:
    _, report = convert_checkpoint(src, out, kind=kind, config=tcfg, strict=bool(config.convert.strict))
    print(report.summary())
  meta = read_metadata(out)
  print(f"wrote {out} ({meta['num_params']:,} parameters, fingerprint {meta['fingerprint'][:12]}); use it with "
        f"--config.tokenizer.checkpoint={os.path.abspath(out)}")
  return 0
