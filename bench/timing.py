"""One way for bench scripts to time a jitted call: back-to-back calls, one wait at the end."""
from __future__ import annotations

import time

import jax
import numpy as np


def time_ms(fn, args, iters: int, repeats: int) -> float:
  """Median over repeats of (wall time of `iters` back-to-back fn(*args) calls, blocked at the end) / iters, after
  one untimed call (compilation)."""
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / iters * 1e3)
  return float(np.median(samples))
