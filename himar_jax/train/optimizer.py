"""AdamW with MAR's no-decay mask, warmup then constant / cosine / VAR's 'lin0' learning rate, gradient clipping,
frozen parameters (a model family's trainable mask: no update, no weight decay, no Adam moments), EMA."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "lin0")
LIN0_HOLD = 0.05  # VAR lr_control.py 'lin0': the peak is held for this fraction of the post-warmup steps


def learning_rate(config) -> float:
  """Peak lr: `lr` if set, else `base_lr * global_batch / 256` (MAR's linear scaling rule)."""
  if config.optim.get("lr") is not None:
    return float(config.optim.lr)
  return float(config.optim.base_lr) * config.data.global_batch_size / 256


def make_schedule(peak_lr: float, warmup_steps: int, total_steps: int, kind: str = "constant",
                  final_lr_fraction: float = 0.0, warmup_start_fraction: float = 0.0) -> optax.Schedule:
  """Linear warmup from `warmup_start_fraction * peak_lr` to `peak_lr` over `warmup_steps`, then
    constant  the peak to the end;
    cosine    half-cycle cosine from the peak to `final_lr_fraction * peak_lr` at `total_steps`;
    lin0      VAR / HMAR's schedule (lr_control.py lr_wd_annealing 'lin0', wp0 = warmup_start_fraction, wpe =
              final_lr_fraction): with p = (step - warmup) / (total - 1 - warmup), the peak while p < 0.05, then
              wpe + (1 - wpe) (1 - p) / 0.95 times the peak, reaching wpe at the last step (total - 1).
  """
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r} is not one of {SCHEDULES}.")
  if warmup_steps < 0 or total_steps <= 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0 and total_steps={total_steps} > 0.")
  if not 0.0 <= warmup_start_fraction <= 1.0 or not 0.0 <= final_lr_fraction <= 1.0:
    raise ValueError(f"config.optim.warmup_start_fraction={warmup_start_fraction} and final_lr_fraction="
                     f"{final_lr_fraction} must lie in [0, 1].")
  if kind == "lin0":
    return _lin0(peak_lr, warmup_steps, total_steps, warmup_start_fraction, final_lr_fraction)
  warmup = optax.linear_schedule(warmup_start_fraction * peak_lr, peak_lr, max(warmup_steps, 1))
  if kind == "constant":
    after = optax.constant_schedule(peak_lr)
  else:
    after = optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup_steps, 1), alpha=final_lr_fraction)
  if warmup_steps == 0:
    return after
  return optax.join_schedules([warmup, after], [warmup_steps])


def _lin0(peak_lr: float, warmup_steps: int, total_steps: int, wp0: float, wpe: float) -> optax.Schedule:
  if total_steps - 1 <= warmup_steps:
    raise ValueError(f"schedule 'lin0' needs total_steps={total_steps} > warmup_steps={warmup_steps} + 1.")
  decay_steps = float(total_steps - 1 - warmup_steps)

  def schedule(count):
    step = jnp.asarray(count, jnp.float32)
    warm = wp0 + (1.0 - wp0) * step / max(warmup_steps, 1)
    # Clamped at 1: steps past the planned end stay at wpe instead of going below it.
    passed = jnp.minimum((step - warmup_steps) / decay_steps, 1.0)
    decay = jnp.where(passed < LIN0_HOLD, 1.0, wpe + (1.0 - wpe) * (1.0 - passed) / (1.0 - LIN0_HOLD))
    return peak_lr * jnp.where(step < warmup_steps, warm, decay)

  return schedule


def path_name(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def weight_decay_mask(params, no_decay_keywords: Sequence[str] = ()):
  """True where weight decay applies. As MAR's `add_weight_decay`: no decay for 1-D params (biases, norm
  scales), names ending in `bias`, and names containing any of `no_decay_keywords` (MAR: the diffusion head)."""

  def decays(path, x):
    name = path_name(path)
    return not (jnp.ndim(x) <= 1 or name.endswith("bias") or any(k in name for k in no_decay_keywords))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, total_steps: int, trainable=None) -> optax.GradientTransformation:
  """AdamW (+ clipping) as config.optim says. trainable: a bool tree over the params, or a function params ->
  such a tree (a model family's `trainable_mask`), True where a param trains. Frozen params get a zero update
  (so neither Adam nor weight decay moves them), keep no Adam moments, and do not count in the clipping norm (as
  PyTorch's requires_grad=False)."""
  o = config.optim
  if not 0.0 <= o.b1 < 1.0 or not 0.0 <= o.b2 < 1.0:
    raise ValueError(f"config.optim.b1={o.b1}, b2={o.b2} must lie in [0, 1).")
  if o.weight_decay < 0:
    raise ValueError(f"config.optim.weight_decay={o.weight_decay} must be >= 0.")
  schedule = make_schedule(learning_rate(config), int(o.warmup_steps), total_steps, o.schedule,
                           o.get("final_lr_fraction", 0.0), o.get("warmup_start_fraction", 0.0))
  chain = []
  if o.grad_clip and o.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(o.grad_clip))
  chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.get("eps", 1e-8), weight_decay=o.weight_decay,
                           mask=lambda p: weight_decay_mask(p, tuple(o.get("no_decay_keywords", ())))))
  tx = optax.chain(*chain)
  if trainable is None:
    return tx

  def labels(params):
    mask = trainable(params) if callable(trainable) else trainable
    return jax.tree.map(lambda t: "train" if t else "frozen", mask)

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def ema_update(ema, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in float32 (MAR updates EMA after every step), written as
  ema + (1 - decay) (params - ema) so that a param equal to its EMA (frozen, or restored with init_from) leaves
  the EMA bit-exactly unchanged: frozen params do not drift through rounding."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)
