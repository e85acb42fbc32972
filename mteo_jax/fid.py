"""Standard FID in JAX: the ``pt_inception-2015-12-05`` network, its weights read without PyTorch, and the distance.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium") is the
Fréchet distance between Gaussians fitted to 2048-d Inception-v3 pool features of generated and real images. Numbers are
comparable with the literature only through the standard network, weights and pipeline; this module follows
pytorch-fid (``mseitzer/pytorch-fid``, ``inception.py`` and ``fid_score.py``), whose weights are the TF FID weights
ported to PyTorch:

    images [N, H, W, C]: float in [-1, 1] -> uint8 as EDM writes them, ``(x * 127.5 + 128).clip(0, 255)``; or uint8
    -> float in [0, 1] -> grayscale to 3 channels -> bilinear resize to 299 x 299 (``F.interpolate(mode="bilinear",
    align_corners=False)``: half-pixel centres, no antialiasing) -> ``2 x - 1`` -> ``FIDInceptionV3`` -> [N, 2048]
    -> ``(mu, sigma)`` in float64 -> ``frechet_distance``.

The weights are user supplied: ``pt_inception-2015-12-05-6726825d.pth`` from pytorch-fid's release (``WEIGHTS_URL``),
or the ``.npz`` that ``python -m mteo_jax.fid convert IN.pth OUT.npz`` writes from it. The harness finds them through
its config key ``fid_weights`` (``--config.mteo.fid_weights=PATH``, ``--config.compare.fid_weights=PATH``) or the
environment variable ``MTEO_FID_WEIGHTS``. The ``.pth`` is read without PyTorch and without running pickled code: a
restricted unpickler allows only the globals a state dict needs and constructs nothing but numpy arrays.

Use::

    network = InceptionFeatures(load_inception_weights("pt_inception-2015-12-05-6726825d.pth"))
    mu, sigma = network.stats(real_images)                 # or load_stats("cifar10-32x32.npz")
    fid = frechet_distance(*network.stats(samples), mu, sigma)

FID is biased upwards at small sample counts (the literature's figures use 50k samples): report the sample count and
the reference statistics with every figure, and compare only figures computed alike. The network costs ~6 GFLOP per
image at 299 x 299: about a second per image on 2 CPU cores, so FID-50k wants an accelerator.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from mteo_jax import files, metrics, parallel
from mteo_jax.metrics import frechet_distance, frechet_distance_from_features  # noqa: F401  (public here too)

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
WEIGHTS_ENV = "MTEO_FID_WEIGHTS"          # the environment variable naming the weights file
CONFIG_KEY = "fid_weights"                # the harness key naming it (mteo.fid_weights, compare.fid_weights)
REFERENCE_STATS_CACHE = "fid_reference_stats.npz"   # the harness's cache of the held-out real images' statistics
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008                        # the omitted logits layer ``fc`` of the weights file: [1008, 2048], [1008]
DEFAULT_BATCH_SIZE = 100
BN_EPSILON = 1e-3


# --- the network -----------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
  """torchvision's ``BasicConv2d``: convolution without bias, BatchNorm (eps 0.001, running statistics), ReLU.

  Inputs and outputs are NHWC; ``padding`` is (rows, columns) of zeros on each side, as torch's ``Conv2d(padding=)``.
  """
  features: int
  kernel_size: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST   # float32 convolutions on every device (no TF32/bf16 passes)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = self.padding
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=((pad_h, pad_h), (pad_w, pad_w)),
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # The FID blocks' patch: TF's average pool leaves the zero padding out of the mean (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """``Mixed_5b/c/d``: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool (padding excluded) -> 1x1."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch1x1 = BasicConv2d(64, name="branch1x1")(x)
    branch5x5 = BasicConv2d(48, name="branch5x5_1")(x)
    branch5x5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
    branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """``Mixed_6a`` (torchvision's, unpatched): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
    branch3x3dbl = BasicConv2d(64, name="branch3x3dbl_1")(x)
    branch3x3dbl = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class FIDInceptionC(nn.Module):
  """``Mixed_6b..e``: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool (padding excluded) -> 1x1."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c7 = self.channels_7x7
    branch1x1 = BasicConv2d(192, name="branch1x1")(x)
    branch7x7 = BasicConv2d(c7, name="branch7x7_1")(x)
    branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    dbl = BasicConv2d(c7, name="branch7x7dbl_1")(x)
    dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
    dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
    dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
    dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
    branch_pool = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """``Mixed_7a`` (torchvision's, unpatched): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    branch3x3 = BasicConv2d(192, name="branch3x3_1")(x)
    branch3x3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(branch3x3)
    branch7x7x3 = BasicConv2d(192, name="branch7x7x3_1")(x)
    branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class FIDInceptionE(nn.Module):
  """``Mixed_7b`` (``pool="avg"``, pytorch-fid's FIDInceptionE_1: average pool, padding excluded) and ``Mixed_7c``
  (``pool="max"``, FIDInceptionE_2: a 3x3 max pool, stride 1, padding 1, as the TF graph has it):
  1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool not in ("avg", "max"):
      raise ValueError(f"FIDInceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    branch1x1 = BasicConv2d(320, name="branch1x1")(x)
    branch3x3 = BasicConv2d(384, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                                 BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    dbl = BasicConv2d(448, name="branch3x3dbl_1")(x)
    dbl = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
    dbl = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                           BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl)], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    else:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    branch_pool = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's ``FIDInceptionV3`` up to the global average pool (the 1008-way ``fc`` is left out).

  Input [N, H, W, 3] float32 in [-1, 1], NHWC (299 x 299 in the standard pipeline; any size >= 75 runs); output the
  2048-d pool features [N, 2048]. Inference only: BatchNorm uses its running statistics (collection
  ``batch_stats``). Submodules carry the torch names (``Conv2d_1a_3x3``, ``Mixed_5b/branch1x1/conv``, ...), so that
  ``state_dict_to_variables`` maps a state dict one to one.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)        # 299 -> 149
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)                # 147
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride_2(x)                                       # 73
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)               # 71
    x = _max_pool_3x3_stride_2(x)                                       # 35
    x = FIDInceptionA(32, name="Mixed_5b")(x)                           # 256 channels
    x = FIDInceptionA(64, name="Mixed_5c")(x)                           # 288
    x = FIDInceptionA(64, name="Mixed_5d")(x)                           # 288
    x = InceptionB(name="Mixed_6a")(x)                                  # 17 x 17 x 768
    x = FIDInceptionC(128, name="Mixed_6b")(x)
    x = FIDInceptionC(160, name="Mixed_6c")(x)
    x = FIDInceptionC(160, name="Mixed_6d")(x)
    x = FIDInceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)                                  # 8 x 8 x 1280
    x = FIDInceptionE("avg", name="Mixed_7b")(x)                        # 2048
    x = FIDInceptionE("max", name="Mixed_7c")(x)                        # 2048
    return jnp.mean(x, axis=(1, 2))                                     # adaptive average pool to 1 x 1


def init_variables(rng: jax.Array) -> dict:
  """Random ``{"params", "batch_stats"}`` of ``FIDInceptionV3`` (float32 numpy arrays) for tests, never for FID.

  He-normal kernels (``N(0, 2 / fan_in)``, so that activations neither vanish nor explode through the 94 layers) and
  BatchNorm scale, bias, mean and variance drawn around the identity (``U(0.5, 1.5)``, ``N(0, 0.1)``, ``N(0, 0.1)``,
  ``U(0.5, 1.5)``), all from numpy seeded with ``rng``'s key data: deterministic per key, and seconds faster than
  compiling Flax's initialisers for this network (over a minute on 2 CPU cores).
  """
  generator = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
  variables: dict = {}
  for flax_path, shape in _variable_layout().values():
    leaf = flax_path[-1]
    if leaf == "kernel":
      value = generator.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[:-1])))
    elif leaf in ("scale", "var"):
      value = generator.uniform(0.5, 1.5, shape).astype(np.float32)
    else:   # bias, mean
      value = np.float32(0.1) * generator.standard_normal(shape, np.float32)
    node = variables
    for key in flax_path[:-1]:
      node = node.setdefault(key, {})
    node[leaf] = value
  return variables


# --- preprocessing ---------------------------------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
  """Images [N, H, W, C] -> uint8 [N, H, W, C]: uint8 as given; floats in [-1, 1] as EDM writes its samples,
  ``(x * 127.5 + 128).clip(0, 255)`` in float32, truncated to uint8.

  Raises:
    ValueError: not [N >= 1, H, W, 1 or 3]; or non-finite float images.
    TypeError: neither uint8 nor floating point.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3) or 0 in images.shape:
    raise ValueError(f"FID expects images [N >= 1, H, W, C in (1, 3)], got shape {images.shape}")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise TypeError(f"FID expects uint8 images or float images in [-1, 1], got dtype {images.dtype}")
  images = images.astype(np.float32)
  if not np.isfinite(images).all():
    raise ValueError("FID: the images contain NaN or infinity")
  return np.clip(images * np.float32(127.5) + np.float32(128), 0, 255).astype(np.uint8)


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """torch's ``compute_source_index_and_lambda`` (``aten/src/ATen/native/UpSample.h``, align_corners=False) in its
  float32 arithmetic: ``src = in / out * (i + 0.5) - 0.5`` clamped at 0; the taps ``floor(src)`` and the next one
  (the last row repeated at the edge) with weights ``1 - lambda`` and ``lambda = src - floor(src)``."""
  scale = np.float32(size_in) / np.float32(size_out)
  src = scale * (np.arange(size_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.where(src < 0, np.float32(0), src)
  low = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  lam = np.clip(src - low.astype(np.float32), np.float32(0), np.float32(1))
  high = low + (low < size_in - 1)
  return low, high, np.float32(1) - lam, lam


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """[N, H, W, C] float32 -> [N, size, size, C]: torch's ``F.interpolate(mode="bilinear", align_corners=False)``.

  Half-pixel centres (source ``(i + 0.5) * in / out - 0.5``, clamped at the edges), two taps per axis, no
  antialiasing when shrinking, the columns interpolated first, as torch's CPU kernel does, with torch's float32 tap
  positions (``_linear_taps``). ``jax.image.resize(..., antialias=False)`` computes the same maths with its own
  float32 positions, which at ~300 px inputs differ from torch's by up to ~4e-5 of the value range; this follows
  torch to float32 rounding (a test checks it against a numpy transcription of torch's kernel).
  """
  _, height, width, _ = images.shape
  row_low, row_high, row_w0, row_w1 = _linear_taps(height, size)
  col_low, col_high, col_w0, col_w1 = _linear_taps(width, size)

  def along_columns(rows: jax.Array) -> jax.Array:   # rows [N, size, W, C] -> [N, size, size, C]
    return col_w0[:, None] * rows[:, :, col_low] + col_w1[:, None] * rows[:, :, col_high]

  return (row_w0[:, None, None] * along_columns(images[:, row_low])
          + row_w1[:, None, None] * along_columns(images[:, row_high]))


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
  """uint8 [N, H, W, 1 | 3] -> float32 [N, size, size, 3] in [-1, 1]: ``/ 255``, grayscale to 3 channels, bilinear
  resize (``resize_bilinear``), ``2 x - 1`` (pytorch-fid's ``InceptionV3.forward``)."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return 2.0 * resize_bilinear(x, size) - 1.0


# --- features and statistics -----------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=2)
def _features(variables: Any, images: jax.Array, resolution: int) -> jax.Array:
  # One compiled program per (input shape, resolution), shared by every InceptionFeatures.
  return FIDInceptionV3().apply(variables, preprocess(images, resolution))


def variables_sha256(variables: Any) -> str:
  """A sha256 of the variables (paths, dtypes, shapes and values): which weights a cached statistic came from."""
  digest = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda item: str(item[0])):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape};".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


class InceptionFeatures:
  """The 2048-d pool features of the standard pipeline (module docstring), batched, jitted and data-parallel.

  Args:
    variables: ``{"params", "batch_stats"}`` of ``FIDInceptionV3`` (``load_inception_weights``; or ``init_variables``
      for tests: the figure is FID only with the standard weights).
    batch_size: images per jitted call (rounded up to a multiple of the device count; the last chunk is padded, so
      one compilation serves every call).
    progress: a tqdm bar over images (rate, ETA).
    mesh: the devices the chunks are split over (default ``parallel.local_mesh()``, this process's devices), as
      ``harness.batched`` does for sampling.
    resolution: the resize target; 299 is the standard (smaller only to test cheaply).
  """

  def __init__(self, variables: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True,
               mesh: jax.sharding.Mesh | None = None, resolution: int = INPUT_SIZE):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if resolution < 75:
      raise ValueError(f"resolution must be >= 75 (Inception-v3's smallest input), got {resolution}")
    self.variables = jax.tree.map(jnp.asarray, variables)
    self.batch_size, self.progress, self.mesh, self.resolution = int(batch_size), bool(progress), mesh, int(resolution)
    self._replicated: dict[Any, Any] = {}

  @functools.cached_property
  def sha256(self) -> str:
    """``variables_sha256`` of the weights."""
    return variables_sha256(self.variables)

  def features(self, images, *, progress: bool | None = None) -> np.ndarray:
    """Pool features [N, 2048] float32 of images [N, H, W, 1 | 3]: uint8, or float in [-1, 1] (``to_uint8``).

    Raises what ``to_uint8`` raises.
    """
    from mteo_jax.harness import batched  # noqa: PLC0415 (the harness imports this module)
    images = to_uint8(images)
    mesh = parallel.local_mesh() if self.mesh is None else self.mesh
    variables = self.variables
    if mesh.size > 1:
      if mesh not in self._replicated:
        self._replicated[mesh] = parallel.replicate(self.variables, mesh)
      variables = self._replicated[mesh]
    show = self.progress if progress is None else progress
    with tqdm.tqdm(total=images.shape[0], unit="image", desc="FID features", disable=not show,
                   dynamic_ncols=True) as bar:
      def step(chunk: jax.Array) -> np.ndarray:
        out = np.asarray(_features(variables, chunk, self.resolution))
        bar.update(min(chunk.shape[0], bar.total - bar.n))   # the last chunk is padded
        return out
      return batched(step, self.batch_size, images, mesh=mesh)

  def stats(self, images, *, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [2048], sigma [2048, 2048])`` in float64 of the features of images (``metrics.gaussian_stats``: the
    unbiased covariance, as pytorch-fid's ``np.cov(rowvar=False)``). Needs N >= 2 images."""
    return metrics.gaussian_stats(self.features(images, progress=progress))


# --- reference statistics (the community's .npz layout) ---------------------------------------------------------------

def save_stats(path: str | os.PathLike, mu, sigma, **extra) -> None:
  """Writes ``mu`` [F] and ``sigma`` [F, F] (float64) to the ``.npz`` layout of pytorch-fid's ``--save-stats`` and
  EDM's ``fid.py ref``; ``extra`` arrays (e.g. what the statistics were computed from) are stored beside them."""
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  _check_stats(mu, sigma, os.fspath(path), None)
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp.npz")
  np.savez(tmp, mu=mu, sigma=sigma, **extra)
  os.replace(tmp, path)


def load_stats(path: str | os.PathLike, dim: int | None = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
  """``(mu [F], sigma [F, F])`` in float64 from a reference-statistics ``.npz`` (keys ``mu``, ``sigma``).

  Args:
    dim: the feature dimension required (2048 for FID), or None for any.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``, ``mu`` or ``sigma`` missing, shapes that do not match (or are not ``dim``), or
      non-finite values.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"reference statistics {path} do not exist (an .npz with mu [F] and sigma [F, F], as "
                            "pytorch-fid's --save-stats or EDM's fid.py ref write)")
  try:
    with np.load(path, allow_pickle=False) as npz:
      stored = {key: npz[key] for key in npz.files if key in ("mu", "sigma")}
      keys = list(npz.files)
  except (ValueError, OSError, zipfile.BadZipFile) as error:
    raise ValueError(f"{path} is not a reference-statistics .npz ({type(error).__name__}: {error})") from None
  if "mu" not in stored or "sigma" not in stored:
    raise ValueError(f"{path} holds {keys}: reference statistics need the arrays 'mu' [F] and 'sigma' [F, F] (the "
                     "layout of pytorch-fid's --save-stats and EDM's fid.py ref)")
  if not (np.issubdtype(stored["mu"].dtype, np.floating) and np.issubdtype(stored["sigma"].dtype, np.floating)):
    raise ValueError(f"{path}: mu and sigma must be floating point, got {stored['mu'].dtype} and "
                     f"{stored['sigma'].dtype}")
  mu, sigma = stored["mu"].astype(np.float64), stored["sigma"].astype(np.float64)
  _check_stats(mu, sigma, path, dim)
  return mu, sigma


def _check_stats(mu: np.ndarray, sigma: np.ndarray, where: str, dim: int | None) -> None:
  f = mu.shape[0] if mu.ndim == 1 else None
  if f is None or sigma.shape != (f, f) or (dim is not None and f != dim):
    wanted = "[F] and [F, F]" if dim is None else f"[{dim}] and [{dim}, {dim}]"
    raise ValueError(f"{where}: reference statistics need mu and sigma of shapes {wanted}, got {mu.shape} and "
                     f"{sigma.shape}")
  if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
    raise ValueError(f"{where}: reference statistics contain NaN or infinity")


# --- the FID metric ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FIDMetric:
  """FID of images against fixed reference statistics: ``metric(images) -> float``.

  Attributes:
    network: the features (with the standard weights).
    mu, sigma: [2048], [2048, 2048] float64 reference statistics.
    reference: what they are (a file, or the held-out real images and their count), for the results.
  """
  network: InceptionFeatures
  mu: np.ndarray
  sigma: np.ndarray
  reference: str

  def __call__(self, images, *, progress: bool | None = None) -> float:
    """FID of images [N >= 2, H, W, 1 | 3] (uint8, or float in [-1, 1]) against the reference statistics."""
    return frechet_distance_from_features(self.network.features(images, progress=progress), self.mu, self.sigma)

  @functools.cached_property
  def identity(self) -> dict[str, str]:
    """What the figure depends on besides the samples (for caches of scored rows): sha256s of the weights and of
    the reference statistics, and the reference's description."""
    digest = hashlib.sha256(np.ascontiguousarray(self.mu, np.float64).tobytes())
    digest.update(np.ascontiguousarray(self.sigma, np.float64).tobytes())
    return {"weights_sha256": self.network.sha256, "reference_sha256": digest.hexdigest(),
            "reference": self.reference, "resolution": str(self.network.resolution)}

  @classmethod
  def from_settings(cls, weights: str | os.PathLike, stats: str | os.PathLike = "", *, real=None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True,
                    resolution: int = INPUT_SIZE) -> FIDMetric:
    """The metric of a harness: the weights file, and the reference statistics from ``stats`` (a ``.npz``) or, when
    that is empty, from the ``real`` images [N >= 2, H, W, C], cached in ``cache_dir/fid_reference_stats.npz`` with
    the sha256 of the images and of the weights and the resolution (a cache of anything else is recomputed).
    ``resolution``: ``InceptionFeatures``'s (299 is FID; smaller only for tests).

    Raises:
      FileNotFoundError: the weights or the stats file is missing (``load_inception_weights``, ``load_stats``).
      ValueError: neither ``stats`` nor ``real`` given, or a bad file.
    """
    network = InceptionFeatures(load_inception_weights(weights), progress=progress, resolution=resolution)
    if stats:
      return cls(network, *load_stats(stats), reference=os.fspath(stats))
    if real is None:
      raise ValueError("FID needs reference statistics: a stats .npz (config key fid_stats) or real images")
    real = to_uint8(real)
    key = {"real_sha256": hashlib.sha256(np.ascontiguousarray(real)).hexdigest(), "weights_sha256": network.sha256,
           "resolution": str(network.resolution)}
    reference = f"held-out real images ({real.shape[0]})"
    cache = None if cache_dir is None else Path(cache_dir) / REFERENCE_STATS_CACHE
    if cache is not None and cache.is_file():
      try:
        with np.load(cache, allow_pickle=False) as npz:
          if all(k in npz.files and str(npz[k]) == v for k, v in key.items()):
            return cls(network, *load_stats(cache), reference=reference)
      except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:   # a cache: computed again and replaced
        logging.warning("%s cannot be read (%s): the FID reference statistics are computed again and replace it",
                        cache, files.reason(error))
    mu, sigma = network.stats(real)
    if cache is not None and parallel.is_writer():
      cache.parent.mkdir(parents=True, exist_ok=True)
      save_stats(cache, mu, sigma, **{k: np.asarray(v) for k, v in key.items()})
    return cls(network, mu, sigma, reference=reference)


# --- the weights file ------------------------------------------------------------------------------------------------

def missing_weights_message(path: str | os.PathLike | None = None, source: str = "") -> str:
  """What to download and where to put it (the text of the ``FileNotFoundError`` for missing weights); ``source``
  says where ``path`` was named (e.g. ``"fid_weights"`` or ``"$MTEO_FID_WEIGHTS"``)."""
  named = f"{source}={os.fspath(path)}" if source else f"{os.fspath(path)}" if path else ""
  found = f"{named} does not exist. " if path else "No weights file is set. "
  return (f"{found}FID needs the standard Inception-v3 weights {WEIGHTS_FILE} (pytorch-fid's release: {WEIGHTS_URL}; "
          f"about 95 MB), or the .npz that `python -m mteo_jax.fid convert {WEIGHTS_FILE} pt_inception.npz` makes "
          f"of it. Put the file on this machine and name it with the config key {CONFIG_KEY} (e.g. "
          f"--config.mteo.{CONFIG_KEY}=/path/to/{WEIGHTS_FILE} or --config.compare.{CONFIG_KEY}=...) or the "
          f"environment variable {WEIGHTS_ENV}=/path/to/{WEIGHTS_FILE}.")


def resolve_weights_path(configured: str | os.PathLike = "", environ: Mapping[str, str] | None = None) -> Path | None:
  """The weights file to use: ``configured`` if set, else ``$MTEO_FID_WEIGHTS`` if set, else None (no FID).

  Raises:
    FileNotFoundError: the path chosen does not exist (``missing_weights_message``).
  """
  env = os.environ if environ is None else environ
  configured = os.fspath(configured)
  path, source = (configured, CONFIG_KEY) if configured else (env.get(WEIGHTS_ENV, ""), f"${WEIGHTS_ENV}")
  if not path:
    return None
  if not Path(path).expanduser().is_file():
    raise FileNotFoundError(missing_weights_message(path, source))
  return Path(path).expanduser()


def load_inception_weights(path: str | os.PathLike) -> dict:
  """``{"params", "batch_stats"}`` of ``FIDInceptionV3`` (float32 numpy arrays) from a weights file.

  Reads, without PyTorch and without running pickled code (``read_state_dict``): a ``torch.save`` state dict in the
  zip format (PyTorch >= 1.6), in the legacy format (before 1.6; the distributed ``pt_inception-2015-12-05`` file is
  one), or an ``.npz`` keyed by the state-dict names (``python -m mteo_jax.fid convert``).

  Raises:
    FileNotFoundError: no such file; the message says which file FID needs and where to name it.
    pickle.UnpicklingError: the file's pickle asks for a global a state dict does not need (nothing is run).
    ValueError: not a weights file, or missing, unexpected or misshapen tensors (all listed at once).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  return state_dict_to_variables(read_state_dict(path), where=os.fspath(path))


@functools.lru_cache(maxsize=1)
def _variable_layout() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch name -> (Flax path from the collection on, Flax shape) of every variable of ``FIDInceptionV3``."""
  shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
  leaf_names = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
  layout = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = tuple(p.key for p in path)
    name = ".".join(keys[1:-1] + (leaf_names[(keys[0], keys[-1])],))
    layout[name] = (keys, tuple(leaf.shape))
  return layout


def _torch_shape(flax_path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  # Conv kernels: Flax HWIO, torch OIHW.
  return (shape[3], shape[2], shape[0], shape[1]) if flax_path[-1] == "kernel" else shape


def _is_ignored(name: str) -> bool:
  # BatchNorm's step counter and the logits layer, which FID does not use.
  return name.endswith(".num_batches_tracked") or name in ("fc.weight", "fc.bias")


def state_dict_to_variables(state: Mapping[str, np.ndarray], where: str = "state dict") -> dict:
  """A pytorch-fid ``FIDInceptionV3`` state dict (torch names, OIHW kernels) -> Flax ``{"params", "batch_stats"}``
  (HWIO kernels), float32 numpy arrays.

  ``Conv2d_1a_3x3.conv.weight`` -> ``params/Conv2d_1a_3x3/conv/kernel`` (transposed), ``.bn.weight/.bias`` ->
  ``params/.../bn/scale/bias``, ``.bn.running_mean/.running_var`` -> ``batch_stats/.../bn/mean/var``. The logits layer
  ``fc`` (which must have its 1008 classes when present: torchvision's own 1000-class Inception is another network)
  and ``*.num_batches_tracked`` are accepted and left out.

  Raises:
    ValueError: missing keys, unexpected keys and wrong shapes, all listed in one message naming ``where``.
  """
  layout = _variable_layout()
  missing = sorted(set(layout) - set(state))
  unexpected = sorted(name for name in state if name not in layout and not _is_ignored(name))
  wrong = []
  variables: dict = {}
  for name, (flax_path, shape) in layout.items():
    if name not in state:
      continue
    value = np.asarray(state[name])
    expected = _torch_shape(flax_path, shape)
    if value.shape != expected or not np.issubdtype(value.dtype, np.floating):
      wrong.append(f"{name}: {value.dtype}{list(value.shape)}, expected float{list(expected)}")
      continue
    if flax_path[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)
    node = variables
    for key in flax_path[:-1]:
      node = node.setdefault(key, {})
    node[flax_path[-1]] = np.ascontiguousarray(value, dtype=np.float32)
  for name, expected in (("fc.weight", (NUM_CLASSES, FEATURE_DIM)), ("fc.bias", (NUM_CLASSES,))):
    if name in state and np.shape(state[name]) != expected:
      wrong.append(f"{name}: {list(np.shape(state[name]))}, expected {list(expected)} (the FID network's 1008 "
                   "classes: is this torchvision's own Inception-v3 rather than pt_inception-2015-12-05?)")
  if missing or unexpected or wrong:
    parts = [f"{len(missing)} missing: {missing}" if missing else "",
             f"{len(unexpected)} unexpected: {unexpected}" if unexpected else "",
             f"{len(wrong)} with the wrong shape or dtype: {wrong}" if wrong else ""]
    raise ValueError(f"{where} is not the FID Inception-v3 ({WEIGHTS_FILE}) state dict: "
                     + "; ".join(p for p in parts if p))
  return variables


def state_dict_from_variables(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of ``state_dict_to_variables``: torch names -> float32 numpy arrays (OIHW kernels), no ``fc``."""
  state = {}
  for name, (flax_path, _) in _variable_layout().items():
    value = variables
    for key in flax_path:
      value = value[key]
    value = np.asarray(value, np.float32)
    state[name] = np.ascontiguousarray(value.transpose(3, 2, 0, 1) if flax_path[-1] == "kernel" else value)
  return state


# --- reading torch.save files without torch -------------------------------------------------------------------------

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C   # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001

# torch's storage classes, as a pickle names them, -> the numpy dtype of their elements (byte order set on reading).
_STORAGE_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                   "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
                   "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str
  dtype: np.dtype


@dataclasses.dataclass
class _Storage:
  """A flat typed buffer of ``numel`` elements; ``data`` is filled once its bytes are read."""
  key: str
  dtype: np.dtype
  numel: int
  data: np.ndarray | None = None
  base: tuple[_Storage, int] | None = None     # a legacy view: (root storage, element offset)

  def array(self) -> np.ndarray:
    if self.base is not None:
      root, offset = self.base
      return root.array()[offset:offset + self.numel]
    if self.data is None:
      raise ValueError(f"storage {self.key!r} is used by a tensor but its data is not in the file")
    return self.data


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  """``torch._utils._rebuild_tensor_v2``'s arguments, made into a numpy array once every storage is read."""
  storage: _Storage
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]

  def array(self) -> np.ndarray:
    data = self.storage.array()
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    # Bounds are checked before numpy is asked for a strided view, so that no file can read outside its storage.
    last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
    if last >= data.shape[0]:
      raise ValueError(f"a tensor of size {self.size}, stride {self.stride} at offset {self.offset} overruns its "
                       f"storage of {data.shape[0]} elements")
    view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                           strides=tuple(st * data.itemsize for st in self.stride), writeable=False)
    return np.array(view)


def _decode(raw: bytes, dtype: np.dtype, little_endian: bool) -> np.ndarray:
  """Raw storage bytes -> a flat array of ``dtype`` in native byte order."""
  order = "<" if little_endian else ">"
  if dtype == np.dtype(jnp.bfloat16):   # ml_dtypes' bfloat16 has no byte-order variants: swap as uint16
    return np.frombuffer(raw, order + "u2").astype(np.uint16).view(dtype)
  return np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype, copy=False)


def _int(value: Any, what: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise pickle.UnpicklingError(f"{what} must be a non-negative integer, got {value!r}")
  return value


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _TensorRef:
  del requires_grad, backward_hooks, metadata   # autograd and tensor metadata: nothing FID needs
  if not isinstance(storage, _Storage):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v2 expects a storage, got {type(storage).__name__}")
  if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v2 expects size and stride tuples of one length, got {size!r}, "
                                 f"{stride!r}")
  return _TensorRef(storage, _int(storage_offset, "storage_offset"),
                    tuple(_int(s, "size") for s in size), tuple(_int(s, "stride") for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None) -> _TensorRef:
  del requires_grad, backward_hooks
  if not isinstance(data, _TensorRef):
    raise pickle.UnpicklingError(f"_rebuild_parameter expects a tensor, got {type(data).__name__}")
  return data


# The only globals a state dict's pickle may name; anything else is refused before it could be called.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """An unpickler that resolves only ``_ALLOWED_GLOBALS`` (torch's rebuild functions are replaced by ones that build
  numpy arrays) and storages through ``persistent_load``; any other global raises ``pickle.UnpicklingError``."""

  def __init__(self, file, where: str, load_storage: Callable[[tuple], _Storage] | None = None):
    super().__init__(file)
    self._where, self._load_storage = where, load_storage

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"{self._where}: refused to load the global {module}.{name}: a weights file may only hold tensors "
          f"(allowed: {sorted(f'{m}.{n}' for m, n in _ALLOWED_GLOBALS)}); nothing in it was run") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._load_storage is None or not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"{self._where}: unexpected persistent id {pid!r}")
    kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
    if kind != "storage" or not isinstance(pid[1], _StorageType):
      raise pickle.UnpicklingError(f"{self._where}: unsupported persistent id {pid!r} (only storages are)")
    return self._load_storage(pid)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict ``{name: numpy array}`` from a ``torch.save`` file (zip or legacy format) or an ``.npz``, without
  PyTorch and without running pickled code.

  Raises:
    FileNotFoundError: no such file.
    pickle.UnpicklingError: the pickle names a global that a state dict does not need, or is malformed.
    ValueError: neither format, a top-level object that is not a mapping of names to tensors, or storages whose
      sizes disagree with the file.
  """
  where = os.fspath(path)
  if not os.path.isfile(where):
    raise FileNotFoundError(f"{where} does not exist")
  if zipfile.is_zipfile(where):
    with zipfile.ZipFile(where) as archive:
      names = archive.namelist()
      if any(name.endswith("data.pkl") for name in names):
        return _read_zip_state_dict(archive, where)
    return _read_npz_state_dict(where)
  with open(where, "rb") as file:
    head = file.read(2)
  if head[:1] == b"\x80":
    return _read_legacy_state_dict(where)
  raise ValueError(f"{where} is neither a torch.save file (zip or legacy pickle format) nor an .npz")


def _materialise(obj: Any, where: str) -> dict[str, np.ndarray]:
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
  state, bad = {}, []
  for name, value in obj.items():
    if isinstance(name, str) and isinstance(value, _TensorRef):
      state[name] = value.array()
    else:
      bad.append(f"{name!r}: {type(value).__name__}")
  if bad:
    raise ValueError(f"{where} is not a state dict of tensors; these entries are not: {bad}")
  return state


def _read_zip_state_dict(archive: zipfile.ZipFile, where: str) -> dict[str, np.ndarray]:
  pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") or name == "data.pkl"]
  if len(pickles) != 1:
    raise ValueError(f"{where}: expected one <name>/data.pkl in the archive, found {pickles}")
  prefix = pickles[0][:-len("data.pkl")]
  names = set(archive.namelist())
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = archive.read(prefix + "byteorder").decode("ascii").strip()
    if byteorder not in ("little", "big"):
      raise ValueError(f"{where}: unknown byteorder {byteorder!r}")
  storages: dict[str, _Storage] = {}

  def load_storage(pid: tuple) -> _Storage:
    if len(pid) != 5:
      raise pickle.UnpicklingError(f"{where}: a zip-format storage id has 5 fields, got {pid!r}")
    _, storage_type, key, _location, numel = pid
    key, numel = str(key), _int(numel, "numel")
    if key not in storages:
      entry = f"{prefix}data/{key}"
      if entry not in names:
        raise ValueError(f"{where}: storage {key!r} is not in the archive ({entry})")
      dtype = storage_type.dtype
      raw = archive.read(entry)
      if len(raw) != numel * dtype.itemsize:
        raise ValueError(f"{where}: storage {key!r} holds {len(raw)} bytes, expected {numel} x {dtype.itemsize}")
      storages[key] = _Storage(key, dtype, numel, _decode(raw, dtype, byteorder == "little"))
    return storages[key]

  obj = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), where, load_storage).load()
  return _materialise(obj, where)


def _read_legacy_state_dict(where: str) -> dict[str, np.ndarray]:
  storages: dict[str, _Storage] = {}
  with open(where, "rb") as file:
    try:
      magic = _StateDictUnpickler(file, where).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
      raise ValueError(f"{where} is neither a zip nor a legacy torch.save file ({error})") from None
    if magic != LEGACY_MAGIC_NUMBER:
      raise ValueError(f"{where} is not a legacy torch.save file (its first pickle is not torch's magic number)")
    protocol = _StateDictUnpickler(file, where).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
      raise ValueError(f"{where}: legacy torch.save protocol {protocol!r} is not supported "
                       f"(expected {LEGACY_PROTOCOL_VERSION})")
    sys_info = _StateDictUnpickler(file, where).load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    order = "<" if little else ">"

    def load_storage(pid: tuple) -> _Storage:
      if len(pid) != 6:
        raise pickle.UnpicklingError(f"{where}: a legacy storage id has 6 fields, got {pid!r}")
      _, storage_type, root_key, _location, numel, view = pid
      root_key, numel = str(root_key), _int(numel, "numel")
      if root_key not in storages:
        storages[root_key] = _Storage(root_key, storage_type.dtype, numel)
      root = storages[root_key]
      if view is None:
        return root
      if not (isinstance(view, tuple) and len(view) == 3):
        raise pickle.UnpicklingError(f"{where}: bad storage view {view!r}")
      view_key, offset, view_size = str(view[0]), _int(view[1], "view offset"), _int(view[2], "view size")
      if offset + view_size > root.numel:
        raise ValueError(f"{where}: storage view {view_key!r} overruns its root {root_key!r}")
      return _Storage(view_key, root.dtype, view_size, base=(root, offset))

    obj = _StateDictUnpickler(file, where, load_storage).load()
    keys = _StateDictUnpickler(file, where).load()
    if not isinstance(keys, list):
      raise ValueError(f"{where}: expected the list of storage keys after the pickled object, got {type(keys)}")
    for key in keys:
      key = str(key)
      if key not in storages:
        raise ValueError(f"{where}: storage {key!r} is in the file but no tensor uses it")
      storage = storages[key]
      header = file.read(8)
      if len(header) != 8:
        raise ValueError(f"{where}: the file ends before storage {key!r}")
      (numel,) = struct.unpack(order + "q", header)
      if numel != storage.numel:
        raise ValueError(f"{where}: storage {key!r} has {numel} elements in the file, {storage.numel} in its id")
      raw = file.read(numel * storage.dtype.itemsize)
      if len(raw) != numel * storage.dtype.itemsize:
        raise ValueError(f"{where}: the file ends inside storage {key!r}")
      storage.data = _decode(raw, storage.dtype, little)
  return _materialise(obj, where)


def _read_npz_state_dict(where: str) -> dict[str, np.ndarray]:
  try:
    with np.load(where, allow_pickle=False) as npz:
      return {name: npz[name] for name in npz.files}
  except (ValueError, OSError) as error:
    raise ValueError(f"{where} is a zip archive but neither a torch.save file nor an .npz ({error})") from None


def convert(source: str | os.PathLike, destination: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads the weights file ``source`` (``read_state_dict``), checks it is the FID network's
  (``state_dict_to_variables``), and writes every tensor of it, under its state-dict name, to the ``.npz``
  ``destination``; returns the state dict."""
  if not os.path.isfile(source):
    raise FileNotFoundError(missing_weights_message(source))
  state = read_state_dict(source)
  state_dict_to_variables(state, where=os.fspath(source))
  destination = Path(destination)
  tmp = destination.with_name(f".{destination.name}.tmp.npz")
  np.savez(tmp, **state)
  os.replace(tmp, destination)
  return state


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m mteo_jax.fid", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  convert_parser = commands.add_parser("convert", help=f"a {WEIGHTS_FILE} state dict -> .npz (no PyTorch needed)")
  convert_parser.add_argument("source", help=f"the .pth file ({WEIGHTS_URL})")
  convert_parser.add_argument("destination", help="the .npz to write")
  args = parser.parse_args(argv)
  if args.command == "convert":
    state = convert(args.source, args.destination)
    print(f"wrote {len(state)} tensors ({sum(v.size for v in state.values())} values) to {args.destination}")
  return 0


__all__ = ["FIDInceptionV3", "InceptionFeatures", "FIDMetric", "init_variables", "to_uint8", "resize_bilinear",
           "preprocess", "frechet_distance", "frechet_distance_from_features", "save_stats", "load_stats",
           "load_inception_weights", "read_state_dict", "state_dict_to_variables", "state_dict_from_variables",
           "resolve_weights_path", "missing_weights_message", "variables_sha256", "convert", "WEIGHTS_FILE",
           "WEIGHTS_URL", "WEIGHTS_ENV"]


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (FileNotFoundError, ValueError, pickle.UnpicklingError) as error:   # one line, no traceback
    sys.exit(f"error: {error}")
