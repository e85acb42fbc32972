"""Datasets behind one indexable interface, and deterministic, resumable batching.

Every source yields examples ``{"x": float32 [*data_shape], "label": int32 []}`` (``label`` only when
``num_classes > 0``). Images are channel-last (HWC, grayscale has C=1) and mapped linearly onto [-1, 1]:
``x = 2 (v - lo) / (hi - lo) - 1`` for raw values ``v`` in ``[lo, hi]`` (uint8: ``v / 127.5 - 1``).

Sources, by registry name (``get_dataset(name, split, **options)``):
  ``tfds``           any image dataset through ``tfds.data_source`` (array_record; no TensorFlow needed).
  ``idx``            a directory of MNIST-format IDX files (optionally gzipped).
  ``fashion_mnist``  ``idx`` on the files of Debian's ``dataset-fashion-mnist``, else tfds ``fashion_mnist``.
  ``digits``         scikit-learn's bundled 8x8 digits.
  ``gmm``            samples of a Gaussian mixture whose density and denoiser are known exactly.

``batches`` draws the batch at global step ``s`` from a permutation seeded by ``(seed, s // steps_per_epoch)``, so a
run resumed at ``start_step`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import gzip
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mteo_jax import closed_form
from mteo_jax.registry import Registry

DATASETS: Registry[Callable[..., "Dataset"]] = Registry("dataset")
MIXTURES: Registry[Callable[..., closed_form.GaussianMixture]] = Registry("mixture")

# Where Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files (`dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

DIGITS_NUM_TEST = 297  # the last 297 of sklearn's 1797 digits are the test split (1500 train / 297 test)


# ----------------------------------------------------------------------------------------------------------------------
# The interface


class Dataset:
  """An indexable collection of examples with ``len``; subclasses implement ``__len__`` and ``_get_batch``."""

  name: str
  split: str
  data_shape: tuple[int, ...]
  num_classes: int

  def __len__(self) -> int:
    raise NotImplementedError

  def _get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def get_batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """Stacked examples ``{"x": [n, *data_shape] float32, "label": [n] int32}`` at ``indices`` (1-D, in range)."""
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
      raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} and dtype {indices.dtype}")
    indices = indices.astype(np.int64)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      bad = indices[(indices < 0) | (indices >= n)][0]
      raise IndexError(f"index {bad} out of range for {self.name} ({self.split}) of length {n}")
    batch = self._get_batch(indices)
    assert batch["x"].shape == (indices.size,) + self.data_shape, (batch["x"].shape, self.data_shape)
    return batch

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    """One example ``{"x": float32 [*data_shape], "label": int32 []}``; negative ``i`` counts from the end."""
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
      raise TypeError(f"{type(self).__name__} indices must be integers, got {type(i).__name__}; "
                      "use get_batch for several examples")
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for {self.name} ({self.split}) of length {n}")
    batch = self.get_batch(np.array([i % n]))
    return {key: value[0] for key, value in batch.items()}

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"data_shape={self.data_shape}, num_classes={self.num_classes})")


class ArrayDataset(Dataset):
  """In-memory data: raw values ``[N, *data_shape]`` in ``value_range`` (kept compact, e.g. uint8), mapped to [-1, 1].

  ``value_range=None`` keeps the values as they are (already data-space floats, e.g. mixture samples).
  """

  def __init__(self, name: str, split: str, values: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int = 0, value_range: tuple[float, float] | None = None):
    values = np.asarray(values)
    if values.ndim < 2 or values.shape[0] == 0:
      raise ValueError(f"{name}: expected values of shape [N >= 1, *data_shape], got {values.shape}")
    if (labels is None) != (num_classes == 0):
      raise ValueError(f"{name}: labels must be given exactly when num_classes > 0 (num_classes={num_classes})")
    if labels is not None:
      labels = np.asarray(labels)
      if labels.shape != values.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels of shape {values.shape[:1]}, "
                         f"got {labels.dtype} {labels.shape}")
      if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")
      labels = labels.astype(np.int32)
    if value_range is not None and not value_range[0] < value_range[1]:
      raise ValueError(f"{name}: value_range must be (lo, hi) with lo < hi, got {value_range}")
    self.name, self.split = name, split
    self.data_shape = tuple(int(d) for d in values.shape[1:])
    self.num_classes = int(num_classes)
    self.value_range = value_range
    self._values, self._labels = values, labels

  def __len__(self) -> int:
    return self._values.shape[0]

  def _get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    x = self._values[indices].astype(np.float32)
    if self.value_range is not None:
      lo, hi = self.value_range
      # (v - lo) / half_width - 1 rather than v * scale + shift: exact at both ends (255 / 127.5 == 2 in float32).
      x = (x - np.float32(lo)) / np.float32((hi - lo) / 2.0) - np.float32(1.0)
    batch = {"x": x}
    if self._labels is not None:
      batch["label"] = self._labels[indices]
    return batch


class MixtureDataset(ArrayDataset):
  """Samples of a Gaussian mixture; ``mixture`` is the exact distribution they were drawn from."""

  def __init__(self, name: str, split: str, mixture: closed_form.GaussianMixture, values: np.ndarray,
               labels: np.ndarray | None):
    super().__init__(name, split, values, labels, num_classes=0 if labels is None else int(mixture.weights.shape[0]))
    self.mixture = mixture


class TfdsDataset(Dataset):
  """A ``tfds.data_source`` (random access, array_record) of uint8 images; decoded lazily, example by example."""

  def __init__(self, name: str, split: str, source: Any, image_key: str = "image", label_key: str | None = "label"):
    features = source.dataset_info.features
    if image_key not in features:
      raise ValueError(f"{name}: no image feature {image_key!r}; features are {sorted(features.keys())}")
    image = features[image_key]
    shape = tuple(image.shape)
    if len(shape) != 3 or any(d is None for d in shape) or np.dtype(image.np_dtype) != np.uint8:
      raise ValueError(f"{name}: feature {image_key!r} must be a fixed-shape uint8 HWC image, got {image}")
    self.name, self.split = name, split
    self.data_shape = tuple(int(d) for d in shape)
    self.num_classes = 0
    self._label_key = None
    if label_key is not None and label_key in features:
      self.num_classes = int(getattr(features[label_key], "num_classes", 0) or 0)
      if self.num_classes == 0:
        raise ValueError(f"{name}: feature {label_key!r} is not a ClassLabel; pass label_key=None to ignore it")
      self._label_key = label_key
    self._source, self._image_key = source, image_key

  def __len__(self) -> int:
    return len(self._source)

  def _get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    # One record at a time: the batched `__getitems__` of array_record sources is not available under tfds' mocks.
    examples = [self._source[int(i)] for i in indices]
    images = np.stack([np.asarray(e[self._image_key]) for e in examples]) if examples else \
        np.zeros((0,) + self.data_shape, np.uint8)
    batch = {"x": images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)}
    if self._label_key is not None:
      batch["label"] = np.asarray([e[self._label_key] for e in examples], np.int32)
    return batch


def get_dataset(name: str, split: str = "train", **options) -> Dataset:
  """The ``split`` of dataset source ``name`` (see ``DATASETS.names()``), configured by its keyword ``options``."""
  return DATASETS.get(name)(split, **options)


def _check_split(name: str, split: str, valid: Sequence[str]) -> None:
  if split not in valid:
    raise ValueError(f"unknown split {split!r} for dataset {name!r}; expected one of {list(valid)}")


# ----------------------------------------------------------------------------------------------------------------------
# Batching


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
  """Batches per pass over the data: ``floor(N / B)`` when dropping the remainder, else ``ceil(N / B)``."""
  return num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of the examples in ``epoch``: a function of ``(seed, epoch, num_examples)`` only."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batches(dataset: Dataset, batch_size: int, *, seed: int, start_step: int = 0,
            drop_remainder: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Endless batches; batch ``s`` is ``perm(seed, s // spe)[(s % spe) B : (s % spe + 1) B]`` with spe steps per epoch.

  With ``drop_remainder=False`` the last batch of each epoch holds the ``N mod B`` leftover examples.
  """
  n = len(dataset)
  for label, value in (("batch_size", batch_size), ("seed", seed), ("start_step", start_step)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise TypeError(f"{label} must be an integer, got {value!r}")
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if batch_size > n:
    raise ValueError(f"batch_size {batch_size} is larger than the dataset {dataset.name} ({dataset.split}) "
                     f"of {n} examples")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed and start_step must be non-negative, got seed={seed}, start_step={start_step}")
  spe = steps_per_epoch(n, batch_size, drop_remainder)
  return _batch_iterator(dataset, batch_size, int(seed), int(start_step), spe)


def _batch_iterator(dataset: Dataset, batch_size: int, seed: int, step: int, spe: int) -> Iterator[dict]:
  epoch, permutation = -1, None
  while True:
    if step // spe != epoch:
      epoch = step // spe
      permutation = epoch_permutation(len(dataset), seed, epoch)
    position = (step % spe) * batch_size
    yield dataset.get_batch(permutation[position:position + batch_size])
    step += 1


# ----------------------------------------------------------------------------------------------------------------------
# tfds


def _tfds_source(tfds_name: str, split: str, data_dir: str | None, download: bool) -> Any:
  import tensorflow_datasets as tfds  # imported here: it is slow to import and only this source needs it
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=download)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"tensorflow_datasets has no dataset named {tfds_name!r}") from None
  except Exception as error:  # tfds raises many types here (missing files, unprepared or TFRecord-only data, splits)
    where = data_dir or "the default tfds data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    reason = f"{type(error).__name__}: {error}"
    try:  # tfds' own message for data that was never prepared is misleading (it blames a TFRecord format)
      if not tfds.builder(tfds_name, data_dir=data_dir).is_prepared():
        reason = "no prepared data there"
    except Exception:  # keep tfds' message when even the builder cannot say
      pass
    hint = "" if download else (" Nothing is downloaded unless download=True (needs internet); otherwise prepare it in "
                                "array_record format there, e.g. `tfds build --file_format=array_record`.")
    raise FileNotFoundError(f"could not open tfds dataset {tfds_name!r}, split {split!r}, in {where}: "
                            f"{reason}.{hint}") from error


@DATASETS.register("tfds")
def _load_tfds(split: str, *, tfds_name: str, data_dir: str | None = None, download: bool = False,
               image_key: str = "image", label_key: str | None = "label") -> TfdsDataset:
  """``tfds.data_source(tfds_name, split=split, data_dir=data_dir)``: uint8 images to [-1, 1], ClassLabel labels."""
  return TfdsDataset(f"tfds/{tfds_name}", split, _tfds_source(tfds_name, split, data_dir, download), image_key,
                     label_key)


# ----------------------------------------------------------------------------------------------------------------------
# IDX files (the MNIST format: https://yann.lecun.com/exdb/mnist/, "FILE FORMATS")

# IDX type byte -> big-endian element type.
_IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """The array in an IDX byte string: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data."""
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{source}: not an IDX file (the magic number must start with two zero bytes, "
                     f"got {data[:4].hex() or 'an empty file'})")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_TYPES:
    raise ValueError(f"{source}: unknown IDX element type 0x{type_code:02x}; expected one of "
                     f"{['0x%02x' % t for t in _IDX_TYPES]}")
  if ndim == 0:
    raise ValueError(f"{source}: IDX header declares 0 dimensions")
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header_size})")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = _IDX_TYPES[type_code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - header_size != expected:
    raise ValueError(f"{source}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes of data) "
                     f"but the file holds {len(data) - header_size}")
  return np.frombuffer(data, dtype, offset=header_size).reshape(shape).astype(dtype.newbyteorder("="))


def _missing_idx_message(directory: str, filename: str) -> str:
  message = (f"IDX file {filename!r} (or {filename + '.gz'!r}) not found in directory {directory!r}. "
             "For Fashion-MNIST, install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
             f"{FASHION_MNIST_DIR}) or, with internet, use tfds: get_dataset('tfds', tfds_name='fashion_mnist', "
             "download=True).")
  return message


def read_idx_file(directory: str, filename: str) -> np.ndarray:
  """``directory/filename`` or, failing that, ``directory/filename.gz``, parsed as IDX."""
  for candidate, opener in ((filename, open), (filename + ".gz", gzip.open)):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      try:
        with opener(path, "rb") as f:
          data = f.read()
      except (OSError, EOFError) as error:  # a damaged gzip stream
        raise ValueError(f"{path}: cannot read ({error})") from error
      return parse_idx(data, path)
  raise FileNotFoundError(_missing_idx_message(directory, filename))


@DATASETS.register("idx")
def _load_idx(split: str, *, directory: str, num_classes: int | None = None, name: str = "idx") -> ArrayDataset:
  """The IDX image/label pair of ``split`` ("train": train-*, "test": t10k-*) in ``directory``, uint8 images.

  ``num_classes`` defaults to ``max(label) + 1`` over the loaded split.
  """
  _check_split(name, split, list(_IDX_FILES))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"IDX directory {directory!r} does not exist. "
                            + _missing_idx_message(directory, _IDX_FILES[split][0]))
  images_file, labels_file = _IDX_FILES[split]
  images = read_idx_file(directory, images_file)
  labels = read_idx_file(directory, labels_file)
  path = os.path.join(directory, images_file)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise ValueError(f"{path}: expected uint8 images [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
  if images.ndim == 3:
    images = images[..., None]  # grayscale: channel last, C = 1
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{os.path.join(directory, labels_file)}: expected {images.shape[0]} integer labels, got "
                     f"{labels.dtype} {labels.shape}")
  if num_classes is None:
    num_classes = int(labels.max()) + 1
  return ArrayDataset(name, split, images, labels, num_classes, value_range=(0.0, 255.0))


@DATASETS.register("fashion_mnist")
def _load_fashion_mnist(split: str, *, directory: str = FASHION_MNIST_DIR, data_dir: str | None = None) -> Dataset:
  """Fashion-MNIST (28x28x1, 10 classes): IDX files in ``directory``, else tfds ``fashion_mnist`` in ``data_dir``."""
  _check_split("fashion_mnist", split, list(_IDX_FILES))
  have_files = all(os.path.isfile(os.path.join(directory, f)) or os.path.isfile(os.path.join(directory, f + ".gz"))
                   for f in _IDX_FILES[split])
  if have_files:
    dataset = _load_idx(split, directory=directory, num_classes=10, name="fashion_mnist")
  else:
    try:
      dataset = TfdsDataset("fashion_mnist", split, _tfds_source("fashion_mnist", split, data_dir, download=False))
    except FileNotFoundError as error:
      raise FileNotFoundError(_missing_idx_message(directory, _IDX_FILES[split][0])
                              + f" (tfds fallback failed too: {error})") from error
  if dataset.data_shape != (28, 28, 1) or dataset.num_classes != 10:
    raise ValueError(f"fashion_mnist: expected 28x28x1 images in 10 classes, got {dataset.data_shape} and "
                     f"{dataset.num_classes} classes")
  return dataset


# ----------------------------------------------------------------------------------------------------------------------
# scikit-learn digits


@DATASETS.register("digits")
def _load_digits(split: str) -> ArrayDataset:
  """sklearn's 1797 8x8x1 digits (0..16 -> [-1, 1], 10 classes); "train": the first 1500, "test": the last 297."""
  _check_split("digits", split, ["train", "test"])
  from sklearn.datasets import load_digits  # bundled with scikit-learn: no download
  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # integer counts 0..16 stored compactly
  rows = slice(None, -DIGITS_NUM_TEST) if split == "train" else slice(-DIGITS_NUM_TEST, None)
  return ArrayDataset("digits", split, images[rows], digits.target[rows], num_classes=10, value_range=(0.0, 16.0))


# ----------------------------------------------------------------------------------------------------------------------
# Gaussian mixtures


@MIXTURES.register("ring8")
def _ring8(radius: float = 0.7, std: float = 0.1, dim: int = 2) -> closed_form.GaussianMixture:
  """8 equal modes on a circle; radius 0.7, std 0.1 give a per-coordinate std of ~0.505, i.e. sigma_data ~= 0.5."""
  return closed_form.ring_mixture(8, radius=radius, std=std, dim=dim)


@MIXTURES.register("random")
def _random(mixture_seed: int = 0, num_components: int = 8, dim: int = 2, spread: float = 0.45,
            std: float = 0.2) -> closed_form.GaussianMixture:
  """``random_mixture``; means ~ N(0, 0.45^2) and stds in [0.1, 0.2] give a per-coordinate std of ~0.5."""
  return closed_form.random_mixture(mixture_seed, num_components, dim, spread=spread, std=std)


def get_mixture(name: str, **options) -> closed_form.GaussianMixture:
  """The Gaussian mixture ``name`` (see ``MIXTURES.names()``), e.g. for the exact density of a ``gmm`` dataset."""
  return MIXTURES.get(name)(**options)


_GMM_SPLITS = ("train", "test")


@DATASETS.register("gmm")
def _load_gmm(split: str, *, mixture: str = "ring8", num_samples: int = 10_000, seed: int = 0, labels: bool = False,
              **mixture_options) -> MixtureDataset:
  """``num_samples`` draws ``x = mu_k + s_k n`` (``k ~ weights``) of ``get_mixture(mixture, **mixture_options)``.

  Each split has its own seed stream, ``default_rng([seed, split_index])``, so "train" and "test" never share draws.
  With ``labels`` the component index ``k`` is the label (``num_classes = K``).
  """
  _check_split("gmm", split, _GMM_SPLITS)
  if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
    raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
  distribution = get_mixture(mixture, **mixture_options)
  # Sampled on the host with numpy, like every other source: no JAX compilation for each new sample count.
  rng = np.random.default_rng([seed, _GMM_SPLITS.index(split)])
  weights = np.asarray(distribution.weights, np.float64)
  means, stds = np.asarray(distribution.means, np.float64), np.asarray(distribution.stds, np.float64)
  component = rng.choice(weights.shape[0], size=int(num_samples), p=weights / weights.sum())
  x = means[component] + stds[component, None] * rng.standard_normal((int(num_samples), means.shape[1]))
  return MixtureDataset(f"gmm/{mixture}", split, distribution, x.astype(np.float32),
                        component.astype(np.int32) if labels else None)
