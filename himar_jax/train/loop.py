"""The training loop: mesh, model, data, state (fresh, from another run's params with config.train.init_from, or
resumed), jitted step, CLU logging, checkpoints. Resuming a workdir's own checkpoint always wins over init_from."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers, periodic_actions
from tqdm.auto import tqdm

from himar_jax import config_lib, data, models
from himar_jax.parallel import mesh as mesh_lib, sharding as sharding_lib
from himar_jax.train import checkpoint as ckpt_lib
from himar_jax.train.optimizer import make_optimizer
from himar_jax.train.state import (TrainState, count_params, init_train_state, init_train_state_from,
                                   make_train_setup)
from himar_jax.train.step import make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  pass


@contextlib.contextmanager
def _sigterm_flag():
  """Turns SIGTERM (pre-emption, scancel) into a flag the loop checks between steps: save, then exit."""
  flag = {"set": False}

  def handler(signum, frame):  # noqa: ARG001
    flag["set"] = True

  previous = None
  with contextlib.suppress(ValueError):  # not the main thread: no handler, nothing to restore
    previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


@jax.jit
def _metric_sums(metrics):
  return {k: jnp.sum(v) for k, v in metrics.items()}


@jax.jit
def _add_metric_sums(totals, metrics):
  return {k: totals[k] + jnp.sum(v) for k, v in metrics.items()}


class MetricAverages:
  """Averages of the step metrics since the last `pop`, as CLU's `metrics.Average` computes them, bit for bit:
  running sums in the metric's dtype (first step: its value; then + each step's, in order) over the count of
  values. Its `single_from_model_output` + `merge` are a dozen eager ops per metric per step, which bounded the
  loop's step rate; here each step is one jitted call and each `pop` one host transfer."""

  def __init__(self):
    self.totals, self.counts = None, None

  def add(self, metrics: dict) -> None:
    if self.totals is None:
      self.totals, self.counts = _metric_sums(metrics), {k: 0 for k in metrics}
    else:
      self.totals = _add_metric_sums(self.totals, metrics)
    for k, v in metrics.items():
      self.counts[k] += int(np.size(v))

  def pop(self) -> dict[str, float]:
    """{name: average} since the last pop (then reset); {} when nothing was added."""
    if self.totals is None:
      return {}
    totals = jax.device_get(self.totals)
    averages = {k: _average(totals[k], self.counts[k]) for k in sorted(totals)}
    self.totals, self.counts = None, None
    return averages


def _average(total: np.ndarray, count: int) -> float:
  """total / count with jnp's promotion (CLU's Average.compute): the total's float dtype, or float32 for ints."""
  dtype = total.dtype if jnp.issubdtype(total.dtype, jnp.floating) else np.float32  # bfloat16 included
  return float(np.asarray(total, dtype) / np.asarray(count, dtype))


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def optimizer_for(config, num_steps: int):
  """make_optimizer with the model family's `trainable(config, params)` hook when it has one (frozen params: no
  update, no weight decay, no Adam moments; e.g. HMAR stage 2 trains only its mask branch)."""
  trainable = getattr(models.family_module(config), "trainable", None)
  return make_optimizer(config, num_steps,
                        trainable=None if trainable is None else functools.partial(trainable, config))


def initial_state(config, setup) -> TrainState:
  """A fresh state, or with config.train.init_from the params (and buffers) of that checkpoint, passed through
  the family's `adapt_restored_params(config, params)` hook when it has one (HMAR stage 2 from stage 1)."""
  init_from = config.train.get("init_from", "")
  if not init_from:
    state = init_train_state(setup, config.seed)
    log.info("initialised %s parameters", f"{count_params(state.params):,}")
    return state
  adapt = getattr(models.family_module(config), "adapt_restored_params", None)
  state = init_train_state_from(setup, config.seed, init_from, field=config.train.get("init_from_field", "params"),
                                adapt=None if adapt is None else functools.partial(adapt, config))
  log.info("initialised %s parameters from %s", f"{count_params(state.params):,}", init_from)
  return state


def train(config, workdir: str, *, stop_after: int | None = None) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final state.

  `stop_after` ends the loop after that many steps of this call (tests use it to interrupt a run; the schedule
  and data are unchanged, so resuming continues exactly as an uninterrupted run).
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.mesh_from_config(config)
  dp = sharding_lib.data_parallel_size(mesh)
  if config.data.global_batch_size % dp:
    raise ValueError(f"config.data.global_batch_size={config.data.global_batch_size} is not divisible by the "
                     f"data-parallel size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
                     f"use a multiple of {dp} or change config.mesh.shape.")
  num_steps = int(config.train.num_steps)
  setup = make_train_setup(models.model_fn(config), optimizer_for(config, num_steps), mesh)
  data_iter = data.make_train_iterator(config)
  ckpt = ckpt_lib.Checkpointer(checkpoint_dir(workdir), max_to_keep=config.train.keep_checkpoints,
                               save_interval_steps=1, async_save=config.train.async_checkpoint)
  start = ckpt.latest_step()
  if start is None:
    state = initial_state(config, setup)
    start = 0
  else:
    state = ckpt.restore(start, setup.abstract_state, data_iter)
    log.info("resumed from %s at step %d", ckpt.directory, start)
  step_fn = make_train_step(setup, config.optim.ema_decay, gradients=config.mesh.get("gradients", "spmd"))

  is_main = jax.process_index() == 0
  # Only process 0 writes TensorBoard events and console metrics; the others get a writer that drops them.
  writer = (metric_writers.create_default_writer(workdir, asynchronous=True) if is_main
            else metric_writers.MultiWriter([]))
  if start == 0:
    writer.write_hparams({k: v for k, v in config_lib.flatten(config).items()
                          if isinstance(v, (int, float, str, bool))})
  hooks = [periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)]
  if config.train.get("profile_steps", 0) and is_main:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.train.profile_steps))

  end = num_steps if stop_after is None else min(num_steps, start + stop_after)
  log_every, ckpt_every = int(config.train.log_every), int(config.train.checkpoint_every)
  averages = MetricAverages()
  last_good = ckpt.latest_step()

  def check_finite(step):
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      ckpt.wait()
      where = (f"the last good checkpoint is step {last_good} in {ckpt.directory}" if last_good is not None
               else "no checkpoint was written before it")
      raise TrainingDiverged(f"loss or gradient norm became NaN/Inf at step {bad} (detected at step {step}); "
                             f"{where}. Lower config.optim.lr / base_lr or raise config.optim.warmup_steps, then "
                             "resume from that checkpoint.")

  progress = tqdm(total=end, initial=start, desc="train", unit="step", disable=not is_main
                  or not config.train.progress_bar, dynamic_ncols=True)
  with _sigterm_flag() as sigterm, progress:
    step = start
    t0 = time.time()
    while step < end:
      batch = sharding_lib.shard_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch)
      step += 1
      averages.add(metrics)
      for hook in hooks:
        hook(step)
      progress.update(1)
      if step % log_every == 0 or step == end:
        check_finite(step)
        summary = {f"train/{k}": v for k, v in averages.pop().items()}
        summary["train/steps_per_sec"] = log_every / max(time.time() - t0, 1e-9)
        writer.write_scalars(step, summary)
        progress.set_postfix(loss=f"{summary['train/loss']:.4f}")
        t0 = time.time()
      if step % ckpt_every == 0 or step == end or sigterm["set"]:
        check_finite(step)
        ckpt.save(step, state, data_iter, force=True)
        last_good = step
      if sigterm["set"]:
        log.warning("SIGTERM: saved step %d to %s; exiting", step, ckpt.directory)
        break
  ckpt.wait()
  ckpt.close()
  writer.flush()
  writer.close()
  return state
