"""Evaluation metrics: error to a reference, Fréchet distance in a feature space, sliced Wasserstein, log-likelihood.

* ``rmse`` / ``psnr``: a few-step sample against the reference sample from the same noise, per sample, then averaged.
* ``frechet_distance``: ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` between two Gaussians in float64, the trace
  of the root by ``eigh`` in the symmetric form (stable for rank-deficient covariances); FD and FID (``fid.py``) both
  use it. ``frechet_distance_from_features``: the same from features [N, F] to given statistics, by an N x N
  eigenproblem when N - 1 < F.
* ``frechet_distance_from_samples``: that distance between the feature statistics of generated and real images under a
  ``FeatureNetwork``. The figure is called ``FD-<network name>`` (e.g. "FD-digits", "FD-fmnist"), never "FID": true FID
  needs the standard Inception-v3 weights (``pt_inception-2015-12-05``) and the standard pipeline (uint8 images, resized
  to 299x299, 2048-d pool features, reference statistics of the real set), none of which is computed here. Fréchet
  distances are biased upwards at small sample counts, so only compare figures computed from the same number of samples.
* ``sliced_wasserstein`` and ``mixture_log_likelihood``: for low-dimensional toys with a known mixture density.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np

from mteo_jax.closed_form import GaussianMixture

_REDUCTIONS = ("mean", "none")


def _check_pair(a, b, name: str) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim < 2 or a.shape[0] == 0:
    raise ValueError(f"{name}: expected two arrays of the same shape [N >= 1, ...], got {a.shape} and {b.shape}")
  return a, b


def _reduce(per_sample: np.ndarray, reduction: str, name: str) -> np.ndarray | float:
  if reduction == "mean":
    return float(np.mean(per_sample))
  if reduction == "none":
    return per_sample
  raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def rmse(a, b, reduction: str = "mean") -> np.ndarray | float:
  """Per-sample ``sqrt(mean_j (a_j - b_j)^2)`` over all but the batch axis; ``reduction="mean"`` averages those."""
  a, b = _check_pair(a, b, "rmse")
  per_sample = np.sqrt(np.mean((a - b).reshape(a.shape[0], -1) ** 2, axis=1))
  return _reduce(per_sample, reduction, "rmse")


def psnr(a, b, data_range: float = 2.0, reduction: str = "mean") -> np.ndarray | float:
  """Per-sample ``10 log10(data_range^2 / MSE)`` in dB (data_range=2 for data in [-1, 1]), then the mean of the dBs.

  A sample identical to its reference has infinite PSNR, and so has the mean over a batch containing one.
  """
  if not data_range > 0:
    raise ValueError(f"psnr: data_range must be positive, got {data_range}")
  a, b = _check_pair(a, b, "psnr")
  mse = np.mean((a - b).reshape(a.shape[0], -1) ** 2, axis=1)
  with np.errstate(divide="ignore"):
    per_sample = 10.0 * np.log10(data_range ** 2 / mse)
  return _reduce(per_sample, reduction, "psnr")


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """``(mu [F], cov [F, F])`` of features [N, F] in float64; ``cov`` is the unbiased (N - 1) sample covariance."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"gaussian_stats: expected features of shape [N >= 2, F], got {features.shape}")
  if not np.isfinite(features).all():
    raise ValueError("gaussian_stats: features contain NaN or infinity")
  return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64 (Dowson & Landau 1982; FID's distance).

  The trace of the root is taken in the symmetric form ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``: ``S1 S2`` and
  ``S1^(1/2) S2 S1^(1/2)`` share their eigenvalues (``AB`` and ``BA`` with ``A = S1^(1/2)``, ``B = S1^(1/2) S2``),
  and the latter is symmetric positive semi-definite, so ``eigh`` gives them stably and the trace is the sum of their
  square roots. Rank-deficient covariances (fewer samples than dimensions, as with 1000 samples of 2048 features)
  have eigenvalues that are zeros blurred by round-off, of either sign: those below ``dim * eps`` times the largest
  are set to zero before the square root, which would otherwise turn ``~eps`` into ``~sqrt(eps)``. The standard code
  instead takes scipy's ``sqrtm`` of the non-symmetric product, adding ``1e-6 I`` and dropping an imaginary part when
  it fails; both agree to ~1e-6 relative where ``sqrtm`` is accurate (a test checks it, rank-deficient case included).

  Args:
    mu1, mu2: [F] means; sigma1, sigma2: [F, F] symmetric positive semi-definite covariances (any float dtype).

  Raises:
    ValueError: mismatched shapes, non-finite values, or a covariance with a clearly negative eigenvalue (below
      ``-1e-6`` of its largest), which is not a covariance.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
    raise ValueError(f"frechet_distance: expected mu [F] and sigma [F, F] for both, got {mu1.shape}, {sigma1.shape}, "
                     f"{mu2.shape}, {sigma2.shape}")
  for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.isfinite(value).all():
      raise ValueError(f"frechet_distance: {name} contains NaN or infinity")
  sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
  eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
  _check_psd(eigenvalues, "sigma1")
  root1 = (eigenvectors * np.sqrt(_round_off_to_zero(eigenvalues))) @ eigenvectors.T
  middle = root1 @ sigma2 @ root1
  middle_eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  _check_psd(middle_eigenvalues, "sigma2")   # negative there only if sigma2 is (on the range of sigma1)
  trace_root = np.sum(np.sqrt(_round_off_to_zero(middle_eigenvalues)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def frechet_distance_from_features(features, mu, sigma) -> float:
  """``frechet_distance`` between the Gaussian fitted to ``features`` [N >= 2, F] (mean and unbiased covariance
  ``S = Xc^T Xc / (N - 1)``, ``Xc`` the centred features) and ``(mu [F], sigma [F, F])``, in float64.

  Where ``N - 1 < F`` (e.g. 1000 samples of 2048 features) the trace of the root is taken from the [N, N] matrix
  ``Xc sigma Xc^T / (N - 1)``, which is symmetric positive semi-definite and has the nonzero eigenvalues of
  ``S sigma`` (``AB`` and ``BA`` again): one N x N eigenvalue problem instead of two F x F ones (seconds rather than
  a minute on 2 CPU cores at F = 2048). Otherwise it is ``frechet_distance(*gaussian_stats(features), mu, sigma)``.

  Raises:
    ValueError: shapes that do not match, non-finite values, or a ``sigma`` that is clearly not positive
      semi-definite.
  """
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"frechet_distance_from_features: expected features [N >= 2, F], got {features.shape}")
  num, dim = features.shape
  if num - 1 >= dim:
    return frechet_distance(*gaussian_stats(features), mu, sigma)
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"frechet_distance_from_features: expected mu [{dim}] and sigma [{dim}, {dim}] for features "
                     f"[N, {dim}], got {mu.shape} and {sigma.shape}")
  for name, value in (("features", features), ("mu", mu), ("sigma", sigma)):
    if not np.isfinite(value).all():
      raise ValueError(f"frechet_distance_from_features: {name} contains NaN or infinity")
  mean = features.mean(axis=0)
  centred = features - mean
  small = centred @ ((sigma + sigma.T) / 2) @ centred.T / (num - 1)
  eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)
  _check_psd(eigenvalues, "sigma")
  trace_root = np.sum(np.sqrt(_round_off_to_zero(eigenvalues)))
  diff = mean - mu
  return float(diff @ diff + np.sum(centred ** 2) / (num - 1) + np.trace(sigma) - 2.0 * trace_root)


def _round_off_to_zero(eigenvalues: np.ndarray) -> np.ndarray:
  # Eigenvalues below dim * eps * the largest are round-off of zeros (eigh's absolute error is ~eps * the largest):
  # zero, not their square roots, which would add ~sqrt(eps) * the largest per null direction.
  threshold = eigenvalues.shape[0] * np.finfo(np.float64).eps * max(float(np.max(eigenvalues)), 0.0)
  return np.where(eigenvalues > threshold, eigenvalues, 0.0)


def _check_psd(eigenvalues: np.ndarray, name: str) -> None:
  scale = max(float(np.max(np.abs(eigenvalues))), np.finfo(np.float64).tiny)
  if eigenvalues[0] < -1e-6 * scale:
    raise ValueError(f"frechet_distance: {name} is not positive semi-definite (eigenvalue {eigenvalues[0]:.3g}, "
                     f"largest {scale:.3g}); is it a covariance?")


def sliced_wasserstein(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """``SW_2(x, y) = sqrt(E_theta W_2^2(<theta, x>, <theta, y>))`` over uniformly random unit directions theta.

  x [N, d] and y [M, d] are samples (N may differ from M). Each 1-D ``W_2`` between the two projected empirical measures
  is exact: ``int_0^1 |F^-1(t) - G^-1(t)|^2 dt`` with both quantile functions piecewise constant. The projections are
  drawn from ``seed``, so two calls with the same seed use the same directions. Meant for low-dimensional samples; in
  high dimensions random directions see little of the difference.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not x.shape[0] or not y.shape[0]:
    raise ValueError(f"sliced_wasserstein: expected x [N, d] and y [M, d] with N, M >= 1, got {x.shape} and {y.shape}")
  if num_projections < 1:
    raise ValueError(f"sliced_wasserstein: num_projections must be >= 1, got {num_projections}")
  directions = np.random.default_rng(seed).standard_normal((x.shape[1], num_projections))
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  x_proj, y_proj = np.sort(x @ directions, axis=0), np.sort(y @ directions, axis=0)           # [N, P], [M, P]
  n, m = x.shape[0], y.shape[0]
  # The quantile functions jump only at i/N and j/M: on each interval between consecutive jumps both are constant.
  # Integer arithmetic (multiples of 1/(N M)) keeps equal breakpoints equal.
  breaks = np.union1d(np.arange(1, n + 1) * m, np.arange(1, m + 1) * n)                     # in units of 1/(N M)
  widths = np.diff(breaks, prepend=0) / (n * m)
  starts = breaks - np.diff(breaks, prepend=0)                                               # left ends, same units
  x_at, y_at = x_proj[starts // m], y_proj[starts // n]                                      # [intervals, P]
  w2_squared = np.sum(widths[:, None] * (x_at - y_at) ** 2, axis=0)                          # [P]
  return float(np.sqrt(np.mean(w2_squared)))


def mixture_log_likelihood(x, mixture: GaussianMixture) -> float:
  """``mean_n log p(x_n)`` of samples x [N, dim] under the exact density of ``mixture`` (in nats)."""
  x = jnp.asarray(x, mixture.means.dtype)
  if x.ndim != 2 or x.shape[1] != mixture.dim or x.shape[0] == 0:
    raise ValueError(f"mixture_log_likelihood: expected samples of shape [N >= 1, {mixture.dim}], got {x.shape}")
  return float(jnp.mean(mixture.log_prob(x)))


@runtime_checkable
class FeatureNetwork(Protocol):
  """A fixed network that maps images to feature vectors for Fréchet distances (``mteo_jax.features`` ships two).

  ``features`` takes images [N, H, W, C] in [-1, 1] and returns [N, F] (batched and jitted inside); ``name`` names the
  figure: ``FD-<name>``.
  """
  name: str

  def features(self, images) -> np.ndarray:
    ...


def frechet_metric_name(feature_net: FeatureNetwork) -> str:
  """The honest name of a Fréchet distance in this network's feature space, e.g. "FD-digits" (never "FID")."""
  return f"FD-{feature_net.name}"


def feature_stats(feature_net: FeatureNetwork, images) -> tuple[np.ndarray, np.ndarray]:
  """``(mu, cov)`` in float64 of the features of images [N, H, W, C] in [-1, 1] (cache these for the real data)."""
  return gaussian_stats(np.asarray(feature_net.features(images)))


def frechet_distance_from_samples(feature_net: FeatureNetwork, generated, real) -> float:
  """``FD-<name>`` between generated and real images [N, H, W, C] in [-1, 1] in ``feature_net``'s feature space."""
  return frechet_distance(*feature_stats(feature_net, generated), *feature_stats(feature_net, real))
