"""himar_jax: hierarchical masked autoregressive image generation (Hi-MAR, MAR, HMAR, VAR) in JAX/Flax NNX."""
import flax as _flax

# Variables are created unsharded and carry logical axis names as metadata; shardings are computed once from
# `himar_jax.parallel.sharding.LOGICAL_AXIS_RULES` and applied by jitted init / restore (maxtext style).
# Eager sharding would instead require a mesh context wherever a module is built (tests, eval_shape, convert).
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
