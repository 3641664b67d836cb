"""AdamW with MAR's no-decay mask, warmup then constant / cosine learning rate, gradient clipping, EMA."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def learning_rate(config) -> float:
  """Peak lr: `lr` if set, else `base_lr * global_batch / 256` (MAR's linear scaling rule)."""
  if config.optim.get("lr") is not None:
    return float(config.optim.lr)
  return float(config.optim.base_lr) * config.data.global_batch_size / 256


def make_schedule(peak_lr: float, warmup_steps: int, total_steps: int, kind: str = "constant",
                  final_lr_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then constant or cosine decay to the end."""
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r} is not one of {SCHEDULES}.")
  if warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} > 0.")
  warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
  if kind == "constant":
    after = optax.constant_schedule(peak_lr)
  else:
    after = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1), alpha=final_lr_fraction)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def path_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def weight_decay_mask(params, no_decay_keywords: Sequence[str] = ()):
  """True where weight decay applies. As MAR's `add_weight_decay`: no decay for 1-D params (biases, norm
  scales), names ending in `bias`, and names containing any of `no_decay_keywords` (MAR: the diffusion head)."""

  def decays(path, x):
    name = path_name(path)
    return not (jnp.ndim(x) <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keywords))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  o = config.optim
  if not 0.0 <= o.b1 < 1.0 or not 0.0 <= o.b2 < 1.0:
    raise ValueError(f"config.optim.b1={o.b1}, b2={o.b2} must lie in [0, 1).")
  if o.weight_decay < 0:
    raise ValueError(f"config.optim.weight_decay={o.weight_decay} must be >= 0.")
  schedule = make_schedule(learning_rate(config), int(o.warmup_steps), total_steps, o.schedule,
                           o.get("final_lr_fraction", 0.0))
  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8), weight_decay=o.weight_decay,
                           mask=lambda p: weight_decay_mask(p, tuple(o.get("no_decay_keywords", ())))))
  return optax.chain(*chain)


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in float32 (MAR updates EMA after every step)."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
