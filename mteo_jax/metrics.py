"""Evaluation metrics: error to a reference, Fréchet distance in a feature space, sliced Wasserstein, log-likelihood.

* ``rmse`` / ``psnr``: a few-step sample against the reference sample from the same noise, per sample, then averaged.
* ``frechet_distance``: ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` between two Gaussians, computed as the
  standard FID code does it (scipy ``sqrtm``; real part; ``eps I`` added to both covariances if the root is not finite).
* ``frechet_distance_from_samples``: that distance between the feature statistics of generated and real images under a
  ``FeatureNetwork``. The figure is called ``FD-<network name>`` (e.g. "FD-digits", "FD-fmnist"), never "FID": true FID
  needs the standard Inception-v3 weights (``pt_inception-2015-12-05``) and the standard pipeline (uint8 images, resized
  to 299x299, 2048-d pool features, reference statistics of the real set), none of which is computed here. Fréchet
  distances are biased upwards at small sample counts, so only compare figures computed from the same number of samples.
* ``sliced_wasserstein`` and ``mixture_log_likelihood``: for low-dimensional toys with a known mixture density.
"""

from __future__ import annotations

import warnings
from typing import Protocol, runtime_checkable

import jax.numpy as jnp
import numpy as np
import scipy.linalg

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


def frechet_distance(mu1, cov1, mu2, cov2, eps: float = 1e-6) -> float:
  """``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^(1/2))``, the squared 2-Wasserstein distance of Gaussians.

  As in the standard FID code: the matrix root is scipy's ``sqrtm`` of the (generally non-symmetric) product; if it is
  not finite (a singular product), ``eps`` is added to both diagonals and the root retaken; a complex root (round-off
  makes tiny negative eigenvalues of a rank-deficient product) keeps its real part when the imaginary part of its
  diagonal is negligible, and is an error otherwise.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,) or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
    raise ValueError(f"frechet_distance: expected mu [F] and cov [F, F] for both, got {mu1.shape}, {cov1.shape}, "
                     f"{mu2.shape}, {cov2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():
    # A singular product is expected (rank-deficient covariances) and handled below; scipy's warning would be noise.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
      offset = eps * np.eye(dim)
      covmean = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: the matrix square root has a large imaginary part "
                       f"({np.max(np.abs(covmean.imag)):.3g}); are both covariances symmetric positive semi-definite?")
    covmean = covmean.real
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))


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
