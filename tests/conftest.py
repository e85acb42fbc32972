"""Shared test fixtures and checks.

Real data that a machine may lack (Debian's Fashion-MNIST, ``apt-get install dataset-fashion-mnist``): every test that
needs it takes the ``fashion_mnist`` fixture. Where the data cannot be had the test is skipped with the reason, so that
README's test command passes on a fresh machine; where the environment sets ``MTEO_REQUIRE_REAL_DATA=1`` (``.ci/run``
does) it fails instead, so that CI cannot pass by silently skipping the real-data tests.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
import pytest

from mteo_jax import data

REQUIRE_REAL_DATA = "MTEO_REQUIRE_REAL_DATA"


def real_data_required() -> bool:
  """Whether ``MTEO_REQUIRE_REAL_DATA`` is set to anything but "", "0", "false" or "no"."""
  return os.environ.get(REQUIRE_REAL_DATA, "").strip().lower() not in ("", "0", "false", "no")


def missing_real_data(what: str, reason: str) -> None:
  """Skips the calling test for lack of ``what``, or fails it where real data is required."""
  message = f"{what} unavailable: {reason}"
  if real_data_required():
    pytest.fail(f"{message}\n{REQUIRE_REAL_DATA}={os.environ[REQUIRE_REAL_DATA]!r} requires the real-data tests to "
                f"run: install the data (`apt-get install dataset-fashion-mnist`) or unset {REQUIRE_REAL_DATA} to "
                "skip them", pytrace=False)
  pytest.skip(message)


def load_fashion_mnist(split: str = "test") -> data.Dataset:
  """Fashion-MNIST's ``split`` from its default places (Debian's IDX files, else tfds), or skip/fail as above."""
  try:
    return data.get_dataset("fashion_mnist", split)
  except FileNotFoundError as error:
    reason = str(error)  # it says where the files were looked for and how to install them
  missing_real_data(f"Fashion-MNIST ({split})", reason)


@pytest.fixture
def fashion_mnist() -> Callable[[str], data.Dataset]:
  """``fashion_mnist(split="test")`` -> the dataset; the test is skipped (or, under ``MTEO_REQUIRE_REAL_DATA=1``,
  failed) where the files cannot be had. Call it before any expensive work so that a skip costs nothing."""
  return load_fashion_mnist


def assert_lifted_identity(backbone, params, x, c_noise, label=None):
  """``body(params, x, embed_time(params, c_noise, label)) == apply(params, x, c_noise, label)`` bit for bit, under
  jit and eagerly (DESIGN §3); returns the jitted output."""
  plain = jax.jit(lambda p, x, c, y: backbone.apply(p, x, c, y))(params, x, c_noise, label)
  lifted = jax.jit(lambda p, x, c, y: backbone.body(p, x, backbone.embed_time(p, c, y)))(params, x, c_noise, label)
  np.testing.assert_array_equal(plain, lifted)
  np.testing.assert_array_equal(backbone.apply(params, x, c_noise, label),
                                backbone.body(params, x, backbone.embed_time(params, c_noise, label)))
  return plain
