"""The shipped teachers load and sample what they were trained on at ~100 NFE.

Images: in the features of the shipped classifier of the same data, the teacher's samples are about as far (FD) from
held-out real images as other real images are, and far closer than noise, and they cover the classes. GMM: the
samples have the exact mixture's likelihood and land on every mode.
"""

import jax
import numpy as np
import pytest

from mteo_jax import data, features, metrics
from mteo_jax.reference import reference_noise
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher

HEUN_STEPS = 50   # 99 NFE


def _teacher_samples(name: str, num: int, seed: int = 7) -> tuple[np.ndarray, dict]:
  teacher = Teacher.load(f"pretrained:{name}")
  precond = teacher.precond
  sigmas = get_schedule("edm", HEUN_STEPS, precond.sigma_min, precond.sigma_max, rho=7.0)
  x_T = reference_noise(seed, num, teacher.data_shape, precond.sigma_max)
  return np.asarray(get_solver("heun").sample(jax.jit(teacher.denoiser), x_T, sigmas)), teacher.metadata


def _num_classes(net: features.ClassifierFeatureNetwork, images: np.ndarray) -> int:
  """How many classes the classifier predicts on ``images``."""
  return len(np.unique(np.argmax(net.logits(images), axis=-1)))


@pytest.mark.parametrize("name, dataset", [
    ("digits", "digits"), ("digits_dit", "digits"),
    pytest.param("fmnist", "fashion_mnist", marks=pytest.mark.slow),   # ~50 s on 2 CPU cores: 28x28 UNet, 99 NFE
])
def test_shipped_image_teacher_samples_are_recognisable(name, dataset, fashion_mnist):
  num = 128
  # The real data first: without Fashion-MNIST's files this skips (fails under MTEO_REQUIRE_REAL_DATA) at no cost.
  test_split = fashion_mnist("test") if dataset == "fashion_mnist" else data.get_dataset(dataset, "test")
  samples, metadata = _teacher_samples(name, num)
  assert metadata["dataset"] == dataset and samples.shape[1:] == tuple(metadata["data_shape"])
  assert np.all(np.isfinite(samples)) and np.abs(samples).max() < 1.5   # images live in [-1, 1]
  net = features.load_feature_network({"digits": "digits", "fashion_mnist": "fmnist"}[dataset])
  real, other_real = (test_split.get_batch(np.arange(k * num, (k + 1) * num))["x"] for k in (0, 1))
  noise = np.clip(np.random.default_rng(0).normal(size=samples.shape), -1.0, 1.0).astype(np.float32)
  # FD at equal sample counts: the teacher is about as far from real data as other real data is, noise is not.
  fd = metrics.frechet_distance_from_samples(net, samples, real)
  fd_real = metrics.frechet_distance_from_samples(net, other_real, real)
  fd_noise = metrics.frechet_distance_from_samples(net, noise, real)
  assert fd < 1.5 * fd_real and fd_noise > 5 * fd, (fd, fd_real, fd_noise)
  # Not a few modes: the classifier sees most classes among them.
  assert _num_classes(net, samples) >= 8


def test_shipped_gmm_teacher_samples_the_mixture():
  samples, metadata = _teacher_samples("gmm", 2000)
  mixture = data.get_mixture(metadata["data_options"]["mixture"])
  true_samples, _ = mixture.sample(jax.random.key(1), 2000)
  teacher_ll = metrics.mixture_log_likelihood(samples, mixture)
  true_ll = metrics.mixture_log_likelihood(true_samples, mixture)
  assert abs(teacher_ll - true_ll) < 0.1, (teacher_ll, true_ll)
  nearest_mode = np.argmin(((samples[:, None, :] - np.asarray(mixture.means)[None]) ** 2).sum(-1), axis=1)
  counts = np.bincount(nearest_mode, minlength=mixture.means.shape[0])
  assert counts.min() > 0.5 * len(samples) / mixture.means.shape[0], counts   # every mode, none starved
