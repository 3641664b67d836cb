"""Text-to-image Hi-MAR on MS-COCO 256 (family 'himar_t2i', himar_jax/models/himar_t2i.py).

Variants (`--config=configs/himar_t2i.py:<variant>`):
  himar_s_t2i      Hi-MAR-S, sized like U-ViT-S/2 (Deep) (width 512, 45M parameters): encoder 5 x 512 and
                   decoder 5 x 512 (8 heads; the two heads make up the rest), MLP head 512 x 3, DiT head 256 x 2
                   (4 heads), context Linear(768 -> 512): 43,874,352 parameters (`info`; 8 + 8 blocks, the
                   U-ViT depth, would be 62.8M).
  himar_t2i_tiny   CPU seconds: 8x8 latents of a tiny 4-channel VAE, 4x4 pivots, width 32, a tiny CLIP width 32.
Training (the paper's MS-COCO settings where it gives them): AdamW lr 8e-4 (not scaled by batch), weight decay
0.03, 8K-step linear warmup then constant, EMA 0.9999, mask ratios Beta(4, 1) in both phases, caption dropped
to the empty caption with probability 0.1 per phase. Not given by the paper and taken from U-ViT's MS-COCO
recipe: global batch 256 and 1M steps; betas (0.9, 0.95), grad clip 3 and dropout 0.1 are Hi-MAR's.
Sampling settings (num_iter 4, cfg 2.0, re_cfg 2.0, linear) are starting points, not published values.
No horizontal flips by default (captions say "left" and "right").

Pipeline ($CLIP: a download of huggingface.co/openai/clip-vit-large-patch14 with vocab.json, merges.txt, config.json,
model.safetensors; ckpt/kl16: MAR's KL-16 VAE from `convert --config=configs/kl_vae.py:kl16`):
  python -m himar_jax cache-latents --config=configs/himar_t2i.py:himar_s_t2i --config.cache.path=/data/coco \
      --config.text.clip=$CLIP --config.tokenizer.checkpoint=ckpt/kl16 \
      --config.cache.dir=/data/cache/coco_train
  (again with --config.cache.split=val --config.cache.dir=/data/cache/coco_val for evaluation captions)
  python -m himar_jax train --config=configs/himar_t2i.py:himar_s_t2i --config.data.cache_dir=/data/cache/coco_train \
      --workdir=runs/himar_s_t2i
  python -m himar_jax sample --config=configs/himar_t2i.py:himar_s_t2i --config.text.clip=$CLIP \
      --config.tokenizer.checkpoint=ckpt/kl16 --workdir=runs/himar_s_t2i --prompts=prompts.txt --per_prompt=4
  python -m himar_jax.evaluation.evaluate --make_reference --source=/data/coco/val2014 --image_size=256 \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth --out=coco_val_ref.npz
  python -m himar_jax evaluate --config=configs/himar_t2i.py:himar_s_t2i --config.tokenizer.checkpoint=ckpt/kl16 \
      --config.eval.captions_cache=/data/cache/coco_val --workdir=runs/himar_s_t2i --ref=coco_val_ref.npz
  (FID of config.eval.num = 30,000 samples for random validation captions)
"""
import math

import ml_collections

from himar_jax import config_lib, tokenizers
from himar_jax.data.latent_cache import default_cache_config

COCO_TRAIN = 82_783


def _model(tiny: bool) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = "himar_t2i"
  m.context_length = 77          # CLIP tokens
  m.context_dim = 768            # CLIP ViT-L/14 width
  m.empty_context = ""           # "" = <data.cache_dir>/empty_context.npy (checkpoints carry it for sampling)
  m.mask_ratio_beta = (4.0, 1.0)
  m.token_dim = 16
  m.grid_size = 16
  m.lowres_grid = 8
  m.encoder_dim, m.encoder_depth, m.encoder_heads = 512, 5, 8
  m.decoder_dim, m.decoder_depth, m.decoder_heads = 512, 5, 8
  m.head_width, m.head_depth = 512, 3
  m.dit_width, m.dit_depth, m.dit_heads = 256, 2, 4
  m.dit_mlp_ratio = 4.0
  m.mlp_ratio = 4.0
  m.dropout = 0.1
  m.label_drop_prob = 0.1        # caption -> empty caption, per phase
  m.mask_ratio_min = 0.7         # unused by the Beta draws (kept for the shared Hi-MAR validation)
  m.diffusion_batch_mul = 4
  m.num_sampling_steps = "100"
  m.dit_sampling_steps = "250"
  m.step_stage2_rate = 0.25
  m.step_warmup_epochs = 100
  m.steps_per_epoch = math.ceil(COCO_TRAIN / 256)
  m.phase_loss_weights = (0.4, 0.6)
  m.dtype = "bfloat16"
  m.encoder_buckets = 4
  m.num_iter = 4
  m.cfg = 2.0
  m.re_cfg = 2.0
  m.cfg_schedule = "linear"
  m.temperature = 1.0
  if tiny:
    m.context_dim = 32
    m.token_dim = 4
    m.grid_size, m.lowres_grid = 8, 4
    m.encoder_dim, m.encoder_depth, m.encoder_heads = 32, 1, 2
    m.decoder_dim, m.decoder_depth, m.decoder_heads = 32, 1, 2
    m.head_width, m.head_depth = 32, 1
    m.dit_width, m.dit_depth, m.dit_heads = 16, 1, 2
    m.diffusion_batch_mul = 1
    m.num_sampling_steps = "2"
    m.dit_sampling_steps = "2"
    m.steps_per_epoch = 1
    m.step_warmup_epochs = 2
    m.dtype = "float32"
    m.encoder_buckets = 1
    m.num_iter = 2
  return m


def get_config(variant: str = "himar_s_t2i") -> ml_collections.ConfigDict:
  if variant not in ("himar_s_t2i", "himar_t2i_tiny"):
    raise ValueError(f"unknown variant {variant!r}; use himar_s_t2i or himar_t2i_tiny.")
  tiny = variant == "himar_t2i_tiny"
  c = config_lib.trainer_defaults()
  c.model = _model(tiny)
  # The KL VAE of the latents (cache-latents, decoding samples): a tokenizer directory from `convert`.
  c.tokenizer = ml_collections.ConfigDict({"preset": "kl_tiny" if tiny else "kl16",
                                           "arch": tokenizers.arch_overrides("kl_vae"), "checkpoint": ""})
  # CLIP ViT-L/14 text encoder (a Hugging Face folder): caption embeddings for the cache and prompts.
  c.text = ml_collections.ConfigDict({"clip": "", "dtype": "float32", "context_dtype": "float16",
                                      "batch_size": 320})
  c.cache = default_cache_config(source="coco", split="train", image_size=256, pivot_size=128)
  # evaluate: FID of `num` samples for random captions of a validation-split caption cache
  c.eval = ml_collections.ConfigDict({"captions_cache": "", "caption_seed": 0, "num": 30_000})
  c.data.source = "coco_cache"
  c.data.cache_dir = ""
  c.data.image_size = 256
  c.data.random_flip = False
  c.data.global_batch_size = 256
  c.optim.lr = 8e-4
  c.optim.weight_decay = 0.03
  c.optim.no_decay_keywords = ("diffusion_head", "dit_head")
  c.optim.warmup_steps = 8000
  c.optim.ema_decay = 0.9999
  c.train.num_steps = 1_000_000
  if tiny:
    c.cache.update(image_size=16, pivot_size=8, shard_size=4, batch_size=8, progress=False)
    c.text.batch_size = 8
    c.text.context_dtype = "float32"
    c.data.image_size = 16
    c.data.global_batch_size = 8
    c.optim.warmup_steps = 2
    c.train.num_steps = 4
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.async_checkpoint = False
    c.train.progress_bar = False
  return c
