"""Preconditioning identities, parametrisation round trips and the training loss, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import diffusion
from mteo_jax.diffusion import Preconditioning

SIGMAS = np.geomspace(0.002, 80.0, 17)


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


def test_edm_coefficients_make_the_training_target_unit_variance():
  precond = Preconditioning("edm", sigma_data=0.7)
  sigma = jnp.asarray(SIGMAS)
  c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
  sd2 = 0.7 ** 2
  # Input to F has unit variance when the data has variance sigma_data^2.
  np.testing.assert_allclose(c_in ** 2 * (sd2 + sigma ** 2), 1.0, rtol=1e-12)
  # Target of F, (x0 - c_skip x) / c_out, has unit variance (EDM eq. 8 / appendix B.6).
  target_var = ((1 - c_skip) ** 2 * sd2 + c_skip ** 2 * sigma ** 2) / c_out ** 2
  np.testing.assert_allclose(target_var, 1.0, rtol=1e-12)
  # c_skip and c_out are tied: c_skip + c_out^2 / sigma_data^2 = 1.
  np.testing.assert_allclose(c_skip + c_out ** 2 / sd2, 1.0, rtol=1e-12)
  np.testing.assert_allclose(c_noise, np.log(SIGMAS) / 4, rtol=1e-12)
  # The weighting is 1 / c_out^2: the F = 0 baseline has unit expected loss at every sigma.
  np.testing.assert_allclose(precond.loss_weight(sigma) * c_out ** 2, 1.0, rtol=1e-12)


def test_vp_and_ve_coefficients():
  sigma = jnp.asarray(SIGMAS)
  vp = Preconditioning("vp").coefficients(sigma)
  np.testing.assert_allclose(vp.c_skip, 1.0)
  np.testing.assert_allclose(vp.c_out, -SIGMAS, rtol=1e-12)
  np.testing.assert_allclose(vp.c_in, 1 / np.sqrt(1 + SIGMAS ** 2), rtol=1e-12)
  t = diffusion.vp_sigma_to_t(sigma)
  np.testing.assert_allclose(vp.c_noise, 999 * t, rtol=1e-12)
  np.testing.assert_allclose(diffusion.vp_t_to_sigma(t), SIGMAS, rtol=1e-10)
  ve = Preconditioning("ve").coefficients(sigma)
  np.testing.assert_allclose(ve.c_out, SIGMAS, rtol=1e-12)
  np.testing.assert_allclose(ve.c_in, 1.0)
  np.testing.assert_allclose(ve.c_noise, np.log(0.5 * SIGMAS), rtol=1e-12)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
def test_denoiser_from_preconditioning_is_exact_for_the_ideal_network(kind):
  """If F outputs its ideal target, c_skip x + c_out F recovers x0 exactly, for every preconditioning."""
  precond = Preconditioning(kind)
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(17, 3)), rng.normal(size=(17, 3))
  sigma = jnp.asarray(SIGMAS)
  x = diffusion.add_noise(x0, sigma, noise)
  c = precond.coefficients(sigma[:, None])
  ideal_f = (x0 - c.c_skip * x) / c.c_out
  np.testing.assert_allclose(c.c_skip * x + c.c_out * ideal_f, x0, atol=1e-10)


def test_prediction_round_trips():
  rng = np.random.default_rng(1)
  x0, eps = rng.normal(size=(17, 5)), rng.normal(size=(17, 5))
  sigma = jnp.asarray(SIGMAS)[:, None]
  x = x0 + sigma * eps
  np.testing.assert_allclose(diffusion.x0_from_eps(x, eps, sigma), x0, atol=1e-10)
  np.testing.assert_allclose(diffusion.eps_from_x0(x, x0, sigma), eps, rtol=1e-9, atol=1e-9)
  v = diffusion.v_from_x0(x, x0, sigma)
  alpha, sigma_vp = diffusion.sigma_to_alpha_sigma(sigma)
  np.testing.assert_allclose(v, alpha * eps - sigma_vp * x0, atol=1e-12)  # Salimans & Ho's definition
  np.testing.assert_allclose(diffusion.x0_from_v(x, v, sigma), x0, atol=1e-10)
  np.testing.assert_allclose(diffusion.eps_from_v(x, v, sigma), eps, atol=1e-10)


def test_noise_level_conversions():
  sigma = jnp.asarray(SIGMAS)
  alpha, sigma_vp = diffusion.sigma_to_alpha_sigma(sigma)
  np.testing.assert_allclose(alpha ** 2 + sigma_vp ** 2, 1.0, rtol=1e-12)
  np.testing.assert_allclose(diffusion.alpha_sigma_to_sigma(alpha, sigma_vp), SIGMAS, rtol=1e-12)
  logsnr = diffusion.sigma_to_logsnr(sigma)
  np.testing.assert_allclose(logsnr, np.log(alpha ** 2 / sigma_vp ** 2), rtol=1e-10)
  np.testing.assert_allclose(diffusion.logsnr_to_sigma(logsnr), SIGMAS, rtol=1e-12)


def test_training_sigma_distributions():
  rng = jax.random.key(0)
  log_sigma = jnp.log(Preconditioning("edm").sample_training_sigma(rng, (200_000,), jnp.float64))
  assert abs(float(log_sigma.mean()) + 1.2) < 0.02 and abs(float(log_sigma.std()) - 1.2) < 0.02
  ve = Preconditioning("ve", sigma_min=0.02, sigma_max=100.0).sample_training_sigma(rng, (10_000,), jnp.float64)
  assert float(ve.min()) >= 0.02 and float(ve.max()) <= 100.0
  vp = Preconditioning("vp").sample_training_sigma(rng, (10_000,), jnp.float64)
  t = diffusion.vp_sigma_to_t(vp)
  assert float(t.min()) >= 1e-5 - 1e-12 and float(t.max()) <= 1.0 + 1e-12


def test_edm_loss_of_the_trivial_denoiser_is_one():
  """With data of variance sigma_data^2 and F = 0, the weighted loss has expectation 1 at every sigma."""
  precond = Preconditioning("edm", sigma_data=0.5)
  x0 = 0.5 * jax.random.normal(jax.random.key(1), (4096, 16), jnp.float64)

  def trivial(x, sigma):
    return precond.coefficients(sigma)[0][:, None] * x

  loss = diffusion.edm_training_loss(trivial, x0, jax.random.key(2), precond)
  assert loss.shape == (4096,)
  assert abs(float(loss.mean()) - 1.0) < 0.03


def test_bad_inputs_are_clear_errors():
  with pytest.raises(ValueError, match="unknown preconditioning 'vq'"):
    Preconditioning("vq")
  with pytest.raises(ValueError, match="sigma_min < sigma_max"):
    Preconditioning(sigma_min=1.0, sigma_max=0.5)
  with pytest.raises(ValueError, match=r"per-sample vector of shape \(4,\)"):
    diffusion.broadcast_to_batch(jnp.ones(3), jnp.ones((4, 2)))


@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_coefficients_of_a_low_precision_sigma_are_float32(kind, dtype):
  """float16 ``sigma ** 2`` overflows above 256: the coefficients are computed in float32 from the given value."""
  precond = Preconditioning(kind)
  sigma_low = jnp.asarray([0.002, 1.0, 80.0, 300.0, 1000.0], dtype)
  got = precond.coefficients(sigma_low)
  expected = precond.coefficients(sigma_low.astype(jnp.float32))
  for name, g, e in zip(got._fields, got, expected):
    assert g.dtype == jnp.float32, name
    np.testing.assert_array_equal(g, e, err_msg=name)
    assert np.all(np.isfinite(g)), name


@pytest.mark.parametrize("dtype, rtol", [(jnp.float16, 0.02), (jnp.bfloat16, 0.1)])
def test_training_loss_of_low_precision_data_matches_float32(dtype, rtol):
  """The same sigma and noise draws for any data precision; only the noisy input is rounded to it."""
  precond = Preconditioning("edm")
  x0 = jax.random.uniform(jax.random.key(0), (64, 4), minval=-1, maxval=1).astype(dtype)
  denoise = lambda x, sigma: x / (1.0 + diffusion.broadcast_to_batch(sigma, x) ** 2)   # noqa: E731
  low = diffusion.edm_training_loss(denoise, x0, jax.random.key(1), precond)
  high = diffusion.edm_training_loss(denoise, x0.astype(jnp.float32), jax.random.key(1), precond)
  assert low.dtype == jnp.float32 and np.all(np.isfinite(low))
  np.testing.assert_allclose(low, high, rtol=rtol)
  np.testing.assert_allclose(np.mean(low), np.mean(high), rtol=rtol / 5)
