"""Fashion-MNIST from IDX files (Debian's `dataset-fashion-mnist` installs them under DEFAULT_PATH)."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
INSTALL_HINT = ("install it with `sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist`, or set "
                "--config.data.path=DIR to a folder holding the four IDX files (optionally .gz)")


def _find(path: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {path!r}: {INSTALL_HINT}.")


def read_idx(filename: str) -> np.ndarray:
  """Reads an IDX file (unsigned-byte data, any rank), validating magic number and size."""
  opener = gzip.open if filename.endswith(".gz") else open
  with opener(filename, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{filename!r} is not an unsigned-byte IDX file (magic bytes {data[:4]!r}); the file is "
                     f"corrupt or of another format: {INSTALL_HINT}.")
  ndim = data[3]
  dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(dims)):
    raise ValueError(f"{filename!r} holds {body.size} bytes of data but its header says {dims}: the file is "
                     f"truncated or corrupt: {INSTALL_HINT}.")
  return body.reshape(dims)


def load(path: str = DEFAULT_PATH, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 28, 28), labels int32 (N,))."""
  if split not in _FILES:
    raise ValueError(f"Fashion-MNIST split={split!r} is not one of {tuple(_FILES)}.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Fashion-MNIST directory {path!r} does not exist: {INSTALL_HINT}.")
  image_stem, label_stem = _FILES[split]
  images = read_idx(_find(path, image_stem))
  labels = read_idx(_find(path, label_stem)).astype(np.int32)
  if images.ndim != 3 or labels.shape != images.shape[:1]:
    raise ValueError(f"Fashion-MNIST {split} files in {path!r} disagree: images {images.shape}, labels "
                     f"{labels.shape}.")
  return images, labels
