"""The real-data policy of the test suite (tests/conftest.py): skip where Debian's Fashion-MNIST is absent, so that
README's command passes on a fresh machine; fail instead under MTEO_REQUIRE_REAL_DATA=1, which .ci/run sets."""

import os

import pytest

import conftest
from mteo_jax import data


def _absent(name, split="train", **options):
  raise FileNotFoundError(f"no Fashion-MNIST files for {name}/{split} (test stand-in)")


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_missing_data_skips_with_its_reason(monkeypatch, value):
  monkeypatch.setattr(data, "get_dataset", _absent)
  monkeypatch.setenv(conftest.REQUIRE_REAL_DATA, value)
  with pytest.raises(pytest.skip.Exception, match=r"Fashion-MNIST \(test\) unavailable: no Fashion-MNIST files"):
    conftest.load_fashion_mnist("test")


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_missing_data_fails_where_real_data_is_required(monkeypatch, value):
  monkeypatch.setattr(data, "get_dataset", _absent)
  monkeypatch.setenv(conftest.REQUIRE_REAL_DATA, value)
  with pytest.raises(pytest.fail.Exception, match="requires the real-data tests to run"):
    conftest.load_fashion_mnist("train")


def test_ci_requires_the_real_data():
  script = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
  assert f"export {conftest.REQUIRE_REAL_DATA}=1" in script
  assert "dataset-fashion-mnist" in script
