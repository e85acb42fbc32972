"""Diffusion maths in the EDM sigma formulation, as pure functions of arrays.

A noisy sample is ``x = x0 + sigma * eps`` (EDM, Karras et al. 2022). The variance-preserving variables of DDPM are
``z = alpha * x0 + sigma_vp * eps`` with ``alpha = 1 / sqrt(1 + sigma^2)`` and ``sigma_vp = sigma * alpha``, so
``z = alpha * x`` and ``logSNR = log(alpha^2 / sigma_vp^2) = -2 log(sigma)``. The probability-flow ODE is
``dx/dsigma = (x - D(x, sigma)) / sigma`` for a denoiser ``D(x, sigma) ~= E[x0 | x]``.

Preconditioning (EDM Table 1) wraps a raw network ``F`` into ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``:
``edm`` (EDM's own), ``vp`` (DDPM++ / VP-SDE with the continuous-time beta schedule) and ``ve`` (NCSN++ / VE-SDE).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

PRECONDITIONINGS = ("edm", "vp", "ve")


def coefficient_dtype(*dtypes) -> jnp.dtype:
  """The dtype in which noise levels, preconditioning and step coefficients are computed: float32 or wider.

  A low-precision state (bfloat16, float16) keeps its dtype for the network input only: ``sigma ** 2`` overflows
  float16 above sigma = 256 (EDM's ``sigma_max`` is 80, VE models reach 380), and neighbouring noise levels of a
  few-step grid collapse in bfloat16's 8-bit mantissa. ``coefficient_dtype(jnp.float16) == float32``;
  ``coefficient_dtype(jnp.float64) == float64``.
  """
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


class Coefficients(NamedTuple):
  """The four preconditioning coefficients of EDM Table 1 at one or more noise levels."""
  c_skip: jax.Array
  c_out: jax.Array
  c_in: jax.Array
  c_noise: jax.Array


@dataclasses.dataclass(frozen=True)
class Preconditioning:
  """How a raw network is turned into a denoiser, and the noise range it was trained on.

  Attributes:
    kind: ``edm``, ``vp`` or ``ve``.
    sigma_data: standard deviation of the data (EDM preconditioning only).
    sigma_min, sigma_max: the sampling range (EDM defaults: 0.002 and 80).
    beta_d, beta_min, vp_m, vp_epsilon_t: VP-SDE schedule (EDM's defaults: 19.9, 0.1, 1000, 1e-5).
    p_mean, p_std: log-normal training distribution of sigma (EDM loss).
  """
  kind: str = "edm"
  sigma_data: float = 0.5
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  beta_d: float = 19.9
  beta_min: float = 0.1
  vp_m: int = 1000
  vp_epsilon_t: float = 1e-5
  p_mean: float = -1.2
  p_std: float = 1.2

  def __post_init__(self):
    if self.kind not in PRECONDITIONINGS:
      raise ValueError(f"unknown preconditioning {self.kind!r}; expected one of {list(PRECONDITIONINGS)}")
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
    if self.sigma_data <= 0:
      raise ValueError(f"sigma_data must be positive, got {self.sigma_data}")

  def coefficients(self, sigma: jax.Array) -> Coefficients:
    """``(c_skip, c_out, c_in, c_noise)`` at ``sigma`` (any shape; returned with the same shape).

    Computed in ``coefficient_dtype(sigma.dtype)`` (float32 or wider): a float16 ``sigma`` is promoted first, since
    ``sigma ** 2`` overflows float16 above 256.
    """
    sigma = jnp.asarray(sigma)
    sigma = sigma.astype(coefficient_dtype(sigma.dtype))
    if self.kind == "edm":
      sd2 = self.sigma_data ** 2
      c_skip = sd2 / (sigma ** 2 + sd2)
      c_out = sigma * self.sigma_data / jnp.sqrt(sigma ** 2 + sd2)
      c_in = 1.0 / jnp.sqrt(sigma ** 2 + sd2)
      c_noise = jnp.log(sigma) / 4.0
    elif self.kind == "vp":
      c_skip = jnp.ones_like(sigma)
      c_out = -sigma
      c_in = 1.0 / jnp.sqrt(sigma ** 2 + 1.0)
      c_noise = (self.vp_m - 1) * vp_sigma_to_t(sigma, self.beta_d, self.beta_min)
    else:  # ve
      c_skip = jnp.ones_like(sigma)
      c_out = sigma
      c_in = jnp.ones_like(sigma)
      c_noise = jnp.log(0.5 * sigma)
    return Coefficients(c_skip, c_out, c_in, c_noise)

  def c_noise(self, sigma: jax.Array) -> jax.Array:
    return self.coefficients(sigma).c_noise

  def sample_training_sigma(self, rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Noise levels drawn from the training distribution of this preconditioning (EDM Table 1)."""
    if self.kind == "edm":
      return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, shape, dtype))
    if self.kind == "vp":
      t = 1.0 + jax.random.uniform(rng, shape, dtype) * (self.vp_epsilon_t - 1.0)
      return vp_t_to_sigma(t, self.beta_d, self.beta_min)
    log_sigma = jax.random.uniform(rng, shape, dtype, jnp.log(self.sigma_min), jnp.log(self.sigma_max))
    return jnp.exp(log_sigma)

  def loss_weight(self, sigma: jax.Array) -> jax.Array:
    """lambda(sigma) of EDM Table 1: makes the effective training target of ``F`` unit-variance."""
    if self.kind == "edm":
      return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
    return 1.0 / sigma ** 2


def vp_sigma_to_t(sigma: jax.Array, beta_d: float = 19.9, beta_min: float = 0.1) -> jax.Array:
  """Inverse of ``vp_t_to_sigma``: the VP-SDE time at which the EDM noise level is ``sigma``."""
  return (jnp.sqrt(beta_min ** 2 + 2.0 * beta_d * jnp.log1p(sigma ** 2)) - beta_min) / beta_d


def vp_t_to_sigma(t: jax.Array, beta_d: float = 19.9, beta_min: float = 0.1) -> jax.Array:
  """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of the continuous VP-SDE."""
  return jnp.sqrt(jnp.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


# --- noise-level parametrisations -------------------------------------------------------------------------------------

def sigma_to_alpha_sigma(sigma: jax.Array) -> tuple[jax.Array, jax.Array]:
  """EDM sigma -> VP ``(alpha, sigma_vp)`` with ``alpha^2 + sigma_vp^2 = 1``."""
  alpha = jax.lax.rsqrt(1.0 + sigma ** 2)
  return alpha, sigma * alpha


def alpha_sigma_to_sigma(alpha: jax.Array, sigma_vp: jax.Array) -> jax.Array:
  """VP ``(alpha, sigma_vp)`` -> EDM sigma (the ratio; works for non-normalised pairs too)."""
  return sigma_vp / alpha


def sigma_to_logsnr(sigma: jax.Array) -> jax.Array:
  return -2.0 * jnp.log(sigma)


def logsnr_to_sigma(logsnr: jax.Array) -> jax.Array:
  return jnp.exp(-0.5 * logsnr)


# --- prediction parametrisations (EDM variables: x = x0 + sigma * eps) --------------------------------------------------

def x0_from_eps(x: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
  return x - sigma * eps


def eps_from_x0(x: jax.Array, x0: jax.Array, sigma: jax.Array) -> jax.Array:
  return (x - x0) / sigma


def v_from_x0(x: jax.Array, x0: jax.Array, sigma: jax.Array) -> jax.Array:
  """v-prediction (Salimans & Ho 2022) in VP variables: ``v = alpha eps - sigma_vp x0``."""
  alpha, sigma_vp = sigma_to_alpha_sigma(sigma)
  return alpha * eps_from_x0(x, x0, sigma) - sigma_vp * x0


def x0_from_v(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
  """Inverse of ``v_from_x0``: with ``z = alpha x``, ``x0 = alpha z - sigma_vp v``."""
  alpha, sigma_vp = sigma_to_alpha_sigma(sigma)
  return alpha * (alpha * x) - sigma_vp * v


def eps_from_v(x: jax.Array, v: jax.Array, sigma: jax.Array) -> jax.Array:
  """``eps = sigma_vp z + alpha v`` with ``z = alpha x``."""
  alpha, sigma_vp = sigma_to_alpha_sigma(sigma)
  return sigma_vp * (alpha * x) + alpha * v


def add_noise(x0: jax.Array, sigma: jax.Array, noise: jax.Array) -> jax.Array:
  """Forward process: ``x = x0 + sigma * noise`` (sigma broadcast over the trailing axes of x0)."""
  return x0 + broadcast_to_batch(sigma, x0) * noise


def ode_derivative(x: jax.Array, x0_hat: jax.Array, sigma: jax.Array) -> jax.Array:
  """Probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
  return (x - x0_hat) / broadcast_to_batch(sigma, x)


def broadcast_to_batch(value: jax.Array, x: jax.Array) -> jax.Array:
  """Reshape a scalar or per-sample ``[B]`` value so that it broadcasts against ``x`` of shape ``[B, ...]``."""
  value = jnp.asarray(value)
  if value.ndim == 0:
    return value
  if value.ndim != 1 or value.shape[0] != x.shape[0]:
    raise ValueError(f"expected a scalar or a per-sample vector of shape ({x.shape[0]},), got shape {value.shape}")
  return value.reshape(value.shape + (1,) * (x.ndim - 1))


def edm_training_loss(denoise_fn, x0: jax.Array, rng: jax.Array, precond: Preconditioning) -> jax.Array:
  """Per-sample denoising loss ``lambda(sigma) * ||D(x0 + sigma n, sigma) - x0||^2`` (mean over features).

  ``denoise_fn(x, sigma)`` takes per-sample sigmas of shape ``[B]``. Returns shape ``[B]`` in float32 or wider:
  sigma, the noise and the loss weight are computed in ``coefficient_dtype(x0.dtype)``; the noisy input takes
  ``x0.dtype``.
  """
  sigma_rng, noise_rng = jax.random.split(rng)
  sigma = precond.sample_training_sigma(sigma_rng, (x0.shape[0],), coefficient_dtype(x0.dtype))
  noise = jax.random.normal(noise_rng, x0.shape, sigma.dtype)   # the same draws whatever the data's precision
  x0_hat = denoise_fn(add_noise(x0, sigma, noise).astype(x0.dtype), sigma)
  error = x0_hat.astype(sigma.dtype) - x0.astype(sigma.dtype)
  per_sample = jnp.mean((error ** 2).reshape(x0.shape[0], -1), axis=-1)
  return precond.loss_weight(sigma) * per_sample
