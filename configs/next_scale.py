"""VAR and HMAR next-scale Transformers on the VQ residual pyramid (ImageNet 256 / 512), published sizes.

Variants (`--config=configs/next_scale.py:<variant>`):
  var_d16 / var_d20 / var_d24 / var_d30     VAR (FoundationVision/VAR): width 64*depth, heads = depth, block-causal
                                            attention, uniform 1/L CE, drop path 0.1*depth/24, adaLN gamma init 1e-5.
  hmar_d16 / hmar_d20 / hmar_d24 / hmar_d30 HMAR (NVlabs/HMAR): depth-8 shared base blocks + 8 next-scale blocks
                                            + 8 mask blocks, block-diagonal attention, normal-pdf scale weights,
                                            adaLN gamma init 1e-3 (`alng`); sampling cfg/top_k/top_p of the
                                            official sample configs, default 14-pass mask schedule.
  hmar_d16_stage2 (any size: append _stage2) stage 2, masked refinement: mask-token CE only (p ~ U(0, 1) per
                                            step, ceil(pn^2 p) positions per scale k >= 1, same for the batch).
  var_d16_512 / hmar_d16_512 (any size: append _512)  the 512px patch_nums (1,2,3,4,6,9,13,18,24,32), L 2240.
  var_tiny / hmar_tiny                      CPU-sized (depth 2/3, width 32) on a tiny 4-scale pyramid, for tests.

Parameter counts (`python -m himar_jax info --config=configs/next_scale.py:<variant>`) equal the official ones:
VAR-d16/20/24/30 310,283,520 / 600,917,136 / 1,033,399,360 / 2,010,020,356; HMAR-d16/20/24/30 467,691,904 /
845,517,872 / 1,384,328,960 / 2,556,324,212 (the VQ tokenizer is not counted there and not here: its codebook
and phi convs are held as frozen `TokenizerWeight` variables).

Data: batches {"indices": (B, L) int32 VQ-pyramid tokens, "label": (B,)} from a token cache (data.source
'token_cache', --config.data.cache_dir=DIR), made once with
  python -m himar_jax cache-latents --config=configs/vq_pyramid.py:vq256 --config.tokenizer.checkpoint=TOK \
      --config.cache.path=/data/imagenet/train --config.cache.dir=DIR
(each record: the indices of all scales of the image and of its flip, int16, plus the label; the cache's patch_nums
and codebook size must equal config.model's, and its tokenizer config.model.tokenizer when that is a directory).
Training (official): AdamW (0.9, 0.95), wd 0.05 (not on 1-D params, biases, pos/level tables, scale_mul), grad
clip 2.0, lr 1e-4 * batch / 256, warmup ep/50 epochs; batch 768 (1024 for d30); 200/250/350/350 epochs for
d16/20/24/30 (VAR and HMAR stage 1), HMAR stage 2 100 epochs. The schedule is the official 'lin0': warmup from
0.005 of the peak, then linear decay to wpe (0.01 VAR, 0.1 HMAR) of the peak.
HMAR stage 1 leaves the (unused) mask branch frozen; stage 2 trains only mask_embed, mask_blocks and the mask head
(the trainer applies models.next_scale.trainable: frozen params get no update, no weight decay, no Adam state) and
starts from stage 1 with --config.train.init_from=<stage-1 workdir>/checkpoints (mask branch <- next-scale branch).
"""
import math

import ml_collections

from himar_jax import config_lib

IMAGENET_TRAIN = 1_281_167
PATCH_NUMS = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
HMAR_SAMPLING = {16: (1.7, 1000, 0.99), 20: (1.9, 950, 0.99), 24: (2.1, 900, 0.99), 30: (1.6, 650, 0.99)}
EPOCHS = {16: 200, 20: 250, 24: 350, 30: 350}  # VAR README and HMAR stage-1 yaml files
SCHEDULES = {
    256: ((1,), (1, 3), (1, 1, 2, 5), (16,), (25,), (36,), (64,), (100,), (169,), (256,)),
    512: ((1,), (1, 3), (1, 1, 2, 5), (5, 11), (36,), (81,), (169,), (324,), (576,), (1024,)),
}


def _model(kind: str, depth: int, resolution: int) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = "next_scale"
  m.kind = kind
  m.depth = depth
  m.width = 64 * depth
  m.num_heads = depth
  m.mlp_ratio = 4.0
  m.num_classes = 1000
  m.vocab_size = 4096            # vae_ch160v4096z32
  m.z_channels = 32
  m.quant_resi = 0.5
  m.share_quant_resi = 4
  m.patch_nums = PATCH_NUMS[resolution]
  m.tokenizer = ""               # vae_ch160v4096z32.pth or a converted tokenizer dir (codebook + phi for the model)
  m.cond_drop_prob = 0.1
  m.drop_path_rate = 0.1 * depth / 24
  m.init_adaln = 0.5
  m.init_adaln_gamma = 1e-5 if kind == "var" else 1e-3
  m.init_head = 0.02
  m.label_smoothing = 0.0
  m.loss_weighting = "uniform" if kind == "var" else "normal_pdf"
  m.stage = 1
  m.dtype = "bfloat16"
  m.attention_implementation = None
  m.scan_blocks = False  # one lax.scan per block stack in training (same result; faster compiles)
  m.remat = "none"  # none | dots | full: what each block's backward keeps (same result; less activation memory)
  if kind == "hmar":
    m.n_layers_train = 8
    m.cfg, m.top_k, m.top_p = HMAR_SAMPLING.get(depth, HMAR_SAMPLING[16])
    m.mask_schedule = SCHEDULES[resolution]
  else:
    m.cfg, m.top_k, m.top_p = 1.5, 900, 0.96   # VAR README FID settings
  return m


def get_config(variant: str = "var_d16") -> ml_collections.ConfigDict:
  parts = variant.split("_")
  kind, size, extras = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
  ok_size = size == "tiny" or (size.startswith("d") and size[1:].isdigit())
  if kind not in ("var", "hmar") or not ok_size or any(e not in ("512", "stage2") for e in extras) or (
      "stage2" in extras and kind != "hmar"):
    raise ValueError(f"unknown variant {variant!r}; use var_d16/d20/d24/d30, hmar_d16/d20/d24/d30, var_tiny, "
                     "hmar_tiny, optionally with _512 and (hmar) _stage2, e.g. hmar_d16_512_stage2.")
  c = config_lib.trainer_defaults()
  resolution = 512 if "512" in extras else 256
  depth = 16 if size == "tiny" else int(size[1:])
  c.model = _model(kind, depth, resolution)
  if "stage2" in extras:
    c.model.stage = 2
    c.model.loss_weighting = "uniform"  # unused: stage 2 averages over the masked tokens
    # Start from stage 1: --config.train.init_from=<stage-1 workdir>/checkpoints; mask_blocks / mask head begin as
    # copies of ns_blocks / ns head (False: keep the checkpoint's own mask branch, e.g. an official hmar-d*.pth).
    c.model.init_mask_from_ns = True
  c.convert = ml_collections.ConfigDict({"src": ""})  # var_d*.pth / hmar-d*.pth (plus config.model.tokenizer)
  # The VQ pyramid that decodes samples into images (sample / evaluate / edit): `checkpoint` is a tokenizer
  # directory from `convert --config=configs/vq_pyramid.py:vq256` (or VAR's vae_ch160v4096z32.pth itself); empty
  # = config.model.tokenizer. `config` names its architecture ("" = trust the directory's tokenizer.json).
  c.tokenizer = ml_collections.ConfigDict({"config": f"configs/vq_pyramid.py:vq{resolution}", "checkpoint": ""})
  c.data.source = "token_cache"   # VQ-pyramid token indices (himar_jax/data/latent_pipeline.py make_token_iterator)
  c.data.cache_dir = ""           # `cache-latents --config=configs/vq_pyramid.py:vq256 (vq512 for _512)` output
  c.data.image_size = resolution
  c.data.global_batch_size = 1024 if depth >= 30 else 768
  c.optim.lr = None
  c.optim.base_lr = 1e-4
  c.optim.weight_decay = 0.05
  c.optim.grad_clip = 2.0
  # VAR train.py filter_params: no decay for 1-D params, biases and these names (class_emb / mask_embed decay).
  c.optim.no_decay_keywords = ("scale_mul", "pos_start", "pos_1LC", "lvl_embed")
  epoch = math.ceil(IMAGENET_TRAIN / c.data.global_batch_size)
  epochs = 100 if "stage2" in extras else EPOCHS.get(depth, 200)
  c.optim.warmup_steps = max(1, epochs * epoch // 50)  # wp = ep / 50 epochs
  # 'lin0' (VAR / HMAR lr_control.py): warmup from wp0 = 0.005 of the peak, hold, then linear to wpe of the peak.
  c.optim.schedule = "lin0"
  c.optim.warmup_start_fraction = 0.005
  c.optim.final_lr_fraction = 0.01 if kind == "var" else 0.1
  c.train.num_steps = epochs * epoch

  if size == "tiny":
    m = c.model
    m.depth, m.width, m.num_heads = (2 if kind == "var" else 3), 32, 2
    m.n_layers_train = 1
    m.num_classes = 10
    m.vocab_size, m.z_channels = 16, 4
    m.patch_nums = (1, 2, 3, 4)
    m.dtype = "float32"
    m.drop_path_rate = 0.0
    m.cfg, m.top_k, m.top_p = 1.5, 8, 0.9
    if kind == "hmar":
      m.mask_schedule = ((1,), (1, 3), (1, 2, 6), (16,))
    c.tokenizer.config = ""      # tests pair tiny models with tiny random tokenizers
    c.data.global_batch_size = 8
    c.optim.warmup_steps = 2
    c.train.num_steps = 4
  return c
