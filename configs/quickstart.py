"""Quickstart: class-conditional MAR on Fashion-MNIST pixel patches, trained on a CPU in minutes.

Variants (`--config=configs/quickstart.py:<variant>`):
  (none)  the quickstart: 32x32 images (28x28 padded), 4x4 patches -> 64 tokens of 16 values, a small
          encoder/decoder and MLP diffusion head; about 10 minutes on a 2-core CPU.
  tiny    a seconds-long run for tests (a few hundred examples, 2 blocks, width 32).
"""
import ml_collections

from himar_jax import config_lib


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.model = ml_collections.ConfigDict()
  m = c.model
  m.family = "pixel_mar"
  m.num_classes = 10
  m.channels = 1
  m.patch_size = 4
  m.buffer_size = 8
  m.encoder_dim, m.encoder_depth, m.encoder_heads = 96, 2, 4
  m.decoder_dim, m.decoder_depth, m.decoder_heads = 96, 2, 4
  m.head_width, m.head_depth = 192, 2
  m.mlp_ratio = 4.0
  m.dropout = 0.0
  m.label_drop_prob = 0.1
  m.mask_ratio_min = 0.7
  m.diffusion_batch_mul = 1
  m.num_sampling_steps = "250"  # 50 respaced steps leave this small pixel model's samples saturated
  m.dtype = "float32"            # CPU: bfloat16 matmuls are emulated and slower
  # Sampling
  m.num_iter = 16
  m.cfg = 3.0
  m.cfg_schedule = "linear"
  m.temperature = 1.0

  c.data.global_batch_size = 64
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.995
  c.train.num_steps = 1200
  c.train.log_every = 50
  c.train.checkpoint_every = 400
  c.sample.per_class = 8

  if variant == "tiny":
    c.data.max_examples = 256
    c.data.global_batch_size = 16
    m.buffer_size = 4
    m.encoder_dim, m.encoder_depth, m.encoder_heads = 32, 1, 2
    m.decoder_dim, m.decoder_depth, m.decoder_heads = 32, 1, 2
    m.head_width, m.head_depth = 32, 1
    m.num_sampling_steps = "5"
    m.num_iter = 4
    c.optim.warmup_steps = 2
    c.train.num_steps = 8
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    c.sample.per_class = 2
  elif variant:
    raise ValueError(f"unknown quickstart variant {variant!r}; use '' or 'tiny'.")
  return c
