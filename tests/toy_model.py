"""A tiny model with the trainer's interface, for tests of the trainer itself (sharding, resume, NaN)."""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from himar_jax import config_lib
from himar_jax.nn.layers import dense, layer_norm


class ToyRegressor(nnx.Module):
  """y = W2 gelu(LN(W1 x)); learns a fixed random linear map. Width 16 splits over every axis of a 2x2x2 mesh."""

  def __init__(self, rngs: nnx.Rngs, dim: int = 8, hidden: int = 16):
    self.fc1 = dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=jnp.float32)
    self.norm = layer_norm(hidden, rngs=rngs)
    self.fc2 = dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=jnp.float32)
    self.dropout = nnx.Dropout(0.1)

  def __call__(self, x, rngs=None):
    h = self.dropout(nnx.gelu(self.norm(self.fc1(x))), deterministic=rngs is None, rngs=rngs)
    return self.fc2(h)

  def train_loss(self, batch, *, key, step=None):
    pred = self(batch["x"], rngs=nnx.Rngs(dropout=key))
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, {"pred_norm": jnp.mean(jnp.abs(pred))}


def toy_batch(seed: int, n: int = 16, dim: int = 8):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, dim))
  w = jax.random.normal(jax.random.key(1234), (dim, dim)) / dim ** 0.5
  return {"x": x, "y": x @ w}


def toy_config() -> ml_collections.ConfigDict:
  c = config_lib.trainer_defaults()
  c.data.global_batch_size = 16
  c.optim.lr = 1e-2
  c.optim.warmup_steps = 0
  c.optim.ema_decay = 0.9
  return c
