"""orbax checkpoints: the full train state plus the grain iterator state, async; EMA-only restore for sampling.

Layout: <dir>/<step>/state (params, ema_params, opt_state, buffers, step, rng, nonfinite_step) and
<dir>/<step>/data (grain iterator state, one file per process).
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                           enable_async_checkpointing=async_save, create=not read_only,
                                           read_only=read_only)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data"), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores onto the shardings held by `abstract_state` (any mesh); sets `data_iterator`'s position."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def resolve_step_dir(directory: str, step: int | None = None) -> tuple[str, int]:
  """Returns (<dir>/<step>, step) for `step` or the latest finished checkpoint, with a clear error if none."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory!r} does not exist; pass --checkpoint=DIR with the "
                            "'checkpoints' folder of a training workdir (or an orbax checkpoint from `convert`).")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit() and
                 os.path.isdir(os.path.join(directory, n, "state")))
  if not steps:
    raise FileNotFoundError(f"no finished checkpoint (a <step>/state folder) in {directory!r}.")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"checkpoint step {step} not in {directory!r}; available steps: {steps}.")
  return os.path.join(directory, str(step)), step


def restore_subtrees(directory: str, abstract: dict, *, step: int | None = None) -> dict:
  """Restores some top-level fields of a saved train state (e.g. {'ema_params': ..., 'buffers': ...}) alone,
  onto the shardings of the ShapeDtypeStructs in `abstract`; the optimizer state is never read, so sampling
  restores onto any mesh (one device included)."""
  step_dir, _ = resolve_step_dir(directory, step)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(os.path.join(step_dir, "state"),
                             args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args,
                                                         partial_restore=True))
  return {k: restored[k] for k in abstract}
