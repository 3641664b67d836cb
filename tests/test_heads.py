"""Diffusion heads: parity with the official SimpleMLPAdaLN / DiffLoss and Hi-MAR DiT / GlobalDiffLoss.

Fixtures in tests/fixtures/heads/ come from tests/fixtures/make_heads.py (official classes at tiny random
weights, injected timesteps and noise). Official weights are loaded through himar_jax.convert.heads, so every
parity test also exercises the key mapping.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from himar_jax.convert.heads import convert_head_state_dict, head_param_path, load_head_state_dict
from himar_jax.diffusion import create_diffusion
from himar_jax.models import heads as H
from himar_jax.nn import layers

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "heads")


@nnx.jit
def forward(head, x, t, z):
  return head(x, t, z)


def load(name):
  return dict(np.load(os.path.join(FIX, name)))


def state_dict(f):
  return {k: v for k, v in f.items() if k.startswith("sd/")}


def close(got, want, rel=1e-4):
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  scale = float(np.max(np.abs(want)))
  err = float(np.max(np.abs(got - want)))
  assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def to_tokens(x):  # NCHW -> (N, H*W, C), row-major
  return np.moveaxis(x, 1, -1).reshape(x.shape[0], -1, x.shape[1])


def mlp_head(f, dtype=jnp.float32):
  head = H.MlpHead(int(f["cfg/in_channels"]), int(f["cfg/z_channels"]), int(f["cfg/width"]), int(f["cfg/depth"]),
                   rngs=nnx.Rngs(0), dtype=dtype)
  assert load_head_state_dict(head, "mlp", state_dict(f), prefix="sd/") == []
  return head


def dit_head(f, dtype=jnp.float32):
  head = H.DiTHead(int(f["cfg/in_channels"]), int(f["cfg/z_channels"]), int(f["cfg/width"]), int(f["cfg/depth"]),
                   int(f["cfg/heads"]), mlp_ratio=float(f["cfg/ratio"]), rngs=nnx.Rngs(0), dtype=dtype)
  assert load_head_state_dict(head, "dit", state_dict(f), prefix="sd/") == ["sd/c_pos_embed", "sd/pos_embed"]
  return head


@pytest.fixture(scope="module")
def mlp():
  f = load("mlp_head.npz")
  return f, mlp_head(f)


@pytest.fixture(scope="module")
def dit():
  f = load("dit_head.npz")
  return f, dit_head(f)


# ---------------------------------------------------------------------------------------------------------------
# MLP head
# ---------------------------------------------------------------------------------------------------------------

def test_mlp_head_forward_matches_official(mlp):
  f, head = mlp
  out = forward(head, jnp.asarray(f["x"]), jnp.asarray(f["t"]), jnp.asarray(f["z"]))
  assert out.shape == (6, 8) and out.dtype == jnp.float32
  close(out, f["out"])


def test_mlp_head_loss_matches_official(mlp):
  f, head = mlp
  diff = create_diffusion("")
  args = (jnp.asarray(f["target"]), jnp.asarray(f["z"]))
  kw = dict(t=jnp.asarray(f["t"]), noise=jnp.asarray(f["noise"]))
  loss = nnx.jit(lambda head, target, z, mask, t, noise: H.mlp_head_loss(head, diff, target, z, mask, t=t,
                                                                         noise=noise))
  close(loss(head, *args, jnp.asarray(f["mask"]), **kw), f["loss"])
  close(loss(head, *args, None, **kw), f["loss_nomask"])
  # Tokens with mask 0 do not count: changing their targets leaves the loss unchanged.
  target2 = np.array(f["target"])
  target2[f["mask"] == 0] += 5.0
  close(loss(head, jnp.asarray(target2), args[1], jnp.asarray(f["mask"]), **kw), f["loss"])


def test_mlp_head_sample_matches_official(mlp):
  f, head = mlp
  gen = create_diffusion("100")
  b = f["init_noise"].shape[0]
  got = H.mlp_head_sample(head, gen, jnp.asarray(f["z_cfg"]), cfg_scale=float(f["cfg"]),
                          temperature=float(f["temperature_cfg"]), noise=jnp.asarray(f["init_noise"]),
                          step_noise=jnp.asarray(f["step_noise_cfg"][:, :b]))
  close(got, f["sample_cfg"][:b])
  got = H.mlp_head_sample(head, gen, jnp.asarray(f["z_cfg"][:b]), noise=jnp.asarray(f["init_noise"]),
                          step_noise=jnp.asarray(f["step_noise"]))
  close(got, f["sample"])


def test_mlp_head_init_and_axes():
  head = H.MlpHead(4, 8, 32, 2, rngs=nnx.Rngs(1))
  # adaLN and the output layer start at zero: the fresh head predicts 0 for any input.
  out = forward(head, jnp.ones((3, 4)), jnp.array([0, 5, 999]), jnp.ones((3, 8)))
  np.testing.assert_array_equal(out, np.zeros((3, 8)))
  for blk in head.res_blocks:
    np.testing.assert_array_equal(blk.adaln.kernel.get_value(), 0.0)
  assert abs(float(jnp.std(head.time_embed.fc1.kernel.get_value())) - 0.02) < 0.003
  names = nnx.to_flat_state(nnx.state(head, nnx.Param))
  axes = {p: v.get_metadata().get("sharding_names") or v.get_metadata().get("out_sharding") for p, v in names}
  assert axes[("res_blocks", 0, "fc1", "kernel")] == ("embed", "mlp")
  assert all(v.get_value().dtype == jnp.float32 for _, v in names)


def test_mlp_head_bfloat16_close_to_float32(mlp):
  f, head32 = mlp
  head16 = mlp_head(f, dtype=jnp.bfloat16)
  args = (jnp.asarray(f["x"]), jnp.asarray(f["t"]), jnp.asarray(f["z"]))
  out16 = forward(head16, *args)
  assert out16.dtype == jnp.float32
  close(out16, forward(head32, *args), rel=5e-2)


def test_timestep_embedding_closed_form():
  t = np.array([0.0, 3.0, 999.0])
  emb = np.asarray(H.timestep_embedding(jnp.asarray(t), 8))
  freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
  np.testing.assert_allclose(emb, np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# DiT head
# ---------------------------------------------------------------------------------------------------------------

def test_sincos_pos_embed_channel_order():
  pe = H.sincos_pos_embed_2d(8, 3)  # quarter = 2 frequencies: 1 and 1/100
  row, col = 1, 2
  tok = pe[row * 3 + col]
  np.testing.assert_allclose(tok, [np.sin(col), np.sin(col / 100), np.cos(col), np.cos(col / 100),
                                   np.sin(row), np.sin(row / 100), np.cos(row), np.cos(row / 100)], rtol=1e-6)
  with pytest.raises(ValueError, match="divisible by 4"):
    H.sincos_pos_embed_2d(6, 3)


def test_dit_head_forward_matches_official(dit):
  f, head = dit
  out = forward(head, jnp.asarray(to_tokens(f["x"])), jnp.asarray(f["t"]), jnp.asarray(to_tokens(f["z"])))
  assert out.shape == (2, 256, 4)
  close(out, to_tokens(f["out"]))
  # Default mixed precision (bfloat16 matmuls and attention inputs, float32 norms / residual) stays close.
  out16 = forward(dit_head(f, dtype=jnp.bfloat16), jnp.asarray(to_tokens(f["x"])), jnp.asarray(f["t"]),
                  jnp.asarray(to_tokens(f["z"])))
  assert out16.dtype == jnp.float32
  close(out16, to_tokens(f["out"]), rel=5e-2)


def test_dit_head_loss_matches_official(dit):
  f, head = dit
  mask = f["mask"].reshape(2, -1)
  kw = dict(t=jnp.asarray(f["t"]), noise=jnp.asarray(to_tokens(f["noise"])))
  z = jnp.asarray(to_tokens(f["z"]))
  loss = nnx.jit(lambda head, target, z, mask, t, noise: H.dit_head_loss(
      head, create_diffusion("", learn_sigma=False), target, z, mask, t=t, noise=noise))
  close(loss(head, jnp.asarray(to_tokens(f["target"])), z, jnp.asarray(mask), **kw), f["loss"])
  # Unmasked positions do not count: only their (eps - eps_hat) would change, and it is multiplied by 0.
  d = create_diffusion("", learn_sigma=False)
  x_t = d.q_sample(jnp.asarray(to_tokens(f["target"])), kw["t"], kw["noise"])
  eps = forward(head, x_t, kw["t"], z)
  manual = np.mean(np.sum(((np.asarray(kw["noise"]) - np.asarray(eps)) * mask[..., None]) ** 2, (1, 2)) / (256 * 4))
  close(manual, f["loss"])


def test_dit_head_sample_matches_official(dit):
  f, head = dit
  steps = np.random.default_rng(int(f["step_noise_seed"])).standard_normal((250,) + f["z_cfg"].shape[:1] + (
      4, 16, 16)).astype(np.float32)
  np.testing.assert_array_equal(steps[:2, :, 0, 0, :4], f["step_noise_head"])  # same draws as the fixture script
  b = f["init_noise"].shape[0]
  step_noise = np.stack([to_tokens(s[:b]) for s in steps])
  gen = create_diffusion("250", learn_sigma=False)
  run = jax.jit(lambda z, known, pm, x0, sn: H.dit_head_sample(
      head, gen, z, known=known, predict_mask=pm, cfg_scale=float(f["cfg"]), temperature=float(f["temperature"]),
      noise=x0, step_noise=sn))
  got = run(jnp.asarray(to_tokens(f["z_cfg"])), jnp.asarray(to_tokens(f["tokens"])),
            jnp.asarray(f["predict_mask"].reshape(b, -1)), jnp.asarray(to_tokens(f["init_noise"])),
            jnp.asarray(step_noise))
  close(got, to_tokens(f["sample_cfg"][:b]))


def test_dit_head_init_and_errors():
  head = H.DiTHead(4, 8, 32, 1, 2, grid_size=4, rngs=nnx.Rngs(0))
  out = forward(head, jnp.ones((1, 16, 4)), jnp.array([10]), jnp.ones((1, 16, 8)))
  np.testing.assert_array_equal(out, np.zeros((1, 16, 4)))  # zero-initialised adaLN and output layer
  bound = 1 / np.sqrt(8)  # the official c_embedder keeps PyTorch's default conv init
  w = np.asarray(head.c_embedder.kernel.get_value())
  assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
  with pytest.raises(ValueError, match=r"\(N, 16, 4\)"):
    head(jnp.ones((1, 15, 4)), jnp.array([10]), jnp.ones((1, 15, 8)))
  with pytest.raises(ValueError, match="z must be"):
    head(jnp.ones((1, 16, 4)), jnp.array([10]), jnp.ones((2, 16, 8)))
  with pytest.raises(ValueError, match="known must be"):
    H.dit_head_sample(head, create_diffusion("5", learn_sigma=False), jnp.ones((1, 16, 8)),
                      known=jnp.ones((1, 16, 3)), predict_mask=jnp.ones((1, 16), bool), key=jax.random.key(0))


def test_head_samplers_with_keys():
  head = H.MlpHead(4, 8, 16, 1, rngs=nnx.Rngs(0))
  # Perturb every weight: the zero-initialised output layer would make guidance irrelevant.
  leaves, tree = jax.tree.flatten(nnx.state(head, nnx.Param))

  @jax.jit
  def perturb(leaves, key):
    keys = jax.random.split(key, len(leaves))
    return [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]

  nnx.update(head, jax.tree.unflatten(tree, perturb(leaves, jax.random.key(3))))
  gen = create_diffusion("10")
  z = jax.random.normal(jax.random.key(4), (4, 8))  # 2 conditional rows, then 2 unconditional rows
  run = nnx.jit(lambda head, z, cfg, key: H.mlp_head_sample(head, gen, z, cfg_scale=cfg, key=key))
  a = run(head, z, 3.0, jax.random.key(0))
  assert a.shape == (2, 4)
  np.testing.assert_array_equal(a, run(head, z, 3.0, jax.random.key(0)))
  assert not np.allclose(a, run(head, z, 1.0, jax.random.key(0)))  # the guidance scale is a traced input
  with pytest.raises(ValueError, match="key= or noise="):
    H.mlp_head_sample(head, gen, z)
  with pytest.raises(ValueError, match="even count"):
    H.mlp_head_sample(head, gen, z[:3], cfg_scale=2.0, key=jax.random.key(0))
  with pytest.raises(ValueError, match="key="):
    H.mlp_head_loss(head, create_diffusion(""), jnp.ones((4, 4)), z)


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts and conversion
# ---------------------------------------------------------------------------------------------------------------

SIZES = {"b": (768, (1024, 6), (512, 6, 8)), "l": (1024, (1280, 8), (512, 8, 8)), "h": (1280, (1536, 12), (768, 12, 12))}


def _count(build):
  abstract = nnx.eval_shape(build)
  return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


@pytest.mark.parametrize("size", ["b", "l", "h"])
def test_param_counts_match_official(size):
  with open(os.path.join(FIX, "param_counts.json")) as fh:
    official = json.load(fh)
  dz, (w, depth), (dw, ddepth, heads) = SIZES[size]
  assert _count(lambda: H.MlpHead(16, dz, w, depth, rngs=nnx.Rngs(0))) == official[f"mlp_{size}"]
  # The official DiT also registers pos_embed (fixed) and c_pos_embed (unused) as parameters: 2 x 256 x width.
  ours = _count(lambda: H.DiTHead(16, dz, dw, ddepth, heads, rngs=nnx.Rngs(0)))
  assert ours + 2 * 256 * dw == official[f"dit_{size}"]


def test_converter_maps_every_key():
  for name, kind, dropped in (("mlp_head.npz", "mlp", []), ("dit_head.npz", "dit", ["sd/c_pos_embed",
                                                                                   "sd/pos_embed"])):
    sd = state_dict(load(name))
    converted, left = convert_head_state_dict(kind, sd, prefix="sd/")
    assert left == dropped and len(converted) + len(left) == len(sd)
  # Within a whole checkpoint the prefix selects the head; other keys are ignored.
  sd = state_dict(load("mlp_head.npz"))
  full = {"diffloss.net." + k[3:]: v for k, v in sd.items()} | {"z_proj.weight": np.zeros((2, 2))}
  converted, _ = convert_head_state_dict("mlp", full, prefix="diffloss.net.")
  assert converted[("res_blocks", 1, "norm", "scale")].shape == (32,)
  np.testing.assert_array_equal(converted[("input_proj", "kernel")], sd["sd/input_proj.weight"].T)
  assert head_param_path("dit", "x_embedder.proj.weight", 4) == ("x_embedder", "kernel")
  with pytest.raises(KeyError, match="y_embedder"):
    head_param_path("dit", "y_embedder.embedding_table.weight", 2)
  with pytest.raises(ValueError, match="no mlp head weights"):
    convert_head_state_dict("mlp", full, prefix="cond_diffloss.net.")


def test_converter_rejects_mismatched_head():
  sd = state_dict(load("mlp_head.npz"))
  wrong = H.MlpHead(4, 8, 32, 3, rngs=nnx.Rngs(0))  # one block more than the checkpoint
  with pytest.raises(ValueError, match=r"missing: res_blocks\.2\.fc1\.kernel"):
    load_head_state_dict(wrong, "mlp", sd, prefix="sd/")
  wrong = H.MlpHead(4, 16, 32, 2, rngs=nnx.Rngs(0))  # condition width 16 instead of 8
  with pytest.raises(ValueError, match=r"shape: cond_embed\.kernel is \(16, 32\) in the model, \(8, 32\)"):
    load_head_state_dict(wrong, "mlp", sd, prefix="sd/")
  sd = state_dict(load("dit_head.npz"))
  sd["sd/pos_embed"] = sd["sd/pos_embed"][:, ::-1].copy()
  with pytest.raises(ValueError, match="not the fixed 2D sin-cos"):
    convert_head_state_dict("dit", sd, prefix="sd/")


def _eqns_by_loop_depth(jaxpr, depth=0):
  """(loop nesting depth, eqn) for every equation of a jaxpr and its sub-jaxprs (loops: while, scan)."""
  for eqn in jaxpr.eqns:
    yield depth, eqn
    inner = depth + (eqn.primitive.name in ("while", "scan"))
    for v in eqn.params.values():
      for j in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
          yield from _eqns_by_loop_depth(j.jaxpr, inner)
        elif hasattr(j, "eqns"):
          yield from _eqns_by_loop_depth(j, inner)


def _dots_by_loop_depth(jaxpr):
  """[(loop nesting depth, rhs shape)] of every dot_general."""
  return [(d, tuple(e.invars[1].aval.shape)) for d, e in _eqns_by_loop_depth(jaxpr)
          if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("kind", ["mlp", "dit"])
def test_samplers_embed_the_condition_once_outside_the_diffusion_loop(kind):
  """z is fixed within a sampling loop: its embedding (the only matmul contracting z's 8 channels) runs once,
  outside the loop, while the timestep-dependent layers run inside it."""
  if kind == "mlp":
    head = H.MlpHead(4, 8, 16, 1, rngs=nnx.Rngs(0))
    run = lambda z: H.mlp_head_sample(head, create_diffusion("5"), z, cfg_scale=2.0, key=jax.random.key(0))
    z = jnp.ones((6, 8))
  else:
    head = H.DiTHead(4, 8, 32, 1, 2, grid_size=4, rngs=nnx.Rngs(0))
    run = lambda z: H.dit_head_sample(head, create_diffusion("5", learn_sigma=False), z, cfg_scale=2.0,
                                      known=jnp.zeros((1, 16, 4)), predict_mask=jnp.ones((1, 16), bool),
                                      key=jax.random.key(0))
    z = jnp.ones((2, 16, 8))
  dots = _dots_by_loop_depth(jax.make_jaxpr(run)(z).jaxpr)
  embeds = [d for d, shape in dots if shape[0] == 8]
  assert embeds == [0], dots
  assert any(d >= 1 for d, _ in dots)  # the denoiser itself runs inside the loop


def _converts_by_loop_depth(jaxpr):
  """[(loop nesting depth, input shape, input dtype, output dtype)] of every convert_element_type."""
  return [(d, tuple(e.invars[0].aval.shape), e.invars[0].aval.dtype, e.params["new_dtype"])
          for d, e in _eqns_by_loop_depth(jaxpr) if e.primitive.name == "convert_element_type"]


@pytest.mark.parametrize("kind", ["mlp", "dit"])
def test_samplers_cast_the_kernels_once_outside_the_diffusion_loop(kind):
  """Every Linear kernel is cast to bfloat16 before the loop (with_compute_dtype_kernels), none inside it (XLA
  left those casts in the while body: bench/notes.md v8), and the samples are bitwise those of the plain head."""
  if kind == "mlp":
    head = H.MlpHead(4, 8, 16, 1, rngs=nnx.Rngs(0))
    run = lambda head, z: H.mlp_head_sample(head, create_diffusion("5"), z, cfg_scale=2.0, key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (6, 8))  # 3 rows x 2 CFG halves: no activation is kernel-shaped
  else:
    head = H.DiTHead(4, 8, 32, 1, 2, grid_size=4, rngs=nnx.Rngs(0))
    run = lambda head, z: H.dit_head_sample(head, create_diffusion("5", learn_sigma=False), z, cfg_scale=2.0,
                                            known=jnp.zeros((1, 16, 4)), predict_mask=jnp.ones((1, 16), bool),
                                            key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), (2, 16, 8))
  kernels = {tuple(layer.kernel.get_value().shape) for _, layer in nnx.iter_modules(head)
             if isinstance(layer, nnx.Linear)}
  converts = [(d, shape) for d, shape, src, dst in _converts_by_loop_depth(jax.make_jaxpr(lambda z: run(head, z))(z).jaxpr)
              if shape in kernels and src == jnp.float32 and dst == jnp.bfloat16]
  assert converts and all(d == 0 for d, _ in converts), converts
  copy = layers.with_compute_dtype_kernels(head)
  assert all(layer.kernel.get_value().dtype == jnp.bfloat16 for _, layer in nnx.iter_modules(copy)
             if isinstance(layer, nnx.Linear))
  assert all(layer.kernel.get_value().dtype == jnp.float32 for _, layer in nnx.iter_modules(head)
             if isinstance(layer, nnx.Linear))  # the original is untouched
  # The casts are the ones each layer does at every call: the copy's outputs equal the head's bit for bit (every
  # kernel and bias random, so neither the zero-initialised layers nor the attention's folded v bias hide a
  # difference).
  for i, (_, layer) in enumerate(nnx.iter_modules(head)):
    if isinstance(layer, nnx.Linear):
      layer.kernel.set_value(0.3 * jax.random.normal(jax.random.key(i), layer.kernel.get_value().shape))
      layer.bias.set_value(0.1 * jax.random.normal(jax.random.key(100 + i), layer.bias.get_value().shape))
  copy = layers.with_compute_dtype_kernels(head)
  if kind == "mlp":
    args = (jax.random.normal(jax.random.key(7), (6, 4)), jnp.arange(6), z)
  else:
    args = (jax.random.normal(jax.random.key(7), (2, 16, 4)), jnp.arange(2), z)
  want = np.asarray(jax.jit(lambda *a: head(*a))(*args))
  assert np.abs(want).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda *a: copy(*a))(*args)), want)
