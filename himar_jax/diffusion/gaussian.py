"""Gaussian diffusion (IDDPM / ADM / DiT flavour, as used by MAR and Hi-MAR), in JAX.

What the published MAR and Hi-MAR checkpoints were trained and sampled with:
- beta schedules 'cosine' (alpha-bar cos^2((t + 0.008) / 1.008 * pi / 2), betas clipped at 0.999) and 'linear';
  every coefficient is computed in float64 NumPy and looked up as float32 (the official `_extract_into_tensor`
  casts after indexing, which gives the same float32 values);
- timestep respacing with IDDPM's `space_timesteps` rule; the spaced process keeps the ORIGINAL timestep index
  of every retained step in `timestep_map` and the model is always called with those original indices;
- epsilon prediction; variance either learned ('learned_range': the extra output channels v in [-1, 1]
  interpolate the log variance between the clipped posterior variance and beta), 'fixed_large' (beta, with the
  posterior variance at t=0) or 'fixed_small' (the posterior variance);
- training loss mse + vb where vb is the variational-bound term in bits computed with a stop-gradient mean (KL
  for t > 0, discretized Gaussian decoder NLL at t = 0);
- ancestral (DDPM) sampling where `temperature` multiplies the per-step noise, DDIM sampling (eta), and the
  RePaint-style re-imposition of known values used by Hi-MAR's DiT head.

Layout: any array (B, ...) with the batch first; the variance channels of a learned-sigma model are the second
half of the LAST axis (channel-last; the official code splits dim 1 of NCHW, which is the same split after a
transpose). All randomness is passed in as noise arrays or PRNG keys.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")

# model_fn(x_t, t_model) -> model output; t_model holds ORIGINAL (unspaced) timestep indices, int32 (B,).
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------------------------
# Schedules and respacing (float64 NumPy, host side)
# ----------------------------------------------------------------------------------------------------------------

def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
  """Betas whose cumulative product follows alpha_bar(t) on t = i / num_steps, each clipped at max_beta."""
  out = np.empty(num_steps, dtype=np.float64)
  for i in range(num_steps):
    ratio = alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps)
    out[i] = min(1.0 - ratio, max_beta)
  return out


def cosine_alpha_bar(t: float, s: float = 0.008) -> float:
  return math.cos((t + s) / (1.0 + s) * math.pi / 2) ** 2


def named_beta_schedule(name: str, num_steps: int = 1000) -> np.ndarray:
  """'linear' (Ho et al., scaled so that any step count spans the same range) or 'cosine' (Nichol & Dhariwal)."""
  if num_steps < 1:
    raise ValueError(f"num_steps={num_steps} must be a positive number of diffusion steps.")
  if name == "linear":
    scale = 1000.0 / num_steps
    return np.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=np.float64)
  if name == "cosine":
    return betas_for_alpha_bar(num_steps, cosine_alpha_bar, max_beta=0.999)
  raise ValueError(f"noise schedule {name!r} is not one of 'linear', 'cosine'.")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
  """The timesteps IDDPM keeps when respacing `num_timesteps` (sorted).

  section_counts: 'ddimN' (the single stride giving exactly N steps, DDIM paper), a comma-separated string or a
  sequence of per-section step counts (the process is cut into equal sections and each section strided evenly,
  with Python's round-half-even on the fractional positions, as the reference does), or an int (one section).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      wanted = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == wanted:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"respacing {section_counts!r}: no integer stride gives exactly {wanted} of "
                       f"{num_timesteps} steps; pick another count or use a plain count like '{wanted}'.")
    section_counts = [int(c) for c in section_counts.split(",")]
  elif isinstance(section_counts, int):
    section_counts = [section_counts]
  counts = list(section_counts)
  base, extra = divmod(num_timesteps, len(counts))
  kept: list[int] = []
  start = 0
  for k, count in enumerate(counts):
    size = base + (1 if k < extra else 0)
    if size < count:
      raise ValueError(f"respacing {counts}: section {k} has {size} steps, fewer than the {count} asked for.")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    pos = 0.0
    for _ in range(count):
      kept.append(start + round(pos))
      pos += stride
    start += size
  return sorted(set(kept))


# ----------------------------------------------------------------------------------------------------------------
# Closed-form pieces (float32, traced)
# ----------------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by IDDPM's decoder likelihood."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
  """log P(bin of x) in nats under N(means, exp(log_scales)^2), bins of width 2/255 on [-1, 1] (open ends)."""
  if not (x.shape == means.shape == log_scales.shape):
    raise ValueError(f"x {x.shape}, means {means.shape} and log_scales {log_scales.shape} must have one shape.")
  centered = x - means
  inv_std = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(x):
  """Mean over every axis but the first."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


# ----------------------------------------------------------------------------------------------------------------
# The process
# ----------------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
  """A (possibly respaced) Gaussian diffusion process with epsilon prediction.

  betas: the base process's betas (float64); use_timesteps: the retained original steps (None keeps all). The
  spaced process has betas 1 - abar[k] / abar[previous kept], exactly as IDDPM's SpacedDiffusion; index i of
  the spaced process is original step `timestep_map[i]`.
  """

  def __init__(self, betas, *, var_type: str = "learned_range", use_timesteps: Iterable[int] | None = None):
    if var_type not in VAR_TYPES:
      raise ValueError(f"var_type={var_type!r} is not one of {VAR_TYPES}.")
    base = np.asarray(betas, dtype=np.float64)
    if base.ndim != 1 or not ((base > 0).all() and (base <= 1).all()):
      raise ValueError(f"betas must be a 1-D array in (0, 1]; got shape {base.shape}, "
                       f"range [{base.min() if base.size else None}, {base.max() if base.size else None}].")
    self.original_num_steps = int(base.shape[0])
    if use_timesteps is None:
      keep = list(range(self.original_num_steps))
    else:
      keep = sorted(set(int(k) for k in use_timesteps))
      if not keep or keep[0] < 0 or keep[-1] >= self.original_num_steps:
        raise ValueError(f"use_timesteps must lie in [0, {self.original_num_steps}); got {keep[:3]}...{keep[-3:]}.")
    base_abar = np.cumprod(1.0 - base)
    new_betas, last = [], 1.0
    for k in keep:
      new_betas.append(1.0 - base_abar[k] / last)
      last = base_abar[k]
    b = np.asarray(new_betas, dtype=np.float64)

    self.var_type = var_type
    self.timestep_map = np.asarray(keep, dtype=np.int32)
    self.num_timesteps = int(b.shape[0])
    abar = np.cumprod(1.0 - b)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = b * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t = 0: its log is clipped by repeating the t = 1 value.
    post_log_var = np.log(np.append(post_var[1], post_var[1:])) if self.num_timesteps > 1 else np.zeros(1)
    large_var = np.append(post_var[1], b[1:]) if self.num_timesteps > 1 else b.copy()
    # float64 tables; `_c` holds their float32 copies used by the traced code.
    self.np = dict(
        betas=b, log_betas=np.log(b), alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        one_minus_alphas_cumprod=1.0 - abar, log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
        posterior_variance=post_var, posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef1=b * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar),
        fixed_large_variance=large_var, fixed_large_log_variance=np.log(large_var),
    )
    self._c = {k: v.astype(np.float32) for k, v in self.np.items()}

  @property
  def learn_sigma(self) -> bool:
    return self.var_type == "learned_range"

  def _take(self, name: str, t, ndim: int):
    """Coefficient `name` at spaced indices t (scalar or (B,)), shaped to broadcast against a rank-`ndim` array."""
    v = jnp.asarray(self._c[name])[jnp.asarray(t, jnp.int32)]
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))

  def model_timesteps(self, t):
    """Original timestep indices the model sees for spaced indices t."""
    return jnp.asarray(self.timestep_map)[jnp.asarray(t, jnp.int32)]

  # -- forward process ---------------------------------------------------------------------------------------
  def q_mean_variance(self, x_start, t):
    n = x_start.ndim
    mean = self._take("sqrt_alphas_cumprod", t, n) * x_start
    return mean, self._take("one_minus_alphas_cumprod", t, n), self._take("log_one_minus_alphas_cumprod", t, n)

  def q_sample(self, x_start, t, noise):
    """x_t ~ q(x_t | x_0) with the given standard-normal noise."""
    if noise.shape != x_start.shape:
      raise ValueError(f"noise {noise.shape} must have the shape of x_start {x_start.shape}.")
    n = x_start.ndim
    return (self._take("sqrt_alphas_cumprod", t, n) * x_start
            + self._take("sqrt_one_minus_alphas_cumprod", t, n) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
    n = x_t.ndim
    mean = self._take("posterior_mean_coef1", t, n) * x_start + self._take("posterior_mean_coef2", t, n) * x_t
    return mean, self._take("posterior_variance", t, n), self._take("posterior_log_variance_clipped", t, n)

  def predict_xstart_from_eps(self, x_t, t, eps):
    n = x_t.ndim
    return self._take("sqrt_recip_alphas_cumprod", t, n) * x_t - self._take("sqrt_recipm1_alphas_cumprod", t, n) * eps

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    n = x_t.ndim
    return ((self._take("sqrt_recip_alphas_cumprod", t, n) * x_t - pred_xstart)
            / self._take("sqrt_recipm1_alphas_cumprod", t, n))

  # -- reverse process -----------------------------------------------------------------------------------------
  def split_output(self, model_output, x):
    """(eps, variance values or None) from a model output; learned sigma doubles the last axis."""
    c = x.shape[-1]
    if self.learn_sigma:
      if model_output.shape != x.shape[:-1] + (2 * c,):
        raise ValueError(f"a learned-sigma model must output {x.shape[:-1] + (2 * c,)} (eps and variance "
                         f"channels on the last axis); got {model_output.shape}.")
      return model_output[..., :c], model_output[..., c:]
    if model_output.shape != x.shape:
      raise ValueError(f"a fixed-variance model must output the shape of x {x.shape}; got {model_output.shape}.")
    return model_output, None

  def p_mean_variance(self, model_output, x, t, *, clip_denoised: bool = False):
    """p(x_{t-1} | x_t) from a model output: dict(mean, variance, log_variance, pred_xstart)."""
    n = x.ndim
    eps, var_values = self.split_output(model_output.astype(jnp.float32), x)
    if self.var_type == "learned_range":
      min_log = self._take("posterior_log_variance_clipped", t, n)
      max_log = self._take("log_betas", t, n)
      frac = (var_values + 1.0) / 2.0  # the model's [-1, 1] maps onto [min_var, max_var] in log space
      log_var = frac * max_log + (1.0 - frac) * min_log
      var = jnp.exp(log_var)
    elif self.var_type == "fixed_large":
      var = jnp.broadcast_to(self._take("fixed_large_variance", t, n), x.shape)
      log_var = jnp.broadcast_to(self._take("fixed_large_log_variance", t, n), x.shape)
    else:
      var = jnp.broadcast_to(self._take("posterior_variance", t, n), x.shape)
      log_var = jnp.broadcast_to(self._take("posterior_log_variance_clipped", t, n), x.shape)
    pred_xstart = self.predict_xstart_from_eps(x, t, eps)
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_xstart=pred_xstart)

  # -- training ------------------------------------------------------------------------------------------------
  def vb_terms_bpd(self, model_output, x_start, x_t, t):
    """Per-row variational-bound term in bits: decoder NLL where t == 0, KL(q posterior || p) elsewhere."""
    true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
    nll = mean_flat(nll) / math.log(2.0)
    return jnp.where(jnp.asarray(t) == 0, nll, kl)

  def training_losses(self, model_fn: ModelFn, x_start, t, noise, *, mse_mask=None) -> dict:
    """Per-row losses at spaced indices t (B,) with the given noise: dict(mse, loss[, vb]).

    mse is the mean over non-batch axes of (noise - eps_hat)^2 (multiplied by `mse_mask` before squaring when
    given, as Hi-MAR's DiT head does: the mean still divides by every element). With a learned sigma, vb is
    added; its gradient reaches only the variance channels (stop-gradient on eps_hat).
    """
    x_start = x_start.astype(jnp.float32)
    t = jnp.asarray(t, jnp.int32)
    if t.shape != x_start.shape[:1]:
      raise ValueError(f"t must hold one timestep per row: shape {x_start.shape[:1]}, got {t.shape}.")
    x_t = self.q_sample(x_start, t, noise)
    model_output = model_fn(x_t, self.model_timesteps(t)).astype(jnp.float32)
    eps, var_values = self.split_output(model_output, x_t)
    terms = {}
    if var_values is not None:
      frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var_values], axis=-1)
      terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
    err = noise - eps
    if mse_mask is not None:
      err = err * mse_mask
    terms["mse"] = mean_flat(jnp.square(err))
    terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
    return terms

  # -- sampling ------------------------------------------------------------------------------------------------
  def _full_t(self, x, i):
    return jnp.full((x.shape[0],), i, jnp.int32) if jnp.ndim(i) == 0 else jnp.asarray(i, jnp.int32)

  def p_sample(self, model_fn: ModelFn, x, i, noise, *, temperature=1.0, clip_denoised: bool = False):
    """One ancestral step from spaced index i; `temperature` multiplies the step noise (none at i == 0)."""
    t = self._full_t(x, i)
    out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised=clip_denoised)
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
    return sample, out["pred_xstart"]

  def ddim_sample(self, model_fn: ModelFn, x, i, noise, *, eta=0.0, temperature=1.0, clip_denoised: bool = False):
    """One DDIM step (Song et al. eq. 12) from spaced index i; eta = 0 is deterministic."""
    t = self._full_t(x, i)
    n = x.ndim
    out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised=clip_denoised)
    eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
    abar = self._take("alphas_cumprod", t, n)
    abar_prev = self._take("alphas_cumprod_prev", t, n)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
    mean = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1.0 - abar_prev - sigma ** 2) * eps
    nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (n - 1))
    return mean + nonzero * sigma * noise * temperature, out["pred_xstart"]

  def sample_loop(self, model_fn: ModelFn, x_init, *, key=None, step_noise=None, temperature=1.0,
                  known=None, predict_mask=None, method: str = "ddpm", eta=0.0, clip_denoised: bool = False):
    """Runs every spaced step from x_init (the x_T noise) down to 0 in one lax.fori_loop.

    Step noise: `step_noise` (num_timesteps, *x.shape) in loop order (row 0 is used by the first step, index
    T-1), or drawn from `key` with fold_in(key, loop step). RePaint (Hi-MAR's DiT head): with `known` (x's
    shape) and `predict_mask` (True where values are generated; broadcastable to x), each step first overwrites
    the known positions of x with q_sample(known, i, x_init), then takes the step; the result of the last step
    is returned as is, like the reference loop.
    """
    if method not in ("ddpm", "ddim"):
      raise ValueError(f"sampling method={method!r} is not one of 'ddpm', 'ddim'.")
    if key is not None and step_noise is not None:
      raise ValueError("pass one of key= or step_noise= (the per-step noise source), not both.")
    noiseless = method == "ddim" and isinstance(eta, (int, float)) and eta == 0.0
    if key is None and step_noise is None and not noiseless:
      raise ValueError(f"method={method!r} (eta={eta}) draws noise each step: pass key= or step_noise=.")
    if step_noise is not None and step_noise.shape != (self.num_timesteps,) + x_init.shape:
      raise ValueError(f"step_noise must have shape {(self.num_timesteps,) + x_init.shape} "
                       f"(steps, *x.shape); got {step_noise.shape}.")
    if (known is None) != (predict_mask is None):
      raise ValueError("RePaint needs both known= and predict_mask= (or neither).")
    x_init = x_init.astype(jnp.float32)
    if known is not None:
      if known.shape != x_init.shape:
        raise ValueError(f"known {known.shape} must have the shape of x_init {x_init.shape}.")
      predict_mask = jnp.asarray(predict_mask, bool)
      predict_mask = predict_mask.reshape(predict_mask.shape + (1,) * (x_init.ndim - predict_mask.ndim))
    num = self.num_timesteps

    def body(k, x):
      i = num - 1 - k
      if known is not None:
        x = jnp.where(predict_mask, x, self.q_sample(known.astype(jnp.float32), self._full_t(x, i), x_init))
      if step_noise is not None:
        noise = step_noise[k].astype(jnp.float32)
      elif key is not None:
        noise = jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32)
      else:
        noise = jnp.zeros_like(x)
      if method == "ddpm":
        x, _ = self.p_sample(model_fn, x, i, noise, temperature=temperature, clip_denoised=clip_denoised)
      else:
        x, _ = self.ddim_sample(model_fn, x, i, noise, eta=eta, temperature=temperature,
                                clip_denoised=clip_denoised)
      return x

    return jax.lax.fori_loop(0, num, body, x_init)

  def p_sample_loop(self, model_fn: ModelFn, x_init, **kwargs):
    return self.sample_loop(model_fn, x_init, method="ddpm", **kwargs)

  def ddim_sample_loop(self, model_fn: ModelFn, x_init, *, eta=0.0, **kwargs):
    return self.sample_loop(model_fn, x_init, method="ddim", eta=eta, **kwargs)


def create_diffusion(timestep_respacing: str | int | Sequence[int] | None = "", *, noise_schedule: str = "cosine",
                     learn_sigma: bool = True, sigma_small: bool = False,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
  """The process MAR / Hi-MAR build: e.g. create_diffusion('') for training, create_diffusion('100') to sample.

  learn_sigma picks 'learned_range'; otherwise 'fixed_large' ('fixed_small' with sigma_small).
  """
  betas = named_beta_schedule(noise_schedule, diffusion_steps)
  if timestep_respacing in (None, ""):
    keep = None
  else:
    keep = space_timesteps(diffusion_steps, timestep_respacing)
  var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
  return GaussianDiffusion(betas, var_type=var_type, use_timesteps=keep)
