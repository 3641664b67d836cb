"""Gaussian diffusion: schedules, IDDPM respacing, mse + vb losses, DDPM / DDIM samplers with RePaint."""
from himar_jax.diffusion.gaussian import (GaussianDiffusion, approx_standard_normal_cdf, betas_for_alpha_bar,
                                          create_diffusion, discretized_gaussian_log_likelihood, mean_flat,
                                          named_beta_schedule, normal_kl, space_timesteps)

__all__ = ["GaussianDiffusion", "approx_standard_normal_cdf", "betas_for_alpha_bar", "create_diffusion",
           "discretized_gaussian_log_likelihood", "mean_flat", "named_beta_schedule", "normal_kl",
           "space_timesteps"]
