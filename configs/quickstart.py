"""Quickstart: a tiny class-conditional Hi-MAR on the latents of a tiny KL VAE, on Fashion-MNIST.

Variants (`--config=configs/quickstart.py:<variant>`):
  (none)      Hi-MAR on a KL VAE's latents: 32x32 images (28x28 padded) -> 8x8x4 latents (VAE stride 4), pivots
              from the 16x16 copy -> 4x4x4; encoder / decoder 2 x 96 scale-aware blocks, MLP head 3 x 192,
              DiT head 2 x 96. By default the quickstart samples the trained checkpoint shipped in
              himar_jax/assets/quickstart (seconds on a CPU); `--from_scratch` trains the VAE, caches latents,
              trains Hi-MAR and samples that (launch/train_quickstart.sh: the run that made the shipped one).
  himar_tiny  the same pipeline at test size (a few hundred examples, seconds).
  pixel       MAR on pixel patches (no VAE): 4x4 patches -> 64 tokens of 16 values; about 10 minutes of CPU.
  tiny        pixel at test size (used by the trainer, evaluation and CLI tests).

Blocks of the default variant: `model` (Hi-MAR, family himar), `data` (the latent cache the pipeline writes),
`vae` (a whole KL VAE training config: configs/kl_vae.py:fmnist's recipe), `tokenizer` (`checkpoint`: the
tokenizer directory that decodes samples), `quickstart` (`checkpoint`: the shipped export, `from_scratch`).
"""
import os

import ml_collections

from himar_jax import config_lib

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "himar_jax", "assets",
                         "quickstart")
VARIANTS = ("", "himar_tiny", "pixel", "tiny")


def _pixel(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
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

  if tiny:
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
  return c


def _vae(tiny: bool) -> ml_collections.ConfigDict:
  """configs/kl_vae.py:fmnist (stride 4, 4 channels: 32 px -> 8x8x4), with a KL weight that keeps the latents
  smooth enough for a small generator."""
  from himar_jax.tokenizers.training import default_config

  v = default_config("kl_vae", "kl_tiny_gray", "tiny" if tiny else "fmnist")
  v.loss.kl_weight = 1e-4
  v.loss.gan_weight = 0.0  # L1 + KL: sharp enough for 28 px garments, and half the work per step
  v.cache.update(dir="", split="train")  # the pipeline fills in <workdir>/latents
  v.tokenizer.arch.ch = 16  # stride 4 with 16 / 32 / 32 channels: a CPU trains it in minutes
  v.data.global_batch_size = 32
  v.optim.lr = 2e-3
  v.train.update(num_steps=800, checkpoint_every=800, log_every=100)
  v.cache.max_examples = 20_000  # the generator's training set (x 2 flips); encoding is the slow part on a CPU
  if tiny:
    v.data.max_examples = v.cache.max_examples = 64
    v.cache.update(shard_size=32, batch_size=16)
    v.data.global_batch_size = 8
    v.train.update(num_steps=2, checkpoint_every=2, async_checkpoint=False)
  return v


def _himar(c: ml_collections.ConfigDict, tiny: bool) -> ml_collections.ConfigDict:
  c.model = ml_collections.ConfigDict()
  m = c.model
  m.family = "himar"
  m.num_classes = 10
  m.token_dim = 4                 # the VAE's latent channels
  m.grid_size = 8                 # 32 px / stride 4
  m.lowres_grid = 4               # the 16 px copy through the same VAE
  m.buffer_size = 8
  m.encoder_dim, m.encoder_depth, m.encoder_heads = 96, 2, 4
  m.decoder_dim, m.decoder_depth, m.decoder_heads = 96, 2, 4
  m.head_width, m.head_depth = 192, 3
  m.mlp_ratio = 4.0
  m.dit_width, m.dit_depth, m.dit_heads = 96, 2, 4
  m.dit_mlp_ratio = 4.0
  m.dropout = 0.0                 # a short run underfits; the official 0.1 only slows it
  m.label_drop_prob = 0.1
  m.mask_ratio_min = 0.7
  m.diffusion_batch_mul = 2
  m.dtype = "float32"             # CPU; the GPU launcher trains in bfloat16
  m.encoder_buckets = 2
  # Sampling always sees real pivots, so a short run trains half its samples with them from the first epoch
  # (official: 0.25, reached after 100 epochs).
  m.step_stage2_rate = 0.5
  m.step_warmup_epochs = 1
  m.phase_loss_weights = (0.4, 0.6)
  # Sampling (CPU-friendly step counts; training uses the 1000-step schedule)
  m.num_sampling_steps = "50"
  # The DiT head samples with deterministic DDIM over 25 of the 1000 steps: on the shipped model it scores
  # Frechet distance 47 and 79% class accuracy against 146 and 54% with 50 ancestral (DDPM, fixed-large
  # variance) steps, whose added noise this small model does not remove (bench/notes.md, v2).
  m.dit_sampling_steps = "ddim25"
  m.dit_sampling_method = "ddim"
  m.sampling_preset = "published"  # published = these fields; "fast" = DDIM 25 (models/himar.py SAMPLING_PRESETS)
  m.num_iter = 8
  m.cfg = 3.0
  m.re_cfg = 3.0
  m.cfg_schedule = "linear"
  m.temperature = 1.0

  c.data.source = "latent_cache"
  c.data.cache_dir = ""           # the pipeline fills in <workdir>/latents
  c.data.image_size = 32
  c.data.global_batch_size = 64
  m.steps_per_epoch = 60_000 // c.data.global_batch_size
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 150
  c.optim.weight_decay = 0.02
  c.optim.no_decay_keywords = ("diffusion_head", "dit_head")
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.05
  c.optim.ema_decay = 0.998
  c.train.num_steps = 2600
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 1
  c.sample.per_class = 8

  c.vae = _vae(tiny)
  c.tokenizer = ml_collections.ConfigDict({
      "checkpoint": os.path.join(ASSET_DIR, "tokenizer"),  # decodes samples; --from_scratch uses its own
      "config": ""})                                        # "" = whatever architecture the checkpoint holds
  c.quickstart = ml_collections.ConfigDict({
      "checkpoint": ASSET_DIR,    # an export: tokenizer/ + checkpoints/<step>/state (EMA params)
      "from_scratch": False,      # train VAE -> cache latents -> train Hi-MAR in the workdir, then sample
      "store_dtype": "bfloat16",  # dtype of the exported EMA params (restored as float32)
      "normalize_samples": 2048,  # images whose latents set the VAE's per-channel mean / std normalisation
  })

  if tiny:
    m.buffer_size = 4
    m.encoder_dim, m.encoder_depth, m.encoder_heads = 32, 1, 2
    m.decoder_dim, m.decoder_depth, m.decoder_heads = 32, 1, 2
    m.head_width, m.head_depth = 32, 1
    m.dit_width, m.dit_depth, m.dit_heads = 16, 1, 2
    m.dropout = 0.0
    m.encoder_buckets = 1
    m.diffusion_batch_mul = 1
    m.num_sampling_steps = m.dit_sampling_steps = "3"
    m.num_iter = 2
    m.steps_per_epoch, m.step_warmup_epochs = 1, 2
    c.data.global_batch_size = 16
    c.optim.warmup_steps = 1
    c.train.update(num_steps=2, log_every=1, checkpoint_every=2, progress_bar=False, async_checkpoint=False)
    c.quickstart.normalize_samples = 32
    c.sample.per_class = 1
  return c


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown quickstart variant {variant!r}; use one of {VARIANTS} ('' is the Hi-MAR "
                     "quickstart).")
  c = config_lib.trainer_defaults()
  if variant in ("pixel", "tiny"):
    return _pixel(c, variant == "tiny")
  return _himar(c, variant == "himar_tiny")
