"""Activation checkpointing changes memory, never numbers: gradients with every remat policy equal the plain ones."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.himar import get_config
from himar_jax import models
from himar_jax.nn.transformer import REMAT_POLICIES, call_checkpointed, check_remat


@functools.lru_cache(maxsize=None)  # the plain run is shared by the tests below (each is one CPU compile)
def _loss_and_grads(remat: str, buckets: int, dropout: float = 0.1, scan: bool = False, dit_remat: str = "same"):
  config = get_config("himar_tiny")
  config.model.remat = remat
  config.model.dit_remat = dit_remat
  config.model.scan_blocks = scan
  config.model.train_encoder_buckets = buckets  # a 2-way switch in training: its branches are checkpointed too
  config.model.dropout = dropout  # dropout on: the recomputation must reuse the same masks
  model = models.model_fn(config)(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Perturb every parameter: at init the heads' zero-initialised output layers hide the backbone (and dropout).
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  batch = {"latent": jnp.asarray(rng.standard_normal((4, 16, 16, 16)), jnp.float32),
           "latent_small": jnp.asarray(rng.standard_normal((4, 8, 8, 16)), jnp.float32),
           "label": jnp.asarray([0, 3, 5, 9], jnp.int32)}

  @jax.jit
  def loss_fn(params):
    m = nnx.merge(graphdef, params, rest)
    return m.train_loss(batch, key=jax.random.key(1), step=3)[0]

  return jax.value_and_grad(loss_fn)(params)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_plain_gradients(remat):
  loss0, grads0 = _loss_and_grads("none", 2)
  loss1, grads1 = _loss_and_grads(remat, 2)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(grads0), jax.tree.leaves(grads1)
  assert len(flat0) == len(flat1)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)
  # Every parameter but the unused ones gets a gradient, the backbone's included.
  assert sum(float(jnp.abs(g).max()) > 0 for g in flat0) > 0.9 * len(flat0)


def test_dit_head_remat_is_its_own_and_changes_no_number():
  """config.model.dit_remat: the DiT head checkpointed on its own (here full, the backbone not at all) gives the
  plain loss and gradients; 'same' follows remat; a bad value is named with the fix."""
  config = get_config("himar_tiny")
  config.model.remat, config.model.dit_remat = "none", "full"
  model = models.model_fn(config)(nnx.Rngs(0))
  assert (model.remat, model.dit_head.remat) == ("none", "full")
  config.model.remat, config.model.dit_remat = "dots", "same"
  model = models.model_fn(config)(nnx.Rngs(0))
  assert (model.remat, model.dit_head.remat) == ("dots", "dots")
  config.model.dit_remat = "some"
  with pytest.raises(ValueError, match=r"dit_remat='some' is not 'same' \(the backbone's remat\) or one of"):
    models.model_fn(config)
  loss0, grads0 = _loss_and_grads("none", 2)
  loss1, grads1 = _loss_and_grads("none", 2, dit_remat="full")
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)


def test_scanned_blocks_give_the_unrolled_loss_and_gradients():
  """scan_blocks (one lax.scan per stack, checkpointed with `dots` inside): same loss and gradients as the unrolled
  plain step, dropout on (the same keys in the same order)."""
  loss0, grads0 = _loss_and_grads("none", 1)
  loss1, grads1 = _loss_and_grads("dots", 1, scan=True)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(grads0), jax.tree.leaves(grads1)
  assert len(flat0) == len(flat1)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-7)


def test_dropout_is_active_in_training():
  loss0, _ = _loss_and_grads("none", 2, dropout=0.0)
  loss1, _ = _loss_and_grads("none", 2)  # dropout 0.1
  assert abs(float(loss1) - float(loss0)) > 1e-4


def test_checkpointed_call_matches_plain_call_and_rejects_unknown_policy():
  layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 3))
  for policy in REMAT_POLICIES:
    np.testing.assert_allclose(call_checkpointed(layer, policy, x), layer(x), rtol=1e-6)
  with pytest.raises(ValueError, match="remat policy 'some' is not one of"):
    check_remat("some")
