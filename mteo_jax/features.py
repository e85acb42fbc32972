"""Offline feature networks for Fréchet distances: small CNN classifiers trained here, shipped as package data.

The features are the activations of the classifier's penultimate dense layer. A Fréchet distance in this space is
reported as ``FD-<name>`` ("FD-digits", "FD-fmnist"), never FID: see ``mteo_jax.metrics``.

Train (the commands that made the shipped networks are in ``launch/train_feature_nets.sh``)::

    python -m mteo_jax.features --dataset=digits --steps=2000 --augment_shift=1 --out=/tmp/features_digits

Use::

    net = load_feature_network("digits")            # or "fmnist", or the directory of a network you trained
    fd = metrics.frechet_distance_from_samples(net, generated_images, real_images)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mteo_jax import checkpoints, data
from mteo_jax.registry import Registry

# Shipped networks: name -> directory under ``mteo_jax/pretrained/``.
PRETRAINED: Registry[str] = Registry("pretrained feature network")
PRETRAINED.register("digits")("features_digits")
PRETRAINED.register("fmnist")("features_fmnist")

# Short names of datasets whose networks are shipped; other datasets name their network after themselves.
_NETWORK_NAMES = {"digits": "digits", "fashion_mnist": "fmnist"}

DEFAULT_BATCH_SIZE = 500


class FeatureCNN(nn.Module):
  """Images [B, H, W, C] -> logits [B, num_classes]: stages of (3x3 conv, SiLU, 2x2 avg pool), then two dense layers.

  ``features`` is the output of the penultimate dense layer (``feature_dim`` units, after its SiLU). SiLU rather than
  ReLU so that no feature is identically zero on the data (a dead unit would make the feature covariance singular).
  """
  num_classes: int
  channels: tuple[int, ...] = (32, 64)
  feature_dim: int = 128

  def setup(self):
    self.convs = [nn.Conv(c, (3, 3)) for c in self.channels]
    self.feature_dense = nn.Dense(self.feature_dim)
    self.classifier = nn.Dense(self.num_classes)

  def features(self, x: jax.Array) -> jax.Array:
    h = x
    for conv in self.convs:
      h = nn.avg_pool(nn.silu(conv(h)), (2, 2), strides=(2, 2))
    return nn.silu(self.feature_dense(h.reshape(h.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classifier(self.features(x))


def default_architecture(data_shape: Sequence[int], num_classes: int) -> dict[str, Any]:
  """``FeatureCNN`` kwargs for images of ``data_shape``: as many pooling stages (at most 3) as leave >= 2x2 pixels.

  8x8 -> 2 stages (32, 64 channels); 28x28 and 32x32 -> 3 stages (32, 64, 64).
  """
  side = min(data_shape[0], data_shape[1])
  if side < 4:
    raise ValueError(f"images must be at least 4x4 for the feature CNN, got data_shape {tuple(data_shape)}")
  stages = min(3, int(math.log2(side)) - 1)
  return {"num_classes": int(num_classes), "channels": [32, 64, 64][:stages], "feature_dim": 128}


def _make_module(architecture: dict[str, Any]) -> FeatureCNN:
  kwargs = dict(architecture)
  kwargs["channels"] = tuple(int(c) for c in kwargs["channels"])
  return FeatureCNN(**kwargs)


def _init_params(module: FeatureCNN, data_shape: Sequence[int], rng: jax.Array) -> Any:
  return module.init(rng, jnp.zeros((1,) + tuple(data_shape), jnp.float32))["params"]


class ClassifierFeatureNetwork:
  """A trained ``FeatureCNN`` as a ``metrics.FeatureNetwork``: ``features(images) -> [N, feature_dim]``.

  Images are [N, H, W, C] in [-1, 1]; values outside are clipped to [-1, 1] first, as the uint8 conversion of any image
  pipeline would. Evaluation runs in jitted batches of ``batch_size`` (the last one padded: one compilation only).
  """

  def __init__(self, module: FeatureCNN, params: Any, name: str, data_shape: Sequence[int],
               metadata: dict[str, Any] | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.module, self.params, self.name = module, params, name
    self.data_shape = tuple(int(d) for d in data_shape)
    self.metadata = dict(metadata or {})
    self.batch_size = int(batch_size)
    self.feature_dim = module.feature_dim
    self._features = jax.jit(lambda p, x: module.apply({"params": p}, x, method=FeatureCNN.features))
    self._logits = jax.jit(lambda p, x: module.apply({"params": p}, x))

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.data_shape or images.shape[0] == 0:
      raise ValueError(f"feature network {self.name!r} expects images of shape [N >= 1, "
                       f"{', '.join(map(str, self.data_shape))}] in [-1, 1], got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
      raise TypeError(f"feature network {self.name!r} expects float images in [-1, 1], got dtype {images.dtype}")
    return np.clip(images.astype(np.float32), -1.0, 1.0)

  def _batched(self, fn, images, batch_size: int | None) -> np.ndarray:
    images = self._check_images(images)
    batch_size = self.batch_size if batch_size is None else int(batch_size)
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    outputs = []
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:], np.float32)])
      outputs.append(np.asarray(fn(self.params, padded))[:len(chunk)])
    return np.concatenate(outputs)

  def features(self, images, batch_size: int | None = None) -> np.ndarray:
    """Penultimate-layer activations [N, feature_dim] (float32) of images [N, H, W, C] in [-1, 1]."""
    return self._batched(self._features, images, batch_size)

  def logits(self, images, batch_size: int | None = None) -> np.ndarray:
    """Class logits [N, num_classes] of images [N, H, W, C] in [-1, 1]."""
    return self._batched(self._logits, images, batch_size)

  def accuracy(self, images, labels) -> float:
    """Fraction of images whose arg-max logit is their label."""
    labels = np.asarray(labels)
    if labels.shape != (np.shape(images)[0],):
      raise ValueError(f"expected labels of shape [{np.shape(images)[0]}], got {labels.shape}")
    return float(np.mean(np.argmax(self.logits(images), axis=-1) == labels))

  def __repr__(self) -> str:
    return (f"ClassifierFeatureNetwork(name={self.name!r}, data_shape={self.data_shape}, "
            f"feature_dim={self.feature_dim}, test_accuracy={self.metadata.get('test_accuracy')})")


def _whole_split(dataset: data.Dataset) -> dict[str, np.ndarray]:
  return dataset.get_batch(np.arange(len(dataset)))


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  """Translate each image [B, H, W, C] by its own integer offset in [-max_shift, max_shift]^2, filling with -1."""
  if max_shift == 0:
    return images
  b, h, w, c = images.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  # -1, the bottom of the data range, is the background of digits and Fashion-MNIST (their edge pixels are not always).
  padded = jnp.pad(images, pad, constant_values=-1.0)
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  return jax.vmap(lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def _make_train_step(module: FeatureCNN, optimizer: optax.GradientTransformation, augment_shift: int):
  """One pure step ``(params, opt_state, x, label, rng) -> (params, opt_state, metrics)`` on the mean cross-entropy."""

  def loss_fn(params, x, label):
    logits = module.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == label)

  def step(params, opt_state, x, label, rng):
    x = random_shift(x, rng, augment_shift)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, label)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

  return jax.jit(step, donate_argnums=(0, 1))


def train_feature_network(dataset_name: str, steps: int, batch_size: int, seed: int, out_dir: str | os.PathLike, *,
                          learning_rate: float = 2e-3, augment_shift: int = 0,
                          architecture: dict[str, Any] | None = None,
                          dataset_options: dict[str, Any] | None = None, name: str | None = None,
                          progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
  """Train a ``FeatureCNN`` classifier on the "train" split, measure its "test" accuracy, save it; returns the metadata.

  Adam with a cosine decay of ``learning_rate`` to zero over ``steps``; batches from ``data.batches(seed=seed)``,
  parameters initialised from ``jax.random.key(seed)``. ``augment_shift > 0`` translates every training image by a
  random offset of up to that many pixels (it helps on the 1500 digits, not on Fashion-MNIST's 60000 images).
  ``architecture`` overrides keys of ``default_architecture``.
  ``name`` (default: "digits", "fmnist", else the dataset name) becomes the network's ``name``, hence ``FD-<name>``.
  The parameters and the metadata (dataset, architecture, test accuracy, steps, seed, wall time, ...) are written with
  ``checkpoints.save_pytree`` to ``out_dir``, which must not exist unless ``overwrite``.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if augment_shift < 0:
    raise ValueError(f"augment_shift must be >= 0 pixels, got {augment_shift}")
  if os.path.exists(out_dir) and not overwrite:  # checked before training, not after minutes of it
    raise FileExistsError(f"{os.fspath(out_dir)} already exists; pass overwrite=True (--overwrite) to replace it")
  dataset_options = dict(dataset_options or {})
  train_set = data.get_dataset(dataset_name, "train", **dataset_options)
  test_set = data.get_dataset(dataset_name, "test", **dataset_options)
  if len(train_set.data_shape) != 3 or train_set.num_classes < 2:
    raise ValueError(f"a feature network needs labelled images [H, W, C] with >= 2 classes; {dataset_name!r} has "
                     f"data_shape {train_set.data_shape} and {train_set.num_classes} classes")
  arch = default_architecture(train_set.data_shape, train_set.num_classes)
  unknown = set(architecture or {}) - set(arch)
  if unknown:
    raise ValueError(f"unknown architecture keys {sorted(unknown)}; expected a subset of {sorted(arch)}")
  arch.update(architecture or {})
  arch["channels"] = [int(c) for c in arch["channels"]]
  name = name or _NETWORK_NAMES.get(dataset_name, dataset_name)
  module = _make_module(arch)

  start = time.perf_counter()
  init_rng, augment_rng = jax.random.split(jax.random.key(seed))
  params = _init_params(module, train_set.data_shape, init_rng)
  optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  opt_state = optimizer.init(params)
  train_step = _make_train_step(module, optimizer, augment_shift)
  batches = data.batches(train_set, batch_size, seed=seed)
  with tqdm.tqdm(range(steps), desc=f"feature net ({name})", unit="step", disable=not progress) as bar:
    for step in bar:
      batch = next(batches)
      params, opt_state, step_metrics = train_step(params, opt_state, batch["x"], batch["label"],
                                                   jax.random.fold_in(augment_rng, step))
      if step % 100 == 0 or step == steps - 1:  # fetching metrics syncs with the device: not every step
        bar.set_postfix(loss=f"{float(step_metrics['loss']):.4f}", acc=f"{float(step_metrics['accuracy']):.3f}")
  params = jax.block_until_ready(params)
  train_seconds = time.perf_counter() - start

  test = _whole_split(test_set)
  network = ClassifierFeatureNetwork(module, params, name, train_set.data_shape)
  test_accuracy = network.accuracy(test["x"], test["label"])
  metadata = {
      "name": name,
      "dataset": dataset_name,
      "dataset_options": dataset_options,
      "data_shape": list(train_set.data_shape),
      "architecture": arch,
      "num_params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
      "test_accuracy": test_accuracy,
      "num_test": len(test_set),
      "num_train": len(train_set),
      "steps": int(steps),
      "batch_size": int(batch_size),
      "learning_rate": float(learning_rate),
      "augment_shift": int(augment_shift),
      "seed": int(seed),
      "train_wall_time_s": round(train_seconds, 2),
      "jax_version": jax.__version__,
  }
  checkpoints.save_pytree(out_dir, jax.tree.map(np.asarray, params), metadata, overwrite=overwrite)
  return metadata


def pretrained_dir(name: str) -> str:
  """The directory of the shipped network ``name`` inside the installed ``mteo_jax`` package."""
  return os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained", PRETRAINED.get(name))


def load_feature_network(name_or_path: str | os.PathLike,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> ClassifierFeatureNetwork:
  """A shipped network by name ("digits", "fmnist") or one saved by ``train_feature_network`` by its directory."""
  if isinstance(name_or_path, str) and name_or_path in PRETRAINED:
    path = pretrained_dir(name_or_path)
  elif os.path.isdir(name_or_path):
    path = os.fspath(name_or_path)
  else:
    raise ValueError(f"{os.fspath(name_or_path)!r} is neither a shipped feature network {PRETRAINED.names()} nor "
                     "a directory written by train_feature_network")
  metadata = checkpoints.load_metadata(path)
  if not metadata or "architecture" not in metadata:
    raise ValueError(f"{path} holds no feature-network metadata (expected the output of train_feature_network)")
  module = _make_module(metadata["architecture"])
  target = _init_params(module, metadata["data_shape"], jax.random.key(0))
  params = checkpoints.load_pytree(path, target=target)
  return ClassifierFeatureNetwork(module, params, metadata["name"], metadata["data_shape"], metadata, batch_size)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog="python -m mteo_jax.features", description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, help="a dataset name of mteo_jax.data, e.g. digits, fashion_mnist")
  parser.add_argument("--steps", type=int, required=True)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--learning_rate", type=float, default=2e-3)
  parser.add_argument("--augment_shift", type=int, default=0, help="random translation of training images, pixels")
  parser.add_argument("--name", default=None, help="network name (default: digits, fmnist, else the dataset name)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)
  metadata = train_feature_network(args.dataset, args.steps, args.batch_size, args.seed, args.out,
                                   learning_rate=args.learning_rate, augment_shift=args.augment_shift, name=args.name,
                                   progress=not args.no_progress, overwrite=args.overwrite)
  print(json.dumps(metadata, indent=2))
  return metadata


if __name__ == "__main__":
  main()
