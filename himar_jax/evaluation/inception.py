"""The 2015 TF Inception-v3 graph that FID, sFID, IS and precision/recall use, as an NNX module.

Structure: pytorch-fid's FIDInception port of `classify_image_graph_def.pb` (torchvision's Inception-v3 layout
with the TF-specific blocks: average pools that exclude padding in Mixed_5b..6e and 7b, a max pool in the last
block Mixed_7c, BatchNorm eps 1e-3, 1008 logits). Weights: pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, read from a local path with torch.load(weights_only=True)
(`load_pytorch_fid`).

Outputs (ADM's evaluator names; all metrics use the same forward pass):
  pool     (N, 2048)  `pool_3`: mean over the 8x8 map of Mixed_7c (FID, IS, precision/recall)
  spatial  (N, 2023)  `mixed_6/conv`: Mixed_6d.branch1x1 (conv+BN+ReLU, 17x17x192), first 7 channels, flattened
                      in NHWC order as ADM does (sFID)
  logits   (N, 1008)  pool @ fc.weight.T. ADM's IS takes the graph's `softmax/logits/MatMul` weight only, so no
                      bias is added.

Preprocessing (`preprocess`), identical for every metric:
  input    NHWC images, uint8 in [0, 255] (ADM's sample/reference batches); grey (C = 1) is repeated to RGB.
  "tf"     (default, ADM-compatible) what the TF graph does after its `ExpandDims` input: bilinear resize to
           299x299 with TF1's legacy `ResizeBilinear` (align_corners=False, no half-pixel centres: source
           coordinate = dst * in / out), then (x - 128) / 128.
  "pytorch_fid"  what pytorch-fid does: x / 255, `F.interpolate(bilinear, align_corners=False)` (half-pixel
           centres) to 299, then 2x - 1. Only for parity checks against pytorch-fid.
Both resizes are exact separable interpolation matrices applied in float32 at HIGHEST precision.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.convert import state_dict as sd_lib
from himar_jax.convert.state_dict import CheckpointMismatchError
from himar_jax.nn.layers import with_axes

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
NUM_LOGITS = 1008
FEATURE_EXTRACTOR = "inception_2015_12_05"   # stored in reference .npz files we write
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "HIMAR_JAX_INCEPTION_WEIGHTS"
PREPROCESS_MODES = ("tf", "pytorch_fid")
_HI = jax.lax.Precision.HIGHEST


# ---- preprocessing -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def resize_matrix(in_size: int, out_size: int, mode: str) -> np.ndarray:
  """(out_size, in_size) bilinear interpolation weights of TF1's legacy resize ("tf") or PyTorch's
  align_corners=False resize ("pytorch_fid")."""
  if mode not in PREPROCESS_MODES:
    raise ValueError(f"preprocess mode {mode!r} is not one of {PREPROCESS_MODES}.")
  scale = in_size / out_size
  dst = np.arange(out_size, dtype=np.float64)
  if mode == "tf":
    src = dst * scale
  else:
    src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)  # PyTorch clamps negative source coordinates to 0
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m.astype(np.float32)


def check_images(images, what: str = "images") -> None:
  """Raises unless `images` is an NHWC uint8 batch with 1 or 3 channels."""
  shape, dtype = getattr(images, "shape", None), getattr(images, "dtype", None)
  if shape is None or len(shape) != 4 or shape[-1] not in (1, 3):
    raise ValueError(f"{what}: expected NHWC images (N, H, W, 3) (or grey, C = 1); got shape {shape}.")
  if dtype != np.uint8:
    raise ValueError(f"{what}: expected uint8 pixels in [0, 255]; got dtype {dtype}. Convert [-1, 1] floats with "
                     "himar_jax.evaluation.images.to_uint8.")


def preprocess(images, mode: str = "tf"):
  """uint8-valued NHWC (N, H, W, 1|3) -> float32 (N, 299, 299, 3) in the graph's input range (module doc)."""
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  rows = jnp.asarray(resize_matrix(x.shape[1], INPUT_SIZE, mode))
  cols = jnp.asarray(resize_matrix(x.shape[2], INPUT_SIZE, mode))
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=_HI)
  x = jnp.einsum("pw,nowc->nopc", cols, x, precision=_HI)
  if mode == "tf":
    return (x - 128.0) * (1.0 / 128.0)
  return 2.0 * (x / 255.0) - 1.0


# ---- network -------------------------------------------------------------------------------------------------
def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv(nnx.Module):
  """conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU."""

  def __init__(self, cin: int, cout: int, kernel, *, rngs: nnx.Rngs, stride=1, padding=0):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(cin, cout, _pair(kernel), strides=_pair(stride), padding=((ph, ph), (pw, pw)),
                         use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, precision=_HI,
                         kernel_init=with_axes(nnx.initializers.lecun_normal(),
                                               (None, None, "conv_in", "conv_out")), rngs=rngs)
    self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=1e-3, momentum=0.9, dtype=jnp.float32,
                            param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool(x, stride: int, pad: int = 0):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _avg_pool_exclude_pad(x):
  """3x3, stride 1, padding 1, averaging only over pixels inside the image (TF's SAME average pool)."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  return total / count


class BlockA(nnx.Module):
  """35x35 block (Mixed_5b/c/d)."""

  def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(cin, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(cin, pool_features, 1, rngs=rngs)

  def __call__(self, x):
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class BlockB(nnx.Module):
  """35 -> 17 reduction (Mixed_6a)."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(cin, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class BlockC(nnx.Module):
  """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

  def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(cin, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def __call__(self, x, *, return_1x1: bool = False):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_exclude_pad(x))
    out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
    return (out, b1) if return_1x1 else out


class BlockD(nnx.Module):
  """17 -> 8 reduction (Mixed_7a)."""

  def __init__(self, cin: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(cin, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class BlockE(nnx.Module):
  """8x8 block with split 1x3 / 3x1 branches (Mixed_7b: average pool, Mixed_7c: max pool, as in the graph)."""

  def __init__(self, cin: int, *, pool: str, rngs: nnx.Rngs):
    self.pool = pool
    self.branch1x1 = BasicConv(cin, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(cin, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(cin, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(cin, 192, 1, rngs=rngs)

  def __call__(self, x):
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_exclude_pad(x) if self.pool == "avg" else _max_pool(x, 1, 1)
    return jnp.concatenate([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], axis=-1)


class FIDInception(nnx.Module):
  """Inception-v3 of the 2015 TF graph; attribute names follow pytorch-fid's state dict (module doc)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = BlockA(192, 32, rngs=rngs)
    self.Mixed_5c = BlockA(256, 64, rngs=rngs)
    self.Mixed_5d = BlockA(288, 64, rngs=rngs)
    self.Mixed_6a = BlockB(288, rngs=rngs)
    self.Mixed_6b = BlockC(768, 128, rngs=rngs)
    self.Mixed_6c = BlockC(768, 160, rngs=rngs)
    self.Mixed_6d = BlockC(768, 160, rngs=rngs)
    self.Mixed_6e = BlockC(768, 192, rngs=rngs)
    self.Mixed_7a = BlockD(768, rngs=rngs)
    self.Mixed_7b = BlockE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = BlockE(2048, pool="max", rngs=rngs)
    # IS uses only the weight of the graph's logits MatMul; the bias is kept so the state dict loads whole.
    self.fc = nnx.Linear(POOL_DIM, NUM_LOGITS, dtype=jnp.float32, param_dtype=jnp.float32, precision=_HI,
                         kernel_init=with_axes(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                         bias_init=with_axes(nnx.initializers.zeros_init(), ("vocab",)), rngs=rngs)

  def __call__(self, x, *, spatial_channels: int = SPATIAL_CHANNELS) -> dict[str, jax.Array]:
    """x: preprocessed (N, 299, 299, 3) -> {"pool", "spatial", "logits"} (module doc); spatial_channels=192
    returns the whole mixed_6/conv map (N, 17, 17, 192) unflattened."""
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 2)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
    x, mixed_6_conv = self.Mixed_6d(x, return_1x1=True)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
    pool = jnp.mean(x, axis=(1, 2))
    logits = jnp.dot(pool, self.fc.kernel.get_value(), precision=_HI)
    if spatial_channels == mixed_6_conv.shape[-1]:
      spatial = mixed_6_conv
    else:
      spatial = mixed_6_conv[..., :spatial_channels].reshape(x.shape[0], -1)
    return {"pool": pool, "spatial": spatial, "logits": logits}


# ---- pytorch-fid weights -------------------------------------------------------------------------------------
class WeightsMismatchError(CheckpointMismatchError):
  """A state dict that is not pytorch-fid's FID Inception (missing / unexpected keys, wrong shapes)."""


def _map_key(key: str, value: np.ndarray) -> tuple[tuple, np.ndarray] | None:
  """pytorch-fid key -> (NNX path, value in the NNX layout); None for num_batches_tracked."""
  parts = key.split(".")
  leaf, module = parts[-1], tuple(parts[:-1])
  if leaf == "num_batches_tracked":
    return None
  if module and module[-1] == "conv" and leaf == "weight":
    return module + ("kernel",), np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
  if module and module[-1] == "bn":
    name = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}.get(leaf)
    return (module + (name,), value) if name else (module + (leaf,), value)
  if module == ("fc",):
    return (("fc", "kernel"), value.T) if leaf == "weight" else (("fc", leaf), value)
  return module + (leaf,), value


def load_state_dict(model: FIDInception, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict"):
  """Copies pytorch-fid's FID-Inception state dict (NumPy arrays) into `model`; every parameter and statistic
  must be present with its exact shape, and nothing else."""
  arrays, sources, _ = sd_lib.map_state_dict(state_dict, _map_key)  # num_batches_tracked dropped
  sd_lib.load(sd_lib.flat_variables(model), arrays, sources=sources, originals=state_dict, dtype=jnp.float32,
              error=WeightsMismatchError, header=f"{source} is not pytorch-fid's FID Inception ({WEIGHTS_FILE})")
  return model


def resolve_weights_path(path: str | None) -> str:
  path = path or os.environ.get(WEIGHTS_ENV)
  if not path:
    raise FileNotFoundError(f"no Inception weights given: pass the path of pytorch-fid's {WEIGHTS_FILE} "
                            f"(--inception_weights=PATH or ${WEIGHTS_ENV}); it is published with pytorch-fid's "
                            "releases (fid_weights).")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Inception weights {path!r} do not exist; download pytorch-fid's {WEIGHTS_FILE} and "
                            f"pass its path (--inception_weights=PATH or ${WEIGHTS_ENV}).")
  return path


def load_pytorch_fid(path: str | None = None) -> FIDInception:
  """FIDInception with pytorch-fid's weights read from `path` (.pth via torch.load(weights_only=True), or an
  .npz / .safetensors state dict); default path: $HIMAR_JAX_INCEPTION_WEIGHTS."""
  from himar_jax.convert.tokenizers import load_torch_state_dict  # lazy: torch only when reading .pth
  path = resolve_weights_path(path)
  state_dict = load_torch_state_dict(path, subkey=None)
  model = nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0)))
  return load_state_dict(model, state_dict, source=repr(path))


# ---- batched feature extraction ------------------------------------------------------------------------------
class InceptionFeatures:
  """uint8 NHWC batches -> float64 {"pool", "spatial", "logits"}, one jitted shape, data parallel over every
  device (a 1-D mesh), host-side padding of the last batch."""

  def __init__(self, model: FIDInception, *, batch_size: int = 64, mode: str = "tf", devices=None):
    if mode not in PREPROCESS_MODES:
      raise ValueError(f"preprocess mode {mode!r} is not one of {PREPROCESS_MODES}.")
    devices = list(devices or jax.local_devices())  # process 0 scores alone: only its own devices
    self.mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    self.mode = mode
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.batch_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("batch"))
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, replicated)

    @jax.jit
    def forward(state, images):
      return nnx.merge(graphdef, state)(preprocess(images, mode))

    self._forward = forward

  def __call__(self, images, *, progress: bool = False) -> dict[str, np.ndarray]:
    check_images(images)
    out = {"pool": [], "spatial": [], "logits": []}
    starts = range(0, len(images), self.batch_size)
    if progress:
      from tqdm.auto import tqdm
      starts = tqdm(starts, desc="inception", unit="batch")
    for start in starts:
      chunk = np.asarray(images[start:start + self.batch_size])
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      result = self._forward(self._state, jax.device_put(chunk, self.batch_sharding))
      for k in out:
        out[k].append(np.asarray(jax.device_get(result[k]), np.float64)[:n])
    return {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in out.items()}
