"""Official PyTorch checkpoints -> our param trees / orbax checkpoints. The `convert` verb dispatches by config:

  python -m himar_jax convert --config=configs/kl_vae.py:kl16 --config.convert.src=kl16.ckpt --workdir=OUT
  python -m himar_jax convert --config=configs/himar.py:himar_b --config.convert.src=checkpoint-last.pth --workdir=OUT
  python -m himar_jax convert --config=configs/next_scale.py:var_d16 --config.convert.src=var_d16.pth \
      --config.model.tokenizer=vae_ch160v4096z32.pth --workdir=OUT

Model checkpoints become OUT/0/state, which `--checkpoint=OUT` restores for sampling and evaluation; tokenizers
become a tokenizer directory (convert/tokenizers.py).
"""
from __future__ import annotations

import importlib
import os

# model family -> module with convert_checkpoint(src, out_dir, config) -> written state dir
MODEL_CONVERTERS = {"mar": "himar_jax.convert.himar", "himar": "himar_jax.convert.himar",
                    "next_scale": "himar_jax.convert.next_scale"}


def convert_verb(flags) -> int:
  config, out = flags.config, flags.workdir
  family = config.model.get("family") if config is not None and "model" in config else None
  if family not in MODEL_CONVERTERS:
    from himar_jax.convert import tokenizers  # kl_vae / vq_pyramid configs
    return tokenizers.convert_verb(flags)
  src = config.convert.src if "convert" in config else ""
  if not src:
    raise ValueError("config.convert.src is empty; pass --config.convert.src=/path/to/the official checkpoint "
                     "(checkpoint-last.pth, var_d16.pth, hmar-d16.pth, ...).")
  if not out:
    raise ValueError("`convert` needs --workdir=DIR: the orbax checkpoint directory to write.")
  module = importlib.import_module(MODEL_CONVERTERS[family])
  state_dir = module.convert_checkpoint(src, out, config)
  print(f"wrote {state_dir} ({family}); sample with --checkpoint={os.path.abspath(out)}")
  return 0
