"""`python -m himar_jax <verb> --config=configs/<family>.py:<variant> [--config.<field>=<value>] --workdir=DIR`.

Verbs are registered in VERBS as "module:function"; a verb function takes the parsed absl FLAGS and returns an
exit code. Flags of every verb are defined here, so `--help` lists them all.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_CONFIG = os.path.join(REPO_ROOT, "configs", "quickstart.py")

VERBS = {
    "train": "himar_jax.cli:train_verb",
    "info": "himar_jax.cli:info_verb",
    "quickstart": "himar_jax.cli:quickstart_verb",
    "convert": "himar_jax.convert:convert_verb",
    "cache-latents": "himar_jax.data.latent_cache:cache_latents_verb",
    "evaluate": "himar_jax.evaluation.evaluate:evaluate_verb",
    "sample": "himar_jax.sample_cli:sample_verb",
    "edit": "himar_jax.editing:edit_verb",
}

# sample / evaluate / edit
flags.DEFINE_string("checkpoint", None, "sample, evaluate, edit: checkpoints folder of a training run or a `convert` "
                    "output (default <workdir>/checkpoints).")
flags.DEFINE_integer("num", None, "sample: number of samples (default config.sample.per_class per class); evaluate: "
                     "number of samples (default 50 per class); edit: edits of the image (default 4).")
flags.DEFINE_string("ref", None, "evaluate: reference batch .npz (ADM format; Fashion-MNIST default: test split).")
flags.DEFINE_string("out", None, "sample: output folder for PNGs, grid.png and the .npz batch (default "
                    "<workdir>/samples); evaluate: folder for chunks, sample batch, metrics (default <workdir>/eval); "
                    "edit: output folder.")
flags.DEFINE_string("labels", None, "sample: comma-separated class labels to cycle through, e.g. 3,7 (default: "
                    "class-balanced over all classes).")
flags.DEFINE_integer("seed", None, "sample, edit: sampling seed (default config.sample.seed); sample i uses "
                     "fold_in(key(seed), i).")
flags.DEFINE_integer("step", None, "sample, edit: checkpoint step to restore (default the latest).")
flags.DEFINE_integer("batch_size", None, "sample: global sampling batch (default min(num, 64), rounded up to a "
                     "multiple of the device count).")
flags.DEFINE_string("prompts", None, "sample: text file with one prompt a line (text-to-image family: "
                    "himar_jax.text.sampling.sample_from_prompts).")
flags.DEFINE_integer("per_prompt", None, "sample --prompts: images per prompt (default config.sample.per_class).")
# edit
flags.DEFINE_string("image", None, "edit: the image to edit (exactly the model's image size).")
flags.DEFINE_string("mask", None, "edit: mask image of the same size; white (>= 128) = generate.")
flags.DEFINE_string("box", None, "edit: x0,y0,x1,y1 pixel box to generate (x1/y1 exclusive), instead of --mask.")
flags.DEFINE_bool("outpaint", False, "edit: keep the box / white part of the mask and generate everything else.")
flags.DEFINE_integer("label", None, "edit: class of the generated region (another class than the image's: "
                     "class-conditional editing).")
flags.DEFINE_string("inception_weights", None, "evaluate: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                    "(default $HIMAR_JAX_INCEPTION_WEIGHTS).")

# quickstart
flags.DEFINE_bool("from_scratch", False, "quickstart: train the KL VAE and Hi-MAR in --workdir (GPU: minutes) instead "
                  "of sampling the checkpoint shipped in himar_jax/assets/quickstart.")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/quickstart.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process job "
                                   "(else HIMAR_COORDINATOR_ADDRESS, SLURM or TPU-pod detection).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process job.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("HIMAR_JAX_COMPILATION_CACHE", "~/.cache/himar_jax/jax"),
    "Folder of JAX's persistent compilation cache: a program compiled once (the Hi-MAR-B sampler takes 110 - 165 s "
    "on an H100) loads from it in later runs with the same software and devices; 'none' turns it off (default "
    "$HIMAR_JAX_COMPILATION_CACHE, else ~/.cache/himar_jax/jax).")


def enable_compilation_cache(path: str | None, min_compile_secs: float = 2.0) -> str | None:
  """Points JAX's persistent compilation cache at `path` (created if missing) for programs that took at least
  min_compile_secs to compile; None / '' / 'none' leaves it off. Returns the folder used, or None. Call it before
  the first compilation."""
  if not path or path.lower() == "none":
    return None
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise app.UsageError(f"--compilation_cache={path}: cannot create the folder ({e.strerror}); pass a writable "
                         "folder or --compilation_cache=none.") from e
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  return path


def _require_config(verb: str):
  if _CONFIG.value is None:
    raise app.UsageError(f"`{verb}` needs --config=configs/<family>.py:<variant> (see configs/).")
  return _CONFIG.value


def _require_workdir(verb: str) -> str:
  if not _WORKDIR.value:
    raise app.UsageError(f"`{verb}` needs --workdir=DIR (created if missing).")
  return _WORKDIR.value


def train_verb(_) -> int:
  from himar_jax.train import loop
  loop.train(_require_config("train"), _require_workdir("train"))
  return 0


def model_info(config) -> dict:
  """Parameter counts from an abstract model (eval_shape: no weights allocated) and the resolved config."""
  from flax import nnx

  from himar_jax import models
  model = nnx.eval_shape(lambda: models.model_fn(config)(nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  per_module = {name: sum(int(x.size) for x in _leaves(sub)) for name, sub in sorted(params.items())}
  return {"family": config.model.family, "total_params": sum(per_module.values()), "params_by_module": per_module,
          "config": json.loads(config.to_json_best_effort())}


def _leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def info_verb(_) -> int:
  print(json.dumps(model_info(_require_config("info")), indent=2))
  return 0


def quickstart_verb(flags_) -> int:
  """Writes a labelled grid of Fashion-MNIST samples: of the shipped Hi-MAR checkpoint (seconds), or of models
  trained in --workdir with --from_scratch (pixel variants always train)."""
  from himar_jax import quickstart
  path = quickstart.run(_require_config("quickstart"), _require_workdir("quickstart"),
                        from_scratch=True if flags_.from_scratch else None)
  print(f"samples: {path}")
  return 0


class _DropLibraryInfo(logging.Filter):
  """Keeps warnings from everywhere, but INFO lines only from this package and CLU's metric writers (orbax
  logs several INFO lines per checkpoint)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def _quiet_library_logs():
  logging.getLogger().setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_DropLibraryInfo())


def _resolve(verb: str):
  module, function = VERBS[verb].split(":")
  return getattr(importlib.import_module(module), function)


def _main(argv) -> int:
  verbs = [a for a in argv[1:] if not a.startswith("-")]
  if len(verbs) != 1 or verbs[0] not in VERBS:
    raise app.UsageError(f"usage: python -m himar_jax <verb> [flags]; verb one of {sorted(VERBS)}, got "
                         f"{verbs or 'none'}.")
  _quiet_library_logs()
  if verbs[0] not in ("info", "convert"):  # every verb that computes joins a multi-process job
    from himar_jax.parallel import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _INIT_TIMEOUT.value)
    enable_compilation_cache(_COMPILATION_CACHE.value)
  return _resolve(verbs[0])(flags.FLAGS)


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if "quickstart" in argv[1:] and not any(a == "--config" or a.startswith("--config=") for a in argv):
    argv.insert(1, f"--config={QUICKSTART_CONFIG}")  # the embedded default; --config.<field> overrides apply
  app.run(_main, argv=argv)
