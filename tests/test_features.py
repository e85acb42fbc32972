"""Feature networks: the shipped classifiers load and keep their accuracy, FD-digits separates real from noise, and a
tiny training run works end to end (every option of ``train_feature_network`` changes the result)."""

import json
import os
import struct

import jax
import numpy as np
import pytest

from mteo_jax import checkpoints, data, features, metrics

# A tiny architecture keeps the end-to-end runs to a second or two each.
TINY = {"channels": [4], "feature_dim": 8}


@pytest.fixture(scope="module")
def digits_net():
  return features.load_feature_network("digits")


@pytest.fixture(scope="module")
def digits_test():
  test = data.get_dataset("digits", "test")
  return test.get_batch(np.arange(len(test)))


@pytest.mark.parametrize("name", ["digits", "fmnist"])
def test_shipped_networks_load_and_describe_themselves(name):
  # Their accuracy is measured on held-out data below, not read back from their metadata.
  net = features.load_feature_network(name)
  assert isinstance(net, metrics.FeatureNetwork)
  assert net.name == name and metrics.frechet_metric_name(net) == f"FD-{name}"
  assert net.metadata["dataset"] == {"digits": "digits", "fmnist": "fashion_mnist"}[name]
  assert net.data_shape == {"digits": (8, 8, 1), "fmnist": (28, 28, 1)}[name]
  # Small enough to ship as package data.
  path = features.pretrained_dir(name)
  assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) < 1_000_000
  images = np.zeros((3,) + net.data_shape, np.float32)
  assert net.features(images).shape == (3, 128)


def test_digits_accuracy_reproduces_the_stored_one(digits_net, digits_test):
  accuracy = digits_net.accuracy(digits_test["x"], digits_test["label"])
  assert accuracy >= 0.95   # measured here on the 297 held-out digits
  assert digits_net.metadata["num_test"] == len(digits_test["label"])
  # Identical up to at most one image flipped by a different CPU's floating-point rounding.
  assert abs(accuracy - digits_net.metadata["test_accuracy"]) <= 1.0 / len(digits_test["label"]) + 1e-9


def test_fmnist_accuracy_on_held_out_data(fashion_mnist):
  test = fashion_mnist("test")  # skipped without the data (failed under MTEO_REQUIRE_REAL_DATA)
  net = features.load_feature_network("fmnist")
  batch = test.get_batch(np.arange(2000))  # a fifth of the test split keeps this fast
  accuracy = net.accuracy(batch["x"], batch["label"])
  assert accuracy >= 0.85 and abs(accuracy - net.metadata["test_accuracy"]) < 0.03


def test_fd_digits_separates_real_data_from_noise(digits_net, digits_test):
  train = data.get_dataset("digits", "train")
  train_x = train.get_batch(np.arange(len(train)))["x"]
  noise = np.random.RandomState(0).randn(*digits_test["x"].shape).astype(np.float32)
  fd_real = metrics.frechet_distance_from_samples(digits_net, digits_test["x"], train_x)
  fd_noise = metrics.frechet_distance_from_samples(digits_net, noise, digits_test["x"])
  assert 0 < fd_real < 0.1 * fd_noise  # measured: 23 vs 392


def test_features_are_batch_independent_and_clip_to_the_data_range(digits_net, digits_test):
  x = digits_test["x"][:23]
  reference = digits_net.features(x)
  assert reference.shape == (23, 128) and reference.dtype == np.float32
  np.testing.assert_allclose(digits_net.features(x, batch_size=7), reference, rtol=1e-5, atol=1e-5)
  small_batches = features.load_feature_network("digits", batch_size=5)
  assert small_batches.batch_size == 5
  np.testing.assert_allclose(small_batches.features(x), reference, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(digits_net.features(3 * x), digits_net.features(np.clip(3 * x, -1, 1)))
  assert not np.allclose(digits_net.features(0.5 * x), reference)
  with pytest.raises(ValueError, match=r"\[N >= 1, 8, 8, 1\]"):
    digits_net.features(x[..., 0])
  with pytest.raises(TypeError, match="float images"):
    digits_net.features(np.zeros((2, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match="labels of shape"):
    digits_net.accuracy(x, digits_test["label"][:5])


def test_random_shift_translates_by_at_most_max_shift():
  images = -np.ones((64, 5, 5, 1), np.float32)
  images[:, 2, 2, 0] = 1.0
  np.testing.assert_array_equal(features.random_shift(images, jax.random.key(0), 0), images)
  shifted = np.asarray(features.random_shift(images, jax.random.key(0), 1))
  rows, cols = np.nonzero(shifted[..., 0] == 1.0)[1:]
  assert len(rows) == 64 and set(rows) == {1, 2, 3} and set(cols) == {1, 2, 3}  # every offset in [-1, 1]^2 occurs
  assert np.all(np.sort(shifted.ravel())[:-64] == -1.0)


def test_default_architecture():
  assert features.default_architecture((8, 8, 1), 10)["channels"] == [32, 64]
  assert features.default_architecture((28, 28, 1), 10)["channels"] == [32, 64, 64]
  assert features.default_architecture((32, 32, 3), 10)["channels"] == [32, 64, 64]
  with pytest.raises(ValueError, match="at least 4x4"):
    features.default_architecture((2, 2, 1), 10)


def _train_tiny(out_dir, **options):
  kwargs = dict(architecture=TINY, progress=False)
  kwargs.update(options)
  metadata = features.train_feature_network("digits", kwargs.pop("steps", 3), 16, kwargs.pop("seed", 0), out_dir,
                                            **kwargs)
  return metadata, features.load_feature_network(out_dir)


def test_tiny_training_run_end_to_end(tmp_path, capsys):
  metadata, net = _train_tiny(tmp_path / "net", name="tiny", progress=True)
  assert "feature net (tiny)" in capsys.readouterr().err  # the progress bar
  stored = json.loads((tmp_path / "net" / "metadata.json").read_text())
  assert stored == json.loads(json.dumps(metadata))
  for key in ("dataset", "architecture", "test_accuracy", "steps", "seed", "train_wall_time_s", "augment_shift"):
    assert key in metadata
  assert metadata["architecture"] == {"num_classes": 10, "channels": [4], "feature_dim": 8}
  assert metadata["steps"] == 3 and metadata["num_test"] == 297 and 0 <= metadata["test_accuracy"] <= 1
  assert net.name == "tiny" and net.feature_dim == 8
  images = data.get_dataset("digits", "test").get_batch(np.arange(40))["x"]
  assert net.features(images).shape == (40, 8)
  assert np.isfinite(metrics.frechet_distance_from_samples(net, images[:20], images[20:]))
  # The saved parameters are the trained ones: the reloaded network reproduces the recorded accuracy.
  test = data.get_dataset("digits", "test").get_batch(np.arange(297))
  assert net.accuracy(test["x"], test["label"]) == pytest.approx(metadata["test_accuracy"], abs=1 / 297 + 1e-9)
  with pytest.raises(FileExistsError, match="overwrite"):
    _train_tiny(tmp_path / "net", steps=10 ** 9)  # refused before any training
  _, quiet = _train_tiny(tmp_path / "net", overwrite=True)
  assert capsys.readouterr().err == ""  # progress=False: no bar
  assert quiet.name == "digits"


def test_training_options_change_the_result(tmp_path):
  def params_of(name, **options):
    return jax.tree.leaves(_train_tiny(tmp_path / name, **options)[1].params)

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))

  base = params_of("base")
  assert same(base, params_of("again"))                       # deterministic
  assert not same(base, params_of("seed", seed=1))
  assert not same(base, params_of("lr", learning_rate=1e-2))
  assert not same(base, params_of("shift", augment_shift=1))
  with pytest.raises(ValueError, match="unknown architecture keys"):
    _train_tiny(tmp_path / "bad", architecture={"width": 3})
  with pytest.raises(ValueError, match="augment_shift"):
    _train_tiny(tmp_path / "bad", augment_shift=-1)
  with pytest.raises(ValueError, match="labelled images"):
    features.train_feature_network("gmm", 3, 16, 0, tmp_path / "bad", progress=False)


def _write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  path.write_bytes(header + array.tobytes())


def test_dataset_options_reach_the_dataset(tmp_path):
  """A user's own IDX files (``dataset_options={"directory": ...}``): two classes, bright left vs right half."""
  rs = np.random.RandomState(0)
  for split, n in (("train", 64), ("t10k", 32)):
    labels = np.arange(n) % 2
    images = rs.randint(0, 60, (n, 8, 8))
    for i, label in enumerate(labels):
      images[i, :, 4 * label:4 * label + 4] += 180
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte", images)
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
  metadata = features.train_feature_network("idx", 30, 16, 0, tmp_path / "net", learning_rate=1e-2,
                                            architecture=TINY, dataset_options={"directory": str(tmp_path)},
                                            progress=False)
  assert metadata["name"] == "idx" and metadata["num_train"] == 64 and metadata["num_test"] == 32
  assert metadata["architecture"]["num_classes"] == 2 and metadata["test_accuracy"] >= 0.9


def test_command_line_entry(tmp_path, capsys):
  out = tmp_path / "cli"
  metadata = features.main(["--dataset=digits", "--steps=2", "--batch_size=8", "--seed=3", "--learning_rate=1e-3",
                            "--augment_shift=1", f"--out={out}", "--name=cli", "--no_progress"])
  assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(metadata))
  assert (metadata["steps"], metadata["batch_size"], metadata["seed"], metadata["augment_shift"]) == (2, 8, 3, 1)
  assert metadata["learning_rate"] == 1e-3 and metadata["architecture"]["channels"] == [32, 64]
  assert features.load_feature_network(str(out)).name == "cli"


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match=r"neither a shipped feature network \['digits', 'fmnist'\]"):
    features.load_feature_network("cifar10")
  with pytest.raises(ValueError, match="save_pytree"):
    features.load_feature_network(tmp_path)  # an empty directory holds no network
  checkpoints.save_pytree(tmp_path / "other", {"w": np.zeros(2)}, {"what": "not a feature network"})
  with pytest.raises(ValueError, match="no feature-network metadata"):
    features.load_feature_network(tmp_path / "other")
