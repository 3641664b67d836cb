"""Forces 8 fake CPU devices before JAX initialises, so sharding tests run anywhere."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["HIMAR_JAX_COMPILATION_CACHE"] = "none"  # CLI tests in this process leave the user's cache alone

import jax  # noqa: E402  (must come after the environment is set)

jax.config.update("jax_num_cpu_devices", 8)


import gzip  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def write_idx(path, array, compress=True):
  """Writes an unsigned-byte IDX file (the Fashion-MNIST format)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  opener = gzip.open if compress else open
  with opener(str(path) + (".gz" if compress else ""), "wb") as f:
    f.write(header + array.tobytes())


@pytest.fixture(scope="session")
def fake_fashion_mnist(tmp_path_factory):
  """A small Fashion-MNIST-format dataset: class c is a bright c-dependent stripe pattern plus noise."""
  root = tmp_path_factory.mktemp("fashion_mnist")
  rng = np.random.default_rng(0)
  for split, n in (("train", 200), ("t10k", 50)):
    labels = np.arange(n) % 10
    images = rng.integers(0, 40, (n, 28, 28))
    for i, c in enumerate(labels):
      images[i, 2 * c:2 * c + 6, 4:24] = 220
    write_idx(root / f"{split}-images-idx3-ubyte", images)
    write_idx(root / f"{split}-labels-idx1-ubyte", labels)
  return str(root)
