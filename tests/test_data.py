"""Data sources behind one interface, IDX parsing, and deterministic, resumable batching."""

import gzip
import os
import tempfile

import numpy as np
import pytest

from mteo_jax import data

IDX_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
  """An IDX file holding ``array`` (big-endian, as the format requires)."""
  array = np.asarray(array)
  header = bytes([0, 0, IDX_TYPE_CODES[array.dtype.type], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(directory, filename: str, array: np.ndarray, gz: bool = False) -> None:
  payload = idx_bytes(array)
  if gz:
    with gzip.open(os.path.join(directory, filename + ".gz"), "wb") as f:
      f.write(payload)
  else:
    with open(os.path.join(directory, filename), "wb") as f:
      f.write(payload)


def make_idx_dir(directory, n_train=12, n_test=5, size=(4, 3), gz=False, seed=0):
  rs = np.random.RandomState(seed)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rs.randint(0, 256, (n,) + size).astype(np.uint8)
    images[0].flat[0], images[0].flat[1] = 0, 255  # both ends of the range present
    labels = (np.arange(n) % 3).astype(np.uint8)
    images_file, labels_file = data._IDX_FILES[split]
    write_idx(directory, images_file, images, gz)
    write_idx(directory, labels_file, labels, gz)
    arrays[split] = (images, labels)
  return arrays


def counting_dataset(n: int, num_classes: int = 0) -> data.ArrayDataset:
  """Example i has x = [i] (so batches reveal which examples they hold)."""
  labels = np.arange(n) % num_classes if num_classes else None
  return data.ArrayDataset("count", "train", np.arange(n, dtype=np.float32)[:, None], labels, num_classes)


# ----------------------------------------------------------------------------------------------------------------------
# Registry and interface


def test_registry_names_and_unknown_name():
  assert {"tfds", "idx", "fashion_mnist", "digits", "gmm"} <= set(data.DATASETS.names())
  with pytest.raises(KeyError, match="unknown dataset 'cifar100'.*digits"):
    data.get_dataset("cifar100")
  with pytest.raises(KeyError, match="unknown mixture 'spiral'.*ring8"):
    data.get_mixture("spiral")


def test_dataset_indexing_and_errors():
  ds = counting_dataset(5, num_classes=2)
  assert len(ds) == 5 and ds.data_shape == (1,) and ds.num_classes == 2
  example = ds[-1]
  assert example["x"].shape == (1,) and example["x"].dtype == np.float32 and example["x"][0] == 4.0
  assert example["label"].dtype == np.int32 and example["label"].shape == () and example["label"] == 0
  batch = ds.get_batch(np.array([3, 1]))
  np.testing.assert_array_equal(batch["x"][:, 0], [3.0, 1.0])
  np.testing.assert_array_equal(batch["label"], [1, 1])
  assert ds.get_batch([])["x"].shape == (0, 1)
  with pytest.raises(IndexError, match="index 5 out of range"):
    ds[5]
  with pytest.raises(IndexError, match="index -1 out of range"):
    ds.get_batch([0, -1])
  with pytest.raises(TypeError, match="integers"):
    ds[1.0]
  with pytest.raises(ValueError, match="1-D integer"):
    ds.get_batch(np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match="1-D integer"):
    ds.get_batch(np.array([0.5]))
  with pytest.raises(ValueError, match="labels must be given exactly when num_classes > 0"):
    data.ArrayDataset("bad", "train", np.zeros((3, 2)), None, num_classes=2)
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
    data.ArrayDataset("bad", "train", np.zeros((3, 2)), np.array([0, 1, 2]), num_classes=2)


def test_array_dataset_value_range_maps_onto_minus_one_one():
  ds = data.ArrayDataset("r", "train", np.array([[0], [8], [16]], np.uint8), value_range=(0.0, 16.0))
  np.testing.assert_array_equal(ds.get_batch([0, 1, 2])["x"][:, 0], [-1.0, 0.0, 1.0])
  raw = data.ArrayDataset("r", "train", np.array([[0], [8], [16]], np.uint8))  # no value_range: values as they are
  np.testing.assert_array_equal(raw.get_batch([0, 1, 2])["x"][:, 0], [0.0, 8.0, 16.0])


# ----------------------------------------------------------------------------------------------------------------------
# Batching


def test_batches_are_deterministic_and_cover_each_epoch_once():
  ds = counting_dataset(10)
  first = [b["x"][:, 0] for b, _ in zip(data.batches(ds, 3, seed=7), range(9))]
  again = [b["x"][:, 0] for b, _ in zip(data.batches(ds, 3, seed=7), range(9))]
  other = [b["x"][:, 0] for b, _ in zip(data.batches(ds, 3, seed=8), range(9))]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))
  # 3 steps per epoch (the remainder of 10 mod 3 dropped): no example twice within an epoch, epochs reshuffled.
  epochs = [np.concatenate(first[3 * e:3 * e + 3]) for e in range(3)]
  for epoch in epochs:
    assert epoch.shape == (9,) and len(set(epoch.tolist())) == 9
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(epochs[1], data.epoch_permutation(10, 7, 1)[:9])


def test_batches_resume_at_start_step_matches_uninterrupted_run():
  ds = counting_dataset(11, num_classes=3)
  uninterrupted = [b for b, _ in zip(data.batches(ds, 4, seed=3), range(20))]
  resumed = [b for b, _ in zip(data.batches(ds, 4, seed=3, start_step=13), range(7))]
  for a, b in zip(uninterrupted[13:], resumed):
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert uninterrupted[0]["label"].dtype == np.int32


def test_batches_without_drop_remainder_keep_the_leftover_examples():
  ds = counting_dataset(10)
  sizes, seen = [], []
  for b, _ in zip(data.batches(ds, 4, seed=0, drop_remainder=False), range(6)):
    sizes.append(b["x"].shape[0])
    seen.append(b["x"][:, 0])
  assert sizes == [4, 4, 2, 4, 4, 2]
  assert sorted(np.concatenate(seen[:3]).tolist()) == list(range(10))
  assert sorted(np.concatenate(seen[3:]).tolist()) == list(range(10))
  dropped = [b["x"].shape[0] for b, _ in zip(data.batches(ds, 4, seed=0), range(3))]
  assert dropped == [4, 4, 4]


def test_batches_reject_bad_arguments():
  ds = counting_dataset(5)
  with pytest.raises(ValueError, match="batch_size 6 is larger than the dataset count"):
    data.batches(ds, 6, seed=0)
  with pytest.raises(ValueError, match="batch_size must be positive"):
    data.batches(ds, 0, seed=0)
  with pytest.raises(ValueError, match="non-negative"):
    data.batches(ds, 2, seed=-1)
  with pytest.raises(ValueError, match="non-negative"):
    data.batches(ds, 2, seed=0, start_step=-3)
  with pytest.raises(TypeError, match="batch_size must be an integer"):
    data.batches(ds, 2.0, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# digits


def test_digits_splits_values_and_labels():
  from sklearn.datasets import load_digits
  reference = load_digits()
  train, test = data.get_dataset("digits", "train"), data.get_dataset("digits", "test")
  assert (len(train), len(test)) == (1500, 297)
  assert train.data_shape == (8, 8, 1) and train.num_classes == 10
  batch = test.get_batch(np.arange(len(test)))
  assert batch["x"].dtype == np.float32 and batch["x"].min() == -1.0 and batch["x"].max() == 1.0
  np.testing.assert_array_equal(batch["x"][0, ..., 0], reference.images[1500] / 8.0 - 1.0)
  np.testing.assert_array_equal(batch["label"], reference.target[1500:])
  assert batch["label"].dtype == np.int32
  np.testing.assert_array_equal(train[0]["x"][..., 0], reference.images[0] / 8.0 - 1.0)
  with pytest.raises(ValueError, match="unknown split 'validation' for dataset 'digits'"):
    data.get_dataset("digits", "validation")


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian mixtures


def test_gmm_samples_labels_and_exact_mixture():
  train = data.get_dataset("gmm", "train", num_samples=4000, seed=1, labels=True)
  assert len(train) == 4000 and train.data_shape == (2,) and train.num_classes == 8
  mixture = data.get_mixture("ring8")
  np.testing.assert_array_equal(np.asarray(train.mixture.means), np.asarray(mixture.means))
  batch = train.get_batch(np.arange(4000))
  assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
  # Labels are component indices: each label's samples sit around its component's mean.
  for k in range(8):
    np.testing.assert_allclose(batch["x"][batch["label"] == k].mean(0), np.asarray(mixture.means[k]), atol=0.03)
  # The default ring is scaled to sigma_data ~= 0.5 per coordinate.
  np.testing.assert_allclose(batch["x"].std(0), 0.5, atol=0.03)
  unlabelled = data.get_dataset("gmm", "train", num_samples=4000, seed=1)
  assert unlabelled.num_classes == 0 and "label" not in unlabelled[0]
  np.testing.assert_array_equal(unlabelled.get_batch(np.arange(4000))["x"], batch["x"])


def test_gmm_seed_streams_and_mixture_options():
  def draws(split="train", seed=0, **options):
    ds = data.get_dataset("gmm", split, num_samples=50, seed=seed, **options)
    return ds.get_batch(np.arange(50))["x"]
  np.testing.assert_array_equal(draws(), draws())
  assert not np.allclose(draws("train"), draws("test"))   # test split: its own seed stream
  assert not np.allclose(draws(seed=0), draws(seed=1))
  wide = data.get_dataset("gmm", "train", num_samples=2000, radius=2.0, std=0.01).get_batch(np.arange(2000))["x"]
  np.testing.assert_allclose(np.linalg.norm(wide, axis=1), 2.0, atol=0.05)
  random = data.get_dataset("gmm", "train", mixture="random", num_samples=10, num_components=5, dim=3, labels=True)
  assert random.data_shape == (3,) and random.num_classes == 5
  assert random.name == "gmm/random"
  assert data.get_dataset("gmm", num_samples=4, dim=3).data_shape == (3,)
  np.testing.assert_array_equal(np.asarray(data.get_mixture("random", spread=0.0).means), 0.0)
  wide_stds = np.asarray(data.get_mixture("random", std=1.0).stds)
  assert 0.5 <= wide_stds.min() and wide_stds.max() <= 1.0 and wide_stds.max() > 0.2
  assert float(np.max(data.get_mixture("random").stds)) <= 0.2
  other = data.get_mixture("random", mixture_seed=1, num_components=5, dim=3)
  assert not np.allclose(np.asarray(other.means), np.asarray(random.mixture.means))
  with pytest.raises(ValueError, match="unknown split 'val'"):
    data.get_dataset("gmm", "val")
  with pytest.raises(ValueError, match="num_samples must be a positive integer"):
    data.get_dataset("gmm", num_samples=0)
  with pytest.raises(TypeError, match="unexpected keyword argument 'radius'"):
    data.get_mixture("random", radius=1.0)


# ----------------------------------------------------------------------------------------------------------------------
# IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trip(tmp_path, gz):
  arrays = make_idx_dir(tmp_path, gz=gz)
  for split in ("train", "test"):
    ds = data.get_dataset("idx", split, directory=str(tmp_path))
    images, labels = arrays[split]
    assert len(ds) == images.shape[0] and ds.data_shape == (4, 3, 1) and ds.num_classes == 3
    batch = ds.get_batch(np.arange(len(ds)))
    np.testing.assert_allclose(batch["x"][..., 0], images / 127.5 - 1.0, rtol=0, atol=1e-6)
    assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0
    np.testing.assert_array_equal(batch["label"], labels)
  assert data.get_dataset("idx", directory=str(tmp_path), num_classes=10).num_classes == 10


def test_parse_idx_types_and_dimensions():
  for array in (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7, np.linspace(-1, 1, 6).astype(np.float32),
                np.arange(16, dtype=np.uint8).reshape(1, 2, 2, 4), np.array([-3, 5], np.int16)):
    parsed = data.parse_idx(idx_bytes(array))
    assert parsed.dtype == array.dtype and parsed.dtype.isnative
    np.testing.assert_array_equal(parsed, array)


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x05", "two zero bytes"),
    (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x05", "unknown IDX element type 0x07"),
    (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01", "truncated IDX header"),
    (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + b"\x05\x06", r"declares shape \(3,\).*holds 2"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (b"", "empty file"),
])
def test_parse_idx_rejects_corrupt_headers(payload, message):
  with pytest.raises(ValueError, match=message):
    data.parse_idx(payload)


def test_idx_corrupt_files_name_the_path(tmp_path):
  make_idx_dir(tmp_path, gz=True)
  path = tmp_path / "t10k-images-idx3-ubyte.gz"
  with gzip.open(path, "wb") as f:
    f.write(b"\x00\x00\x08\x03" + np.asarray([5, 4, 3], ">u4").tobytes() + b"\x00" * 10)  # 60 bytes declared
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: IDX header declares shape"):
    data.get_dataset("idx", "test", directory=str(tmp_path))
  path.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: cannot read"):
    data.get_dataset("idx", "test", directory=str(tmp_path))


def test_idx_content_validation(tmp_path):
  make_idx_dir(tmp_path)
  write_idx(tmp_path, "train-labels-idx1-ubyte", np.zeros(7, np.uint8))  # 12 images, 7 labels
  with pytest.raises(ValueError, match="expected 12 integer labels"):
    data.get_dataset("idx", "train", directory=str(tmp_path))
  write_idx(tmp_path, "t10k-images-idx3-ubyte", np.zeros((5, 4, 3), np.float32))
  with pytest.raises(ValueError, match="expected uint8 images"):
    data.get_dataset("idx", "test", directory=str(tmp_path))


def test_idx_missing_files_and_bad_split(tmp_path):
  make_idx_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(FileNotFoundError) as error:
    data.get_dataset("idx", "test", directory=str(tmp_path))
  message = str(error.value)
  assert str(tmp_path) in message and "t10k-labels-idx1-ubyte" in message
  assert "apt-get install dataset-fashion-mnist" in message and "fashion_mnist" in message
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_dataset("idx", "train", directory=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="unknown split 'valid'.*'train', 'test'"):
    data.get_dataset("idx", "valid", directory=str(tmp_path))
  with pytest.raises(TypeError, match="directory"):
    data.get_dataset("idx", "train")


# ----------------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_real_fashion_mnist_files(fashion_mnist):  # skipped without the data (failed under MTEO_REQUIRE_REAL_DATA)
  for split, size in (("train", 60000), ("test", 10000)):
    ds = fashion_mnist(split)
    assert len(ds) == size and ds.data_shape == (28, 28, 1) and ds.num_classes == 10
    batch = ds.get_batch(np.arange(size))
    assert batch["x"].dtype == np.float32 and batch["x"].min() == -1.0 and batch["x"].max() == 1.0
    np.testing.assert_array_equal(np.bincount(batch["label"], minlength=10), np.full(10, size // 10))
  assert ds[0]["label"] == 9  # the first test image is an ankle boot (class 9)


def test_fashion_mnist_from_a_directory_checks_its_shape(tmp_path):
  make_idx_dir(tmp_path, size=(28, 28))
  ds = data.get_dataset("fashion_mnist", "train", directory=str(tmp_path))
  assert ds.name == "fashion_mnist" and ds.data_shape == (28, 28, 1) and ds.num_classes == 10
  small = tmp_path / "small"
  small.mkdir()
  make_idx_dir(small, size=(4, 4))
  with pytest.raises(ValueError, match="expected 28x28x1 images in 10 classes"):
    data.get_dataset("fashion_mnist", "train", directory=str(small))


def test_fashion_mnist_missing_everywhere_explains_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with pytest.raises(FileNotFoundError) as error:
    data.get_dataset("fashion_mnist", "test", directory=str(tmp_path / "none"), data_dir=str(tmp_path / "tfds"))
  message = str(error.value)
  assert "apt-get install dataset-fashion-mnist" in message and str(tmp_path / "none") in message
  assert "tfds fallback failed too" in message


# ----------------------------------------------------------------------------------------------------------------------
# tfds (through tfds' own mock of the array_record data source: nothing is downloaded)


@pytest.fixture
def mock_tfds(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the mock creates scratch directories
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    yield tfds


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_mock_data_source(mock_tfds, name, shape):
  ds = data.get_dataset("tfds", "train", tfds_name=name)
  assert ds.name == f"tfds/{name}" and len(ds) == 6 and ds.data_shape == shape and ds.num_classes == 10
  raw = mock_tfds.data_source(name, split="train")
  batch = ds.get_batch(np.arange(6))
  assert batch["x"].dtype == np.float32 and batch["x"].shape == (6,) + shape
  assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
  for i in range(6):
    np.testing.assert_allclose(batch["x"][i], raw[i]["image"] / 127.5 - 1.0, atol=1e-6)
    assert batch["label"][i] == raw[i]["label"]
  assert batch["label"].dtype == np.int32
  steps = [b for b, _ in zip(data.batches(ds, 4, seed=0, drop_remainder=False), range(2))]
  assert [b["x"].shape[0] for b in steps] == [4, 2]


def test_tfds_options(mock_tfds, monkeypatch):
  unlabelled = data.get_dataset("tfds", tfds_name="mnist", label_key=None)
  assert unlabelled.num_classes == 0 and set(unlabelled[0]) == {"x"}
  with pytest.raises(ValueError, match="no image feature 'pixels'"):
    data.get_dataset("tfds", tfds_name="mnist", image_key="pixels")
  with pytest.raises(ValueError, match="no dataset named 'not_a_dataset'"):
    data.get_dataset("tfds", tfds_name="not_a_dataset")
  with pytest.raises(TypeError, match="tfds_name"):
    data.get_dataset("tfds")
  # `download` reaches tfds (False unless asked: nothing is fetched behind the user's back).
  calls = []
  real = mock_tfds.data_source
  monkeypatch.setattr(mock_tfds, "data_source", lambda *a, **k: calls.append(k) or real(*a, **k))
  data.get_dataset("tfds", tfds_name="mnist")
  data.get_dataset("tfds", tfds_name="mnist", download=True, data_dir="/somewhere")
  assert [(c["download"], c["data_dir"]) for c in calls] == [(False, None), (True, "/somewhere")]


def test_fashion_mnist_falls_back_to_tfds(mock_tfds, tmp_path):
  ds = data.get_dataset("fashion_mnist", "test", directory=str(tmp_path / "no_idx_files"))
  assert isinstance(ds, data.TfdsDataset) and len(ds) == 6
  assert ds.data_shape == (28, 28, 1) and ds.num_classes == 10


def test_tfds_unprepared_data_is_a_clear_error(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f"could not open tfds dataset 'mnist', split 'train', in {tmp_path}: "
                                              "no prepared data there.*download=True"):
    data.get_dataset("tfds", tfds_name="mnist", data_dir=str(tmp_path))
