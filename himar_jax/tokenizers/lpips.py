"""LPIPS perceptual distance (Zhang et al. 2018, v0.1, VGG16 trunk) for tokenizer training.

d(x0, x1) = sum over the relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 features f of
  mean_hw( w_l . (f0 / |f0|_c - f1 / |f1|_c)^2 )   (|.|_c: L2 norm over channels, + 1e-10)
after the input scaling (x - shift) / scale. Images are channels-last in [-1, 1]; gray images are repeated to RGB.
Weights: torchvision's ImageNet VGG16 (`features.<i>.weight/bias`) and LPIPS' linear heads (`lin<l>.model.1.weight`,
lpips/weights/v0.1/vgg.pth), read with torch.load(weights_only=True). All variables are `LpipsWeight`, not
nnx.Param, so an optimizer never updates them (they ride in the train state's constant buffers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16().features: conv indices (out channels) and where the five LPIPS taps sit (after the ReLU
# of these convs); "M" = 2x2 max pool.
VGG16_LAYOUT = ((0, 64), (2, 64), "M", (5, 128), (7, 128), "M", (10, 256), (12, 256), (14, 256), "M",
                (17, 512), (19, 512), (21, 512), "M", (24, 512), (26, 512), (28, 512))
TAPS = (2, 7, 14, 21, 28)
CHANNELS = (64, 128, 256, 512, 512)


class LpipsWeight(nnx.Variable):
  """Frozen pretrained weight (not an nnx.Param: never trained)."""


class LPIPS(nnx.Module):

  def __init__(self, *, dtype=jnp.float32):
    self.dtype = dtype
    kernels, biases = {}, {}
    in_ch = 3
    for item in VGG16_LAYOUT:
      if item == "M":
        continue
      idx, out = item
      kernels[str(idx)] = LpipsWeight(jnp.zeros((3, 3, in_ch, out), jnp.float32))
      biases[str(idx)] = LpipsWeight(jnp.zeros((out,), jnp.float32))
      in_ch = out
    self.vgg_kernel = nnx.Dict(kernels)
    self.vgg_bias = nnx.Dict(biases)
    self.lin = nnx.List([LpipsWeight(jnp.zeros((c,), jnp.float32)) for c in CHANNELS])

  def features(self, x):
    taps = []
    h = x.astype(self.dtype)
    for item in VGG16_LAYOUT:
      if item == "M":
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        continue
      idx = str(item[0])
      h = jax.lax.conv_general_dilated(h, self.vgg_kernel[idx][...].astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       preferred_element_type=jnp.float32)
      h = jax.nn.relu(h + self.vgg_bias[idx][...]).astype(self.dtype)
      if item[0] in TAPS:
        taps.append(h.astype(jnp.float32))
    return taps

  def __call__(self, x0, x1):
    """Per-example distances (B,) between images x0, x1 (B, H, W, 1 or 3) in [-1, 1]."""
    if x0.shape != x1.shape or x0.ndim != 4 or x0.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS takes two (B, H, W, 1|3) image batches of one shape; got {x0.shape}, {x1.shape}.")
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    prep = lambda x: (jnp.broadcast_to(x, x.shape[:-1] + (3,)).astype(jnp.float32) - shift) / scale
    b = x0.shape[0]
    feats = self.features(jnp.concatenate([prep(x0), prep(x1)]))
    total = jnp.zeros((b,), jnp.float32)
    for f, w in zip(feats, self.lin):
      f = f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + 1e-10)
      diff = jnp.square(f[:b] - f[b:])
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w[...]), axis=(1, 2))
    return total


def load_state_dicts(model: LPIPS, vgg: dict, lin: dict) -> LPIPS:
  """Copies torchvision VGG16 (`features.<i>.weight/bias`, optional `features.` prefix) and LPIPS `lin<l>` weights
  into `model` (which may be abstract, from nnx.eval_shape); refuses missing keys and shape mismatches, naming
  them."""
  def get(sd, key, shape):
    for k in (key, key.removeprefix("features."), "net." + key):
      if k in sd:
        a = np.asarray(sd[k], np.float32)
        if a.shape != shape:
          raise ValueError(f"LPIPS weight {k!r} has shape {a.shape}, expected {shape}.")
        return a
    raise KeyError(f"LPIPS weight {key!r} not found; keys start {sorted(sd)[:6]}.")

  in_ch = 3
  for item in VGG16_LAYOUT:
    if item == "M":
      continue
    idx, out = item
    w = get(vgg, f"features.{idx}.weight", (out, in_ch, 3, 3))
    model.vgg_kernel[str(idx)].set_value(jnp.asarray(np.transpose(w, (2, 3, 1, 0))))
    model.vgg_bias[str(idx)].set_value(jnp.asarray(get(vgg, f"features.{idx}.bias", (out,))))
    in_ch = out
  for l, c in enumerate(CHANNELS):
    model.lin[l].set_value(jnp.asarray(get(lin, f"lin{l}.model.1.weight", (1, c, 1, 1)).reshape(c)))
  return model


def load(vgg_path: str, lin_path: str, *, dtype=jnp.float32) -> LPIPS:
  """LPIPS from a torchvision VGG16 checkpoint and LPIPS' vgg.pth (torch.load weights_only, .npz or .safetensors)."""
  from himar_jax.convert.tokenizers import load_torch_state_dict

  return load_state_dicts(LPIPS(dtype=dtype), load_torch_state_dict(vgg_path), load_torch_state_dict(lin_path))


def random_state_dicts(seed: int = 0) -> tuple[dict, dict]:
  """(vgg, lin) random weights in the torchvision / LPIPS key layout, drawn with NumPy (parity fixtures and tests
  regenerate them from the seed instead of storing 15M numbers)."""
  rng = np.random.default_rng(seed)
  vgg, in_ch = {}, 3
  for item in VGG16_LAYOUT:
    if item == "M":
      continue
    idx, out = item
    bound = np.sqrt(6.0 / (in_ch * 9))  # He-uniform: keeps ReLU activations alive through 13 layers
    vgg[f"features.{idx}.weight"] = rng.uniform(-bound, bound, (out, in_ch, 3, 3)).astype(np.float32)
    vgg[f"features.{idx}.bias"] = rng.uniform(-0.1, 0.1, (out,)).astype(np.float32)
    in_ch = out
  lin = {f"lin{l}.model.1.weight": rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32) for l, c in enumerate(CHANNELS)}
  return vgg, lin
