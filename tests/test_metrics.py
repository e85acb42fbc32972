"""Metrics: Fréchet distance against closed forms and an independent symmetric route, RMSE/PSNR by hand, sliced
Wasserstein on exact 1-D cases and shifts, log-likelihood under the known mixture."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from mteo_jax import closed_form, metrics


def _random_spd(rs, dim, rank=None):
  factor = rs.randn(dim, rank or dim)
  return factor @ factor.T / dim + (0 if rank else 0.1) * np.eye(dim)


def _frechet_reference(mu1, cov1, mu2, cov2):
  """Independent route: tr (C1 C2)^(1/2) = tr (C1^(1/2) C2 C1^(1/2))^(1/2), a symmetric PSD root by eigh."""
  def psd_sqrt(c):
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  root1 = psd_sqrt(cov1)
  middle = np.linalg.eigvalsh(root1 @ cov2 @ root1)
  return np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.sum(np.sqrt(np.clip(middle, 0, None)))


def test_frechet_distance_of_identical_statistics_is_zero():
  rs = np.random.RandomState(0)
  mu, cov = metrics.gaussian_stats(rs.randn(500, 16) @ rs.randn(16, 16))
  assert mu.dtype == cov.dtype == np.float64 and cov.shape == (16, 16)
  assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-8 * np.trace(cov)


def test_frechet_distance_closed_form_for_diagonal_covariances():
  """FD = |mu1 - mu2|^2 + sum_j (s1_j - s2_j)^2 for covariances diag(s1^2), diag(s2^2)."""
  with jax.enable_x64(True):
    rs = np.random.RandomState(1)
    mu1, mu2 = jnp.asarray(rs.randn(7)), jnp.asarray(rs.randn(7))
    s1, s2 = jnp.asarray(rs.uniform(0.1, 2.0, 7)), jnp.asarray(rs.uniform(0.1, 2.0, 7))
    expected = float(jnp.sum((mu1 - mu2) ** 2) + jnp.sum((s1 - s2) ** 2))
    got = metrics.frechet_distance(mu1, jnp.diag(s1 ** 2), mu2, jnp.diag(s2 ** 2))
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_distance_is_symmetric_and_matches_the_symmetric_route():
  rs = np.random.RandomState(2)
  mu1, mu2 = rs.randn(10), rs.randn(10)
  cov1, cov2 = _random_spd(rs, 10), _random_spd(rs, 10)
  forward, backward = metrics.frechet_distance(mu1, cov1, mu2, cov2), metrics.frechet_distance(mu2, cov2, mu1, cov1)
  np.testing.assert_allclose(forward, backward, rtol=1e-10)
  np.testing.assert_allclose(forward, _frechet_reference(mu1, cov1, mu2, cov2), rtol=1e-9)


def test_frechet_distance_on_rank_deficient_covariances():
  """Fewer samples than features: singular covariances (where scipy's root of the product is complex) -> a real FD."""
  rs = np.random.RandomState(3)
  mu1, cov1 = metrics.gaussian_stats(rs.randn(6, 20))
  mu2, cov2 = metrics.gaussian_stats(rs.randn(9, 20) + 0.5)
  assert np.linalg.matrix_rank(cov1) == 5 and np.linalg.matrix_rank(cov2) == 8
  assert np.iscomplexobj(scipy.linalg.sqrtm(cov1 @ cov2))  # the case the real-part handling is for
  got = metrics.frechet_distance(mu1, cov1, mu2, cov2)
  assert np.isfinite(got) and got > 0
  np.testing.assert_allclose(got, _frechet_reference(mu1, cov1, mu2, cov2), rtol=1e-6)
  np.testing.assert_allclose(got, metrics.frechet_distance(mu2, cov2, mu1, cov1), rtol=1e-6)


def test_frechet_distance_agrees_with_scipy_sqrtm_of_the_product():
  """The standard FID code's route, scipy ``sqrtm`` of the non-symmetric product C1 C2, on well-conditioned
  covariances: the same distance to 1e-9 relative."""
  rs = np.random.RandomState(4)
  mu1, mu2, cov1, cov2 = rs.randn(12), rs.randn(12), _random_spd(rs, 12), _random_spd(rs, 12)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2)
              - 2 * np.trace(scipy.linalg.sqrtm(cov1 @ cov2).real))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-9)


def test_frechet_distance_rejects_bad_input():
  with pytest.raises(ValueError, match="sigma2 is not positive semi-definite"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
  with pytest.raises(ValueError, match=r"mu \[F\] and sigma \[F, F\]"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match=r"\[N >= 2, F\]"):
    metrics.gaussian_stats(np.zeros((1, 3)))


def test_rmse_and_psnr_against_hand_values():
  a = np.zeros((2, 2, 2, 1))
  b = np.stack([np.ones((2, 2, 1)), np.full((2, 2, 1), 0.5)])     # per-sample MSE 1 and 0.25
  np.testing.assert_allclose(metrics.rmse(a, b, reduction="none"), [1.0, 0.5])
  assert metrics.rmse(a, b) == pytest.approx(0.75)                 # mean of per-sample RMSEs, not RMSE of all pixels
  db = 10 * np.log10([4.0, 16.0])                                   # data_range 2: 10 log10(4 / MSE)
  np.testing.assert_allclose(metrics.psnr(a, b, reduction="none"), db)
  assert metrics.psnr(a, b) == pytest.approx(db.mean())             # mean of per-sample dB values
  np.testing.assert_allclose(metrics.psnr(a, b, data_range=1.0, reduction="none"), db - 10 * np.log10(4.0))
  assert metrics.psnr(a, a) == np.inf
  with pytest.raises(ValueError, match="same shape"):
    metrics.rmse(a, b[:1])
  with pytest.raises(ValueError, match="reduction"):
    metrics.psnr(a, b, reduction="sum")
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(a, b, data_range=0.0)


def test_sliced_wasserstein_exact_one_dimensional_cases():
  """In 1-D every direction is +-1, so SW_2 is the exact W_2 between the empirical measures."""
  assert metrics.sliced_wasserstein([[0.0], [1.0]], [[2.0], [1.0]], num_projections=3) == pytest.approx(1.0)
  # Unequal sizes: the quantile functions are {0} and {0 on (0, 1/2], 2 on (1/2, 1]}: W_2^2 = 0.5 * 4.
  assert metrics.sliced_wasserstein([[0.0]], [[0.0], [2.0]], num_projections=2) == pytest.approx(np.sqrt(2.0))
  # 2 vs 3 points: on (0, 1/3] 0 vs 0, on (1/3, 1/2] 0 vs 1, on (1/2, 1] 3 vs 1: W_2^2 = 1/6 * 1 + 1/2 * 4 = 13/6.
  assert metrics.sliced_wasserstein([[0.0], [3.0]], [[0.0], [1.0], [1.0]]) == pytest.approx(np.sqrt(13 / 6))


def test_sliced_wasserstein_small_for_one_distribution_and_growing_with_a_shift():
  mixture = closed_form.ring_mixture(8, radius=1.0, std=0.1)
  x = np.asarray(mixture.sample(jax.random.key(0), 2000)[0])
  y = np.asarray(mixture.sample(jax.random.key(1), 2000)[0])
  assert metrics.sliced_wasserstein(x, x) == 0.0
  same = metrics.sliced_wasserstein(x, y)
  distances = [metrics.sliced_wasserstein(x, y + np.array([shift, 0.0])) for shift in (0.25, 0.5, 1.0)]
  assert same < 0.05 and same < distances[0] < distances[1] < distances[2]
  # An exact translation by v: each projection moves by <theta, v>, so SW_2 -> |v| / sqrt(dim) for many directions.
  assert metrics.sliced_wasserstein(x, x + np.array([1.0, 0.0]), num_projections=1000) == pytest.approx(
      1 / np.sqrt(2), rel=0.03)
  # The seed picks the directions: the same seed repeats the figure, another one changes it.
  v = x + np.array([1.0, 0.0])
  assert metrics.sliced_wasserstein(x, v, 8, seed=3) == metrics.sliced_wasserstein(x, v, 8, seed=3)
  assert metrics.sliced_wasserstein(x, v, 8, seed=3) != metrics.sliced_wasserstein(x, v, 8, seed=4)
  with pytest.raises(ValueError, match=r"\[N, d\] and y \[M, d\]"):
    metrics.sliced_wasserstein(x, y[:, :1])
  with pytest.raises(ValueError, match="num_projections"):
    metrics.sliced_wasserstein(x, y, num_projections=0)


def test_mixture_log_likelihood_is_the_mean_exact_log_density():
  with jax.enable_x64(True):
    mixture = closed_form.random_mixture(0, num_components=4, dim=3, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(2), (50, 3), jnp.float64)
    np.testing.assert_allclose(metrics.mixture_log_likelihood(x, mixture), float(mixture.log_prob(x).mean()),
                               rtol=1e-12)
    # Samples of the mixture itself score higher than samples of a broad Gaussian.
    own = mixture.sample(jax.random.key(3), 2000)[0]
    assert metrics.mixture_log_likelihood(own, mixture) > metrics.mixture_log_likelihood(3 * x, mixture)
    with pytest.raises(ValueError, match=r"\[N >= 1, 3\]"):
      metrics.mixture_log_likelihood(x[:, :2], mixture)


class _MeanPool:
  """A trivial feature network: per-channel image means and the means of the squares."""
  name = "toy"

  def features(self, images):
    images = np.asarray(images)
    return np.concatenate([images.mean(axis=(1, 2)), (images ** 2).mean(axis=(1, 2))], axis=-1)


def test_frechet_distance_from_samples_uses_the_feature_network():
  net = _MeanPool()
  assert isinstance(net, metrics.FeatureNetwork)
  assert metrics.frechet_metric_name(net) == "FD-toy"
  rs = np.random.RandomState(5)
  real = rs.uniform(-1, 1, (300, 4, 4, 1))
  close = rs.uniform(-1, 1, (300, 4, 4, 1))
  far = rs.uniform(-1, 1, (300, 4, 4, 1)) * 0.5 + 0.3
  fd_close = metrics.frechet_distance_from_samples(net, close, real)
  fd_far = metrics.frechet_distance_from_samples(net, far, real)
  assert 0 <= fd_close < 0.1 * fd_far
  mu1, cov1 = metrics.feature_stats(net, far)
  mu2, cov2 = metrics.gaussian_stats(net.features(real))
  assert fd_far == metrics.frechet_distance(mu1, cov1, mu2, cov2)
