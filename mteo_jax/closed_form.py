"""Data distributions whose denoiser is known in closed form: teachers for tests and toy configs, no network needed.

For data ``x0 ~ N(mu, diag(s^2))`` and ``x = x0 + sigma n``:
    D(x, sigma) = E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu),
and the probability-flow ODE ``dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2)`` has the exact solution
    x(sigma) = mu + (x(sigma0) - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma0^2)).
A mixture of such Gaussians has the posterior-weighted mixture of the component denoisers as its exact denoiser.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax.diffusion import broadcast_to_batch, coefficient_dtype


def _noise_level(sigma: jax.Array, x: jax.Array) -> jax.Array:
  """``sigma`` in float32 or wider whatever the state's dtype (``sigma ** 2`` overflows float16 above 256)."""
  sigma = jnp.asarray(sigma)
  return sigma.astype(coefficient_dtype(sigma.dtype, x.dtype))


@dataclasses.dataclass(frozen=True)
class Gaussian:
  """``N(mean, diag(std^2))`` over vectors of shape ``mean.shape``."""
  mean: jax.Array
  std: jax.Array

  def denoise(self, x: jax.Array, sigma: jax.Array, temb=None) -> jax.Array:
    """Exact ``D(x, sigma)``; ``temb`` is accepted and ignored (no network to condition)."""
    del temb
    s2 = self.std ** 2
    sigma = broadcast_to_batch(_noise_level(sigma, x), x)
    return self.mean + s2 / (s2 + sigma ** 2) * (x - self.mean)

  def ode_solution(self, x: jax.Array, sigma_from: jax.Array, sigma_to: jax.Array) -> jax.Array:
    """Exact probability-flow ODE flow from noise level ``sigma_from`` to ``sigma_to``."""
    s2 = self.std ** 2
    sigma_from, sigma_to = broadcast_to_batch(sigma_from, x), broadcast_to_batch(sigma_to, x)
    return self.mean + (x - self.mean) * jnp.sqrt((s2 + sigma_to ** 2) / (s2 + sigma_from ** 2))

  def sample(self, rng: jax.Array, n: int, sigma: float = 0.0) -> jax.Array:
    """Samples of the noised marginal ``N(mean, std^2 + sigma^2)``."""
    noise = jax.random.normal(rng, (n,) + self.mean.shape, jnp.result_type(self.mean))
    return self.mean + jnp.sqrt(self.std ** 2 + sigma ** 2) * noise

  def log_prob(self, x: jax.Array, sigma: float = 0.0) -> jax.Array:
    var = self.std ** 2 + sigma ** 2
    return jnp.sum(-0.5 * (x - self.mean) ** 2 / var - 0.5 * jnp.log(2 * jnp.pi * var), axis=-1)


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """``sum_k weights[k] N(means[k], stds[k]^2 I)`` in ``dim = means.shape[1]`` dimensions."""
  weights: jax.Array  # [K], sums to 1
  means: jax.Array    # [K, dim]
  stds: jax.Array     # [K]

  def __post_init__(self):
    k = self.weights.shape[0]
    if self.means.ndim != 2 or self.means.shape[0] != k or self.stds.shape != (k,):
      raise ValueError(f"expected weights [K], means [K, dim], stds [K]; got {self.weights.shape}, "
                       f"{self.means.shape}, {self.stds.shape}")

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def _component_log_probs(self, x: jax.Array, sigma: jax.Array) -> jax.Array:
    var = self.stds[None, :] ** 2 + jnp.reshape(sigma, (-1, 1)) ** 2                     # [B or 1, K]
    sq = jnp.sum((x[:, None, :] - self.means[None]) ** 2, axis=-1)                         # [B, K]
    return jnp.log(self.weights)[None] - 0.5 * sq / var - 0.5 * self.dim * jnp.log(2 * jnp.pi * var)

  def log_prob(self, x: jax.Array, sigma: jax.Array = 0.0) -> jax.Array:
    """Exact log-density of the noised marginal at ``sigma`` (scalar or [B]); x: [B, dim]."""
    return jax.nn.logsumexp(self._component_log_probs(x, _noise_level(sigma, x)), axis=-1)

  def denoise(self, x: jax.Array, sigma: jax.Array, temb=None) -> jax.Array:
    """Exact ``D(x, sigma) = sum_k p(k | x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))``."""
    del temb
    sigma = jnp.broadcast_to(_noise_level(sigma, x), x.shape[:1])
    posterior = jax.nn.softmax(self._component_log_probs(x, sigma), axis=-1)              # [B, K]
    shrink = self.stds[None] ** 2 / (self.stds[None] ** 2 + sigma[:, None] ** 2)           # [B, K]
    per_component = self.means[None] + shrink[..., None] * (x[:, None, :] - self.means[None])
    return jnp.sum(posterior[..., None] * per_component, axis=1)

  def sample(self, rng: jax.Array, n: int, sigma: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``(x [n, dim], component [n])`` from the noised marginal at ``sigma``."""
    k_rng, n_rng = jax.random.split(rng)
    component = jax.random.categorical(k_rng, jnp.log(self.weights), shape=(n,))
    noise = jax.random.normal(n_rng, (n, self.dim), self.means.dtype)
    std = jnp.sqrt(self.stds[component] ** 2 + sigma ** 2)[:, None]
    return self.means[component] + std * noise, component


def ring_mixture(num_components: int = 8, radius: float = 1.0, std: float = 0.1, dim: int = 2,
                 dtype=jnp.float32) -> GaussianMixture:
  """Equal-weight components on a circle in the first two coordinates (the usual 2-D toy)."""
  if dim < 2:
    raise ValueError(f"ring_mixture needs dim >= 2, got {dim}")
  angles = 2 * np.pi * np.arange(num_components) / num_components
  means = np.zeros((num_components, dim))
  means[:, 0], means[:, 1] = radius * np.cos(angles), radius * np.sin(angles)
  return GaussianMixture(jnp.full((num_components,), 1.0 / num_components, dtype), jnp.asarray(means, dtype),
                         jnp.full((num_components,), std, dtype))


def random_mixture(seed: int, num_components: int, dim: int, spread: float = 1.0, std: float = 0.2,
                   dtype=jnp.float32) -> GaussianMixture:
  """A mixture with means ~ N(0, spread^2), Dirichlet(2) weights and per-component stds in [std/2, std]."""
  rs = np.random.RandomState(seed)
  return GaussianMixture(jnp.asarray(rs.dirichlet(np.full(num_components, 2.0)), dtype),
                         jnp.asarray(spread * rs.randn(num_components, dim), dtype),
                         jnp.asarray(std * rs.uniform(0.5, 1.0, num_components), dtype))
