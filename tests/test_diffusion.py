"""Gaussian diffusion: float64 re-derivations, closed forms, and parity with the official PyTorch code.

Fixtures in tests/fixtures/diffusion/ come from tests/fixtures/make_diffusion.py (official LTH14/mar and
HiDream-ai/himar diffusion packages, injected t / noise / per-step noise, a closed-form stand-in model).
"""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from himar_jax.diffusion import (GaussianDiffusion, create_diffusion, discretized_gaussian_log_likelihood,
                                 named_beta_schedule, normal_kl, space_timesteps)

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "diffusion")


def load(name):
  return dict(np.load(os.path.join(FIX, name)))


def fake_model(w1, f, w2=None, seen=None):
  """JAX twin of make_diffusion.make_torch_model (channel-last): eps = tanh(x W1 + sin(t f)), var = tanh(x W2)."""
  w1, f = jnp.asarray(w1), jnp.asarray(f)

  def model(x, t):
    if seen is not None:
      seen.append(1)
    temb = jnp.sin(t.astype(jnp.float32)[:, None] * f[None]).reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (-1,))
    eps = jnp.tanh(x @ w1 + temb)
    return jnp.concatenate([eps, jnp.tanh(x @ jnp.asarray(w2))], -1) if w2 is not None else eps

  return model


def nchw_to_last(x):
  return np.moveaxis(x, 1, -1)


# ---------------------------------------------------------------------------------------------------------------
# Schedules and respacing
# ---------------------------------------------------------------------------------------------------------------

def test_cosine_schedule_matches_closed_form():
  s = np.arange(1001, dtype=np.float64) / 1000
  abar = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
  expected = np.minimum(1.0 - abar[1:] / abar[:-1], 0.999)
  betas = named_beta_schedule("cosine", 1000)
  np.testing.assert_allclose(betas, expected, rtol=1e-13, atol=0)
  assert betas[-1] == 0.999 and betas.dtype == np.float64  # the clip is active at the last step
  d = create_diffusion("")
  # Where no clip applies, the cumulative product is the alpha-bar curve itself (normalised at t=0).
  np.testing.assert_allclose(d.np["alphas_cumprod"][:-1], abar[1:-1] / abar[0], rtol=1e-12)
  assert d._c["betas"].dtype == np.float32
  np.testing.assert_array_equal(d._c["betas"], betas.astype(np.float32))


def test_linear_schedule_and_tables_match_official():
  np.testing.assert_allclose(named_beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000), rtol=1e-15)
  np.testing.assert_allclose(named_beta_schedule("linear", 500)[[0, -1]], [2e-4, 0.04], rtol=1e-15)
  tab = load("tables.npz")
  for sched in ("cosine", "linear"):
    d = create_diffusion("", noise_schedule=sched)
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance",
                 "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                 "sqrt_recipm1_alphas_cumprod"):
      np.testing.assert_allclose(d.np[name], tab[f"{sched}/{name}"], rtol=1e-12, atol=1e-300, err_msg=name)
  with pytest.raises(ValueError, match="'quad'"):
    named_beta_schedule("quad", 10)


def test_posterior_matches_gaussian_conditioning():
  d = create_diffusion("")
  b = d.np["betas"]
  abar_prev = d.np["alphas_cumprod_prev"]
  # q(x_{t-1}|x_0) = N(sqrt(abar_prev) x0, 1 - abar_prev), q(x_t|x_{t-1}) = N(sqrt(1-b) x_{t-1}, b): condition.
  t = np.arange(1, 1000)
  prec = 1.0 / (1.0 - abar_prev[t]) + (1.0 - b[t]) / b[t]
  var = 1.0 / prec
  np.testing.assert_allclose(d.np["posterior_variance"][t], var, rtol=1e-10)
  np.testing.assert_allclose(d.np["posterior_mean_coef1"][t], var * np.sqrt(abar_prev[t]) / (1 - abar_prev[t]),
                             rtol=1e-10)
  np.testing.assert_allclose(d.np["posterior_mean_coef2"][t], var * np.sqrt(1 - b[t]) / b[t], rtol=1e-10)
  assert d.np["posterior_variance"][0] == 0.0
  assert d.np["posterior_log_variance_clipped"][0] == np.log(d.np["posterior_variance"][1])
  # Traced float32 lookups against the float64 formulas.
  rng = np.random.default_rng(1)
  x0, xt = rng.standard_normal((2, 5, 3))
  ts = np.array([0, 1, 17, 500, 999])
  mean, v, lv = d.q_posterior_mean_variance(jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), ts)
  c1, c2 = d.np["posterior_mean_coef1"][ts, None], d.np["posterior_mean_coef2"][ts, None]
  np.testing.assert_allclose(mean, c1 * x0 + c2 * xt, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(v[:, 0], d.np["posterior_variance"][ts], rtol=1e-6)
  np.testing.assert_allclose(lv[:, 0], d.np["posterior_log_variance_clipped"][ts], rtol=1e-6)
  # q_sample / predict_xstart_from_eps invert each other.
  noise = rng.standard_normal((5, 3)).astype(np.float32)
  x_t = d.q_sample(jnp.asarray(x0, jnp.float32), ts, jnp.asarray(noise))
  np.testing.assert_allclose(d.predict_xstart_from_eps(x_t, ts, jnp.asarray(noise)), x0, rtol=1e-3, atol=2e-3)


@pytest.mark.parametrize("counts,length,head,tail", [
    # 999 / 99 = 10.09...: the stride is fractional, so the sixth gap is 11 and the last kept step is 999.
    ("100", 100, [0, 10, 20, 30, 40, 50, 61, 71], [979, 989, 999]),
    ("250", 250, [0, 4, 8, 12, 16, 20], [991, 995, 999]),
    ("ddim25", 25, [0, 40, 80, 120], [880, 920, 960]),
    # 999 / 6 = 166.5: Python's round-half-even gives 166 (and 832 from 832.5), as the reference does.
    ("7", 7, [0, 166, 333, 500], [666, 832, 999]),
    ("1000", 1000, [0, 1, 2], [997, 998, 999]),
    (1, 1, [0], [0]),
])
def test_space_timesteps_iddpm_rule(counts, length, head, tail):
  steps = space_timesteps(1000, counts)
  assert len(steps) == length and steps[:len(head)] == head and steps[-len(tail):] == tail


def test_respacing_matches_official_and_keeps_alpha_bar():
  tab = load("tables.npz")
  base = create_diffusion("")
  for resp in ("100", "250", "ddim25", "10,20,30", "7"):
    d = create_diffusion(resp)
    np.testing.assert_array_equal(d.timestep_map, tab[f"respace/{resp}/timestep_map"])
    np.testing.assert_allclose(d.np["betas"], tab[f"respace/{resp}/betas"], rtol=1e-12)
    # A spaced process visits the base process's alpha-bar at exactly the kept steps.
    np.testing.assert_allclose(d.np["alphas_cumprod"], base.np["alphas_cumprod"][d.timestep_map], rtol=1e-8)
  # Sections: 300 steps as [10, 15, 20] -> strides within each 100-step section (the docstring example).
  steps = space_timesteps(300, [10, 15, 20])
  assert len(steps) == 45 and steps[:2] == [0, 11] and steps[10] == 100 and steps[-1] == 299
  with pytest.raises(ValueError, match="no integer stride"):
    space_timesteps(1000, "ddim3000")
  with pytest.raises(ValueError, match="fewer than"):
    space_timesteps(10, "20")
  with pytest.raises(ValueError, match="var_type"):
    GaussianDiffusion(named_beta_schedule("cosine", 10), var_type="learned")


def test_model_sees_original_timesteps():
  d = create_diffusion("250")
  np.testing.assert_array_equal(d.model_timesteps(jnp.array([0, 1, 248, 249])), [0, 4, 995, 999])


# ---------------------------------------------------------------------------------------------------------------
# KL and decoder likelihood
# ---------------------------------------------------------------------------------------------------------------

def test_normal_kl_matches_numerical_integral():
  cases = [(0.3, -1.0, -0.2, 0.5), (0.0, 0.0, 0.0, 0.0), (1.5, 0.7, 0.1, -2.0)]
  x = np.linspace(-30, 30, 600001)
  for m1, lv1, m2, lv2 in cases:
    p = np.exp(-0.5 * (x - m1) ** 2 / np.exp(lv1)) / np.sqrt(2 * np.pi * np.exp(lv1))
    logp = -0.5 * (x - m1) ** 2 / np.exp(lv1) - 0.5 * np.log(2 * np.pi * np.exp(lv1))
    logq = -0.5 * (x - m2) ** 2 / np.exp(lv2) - 0.5 * np.log(2 * np.pi * np.exp(lv2))
    integral = integrate.trapezoid(p * (logp - logq), x)
    got = float(normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
    assert abs(got - integral) < 1e-5 * max(1.0, abs(integral)), (m1, lv1, m2, lv2, got, integral)


def test_discretized_gaussian_log_likelihood():
  rng = np.random.default_rng(2)
  x = np.concatenate([[-1.0, 1.0, -0.9995, 0.9995], rng.uniform(-0.99, 0.99, 12)])
  # Means near x and moderate scales keep bin probabilities >~1e-3, where float32 cdf differences are accurate.
  means = x + rng.normal(0, 0.05, x.shape)
  log_scales = rng.uniform(-3, -1, x.shape)
  got = np.asarray(discretized_gaussian_log_likelihood(jnp.asarray(x, jnp.float32), means=jnp.asarray(
      means, jnp.float32), log_scales=jnp.asarray(log_scales, jnp.float32)))

  def cdf(v, approx):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))) if approx else special.ndtr(v)

  for approx, tol in ((True, 1e-3), (False, 3e-3)):
    inv = np.exp(-log_scales)
    plus, minus = cdf(inv * (x - means + 1 / 255), approx), cdf(inv * (x - means - 1 / 255), approx)
    ref = np.where(x < -0.999, np.log(np.maximum(plus, 1e-12)),
                   np.where(x > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))))
    # log-probabilities; compare as probabilities where the exact CDF is the reference.
    if approx:
      np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-4)
    else:
      np.testing.assert_allclose(np.exp(got), np.exp(ref), atol=tol)
  with pytest.raises(ValueError, match="one shape"):
    discretized_gaussian_log_likelihood(jnp.zeros(3), means=jnp.zeros(2), log_scales=jnp.zeros(3))


# ---------------------------------------------------------------------------------------------------------------
# Training losses (official parity)
# ---------------------------------------------------------------------------------------------------------------

def test_training_losses_match_official():
  f = load("training_losses.npz")
  d = create_diffusion("")
  seen_t = []

  def model(x_t, t):
    seen_t.append(t)
    return jnp.asarray(f["model_output"])

  terms = d.training_losses(model, jnp.asarray(f["x_start"]), jnp.asarray(f["t"]), jnp.asarray(f["noise"]))
  np.testing.assert_array_equal(seen_t[0], f["t"])
  np.testing.assert_allclose(terms["mse"], f["mse"], rtol=1e-5)
  np.testing.assert_allclose(terms["vb"], f["vb"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(terms["loss"], f["loss"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(d.q_sample(jnp.asarray(f["x_start"]), jnp.asarray(f["t"]), jnp.asarray(f["noise"])),
                             f["x_t"], rtol=1e-5, atol=1e-6)


def test_vb_term_does_not_train_the_mean():
  f = load("training_losses.npz")
  d = create_diffusion("")
  c = f["x_start"].shape[1]

  def total(out):
    return d.training_losses(lambda x, t: out, jnp.asarray(f["x_start"]), jnp.asarray(f["t"]),
                             jnp.asarray(f["noise"]))["loss"].sum()

  out = jnp.asarray(f["model_output"])
  g = jax.grad(total)(out)
  # Only the mse reaches the eps channels: d/d eps of mean((noise - eps)^2) = -2 (noise - eps) / C.
  np.testing.assert_allclose(g[:, :c], -2.0 * (f["noise"] - f["model_output"][:, :c]) / c, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g[:, c:]).sum()) > 0.0  # the variance channels learn from vb


def test_masked_mse_matches_himar():
  f = load("masked_mse.npz")
  d = create_diffusion("", learn_sigma=False)
  out = jnp.asarray(nchw_to_last(f["model_output"]))
  terms = d.training_losses(lambda x, t: out, jnp.asarray(nchw_to_last(f["x_start"])), jnp.asarray(f["t"]),
                            jnp.asarray(nchw_to_last(f["noise"])), mse_mask=jnp.asarray(f["mask"])[..., None])
  assert set(terms) == {"mse", "loss"}
  np.testing.assert_allclose(terms["mse"], f["mse"], rtol=1e-5)
  np.testing.assert_allclose(terms["loss"], f["loss"], rtol=1e-5)


def test_training_losses_bad_shapes():
  d = create_diffusion("")
  with pytest.raises(ValueError, match="learned-sigma model must output"):
    d.training_losses(lambda x, t: x, jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="one timestep per row"):
    d.training_losses(lambda x, t: x, jnp.zeros((2, 4)), jnp.zeros(3, jnp.int32), jnp.zeros((2, 4)))


# ---------------------------------------------------------------------------------------------------------------
# Sampling loops (official parity)
# ---------------------------------------------------------------------------------------------------------------

def test_ddpm_step_and_loop_match_official():
  f = load("ddpm_loop.npz")
  d = create_diffusion("100")
  np.testing.assert_array_equal(f["model_t"], d.timestep_map[::-1])  # the official model saw original indices
  seen_t = []
  base = fake_model(f["w1"], f["f"], f["w2"])

  def model(x, t):
    seen_t.append(t)
    return base(x, t)

  temp = float(f["temperature"])
  first, _ = d.p_sample(model, jnp.asarray(f["x_init"]), 99, jnp.asarray(f["step_noise"][0]), temperature=temp)
  np.testing.assert_array_equal(seen_t[0], [999] * 4)
  np.testing.assert_allclose(first, f["first_step"], rtol=1e-5, atol=1e-5)
  final = jax.jit(lambda x, n: d.p_sample_loop(base, x, step_noise=n, temperature=temp))(
      jnp.asarray(f["x_init"]), jnp.asarray(f["step_noise"]))
  np.testing.assert_allclose(final, f["final"], rtol=1e-4, atol=1e-4)


def test_ddim_loop_matches_official():
  f = load("ddim_loop.npz")
  d = create_diffusion("ddim25", learn_sigma=False)
  np.testing.assert_array_equal(f["model_t"], d.timestep_map[::-1])
  final = d.ddim_sample_loop(fake_model(f["w1"], f["f"]), jnp.asarray(nchw_to_last(f["x_init"])),
                             step_noise=jnp.asarray(np.moveaxis(f["step_noise"], 2, -1)), eta=float(f["eta"]))
  np.testing.assert_allclose(final, nchw_to_last(f["final"]), rtol=1e-4, atol=1e-4)


def test_repaint_loop_matches_himar():
  f = load("repaint_loop.npz")
  d = create_diffusion("50", learn_sigma=False)
  final = d.p_sample_loop(fake_model(f["w1"], f["f"]), jnp.asarray(nchw_to_last(f["x_init"])),
                          step_noise=jnp.asarray(np.moveaxis(f["step_noise"], 2, -1)),
                          known=jnp.asarray(nchw_to_last(f["tokens"])), predict_mask=jnp.asarray(f["mask"]))
  np.testing.assert_allclose(final, nchw_to_last(f["final"]), rtol=1e-4, atol=1e-4)


def test_sample_loop_traces_model_once_and_uses_keys():
  d = create_diffusion("25")
  rng = np.random.default_rng(3)
  seen = []
  model = fake_model(rng.standard_normal((3, 3)).astype(np.float32) / 2, np.full(3, 0.01, np.float32),
                     rng.standard_normal((3, 3)).astype(np.float32), seen=seen)
  x = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
  run = jax.jit(lambda x, key, temp: d.p_sample_loop(model, x, key=key, temperature=temp))
  a = run(x, jax.random.key(0), 1.0)
  b = run(x, jax.random.key(0), 0.5)
  assert len(seen) == 1  # one trace for 25 steps and two temperatures: no per-step recompilation
  np.testing.assert_array_equal(a, run(x, jax.random.key(0), 1.0))
  assert not np.allclose(a, b) and not np.allclose(a, run(x, jax.random.key(1), 1.0))
  # temperature 0 is the noiseless mean path, the same for any key.
  np.testing.assert_allclose(run(x, jax.random.key(5), 0.0), run(x, jax.random.key(6), 0.0), rtol=1e-6)
  # DDIM with eta = 0 is deterministic and needs no key.
  np.testing.assert_array_equal(d.ddim_sample_loop(model, x), d.ddim_sample_loop(model, x))


def test_sample_loop_bad_input():
  d = create_diffusion("10")
  model = lambda x, t: jnp.concatenate([x, x], -1)  # noqa: E731
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="pass key= or step_noise="):
    d.p_sample_loop(model, x)
  with pytest.raises(ValueError, match=r"step_noise must have shape \(10, 2, 3\)"):
    d.p_sample_loop(model, x, step_noise=jnp.zeros((9, 2, 3)))
  with pytest.raises(ValueError, match="both known= and predict_mask="):
    d.p_sample_loop(model, x, key=jax.random.key(0), known=x)
  with pytest.raises(ValueError, match="'ddpm', 'ddim'"):
    d.sample_loop(model, x, key=jax.random.key(0), method="euler")


def test_fixed_variances():
  d_large = create_diffusion("100", learn_sigma=False)
  d_small = create_diffusion("100", learn_sigma=False, sigma_small=True)
  x = jnp.ones((3, 2))
  t = jnp.array([0, 1, 99])
  large = d_large.p_mean_variance(x, x, t)["variance"][:, 0]
  small = d_small.p_mean_variance(x, x, t)["variance"][:, 0]
  b, pv = d_large.np["betas"], d_large.np["posterior_variance"]
  np.testing.assert_allclose(large, [pv[1], b[1], b[99]], rtol=1e-6)
  np.testing.assert_allclose(small, [pv[0], pv[1], pv[99]], rtol=1e-6, atol=1e-30)
  # learned range spans [clipped posterior, beta] in log space.
  d = create_diffusion("100")
  lo = d.p_mean_variance(jnp.concatenate([x, -x], -1), x, t)["log_variance"][:, 0]
  hi = d.p_mean_variance(jnp.concatenate([x, x], -1), x, t)["log_variance"][:, 0]
  np.testing.assert_allclose(lo, d.np["posterior_log_variance_clipped"][[0, 1, 99]], rtol=1e-6)
  np.testing.assert_allclose(hi, np.log(b[[0, 1, 99]]), rtol=1e-6)
  assert math.isclose(float(d.np["betas"][0]), float(d_large.np["betas"][0]))
