"""One way for bench scripts to time a jitted call: back-to-back calls, one wait at the end."""
from __future__ import annotations

import time

import jax
import numpy as np


def time_ms(fn, input_sets, iters: int, repeats: int) -> float:
  """Median over repeats of (wall time of `iters` back-to-back calls, blocked at the end) / iters, after one
  untimed call (compilation). Call i gets the arguments input_sets[i % len(input_sets)] (a list of tuples)."""
  jax.block_until_ready(fn(*input_sets[0]))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*input_sets[i % len(input_sets)]) for i in range(iters)]
    jax.block_until_ready(outs)
    samples.append((time.perf_counter() - t0) / iters * 1e3)
  return float(np.median(samples))
