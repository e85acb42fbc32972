"""Schedules: shapes, endpoints, strict monotonicity, the maths of each family, bad input, jit and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import diffusion
from mteo_jax.schedules import SCHEDULES, get_schedule, validate_sigmas

CLOSED_FORM = ["edm", "time_uniform", "logsnr_uniform"]


def test_registry_names():
  assert SCHEDULES.names() == ["edm", "explicit", "logsnr_uniform", "time_uniform"]
  with pytest.raises(KeyError, match="unknown schedule 'karras'.*'edm'"):
    get_schedule("karras", 4, 0.002, 80.0)


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 64])
def test_shape_endpoints_monotone(name, num_steps):
  sigmas = get_schedule(name, num_steps, 0.002, 80.0)
  assert sigmas.shape == (num_steps + 1,)
  assert sigmas.dtype == jnp.float32
  assert float(sigmas[0]) == np.float32(80.0) and float(sigmas[-1]) == np.float32(0.002)
  assert np.all(np.diff(np.asarray(sigmas)) < 0) and np.all(np.asarray(sigmas) > 0)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_float64_when_enabled(name):
  with jax.enable_x64(True):
    sigmas = get_schedule(name, 5, 0.002, 80.0)
    assert sigmas.dtype == jnp.float64
    assert float(sigmas[0]) == 80.0 and float(sigmas[-1]) == 0.002


def test_edm_formula_and_rho():
  with jax.enable_x64(True):
    n, lo, hi = 6, 0.002, 80.0
    for rho in (1.0, 3.0, 7.0):
      ramp = np.arange(n + 1) / n
      expected = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
      np.testing.assert_allclose(get_schedule("edm", n, lo, hi, rho=rho), expected, rtol=1e-10)
    linear = get_schedule("edm", n, lo, hi, rho=1.0)
    np.testing.assert_allclose(np.diff(linear), (lo - hi) / n, rtol=1e-12)  # rho = 1: uniform in sigma
    # rho changes the schedule: a larger rho puts more steps at low noise
    s3, s7 = get_schedule("edm", n, lo, hi, rho=3.0), get_schedule("edm", n, lo, hi, rho=7.0)
    assert np.all(np.asarray(s7[1:-1]) < np.asarray(s3[1:-1]))
    assert np.array_equal(get_schedule("edm", n, lo, hi), s7)  # the default is EDM's rho = 7


def test_logsnr_uniform_is_geometric():
  with jax.enable_x64(True):
    sigmas = get_schedule("logsnr_uniform", 8, 0.01, 50.0)
    logsnr = diffusion.sigma_to_logsnr(sigmas)
    np.testing.assert_allclose(np.diff(logsnr), (logsnr[-1] - logsnr[0]) / 8, rtol=1e-12)


def test_time_uniform_is_uniform_in_vp_time_and_beta_matters():
  with jax.enable_x64(True):
    sigmas = get_schedule("time_uniform", 8, 0.002, 80.0)
    t = diffusion.vp_sigma_to_t(sigmas)
    np.testing.assert_allclose(np.diff(t), (t[-1] - t[0]) / 8, rtol=1e-9)
    other = get_schedule("time_uniform", 8, 0.002, 80.0, beta_d=5.0, beta_min=1.0)
    t_other = diffusion.vp_sigma_to_t(other, 5.0, 1.0)
    np.testing.assert_allclose(np.diff(t_other), (t_other[-1] - t_other[0]) / 8, rtol=1e-9)
    assert not np.allclose(other, sigmas)
    assert not np.allclose(get_schedule("time_uniform", 8, 0.002, 80.0, beta_min=1.0), sigmas)


def test_explicit():
  given = [80.0, 10.0, 1.0, 0.002]
  sigmas = get_schedule("explicit", 3, sigmas=given)
  np.testing.assert_array_equal(sigmas, np.asarray(given, np.float32))
  np.testing.assert_array_equal(get_schedule("explicit", 3, 0.002, 80.0, sigmas=given), sigmas)
  with pytest.raises(ValueError, match="4 entries, so 3 steps, but num_steps=2"):
    get_schedule("explicit", 2, sigmas=given)
  with pytest.raises(ValueError, match=r"sigmas\[0\] = 80.0 does not match sigma_max=90"):
    get_schedule("explicit", 3, 0.002, 90.0, sigmas=given)
  with pytest.raises(ValueError, match=r"does not match sigma_min=0.01"):
    get_schedule("explicit", 3, 0.01, 80.0, sigmas=given)
  with pytest.raises(ValueError, match=r"strictly decreasing, but sigmas\[1\] = 10.0 <= sigmas\[2\] = 20.0"):
    get_schedule("explicit", 3, sigmas=[80.0, 10.0, 20.0, 0.002])
  with pytest.raises(TypeError, match=r"needs option\(s\) \['sigmas'\]"):
    get_schedule("explicit", 3)
  integers = get_schedule("explicit", 2, sigmas=[3, 2, 1])  # integer input becomes a float array
  assert jnp.issubdtype(integers.dtype, jnp.floating)


@pytest.mark.parametrize("bad, message", [
    ([[2.0, 1.0]], r"1-D array .* got shape \(1, 2\)"),
    ([1.0], r"at least 2 noise levels \(sigma_max \.\.\. sigma_min\), got 1"),
    ([3.0, np.nan, 1.0], r"finite, but sigmas\[1\] = nan"),
    ([np.inf, 1.0], r"finite, but sigmas\[0\] = inf"),
    ([2.0, 1.0, 0.0], r"> 0, but sigmas\[2\] = 0.0"),
    ([2.0, -1.0], r"> 0, but sigmas\[1\] = -1.0"),
    ([3.0, 2.0, 2.0, 1.0], r"strictly decreasing, but sigmas\[1\] = 2.0 <= sigmas\[2\] = 2.0"),
    ([1.0, 2.0, 3.0], r"strictly decreasing, but sigmas\[0\] = 1.0 <= sigmas\[1\] = 2.0"),
])
def test_validate_sigmas_errors(bad, message):
  with pytest.raises(ValueError, match=message):
    validate_sigmas(bad)


def test_validate_sigmas_is_skipped_for_traced_values_but_shapes_are_checked():
  # Under jit the values are unknown, so an increasing array passes through (shape checks still apply).
  out = jax.jit(validate_sigmas)(jnp.asarray([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match="at least 2 noise levels"):
    jax.jit(validate_sigmas)(jnp.asarray([1.0]))


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_bad_arguments(name):
  for steps in (0, -3):
    with pytest.raises(ValueError, match=f"num_steps must be >= 1, got {steps}"):
      get_schedule(name, steps, 0.002, 80.0)
  for steps in (2.5, True, "3"):
    with pytest.raises(TypeError, match="num_steps must be a Python integer"):
      get_schedule(name, steps, 0.002, 80.0)
  for lo in (0.0, -1.0):
    with pytest.raises(ValueError, match="sigma_min must be > 0"):
      get_schedule(name, 4, lo, 80.0)
  for lo, hi in ((80.0, 80.0), (90.0, 80.0)):
    with pytest.raises(ValueError, match="need sigma_min < sigma_max"):
      get_schedule(name, 4, lo, hi)
  with pytest.raises(ValueError, match="finite"):
    get_schedule(name, 4, 0.002, np.inf)
  with pytest.raises(ValueError, match=f"schedule '{name}' needs sigma_min and sigma_max"):
    get_schedule(name, 4)
  with pytest.raises(TypeError, match=f"unknown option\\(s\\) \\['rh0'\\] for schedule '{name}'"):
    get_schedule(name, 4, 0.002, 80.0, rh0=7.0)


def test_bad_options():
  for rho in (0.0, -7.0, np.nan):
    with pytest.raises(ValueError, match="rho must be a finite scalar > 0"):
      get_schedule("edm", 4, 0.002, 80.0, rho=rho)
  with pytest.raises(ValueError, match="beta_d must be a finite scalar > 0"):
    get_schedule("time_uniform", 4, 0.002, 80.0, beta_d=0.0)
  with pytest.raises(ValueError, match="beta_min must be a finite scalar >= 0"):
    get_schedule("time_uniform", 4, 0.002, 80.0, beta_min=-0.1)
  get_schedule("time_uniform", 4, 0.002, 80.0, beta_min=0.0)  # a zero linear term is a valid VP schedule


def test_float32_degenerate_schedule_is_an_error():
  # 10^6 steps over a tiny range cannot be represented strictly decreasing in float32.
  with pytest.raises(ValueError, match="strictly decreasing"):
    get_schedule("logsnr_uniform", 1_000_000, 1.0, 1.0001)


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_jit_matches_eager(name):
  fn = jax.jit(lambda lo, hi: get_schedule(name, 5, lo, hi))
  np.testing.assert_allclose(fn(0.002, 80.0), get_schedule(name, 5, 0.002, 80.0), rtol=1e-6)


@pytest.mark.parametrize("name, option", [("edm", "rho"), ("time_uniform", "beta_d"), ("logsnr_uniform", None)])
def test_gradients_match_finite_differences(name, option):
  with jax.enable_x64(True):
    weights = jnp.linspace(0.5, 1.5, 6)

    def loss(lo, hi, opt):
      kwargs = {} if option is None else {option: opt}
      return jnp.sum(weights * jnp.log(get_schedule(name, 5, lo, hi, **kwargs)))

    args = (0.01, 40.0, 7.0 if option == "rho" else 19.9)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
    for i, g in enumerate(grads):
      if i == 2 and option is None:
        continue
      eps = 1e-6 * args[i]
      plus = list(args); plus[i] += eps
      minus = list(args); minus[i] -= eps
      fd = (loss(*plus) - loss(*minus)) / (2 * eps)
      assert np.isfinite(g)
      np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_subnormal_levels_are_refused_in_every_dtype():
  """XLA on CPU flushes subnormals to 0, so log(sigma) would be -inf: refused with the entry named."""
  with pytest.raises(ValueError, match=r"sigmas\[1\] = .* below the smallest normal float32"):
    validate_sigmas(jnp.asarray([1.0, 1e-40], jnp.float32))
  with pytest.raises(ValueError, match=r"below the smallest normal bfloat16"):
    validate_sigmas(jnp.asarray([1.0, 1e-39], jnp.bfloat16))
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match=r"below the smallest normal float64"):
      validate_sigmas(np.array([1.0, 1e-320]))
    validate_sigmas(np.array([1.0, 1e-300]))   # normal in float64


def test_host_grid_that_collapses_in_jax_dtype_says_so():
  """Without x64, JAX narrows a float64 numpy grid to float32: the error says the grid was fine before that."""
  if jax.config.jax_enable_x64:
    pytest.skip("needs jax_enable_x64 off")
  for sigmas, match in (([1.0, 1.0 - 1e-12, 0.5], r"strictly decreasing"), ([1.0, 1e-40], r"smallest normal")):
    with pytest.raises(ValueError, match=r"valid in float64 but not in float32, the dtype JAX gives them \(jax_enable"
                                         r"_x64 is off\): .*" + match):
      validate_sigmas(np.array(sigmas))
