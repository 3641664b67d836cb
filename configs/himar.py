"""Hi-MAR and MAR on ImageNet 256 (KL-16 VAE latents), with the published sizes and sampling settings.

Variants (`--config=configs/himar.py:<variant>`):
  himar_b / himar_l / himar_h   Hi-MAR (HiDream-ai/himar README): 12x768 / 16x1024 / 20x1280 encoder and
                                decoder, MLP head 6x1024 / 8x1280 / 12x1536, DiT head 6x512 (8 heads) /
                                8x512 (8) / 12x768 (12); sampling num_iter 4 / 4 / 12, cfg 2.5 / 3.5 / 3.2,
                                re_cfg 2.7 / 3.5 / 5.5, linear schedules, temperature 1.0.
  mar_b / mar_l / mar_h         MAR (LTH14/mar README): same backbones, MLP head as above; num_iter 256,
                                cfg 2.9 / 3.0 / 3.2, linear, temperature 1.0.
  himar_tiny / mar_tiny         CPU-sized models on the same 16x16 (+ 8x8) latent grids, for tests (the
                                sizes of the official tiny models in tests/fixtures/make_himar.py).

Parameter counts (`python -m himar_jax info --config=configs/himar.py:<variant>`): MAR-B/L/H equal the official
207,924,768 / 478,326,304 / 942,403,104. Hi-MAR-B/L/H are the official 244,730,160 / 529,490,480 /
1,090,965,808 minus the DiT head's two (1, 256, dit_width) tensors that the official class registers as
parameters but never trains: `pos_embed` (the fixed 2D sin-cos table, recomputed here) and `c_pos_embed` (unused
by its forward): 262,144 fewer for B and L (244,468,016 / 529,228,336), 393,216 for H (1,090,572,592).

Training (the papers / official scripts): global batch 2048, AdamW (0.9, 0.95), weight decay 0.02, lr 1e-4 x
batch / 256, 100-epoch linear warmup then constant, grad clip 3.0, EMA 0.9999, 800 epochs, diffusion_batch_mul
4, label drop 0.1, dropout 0.1; Hi-MAR's null-pivot schedule step_stage2_rate 0.25 over step_warmup 100
epochs (steps_per_epoch converts the trainer's step into the official integer epoch).
Data: the latent cache of `cache-latents` (latent (B, 16, 16, 16), latent_small (B, 8, 8, 16), label).
"""
import math

import ml_collections

from himar_jax import config_lib

IMAGENET_TRAIN = 1_281_167
# encoder = decoder (width, depth, heads); MLP head (width, depth); DiT head (width, depth, heads)
SIZES = {
    "b": dict(backbone=(768, 12, 12), mlp=(1024, 6), dit=(512, 6, 8)),
    "l": dict(backbone=(1024, 16, 16), mlp=(1280, 8), dit=(512, 8, 8)),
    "h": dict(backbone=(1280, 20, 16), mlp=(1536, 12), dit=(768, 12, 12)),
}
HIMAR_SAMPLING = {"b": dict(num_iter=4, cfg=2.5, re_cfg=2.7), "l": dict(num_iter=4, cfg=3.5, re_cfg=3.5),
                  "h": dict(num_iter=12, cfg=3.2, re_cfg=5.5)}
MAR_SAMPLING = {"b": dict(num_iter=256, cfg=2.9), "l": dict(num_iter=256, cfg=3.0), "h": dict(num_iter=256, cfg=3.2)}


def _model(family: str, size: str) -> ml_collections.ConfigDict:
  s = SIZES[size]
  m = ml_collections.ConfigDict()
  m.family = family
  m.num_classes = 1000
  m.token_dim = 16               # KL-16 VAE channels (patch size 1)
  m.grid_size = 16               # 256 / 16
  m.buffer_size = 64
  m.encoder_dim, m.encoder_depth, m.encoder_heads = s["backbone"]
  m.decoder_dim, m.decoder_depth, m.decoder_heads = s["backbone"]
  m.head_width, m.head_depth = s["mlp"]
  m.mlp_ratio = 4.0
  m.dropout = 0.1
  m.label_drop_prob = 0.1
  m.mask_ratio_min = 0.7
  m.diffusion_batch_mul = 4
  m.num_sampling_steps = "100"
  m.dtype = "bfloat16"
  # Encoder capacities picked per batch at run time (lax.switch; 1 = always the whole sequence): Hi-MAR's
  # phase-2 encoder and MAR's sampler then skip most padding; the result is the same for any value.
  m.encoder_buckets = 4
  # Training: 1 = the phase-2 encoder always runs the whole sequence (a k-way switch under differentiation keeps
  # every branch's residuals, or recomputes them when checkpointed, and compiles slowly).
  m.train_encoder_buckets = 1
  # Activation checkpointing of every backbone block (and DiT block, unless dit_remat says otherwise):
  # none | dots (keep matmul outputs) | full.
  m.remat = "none"
  # The DiT head's blocks': same (as remat) | none | dots | full. Hi-MAR-B on an H100 (bench/notes.md v9): remat
  # dots + dit_remat none trains at 287 images/s in 26.5 GiB, against 300 images/s in 48.8 GiB with neither.
  m.dit_remat = "same"
  # One lax.scan per block stack (same params, same result; compiles in a fraction of the time).
  m.scan_blocks = False
  # Dropout mask bits: threefry (JAX's default), rbg (XLA's RngBitGenerator) or hash (a counter hash of each
  # element's index, computed where the mask is applied: no random-bit tensors; nn/layers.Dropout). hash is
  # the default: same keep rate, masks still a function of the step key, Hi-MAR-B training 10% faster than rbg
  # on an H200 (bench/notes.md, v3).
  m.dropout_rng = "hash"
  m.cfg_schedule = "linear"
  m.temperature = 1.0
  if family == "himar":
    m.lowres_grid = 8            # the 128 px copy through the same VAE
    m.dit_width, m.dit_depth, m.dit_heads = s["dit"]
    m.dit_mlp_ratio = 4.0
    m.dit_sampling_steps = "250"
    m.dit_sampling_method = "ddpm"  # ddpm (the official ancestral sampler) | ddim (deterministic, eta 0)
    # True: the DiT head's LayerNorm + adaLN modulation (+ the attention's gated residual) as one Pallas kernel
    # (GPU only; kernels/modulated_norm.py). Off: inside the head it measured slower than XLA's fusions (H100).
    m.fused_norm = False
    # True: every MLP's fc1 bias + GELU (the DiT blocks' tanh form, the backbone's exact form) in the matmul's
    # epilogue where that kernel runs (Hopper GPUs, bfloat16; elsewhere the unfused layer), at inference: training
    # computes the unfused layer (kernels/fused_dense.py). Numbers differ from False by rounding only. Sampling
    # 7% faster on an H100, on 2 GPUs as on one (bench/notes.md v7, v8, v10).
    m.fused_mlp = True
    # published | fast (DDIM with 25 DiT-head steps over the fields above: models/himar.py SAMPLING_PRESETS; not
    # the paper's sampler)
    m.sampling_preset = "published"
    m.step_stage2_rate = 0.25
    m.step_warmup_epochs = 100
    m.steps_per_epoch = math.ceil(IMAGENET_TRAIN / 2048)
    m.phase_loss_weights = (0.4, 0.6)
    m.update(HIMAR_SAMPLING[size])
  else:
    m.update(MAR_SAMPLING[size])
  return m


def get_config(variant: str = "himar_b") -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  family, _, size = variant.partition("_")
  if family not in ("himar", "mar") or size not in (*SIZES, "tiny"):
    raise ValueError(f"unknown variant {variant!r}; use one of himar_b, himar_l, himar_h, mar_b, mar_l, mar_h, "
                     "himar_tiny, mar_tiny.")
  c.model = _model(family, "b" if size == "tiny" else size)
  c.convert = ml_collections.ConfigDict({"src": ""})  # official checkpoint-last.pth for `convert`
  # The KL VAE that decodes samples (sample / evaluate / edit) and checks the latent cache: `checkpoint` is a
  # tokenizer directory from `convert --config=<config>` (official kl16.ckpt or train:<workdir>); `config` names
  # its architecture ("" = trust the directory's tokenizer.json).
  c.tokenizer = ml_collections.ConfigDict({"config": "configs/kl_vae.py:kl16", "checkpoint": ""})
  c.data.source = "latent_cache"
  c.data.cache_dir = ""          # a `cache-latents` output directory
  c.data.image_size = 256
  c.data.global_batch_size = 2048
  c.optim.lr = None              # base_lr x batch / 256
  c.optim.base_lr = 1e-4
  c.optim.weight_decay = 0.02
  c.optim.no_decay_keywords = ("diffusion_head", "dit_head")
  c.optim.ema_decay = 0.9999
  epoch = math.ceil(IMAGENET_TRAIN / c.data.global_batch_size)
  c.optim.warmup_steps = 100 * epoch
  c.train.num_steps = 800 * epoch

  if size == "tiny":
    m = c.model
    m.num_classes = 10
    m.buffer_size = 4
    m.encoder_dim, m.encoder_depth, m.encoder_heads = 32, 2, 2
    m.decoder_dim, m.decoder_depth, m.decoder_heads = 32, 2, 2
    m.head_width, m.head_depth = 32, 2
    m.diffusion_batch_mul = 1
    m.num_sampling_steps = "4"
    m.dtype = "float32"
    m.encoder_buckets = 2
    m.num_iter = 2
    if family == "himar":
      m.lowres_grid = 8
      m.dit_width, m.dit_depth, m.dit_heads = 16, 2, 2
      m.dit_sampling_steps = "4"
      m.steps_per_epoch = 1
      m.step_warmup_epochs = 2
    c.tokenizer.config = ""      # tests pair tiny models with tiny random tokenizers
    c.data.global_batch_size = 8
    c.optim.warmup_steps = 2
    c.train.num_steps = 4
  return c
