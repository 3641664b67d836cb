"""A small Fashion-MNIST CNN whose penultimate features define a Frechet distance for quick, offline checks.

Inception features mean little on 28x28 grey clothing, so Fashion-MNIST runs are scored with this classifier
instead: Frechet distance of its 128-d penultimate features (generated samples vs the test split), its own
"inception score" exp(E[KL(p(y|x) || p(y))]) and the accuracy of class-conditional samples (argmax vs the label
they were generated for).

Input: uint8 images (N, H, W) or (N, H, W, 1), H, W >= 28; the centre 28x28 is classified (the trainer pads
Fashion-MNIST to 32x32 centred on background, himar_jax/data/__init__.py), scaled like the trainer's images
(x / 127.5 - 1). The network was trained with random horizontal flips because the generator is too.

Weights ship in himar_jax/evaluation/weights/fmnist_cnn.npz; they were made with

  python -m himar_jax.evaluation.fmnist_classifier --train --out=himar_jax/evaluation/weights/fmnist_cnn.npz

(about 3 minutes on a 2-core CPU; see WEIGHTS_INFO in the file for the measured test accuracy).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from himar_jax.convert import state_dict as sd_lib
from himar_jax.nn.layers import Dropout, with_axes

log = logging.getLogger(__name__)

WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "fmnist_cnn.npz")
FEATURE_EXTRACTOR = "fmnist_cnn_v1"   # stored in reference .npz files so features of different nets never mix
INPUT_SIZE = 28
NUM_CLASSES = 10
FEATURE_DIM = 128


def _conv(cin: int, cout: int, rngs: nnx.Rngs) -> nnx.Conv:
  # float32 compute: the metric must not depend on the accelerator's matmul precision
  return nnx.Conv(cin, cout, (3, 3), padding="SAME", dtype=jnp.float32, param_dtype=jnp.float32,
                  precision=jax.lax.Precision.HIGHEST,
                  kernel_init=with_axes(nnx.initializers.he_normal(), (None, None, "conv_in", "conv_out")),
                  bias_init=with_axes(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs)


def _dense(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, dtype=jnp.float32, param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST,
                    kernel_init=with_axes(nnx.initializers.he_normal(), ("embed", "mlp")),
                    bias_init=with_axes(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)


def _max_pool2(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class FashionCNN(nnx.Module):
  """conv16-conv16-pool-conv32-conv32-pool-dense128-dense10 (ReLU), channels-last."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = _conv(1, 16, rngs)
    self.conv2 = _conv(16, 16, rngs)
    self.conv3 = _conv(16, 32, rngs)
    self.conv4 = _conv(32, 32, rngs)
    self.fc1 = _dense(7 * 7 * 32, FEATURE_DIM, rngs)
    self.fc2 = _dense(FEATURE_DIM, NUM_CLASSES, rngs)
    self.drop = Dropout(0.3)

  def __call__(self, x, *, rngs: nnx.Rngs | None = None):
    """x: float (N, 28, 28, 1) in [-1, 1] -> (logits (N, 10), penultimate features (N, 128)).

    Dropout (on the features fed to the last layer) is active iff `rngs` is given."""
    h = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
    h = _max_pool2(h)
    h = jax.nn.relu(self.conv4(jax.nn.relu(self.conv3(h))))
    h = _max_pool2(h)
    features = jax.nn.relu(self.fc1(h.reshape(h.shape[0], -1)))
    logits = self.fc2(self.drop(features, deterministic=rngs is None, rngs=rngs))
    return logits, features


def preprocess(images) -> np.ndarray:
  """uint8 (N, H, W[, 1]) -> float32 (N, 28, 28, 1) in [-1, 1], the centre crop."""
  images = np.asarray(images)
  if images.ndim == 4:
    if images.shape[-1] != 1:
      raise ValueError(f"the Fashion-MNIST classifier takes grey images (N, H, W[, 1]); got shape {images.shape} "
                       "with more than one channel.")
    images = images[..., 0]
  if images.ndim != 3 or min(images.shape[1:]) < INPUT_SIZE:
    raise ValueError(f"the Fashion-MNIST classifier takes uint8 images (N, H, W[, 1]) with H, W >= 28; got shape "
                     f"{images.shape}.")
  if images.dtype != np.uint8:
    raise ValueError(f"the Fashion-MNIST classifier takes uint8 images in [0, 255]; got dtype {images.dtype} "
                     "(convert [-1, 1] floats with himar_jax.evaluation.images.to_uint8).")
  top = (images.shape[1] - INPUT_SIZE) // 2  # the trainer centres 28x28 on the canvas the same way
  left = (images.shape[2] - INPUT_SIZE) // 2
  crop = images[:, top:top + INPUT_SIZE, left:left + INPUT_SIZE]
  return (crop.astype(np.float32) / 127.5 - 1.0)[..., None]


# ---- weights -------------------------------------------------------------------------------------------------
def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  return {".".join(str(p) for p in path): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_weights(model: FashionCNN, path: str, info: dict) -> str:
  arrays = _flat_params(model)
  arrays["__info__"] = np.array(json.dumps(info))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)
  return path


def load(path: str = WEIGHTS_PATH) -> FashionCNN:
  """The classifier with weights from `path` (default: the shipped weights)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Fashion-MNIST classifier weights {path!r} do not exist; the repository ships them "
                            "at himar_jax/evaluation/weights/fmnist_cnn.npz, or train new ones with `python -m "
                            "himar_jax.evaluation.fmnist_classifier --train --out=PATH`.")
  model = FashionCNN(rngs=nnx.Rngs(0))
  with np.load(path, allow_pickle=False) as f:
    stored = {k: f[k] for k in f.files if k != "__info__"}
  targets = {sd_lib.path_name(p): var for p, var in sd_lib.flat_variables(model, nnx.Param).items()}
  sd_lib.load(targets, stored, dtype=jnp.float32, header=f"{path!r} does not hold FashionCNN weights (retrain "
              "with `python -m himar_jax.evaluation.fmnist_classifier --train --out=PATH`)")
  return model


def weights_info(path: str = WEIGHTS_PATH) -> dict:
  with np.load(path, allow_pickle=False) as f:
    return json.loads(str(f["__info__"])) if "__info__" in f.files else {}


# ---- inference -----------------------------------------------------------------------------------------------
class Classifier:
  """Batched, jitted inference: uint8 images -> (logits float64 (N, 10), features float64 (N, 128))."""

  def __init__(self, model: FashionCNN | None = None, *, batch_size: int = 500):
    self.model = model if model is not None else load()
    self.batch_size = batch_size
    graphdef, state = nnx.split(self.model)
    self._state = state

    @jax.jit
    def forward(state, x):
      return nnx.merge(graphdef, state)(x)

    self._forward = forward

  def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
    x = preprocess(images)
    logits, feats = [], []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size and len(x) > self.batch_size:  # one compiled shape for all but tiny inputs
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)])
      lo, fe = self._forward(self._state, jnp.asarray(chunk))
      logits.append(np.asarray(lo, np.float64)[:n])
      feats.append(np.asarray(fe, np.float64)[:n])
    if not logits:
      return np.zeros((0, NUM_CLASSES)), np.zeros((0, FEATURE_DIM))
    return np.concatenate(logits), np.concatenate(feats)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(logits, -1) == np.asarray(labels)))


# ---- training ------------------------------------------------------------------------------------------------
def train(images: np.ndarray, labels: np.ndarray, *, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
          seed: int = 0) -> FashionCNN:
  """Adam with cosine decay, random horizontal flips, dropout 0.3 before the last layer."""
  import optax

  x_all = preprocess(images)
  y_all = np.asarray(labels, np.int32)
  steps_per_epoch = len(x_all) // batch_size
  model = FashionCNN(rngs=nnx.Rngs(seed))
  tx = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y, key):
    flip_key, drop_key = jax.random.split(key)
    flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)

    def loss_fn(model):
      logits, _ = model(x, rngs=nnx.Rngs(dropout=drop_key))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  for epoch in range(epochs):
    order = rng.permutation(len(x_all))
    t0, losses = time.time(), []
    for i in range(steps_per_epoch):
      idx = order[i * batch_size:(i + 1) * batch_size]
      losses.append(step(model, optimizer, jnp.asarray(x_all[idx]), jnp.asarray(y_all[idx]),
                         jax.random.fold_in(key, epoch * steps_per_epoch + i)))
    log.info("epoch %d: loss %.4f (%.0f s)", epoch, float(np.mean(jax.device_get(losses))), time.time() - t0)
  return model


def main(argv=None) -> int:
  from himar_jax.data import fashion_mnist

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--train", action="store_true", help="train on the training split and write --out")
  parser.add_argument("--out", default=WEIGHTS_PATH, help="weights .npz to write (--train) or read")
  parser.add_argument("--data", default=fashion_mnist.DEFAULT_PATH, help="folder with the Fashion-MNIST IDX files")
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  test_images, test_labels = fashion_mnist.load(args.data, "test")
  if args.train:
    images, labels = fashion_mnist.load(args.data, "train")
    t0 = time.time()
    model = train(images, labels, epochs=args.epochs, seed=args.seed)
    seconds = time.time() - t0
    acc = accuracy(Classifier(model)(test_images)[0], test_labels)
    info = {"test_accuracy": acc, "epochs": args.epochs, "seed": args.seed, "train_seconds": round(seconds, 1),
            "feature_extractor": FEATURE_EXTRACTOR,
            "command": "python -m himar_jax.evaluation.fmnist_classifier --train --out=" + args.out}
    save_weights(model, args.out, info)
    print(json.dumps(info))
  else:
    acc = accuracy(Classifier(load(args.out))(test_images)[0], test_labels)
    print(json.dumps({"weights": args.out, "test_accuracy": acc}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
