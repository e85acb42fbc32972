"""Closed-form teachers: the Gaussian ODE solution solves its ODE; both denoisers satisfy Tweedie's formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import closed_form


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def _gaussian():
  return closed_form.Gaussian(jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 1.5, 0.05]))


def test_gaussian_ode_solution_satisfies_the_probability_flow_ode():
  g = _gaussian()
  x_start = jnp.array([[1.0, 2.0, -3.0], [0.1, 0.2, 0.3]]) * 20.0
  for sigma in [0.01, 0.3, 2.0, 40.0]:
    def x_of(s):
      return g.ode_solution(x_start, 80.0, s)
    x, dx_dsigma = jax.jvp(x_of, (jnp.float64(sigma),), (jnp.float64(1.0),))
    np.testing.assert_allclose(dx_dsigma, (x - g.denoise(x, sigma)) / sigma, rtol=1e-10)
  np.testing.assert_allclose(g.ode_solution(x_start, 80.0, 80.0), x_start, rtol=1e-14)
  # The flow maps the noised marginal onto the data distribution: moments at sigma -> 0.
  x_T = g.sample(jax.random.key(0), 100_000, sigma=80.0)
  x_0 = g.ode_solution(x_T, 80.0, 0.0)
  np.testing.assert_allclose(x_0.mean(0), g.mean, atol=0.02)
  np.testing.assert_allclose(x_0.std(0), g.std, rtol=0.02)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 5.0])
def test_denoisers_satisfy_tweedie(sigma):
  """E[x0 | x] = x + sigma^2 grad log p_sigma(x), checked against autodiff of the exact log-density."""
  x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float64) * 1.5
  g = _gaussian()
  score = jax.vmap(jax.grad(lambda xi: g.log_prob(xi, sigma)))(x)
  np.testing.assert_allclose(g.denoise(x, sigma), x + sigma ** 2 * score, rtol=1e-10)
  mix = closed_form.random_mixture(0, num_components=5, dim=3, dtype=jnp.float64)
  score = jax.grad(lambda xs: mix.log_prob(xs, sigma).sum())(x)
  np.testing.assert_allclose(mix.denoise(x, sigma), x + sigma ** 2 * score, rtol=1e-9, atol=1e-12)


def test_mixture_sampling_and_density():
  mix = closed_form.ring_mixture(8, radius=2.0, std=0.1, dtype=jnp.float64)
  x, component = mix.sample(jax.random.key(2), 40_000)
  np.testing.assert_allclose(np.bincount(np.asarray(component), minlength=8) / 40_000, 1 / 8, atol=0.01)
  np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1).mean(), 2.0, atol=0.01)
  # The density integrates to one (2-D grid quadrature).
  grid = jnp.linspace(-3, 3, 601)
  xx, yy = jnp.meshgrid(grid, grid)
  points = jnp.stack([xx.ravel(), yy.ravel()], -1)
  mass = jnp.exp(mix.log_prob(points, 0.2)).sum() * (grid[1] - grid[0]) ** 2
  np.testing.assert_allclose(mass, 1.0, rtol=1e-3)


def test_mixture_shape_errors():
  with pytest.raises(ValueError, match=r"weights \[K\], means \[K, dim\], stds \[K\]"):
    closed_form.GaussianMixture(jnp.ones(3) / 3, jnp.zeros((2, 2)), jnp.ones(3))
