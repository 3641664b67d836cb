"""Trainer defaults shared by every config family, and validation with messages that name field and fix."""
from __future__ import annotations

import ml_collections

from himar_jax.data import fashion_mnist


DATA_SOURCES = ("fashion_mnist", "image_folder", "latent_cache", "token_cache", "coco_cache")


def trainer_defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"shape": (-1, 1, 1)})  # (data, fsdp, tensor); -1 fills the rest
  # "spmd": one partitioned program (any mesh; losses equal one device's); "per_device": pure data parallelism
  # with per-device draws and one gradient all-reduce, as PyTorch DDP (train/step.py says when it is faster).
  c.mesh.gradients = "spmd"

  c.data = ml_collections.ConfigDict()
  c.data.source = "fashion_mnist"
  c.data.path = fashion_mnist.DEFAULT_PATH
  c.data.image_size = 32            # Fashion-MNIST's 28x28 is padded with background to this size
  c.data.max_examples = 0           # > 0: use only the first N training examples (tiny runs, tests)
  c.data.global_batch_size = 64
  c.data.shuffle_seed = 0
  c.data.random_flip = True
  c.data.num_workers = 0            # > 0: grain multiprocessing workers

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = ml_collections.FieldReference(None, field_type=float)  # None: base_lr * batch / 256
  c.optim.base_lr = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.02
  c.optim.no_decay_keywords = ("diffusion_head",)  # MAR: no decay on biases, 1-D params and the diffusion head
  c.optim.warmup_steps = 100
  c.optim.schedule = "constant"
  c.optim.final_lr_fraction = 0.0     # cosine / lin0: the lr at the end, as a fraction of the peak (VAR's wpe)
  c.optim.warmup_start_fraction = 0.0  # the lr at step 0, as a fraction of the peak (VAR's wp0)
  c.optim.grad_clip = 3.0
  c.optim.ema_decay = 0.9999

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpoint = True
  c.train.progress_bar = True
  c.train.profile_steps = 0
  c.train.init_from = ""            # checkpoints folder (or convert output) whose params start a fresh run
  c.train.init_from_field = "params"  # or "ema_params"

  c.sample = ml_collections.ConfigDict()
  c.sample.per_class = 8            # samples per class row of the grid
  c.sample.seed = 0
  return c


def flatten(config, prefix: str = "") -> dict:
  out = {}
  for k, v in config.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _positive_int(config, field: str):
  value = config
  for part in field.split("."):
    value = value[part]
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"config.{field}={value!r} must be a positive integer; set --config.{field}=N.")


def validate(config) -> None:
  """Checks the trainer fields (model families validate their own in `build`)."""
  for field in ("data.global_batch_size", "data.image_size", "train.num_steps", "train.log_every",
                "train.checkpoint_every", "train.keep_checkpoints"):
    _positive_int(config, field)
  if config.data.max_examples < 0:
    raise ValueError(f"config.data.max_examples={config.data.max_examples} must be >= 0 (0 = all).")
  if config.data.source not in DATA_SOURCES:
    raise ValueError(f"config.data.source={config.data.source!r} is not a known source; use one of "
                     f"{DATA_SOURCES}.")
  if config.data.source == "fashion_mnist" and config.data.image_size < 28:
    raise ValueError(f"config.data.image_size={config.data.image_size} is smaller than Fashion-MNIST's 28 "
                     "pixels; use 28 or more (the default 32 pads the border).")
  lr = config.optim.lr if config.optim.lr is not None else config.optim.base_lr
  if not lr > 0:
    raise ValueError(f"learning rate {lr!r} (config.optim.lr or base_lr) must be > 0.")
  if config.optim.schedule not in ("constant", "cosine", "lin0"):
    raise ValueError(f"config.optim.schedule={config.optim.schedule!r} must be 'constant' or 'cosine', or 'lin0' (VAR / HMAR: "
                     "warmup, hold, linear decay).")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={config.optim.ema_decay} must lie in [0, 1), e.g. 0.9999.")
  if config.optim.warmup_steps < 0:
    raise ValueError(f"config.optim.warmup_steps={config.optim.warmup_steps} must be >= 0.")
  if config.optim.grad_clip < 0:
    raise ValueError(f"config.optim.grad_clip={config.optim.grad_clip} must be >= 0 (0 disables clipping).")
  if len(tuple(config.mesh.shape)) != 3:
    raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)} needs 3 entries (data, fsdp, tensor).")
  from himar_jax.train.step import GRADIENT_MODES  # the step owns the modes; imported here, not at load time
  if config.mesh.get("gradients", "spmd") not in GRADIENT_MODES:
    raise ValueError(f"config.mesh.gradients={config.mesh.gradients!r} is not one of {GRADIENT_MODES}.")
