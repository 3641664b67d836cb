"""One home for putting named arrays into NNX variables: official PyTorch state dicts (tokenizers, MAR / Hi-MAR,
diffusion heads, VAR / HMAR, FID Inception) and orbax param trees (training's `init_from`).

A loader maps each source key to our variable path (a tuple, as nnx.to_flat_state gives it) and its array to our
layout (`map_state_dict` with a per-key `map_key`, or a converter of its own), then `load` checks everything at
once (unexpected keys, shape mismatches, missing variables), raising one CheckpointMismatchError that names them
all, and only then writes the values, so a failed load leaves the model untouched.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

MAX_LISTED = 40  # problems listed in one error; the rest are counted


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the model (shape mismatch, missing or unexpected keys)."""


@dataclasses.dataclass
class LoadReport:
  """What a load did: missing model entries and unexpected checkpoint keys by name; skipped keys (tolerated
  shape mismatches of non-parameter buffers) and zero-filled non-parameter variables."""
  missing: list[str]
  unexpected: list[str]
  skipped: list[str]
  zero_filled: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"missing ({len(self.missing)}): {self.missing}", f"unexpected ({len(self.unexpected)}): "
             f"{self.unexpected}"]
    if self.skipped:
      lines.append(f"skipped buffers ({len(self.skipped)}): {self.skipped}")
    return "\n".join(lines)


def path_name(path: Sequence) -> str:
  """('blocks', 0, 'attn', 'kernel') -> 'blocks.0.attn.kernel' (the PyTorch-style dotted name); strings pass."""
  if isinstance(path, str):
    return path
  return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def flat_variables(module_or_state, *filters) -> dict[tuple, object]:
  """{path: nnx.Variable} of a module (or nnx.State), optionally filtered (e.g. nnx.Param)."""
  from flax import nnx

  state = module_or_state if isinstance(module_or_state, nnx.State) else nnx.state(module_or_state, *filters)
  return dict(nnx.to_flat_state(state))


def map_state_dict(state_dict: Mapping[str, np.ndarray], map_key: Callable[[str, np.ndarray], tuple | None]
                   ) -> tuple[dict[tuple, np.ndarray], dict[tuple, str], list[str]]:
  """Applies map_key(key, array) -> (our path, array in our layout) | None (dropped) to every key.
  Returns ({path: array}, {path: source key}, dropped keys)."""
  arrays, sources, dropped = {}, {}, []
  for key in sorted(state_dict):
    mapped = map_key(key, np.asarray(state_dict[key]))
    if mapped is None:
      dropped.append(key)
      continue
    path, value = mapped
    arrays[path], sources[path] = value, key
  return arrays, sources, dropped


def _shape(x) -> tuple:
  if isinstance(x, tuple):
    return x
  getter = getattr(x, "get_value", None)
  return tuple((getter() if getter is not None else x).shape)


def find_problems(arrays: Mapping[tuple, object], targets: Mapping[tuple, object], *, unexpected: Sequence[str] = (),
                  sources: Mapping[tuple, str] | None = None, originals: Mapping[str, object] | None = None,
                  what: str = "checkpoint", optional: Callable[[tuple], bool] | None = None,
                  tolerate_shape: Callable[[tuple], bool] | None = None) -> tuple[list[str], list[tuple]]:
  """(problem lines, paths whose shape mismatch is tolerated). targets / arrays hold anything with a shape
  (variables, arrays, ShapeDtypeStructs) or shape tuples, keyed by path tuples or dotted names; `optional` paths may be missing; `sources` / `originals` add the source
  key and its original shape to shape lines."""
  problems = [f"unexpected key: {k}" for k in unexpected]
  tolerated = []
  for path, value in arrays.items():
    name = path_name(path)
    if path not in targets:
      key = sources.get(path) if sources else None
      problems.append(f"unexpected: {name}" + (f" (key {key!r})" if key and key != name else ""))
      continue
    want, got = _shape(targets[path]), _shape(value)
    if want == got:
      continue
    if tolerate_shape is not None and tolerate_shape(path):
      tolerated.append(path)
      continue
    line = f"shape: {name} is {want} in the model, {got} in the {what}"
    key = sources.get(path) if sources else None
    if key is not None:
      orig = _shape(originals[key]) if originals is not None and key in originals else got
      line += f" ({key!r} has shape {orig}; the model expects {want} in the JAX layout)"
    problems.append(line)
  problems += [f"missing: {path_name(p)}" for p in targets
               if p not in arrays and not (optional is not None and optional(p))]
  return problems, tolerated


def raise_problems(problems: Sequence[str], header: str, error: type = CheckpointMismatchError) -> None:
  if problems:
    listed = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise error(f"{header}:\n  {listed}{more}")


def check_against(arrays: Mapping[tuple, object], targets: Mapping[tuple, object], *, unexpected: Sequence[str] = (),
                  what: str = "checkpoint", hint: str = "pick the config variant of the checkpoint's family and "
                  "size") -> None:
  """Raises CheckpointMismatchError naming every unexpected key, shape mismatch and missing target."""
  problems, _ = find_problems(arrays, targets, unexpected=unexpected, what=what)
  raise_problems(problems, f"the {what} does not fit the configured model ({hint})")


def load(targets: Mapping[tuple, object], arrays: Mapping[tuple, np.ndarray], *, header: str,
         unexpected: Sequence[str] = (), sources: Mapping[tuple, str] | None = None,
         originals: Mapping[str, object] | None = None, what: str = "checkpoint", allow_unexpected: bool = False,
         fill_missing: Callable[[tuple, object], bool] | None = None,
         tolerate_shape: Callable[[tuple], bool] | None = None, dtype=None,
         error: type = CheckpointMismatchError) -> LoadReport:
  """Checks, then writes `arrays` into the nnx.Variables `targets` ({path: variable}); returns a LoadReport.

  header: the error's first line (what was loaded into what, and the fix). unexpected: source keys that mapped
  to no path. sources / originals: {path: source key} and the source arrays, named in shape lines.
  allow_unexpected: unexpected keys / paths are reported instead of raised. fill_missing(path, var): missing
  variables it accepts are zero-filled (e.g. statistics buffers) instead of raised. tolerate_shape(path): a shape
  mismatch there drops the array (the variable then counts as missing). dtype: cast (default: the variable's).
  """
  import jax.numpy as jnp

  optional = (lambda p: False) if fill_missing is None else (lambda p: fill_missing(p, targets[p]))
  problems, tolerated = find_problems(arrays, targets, unexpected=unexpected, sources=sources, originals=originals,
                                      what=what, optional=optional, tolerate_shape=tolerate_shape)
  problems += [f"missing: {path_name(p)} (shape mismatch tolerated)" for p in tolerated if not optional(p)]
  if allow_unexpected:
    problems = [p for p in problems if not p.startswith("unexpected")]
  raise_problems(problems, header, error)
  names = lambda paths: [sources.get(p, path_name(p)) if sources else path_name(p) for p in paths]
  for path, value in arrays.items():
    if path in targets and path not in tolerated:
      var = targets[path]
      var.set_value(jnp.asarray(value, dtype or var.get_value().dtype))
  zero_filled = [p for p in targets if (p not in arrays or p in tolerated) and optional(p)]
  for path in zero_filled:
    var = targets[path]
    var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
  return LoadReport(missing=[], unexpected=list(unexpected) + names([p for p in arrays if p not in targets]),
                    skipped=names(tolerated), zero_filled=[path_name(p) for p in zero_filled])
