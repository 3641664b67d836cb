"""Zero-shot editing: inpainting, outpainting and class-conditional editing of an image with a trained generator.

`python -m himar_jax edit --config=... --checkpoint=DIR --image=PATH (--mask=PATH | --box=x0,y0,x1,y1)
 [--outpaint] --label=N [--num=4] [--seed=S] [--step=K] --out=DIR`

The region to generate is the white part of --mask (a grey/RGB image of the model's size; pixels >= 128 count as
white) or the inside of --box (pixel corners, x1 / y1 exclusive); --outpaint inverts it (keep the box / white
part, generate everything else). The image is encoded with the family's tokenizer; a token is known (kept) when
every pixel it covers is kept (token_masks_from_pixels, area rule), and the model generates the other tokens
conditioned on --label (any class: the same image and mask with another label is class-conditional editing):
  pixel_mar / mar   known patches / KL latents visible from the first step (MAR.sample_tokens known=),
  himar             also the pivots: latents of the half-size image (Hi-MAR's pivot_downsample) where known,
  next_scale        VQ-pyramid tokens per scale (NextScaleTransformer.sample_tokens known=; VAR and HMAR).
Known tokens are never overwritten; only the decoder's receptive field blurs the seam in pixels. Writes under
--out: edit_<i>.png (each result), input.png, mask.png (white = generated) and edit_strip.png (input with the
generated region greyed, then the results), plus edit.json.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax import models, sampling
from himar_jax.models.himar import patchify, unpatchify
from himar_jax.models.next_scale import token_masks_from_pixels
from himar_jax.parallel import sharding as sharding_lib
from himar_jax.tokenizers.resize import pivot_downsample


EDIT_FAMILIES = ("pixel_mar", "mar", "himar", "next_scale")


# ---- inputs ------------------------------------------------------------------------------------------------------
def image_spec(config) -> tuple[int, int]:
  """(side, channels) of the images the config's model makes (pixel_mar: the config; else its tokenizer)."""
  if config.model.family == "pixel_mar":
    return int(config.data.image_size), int(config.model.channels)
  _, tokenizer, _ = sampling.load_tokenizer(config)
  tcfg = tokenizer.config
  grid = config.model.grid_size if hasattr(tcfg, "embed_dim") else tcfg.patch_nums[-1]
  return int(grid * tcfg.stride), int(tcfg.in_channels)


def load_image(path: str, side: int, channels: int) -> np.ndarray:
  """(side, side, channels) float32 in [-1, 1] from an image file of exactly side x side pixels."""
  from PIL import Image
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"--image={path!r} does not exist; pass a {side}x{side} image file (PNG, JPEG).")
  with Image.open(path) as img:
    if img.size != (side, side):
      raise ValueError(f"--image={path!r} is {img.size[0]}x{img.size[1]} pixels; this model makes {side}x{side} "
                       f"images: resize or crop it to {side}x{side} first.")
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"), np.float32)
  arr = arr[..., None] if arr.ndim == 2 else arr
  return arr / 127.5 - 1.0


def load_mask(path: str, side: int) -> np.ndarray:
  """(side, side) bool, True = generate (white pixels, >= 128 in grey)."""
  from PIL import Image
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--mask={path!r} does not exist; pass a {side}x{side} image (white = generate) or "
                            "--box=x0,y0,x1,y1.")
  with Image.open(path) as img:
    if img.size != (side, side):
      raise ValueError(f"--mask={path!r} is {img.size[0]}x{img.size[1]} pixels but the image is {side}x{side}; "
                       "the mask must have the image's size.")
    return np.asarray(img.convert("L")) >= 128


def box_mask(box: str, side: int) -> np.ndarray:
  """"x0,y0,x1,y1" (pixels, x1 / y1 exclusive) -> (side, side) bool, True inside the box."""
  try:
    x0, y0, x1, y1 = (int(v) for v in str(box).split(","))
  except ValueError:
    raise ValueError(f"--box={box!r} must be four integers x0,y0,x1,y1 (pixel corners, x1/y1 exclusive).") from None
  if not (0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side):
    raise ValueError(f"--box={box!r} must satisfy 0 <= x0 < x1 <= {side} and 0 <= y0 < y1 <= {side} (the image "
                     f"is {side}x{side}).")
  mask = np.zeros((side, side), bool)
  mask[y0:y1, x0:x1] = True
  return mask


def generate_mask(side: int, *, mask: str | None = None, box: str | None = None, outpaint: bool = False) -> np.ndarray:
  """(side, side) bool, True = generate, from --mask or --box; --outpaint inverts it."""
  if (mask is None) == (box is None):
    raise ValueError("pass exactly one of --mask=PATH (white = generate) and --box=x0,y0,x1,y1.")
  region = load_mask(mask, side) if mask is not None else box_mask(box, side)
  region = ~region if outpaint else region
  if not region.any():
    raise ValueError("the mask leaves nothing to generate (no white pixels / --outpaint of the whole image).")
  return region


# ---- tokens --------------------------------------------------------------------------------------------------------
def _token_mask(keep: np.ndarray, grid: int) -> jax.Array:
  """(B, H, W) kept pixels -> (B, grid^2) kept tokens: a token is kept when every pixel it covers is."""
  return token_masks_from_pixels(keep, (grid,))


def encode_known(family: str, model, tokenizer, images, keep):
  """(known, known_mask) for the model's sampler from images (B, H, W, C) in [-1, 1] and kept pixels (B, H, W):
  pixel_mar patches, KL latents (posterior mean x scale_factor; himar: (pivots, dense) pairs) or VQ indices."""
  if family == "pixel_mar":
    return patchify(images, model.patch_size), _token_mask(keep, images.shape[1] // model.patch_size)
  images = _to_channels(images, tokenizer)
  if family == "next_scale":
    idx = jnp.concatenate(tokenizer.img_to_indices(images), axis=1)
    return idx, token_masks_from_pixels(keep, model.scales.patch_nums)
  scale = tokenizer.config.scale_factor
  dense = patchify(tokenizer.encode(images).mode() * scale, 1)
  dense_mask = _token_mask(keep, math.isqrt(model.num_tokens))
  if family != "himar":
    return dense, dense_mask
  factor = images.shape[1] // (model.lowres_grid * tokenizer.config.stride)
  low = patchify(tokenizer.encode(pivot_downsample(images, factor)).mode() * scale, 1)
  return (low, dense), (_token_mask(keep, model.lowres_grid), dense_mask)


def _to_channels(images, tokenizer):
  """Grey images repeated to the tokenizer's channels (as the latent cache does)."""
  want = tokenizer.config.in_channels
  return jnp.repeat(images, want, axis=-1) if images.shape[-1] == 1 and want != 1 else images


@functools.lru_cache(maxsize=8)
def _editor(graphdef, tok_graphdef, family: str, sample_kwargs: tuple, mesh=None):
  """Jitted: (params, buffers, tokenizer state, labels, keys, images, keep) -> (images, tokens, known, mask),
  traced under the sampling mesh (as sampling._sampler is)."""
  kwargs = dict(sample_kwargs)

  @jax.jit
  def edit(params, buffers, tok_state, labels, keys, images, keep):
    with sharding_lib.use_mesh_for_tracing(mesh):
      model = nnx.merge(graphdef, nnx.State(params), nnx.State(buffers))
      tokenizer = None if tok_graphdef is None else nnx.merge(tok_graphdef, nnx.State(tok_state))
      known, known_mask = encode_known(family, model, tokenizer, images, keep)
      if family == "next_scale":
        tokens = model.sample(labels, keys=keys, known=known, known_mask=known_mask, **kwargs)
        out = tokenizer.indices_to_img(model.split_scales(tokens))
      else:
        tokens = model.sample_tokens(labels, keys=keys, known=known, known_mask=known_mask, **kwargs)
        if family == "pixel_mar":
          out = jnp.clip(unpatchify(tokens, model.patch_size, model.channels), -1.0, 1.0)
        else:
          dense = tokens[1] if family == "himar" else tokens
          out = jnp.clip(tokenizer.decode_scaled(unpatchify(dense, 1, model.token_dim)), -1.0, 1.0)
      return out, tokens, known, known_mask

  return edit


# ---- the edit ------------------------------------------------------------------------------------------------------
def edit(config, restored: sampling.RestoredModel, image: np.ndarray, generate: np.ndarray, *, label: int,
         num: int = 4, seed: int = 0, tokenizer=None) -> dict:
  """`num` edits of one image (H, W, C) in [-1, 1]: pixels where `generate` (H, W) is True are generated for class
  `label`, the rest kept. Returns images (num, H, W, C) in [-1, 1], tokens (the sampler's output), known and
  known_mask (what was kept). tokenizer: (kind, module) of sampling.load_tokenizer (loaded when None)."""
  family = config.model.family
  if jax.process_count() > 1:
    raise ValueError("editing runs in one process (one image); start `edit` without a multi-process job.")
  if family not in EDIT_FAMILIES:
    raise ValueError(f"editing supports config.model.family in {EDIT_FAMILIES}; got {family!r}.")
  num_classes = int(config.model.num_classes)
  if not 0 <= int(label) < num_classes:
    raise ValueError(f"--label={label} is outside [0, {num_classes}) (config.model.num_classes).")
  if num < 1:
    raise ValueError(f"--num={num} must be >= 1 (edits of the image, one per key).")
  if generate.shape != image.shape[:2]:
    raise ValueError(f"the mask is {generate.shape[1]}x{generate.shape[0]} but the image is "
                     f"{image.shape[1]}x{image.shape[0]}; give them the same size.")
  tok_graphdef = tok_state = None
  if family != "pixel_mar":
    module = tokenizer[1] if tokenizer is not None else sampling.load_tokenizer(config)[1]
    tok_graphdef, state = nnx.split(module)
    tok_state = nnx.to_pure_dict(state)
  sample_kwargs = models.family_module(config).sample_kwargs(config)
  fn = _editor(restored.graphdef, tok_graphdef, family, tuple(sorted(sample_kwargs.items())), restored.mesh)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(num))
  images = jnp.broadcast_to(jnp.asarray(image, jnp.float32), (num,) + image.shape)
  keep = jnp.broadcast_to(jnp.asarray(~generate), (num,) + generate.shape)
  labels = jnp.full((num,), int(label), jnp.int32)
  out, tokens, known, known_mask = fn(restored.params, restored.buffers, tok_state, labels, keys, images, keep)
  return {"images": np.asarray(out), "tokens": jax.tree.map(np.asarray, tokens),
          "known": jax.tree.map(np.asarray, known), "known_mask": jax.tree.map(np.asarray, known_mask)}


def edit_strip(image: np.ndarray, generate: np.ndarray, results: np.ndarray) -> np.ndarray:
  """(1, 1 + num, H, W, C) uint8: the input with the generated region greyed, then the results."""
  from himar_jax.evaluation.images import to_uint8
  masked = np.where(generate[..., None], 0.0, image)  # mid grey = the region to generate
  return to_uint8(np.concatenate([masked[None], results])[None])


def edit_files(config, checkpoint_dir: str, out_dir: str, *, image: str, mask: str | None = None,
               box: str | None = None, outpaint: bool = False, label: int | None = None, num: int = 4,
               seed: int | None = None, step: int | None = None) -> dict:
  """The `edit` verb's work: read, edit, write (process 0). Returns the summary (also <out_dir>/edit.json)."""
  from himar_jax.evaluation.images import save_grid, to_uint8
  from himar_jax.sample_cli import save_png
  from himar_jax.train import checkpoint as ckpt_lib

  if label is None:
    raise ValueError(f"`edit` needs --label=N, the class to generate the region as (0..{config.model.num_classes - 1}"
                     "; the image's own class for inpainting / outpainting, another one for class-conditional "
                     "editing).")
  side, channels = image_spec(config)
  pixels = load_image(image, side, channels)
  generate = generate_mask(side, mask=mask, box=box, outpaint=outpaint)
  _, step = ckpt_lib.resolve_step_dir(checkpoint_dir, step)
  restored = sampling.restore_model_for_sampling(config, checkpoint_dir, step=step)
  tokenizer = None if config.model.family == "pixel_mar" else sampling.load_tokenizer(config)[:2]
  seed = int(config.sample.seed if seed is None else seed)
  result = edit(config, restored, pixels, generate, label=int(label), num=int(num), seed=seed, tokenizer=tokenizer)
  if jax.process_index() != 0:
    return {}
  os.makedirs(out_dir, exist_ok=True)
  save = lambda array, name: save_png(array, os.path.join(out_dir, name))
  results = to_uint8(result["images"])
  paths = [save(r, f"edit_{i}.png") for i, r in enumerate(results)]
  save(to_uint8(pixels), "input.png")
  save(np.where(generate, 255, 0).astype(np.uint8)[..., None], "mask.png")
  strip = save_grid(edit_strip(pixels, generate, result["images"]), os.path.join(out_dir, "edit_strip.png"),
                    row_labels=None)
  kept = result["known_mask"]
  kept_fraction = float(np.mean(np.concatenate([np.ravel(k) for k in jax.tree.leaves(kept)])))
  summary = {"checkpoint": os.path.abspath(checkpoint_dir), "step": int(step), "image": os.path.abspath(image),
             "label": int(label), "seed": seed, "num": int(num), "outpaint": bool(outpaint),
             "generated_pixel_fraction": float(np.mean(generate)), "kept_token_fraction": kept_fraction,
             "edits": paths, "strip": strip}
  with open(os.path.join(out_dir, "edit.json.tmp"), "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(out_dir, "edit.json.tmp"), os.path.join(out_dir, "edit.json"))
  return summary


def edit_verb(flags) -> int:
  """The CLI verb; flags are defined in himar_jax/cli.py."""
  from absl import app

  config, checkpoint = sampling.config_and_checkpoint(flags, "edit")
  if not flags.out:
    raise app.UsageError("`edit` needs --out=DIR (created if missing).")
  if not flags.image:
    raise app.UsageError("`edit` needs --image=PATH (an image of the model's size).")
  summary = edit_files(config, checkpoint, flags.out, image=flags.image, mask=flags.mask, box=flags.box,
                       outpaint=flags.outpaint, label=flags.label, num=flags.num or 4, seed=flags.seed,
                       step=flags.step)
  if summary:
    print(json.dumps(summary, indent=2))
  return 0
