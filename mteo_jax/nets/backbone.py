"""The pure-functional face of a backbone and the denoiser built on it.

``Backbone`` wraps a Flax module into pure functions of ``params`` (the module's ``params`` collection):

    temb = backbone.embed_time(params, c_noise, label)   # TimeEmb: {layer name: [B, D]}, one leaf per conditioned layer
    out  = backbone.body(params, x_in, temb)             # the network proper

and ``make_denoiser`` wraps them with a preconditioning into ``D(x, sigma, temb=None) -> x0_hat``, the only thing a
solver ever calls. ``temb``, when given, replaces the *time part* of the embedding (an MTEO table row); the label term
is then added exactly as the backbone adds it.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax.diffusion import Preconditioning, broadcast_to_batch, coefficient_dtype
from mteo_jax.nets.dit import DiT
from mteo_jax.nets.mlp import MLP
from mteo_jax.nets.unet import UNet
from mteo_jax.registry import Registry
from mteo_jax.schedules import is_concrete

TimeEmb = dict[str, jax.Array]
Params = Any

BACKBONES: Registry[type[nn.Module]] = Registry("backbone")
BACKBONES.register("mlp")(MLP)
BACKBONES.register("unet")(UNet)
BACKBONES.register("dit")(DiT)


class Denoiser(Protocol):
  def __call__(self, x: jax.Array, sigma: jax.Array, temb: TimeEmb | None = None, *,
               label: jax.Array | None = None) -> jax.Array:
    """x0_hat = D(x, sigma); sigma is a scalar or per-sample [B]; ``temb`` replaces the time embedding; ``label``
    [B] replaces the labels given to ``make_denoiser``."""


class Backbone:
  """A Flax backbone as pure functions over its parameter pytree.

  Args:
    module: a ``LiftedTimeEmbedding`` module (``MLP``, ``UNet`` or ``DiT``).
    data_shape: shape of one sample, e.g. ``(2,)`` or ``(28, 28, 1)``.
  Raises:
    ValueError: ``data_shape`` is not a tuple of positive integers, or the module's options fix another sample
      shape (e.g. a UNet with ``image_size=8, in_channels=1`` for data of shape ``(8, 8, 3)``); the message names both.
  """

  def __init__(self, module: nn.Module, data_shape: tuple[int, ...]):
    self.module = module
    if (isinstance(data_shape, (str, bytes)) or not hasattr(data_shape, "__iter__")
        or not all(isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_)) for d in data_shape)
        or not tuple(data_shape) or min(data_shape) < 1):
      raise ValueError(f"data_shape must be a non-empty tuple of positive integers, got {data_shape!r}")
    self.data_shape = tuple(int(d) for d in data_shape)
    expected = module.expected_data_shape()
    if expected is not None and tuple(expected) != self.data_shape:
      raise ValueError(f"{module.describe_data_shape()} takes samples of shape {tuple(expected)}, but the data shape "
                       f"is {self.data_shape}; set the backbone's options to match the data")
    self.layer_names: tuple[str, ...] = module.layer_names
    self.num_classes: int = module.num_classes
    self.emb_dim: int = module.emb_dim

  def init(self, rng: jax.Array) -> Params:
    x = jnp.zeros((1,) + self.data_shape, jnp.float32)
    label = jnp.zeros((1,), jnp.int32) if self.num_classes else None
    return self.module.init({"params": rng}, x, jnp.zeros((1,)), label)["params"]

  def check_input(self, x: jax.Array) -> None:
    if x.ndim != len(self.data_shape) + 1 or tuple(x.shape[1:]) != self.data_shape:
      raise ValueError(f"expected input of shape [batch, {', '.join(map(str, self.data_shape))}], got {tuple(x.shape)}")

  def check_label(self, label: jax.Array | None, batch: int | None = None, *, values: bool = True
                  ) -> jax.Array | None:
    """``label`` as an integer array [B] after checking it fits this backbone; returns None for None.

    An unconditional backbone (``num_classes=0``) takes no label; a conditional one needs integer labels of shape
    [B] (``batch``, when given), and concrete labels (not jit tracers) must lie in ``[0, num_classes)``: an embedding
    lookup out of range would give NaN (``label = num_classes``) or silently another class (``label = -1``).
    ``values=False`` skips the value check (it reads the labels back from the device).
    Raises:
      ValueError: a label where none is expected or the reverse, a shape other than [batch], a value out of range.
      TypeError: labels that are not integers.
    """
    if not self.num_classes:
      if label is not None:
        raise ValueError("this backbone is unconditional (num_classes=0) but a label was given")
      return None
    if label is None:
      raise ValueError(f"this backbone is class-conditional (num_classes={self.num_classes}); pass integer labels "
                       f"[batch] in [0, {self.num_classes - 1}]")
    label = jnp.asarray(label)
    if not jnp.issubdtype(label.dtype, jnp.integer):
      raise TypeError(f"class labels must be integers in [0, {self.num_classes - 1}], got dtype {label.dtype}")
    if label.ndim != 1:
      raise ValueError(f"class labels must have shape [batch] (one per sample), got shape {tuple(label.shape)}")
    if batch is not None and label.shape[0] != batch:
      raise ValueError(f"{label.shape[0]} class label(s) for a batch of {batch} samples; expected one label per "
                       "sample")
    if values and is_concrete(label) and label.size:
      host = np.asarray(label)
      bad = np.flatnonzero((host < 0) | (host >= self.num_classes))
      if bad.size:
        raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}] (num_classes={self.num_classes}), "
                         f"but label[{bad[0]}] = {host[bad[0]]} ({bad.size} label(s) out of range)")
    return label

  def time_embedding(self, params: Params, c_noise: jax.Array) -> TimeEmb:
    """The time part of the embedding, {layer: [B, D]} for ``c_noise`` of shape [B]."""
    return self.module.apply({"params": params}, jnp.atleast_1d(c_noise), method=type(self.module).time_embedding)

  def add_label(self, params: Params, temb: TimeEmb, label: jax.Array | None) -> TimeEmb:
    """``temb`` ({layer: [B, D]}) plus the label embedding of ``label`` [B] (shapes checked, not values)."""
    batch = next(iter(temb.values())).shape[0] if temb and jnp.ndim(next(iter(temb.values()))) == 2 else None
    label = self.check_label(label, batch, values=False)
    return self.module.apply({"params": params}, temb, label, method=type(self.module).add_label)

  def embed_time(self, params: Params, c_noise: jax.Array, label: jax.Array | None = None) -> TimeEmb:
    """``add_label(time_embedding(c_noise), label)``; ``label`` [B] is checked as ``check_label`` does."""
    c_noise = jnp.atleast_1d(c_noise)
    label = self.check_label(label, c_noise.shape[0] if c_noise.shape[0] != 1 else None)
    return self.module.apply({"params": params}, c_noise, label, method=type(self.module).embed_time)

  def body(self, params: Params, x: jax.Array, temb: TimeEmb, *, train: bool = False,
           rng: jax.Array | None = None) -> jax.Array:
    self.check_input(x)
    missing = set(self.layer_names) - set(temb)
    if missing or len(temb) != len(self.layer_names):
      raise ValueError(f"temb must have one leaf per conditioned layer {list(self.layer_names)}, got {sorted(temb)}")
    rngs = {"dropout": rng} if rng is not None else {}
    return self.module.apply({"params": params}, x, temb, train, method=type(self.module).body, rngs=rngs)

  def apply(self, params: Params, x: jax.Array, c_noise: jax.Array, label: jax.Array | None = None, *,
            train: bool = False, rng: jax.Array | None = None) -> jax.Array:
    """The ordinary forward pass ``F(x, c_noise, label)``; ``label`` [B] is checked as ``check_label`` does."""
    self.check_input(x)
    label = self.check_label(label, x.shape[0])
    rngs = {"dropout": rng} if rng is not None else {}
    return self.module.apply({"params": params}, x, jnp.broadcast_to(c_noise, x.shape[:1]), label, train, rngs=rngs)


def get_backbone(name: str, data_shape: tuple[int, ...], **kwargs) -> Backbone:
  """Builds a registered backbone by name, e.g. ``get_backbone("unet", (8, 8, 1), image_size=8, ...)``."""
  module_cls = BACKBONES.get(name)
  try:
    module = module_cls(**kwargs)
  except TypeError as e:
    raise TypeError(f"bad options for backbone {name!r}: {e}") from None
  return Backbone(module, data_shape)


def make_denoiser(backbone: Backbone, params: Params, precond: Preconditioning, label: jax.Array | None = None,
                  *, train: bool = False, rng: jax.Array | None = None) -> Denoiser:
  """``D(x, sigma, temb=None) = c_skip x + c_out F(c_in x, temb)`` (EDM eq. 7) with ``temb`` computed from
  ``c_noise(sigma)`` by default, or taken from the caller (leaves [D] or [B, D]: the time part; the label term is
  added here).

  Args:
    label: None for an unconditional backbone; otherwise integer class labels [B] in ``[0, num_classes)``, one per
      sample of every ``x`` the denoiser is called with. Concrete labels are checked here (``ValueError`` naming the
      valid range); their count is checked against the batch at every call. The denoiser also takes ``label=`` at
      call time (it replaces this one; concrete values are checked then), so that ``reference_trajectories(...,
      labels=...)`` can pass each chunk's labels; ``denoiser.check_label(labels)`` is the host-side check it runs
      first.
  Precision: ``sigma``, ``c_skip``, ``c_out``, ``c_in`` and ``c_noise`` are computed in float32 or wider
  (``coefficient_dtype``) whatever ``x.dtype`` is; only the network input ``c_in x`` takes ``x.dtype``, and
  ``x0_hat`` is returned in ``x.dtype``. So a bfloat16 or float16 state gives the float32 answer within its own
  precision (a float16 ``sigma ** 2`` would overflow above sigma = 256).
  """
  if label is not None:
    label = backbone.check_label(label)
  default_label = label

  def denoiser(x: jax.Array, sigma: jax.Array, temb: TimeEmb | None = None, *,
               label: jax.Array | None = None) -> jax.Array:
    batch = x.shape[0]
    # A call-time label has its values checked here; the count of either is checked by add_label below.
    label = default_label if label is None else backbone.check_label(label, batch)
    sigma = jnp.asarray(sigma, coefficient_dtype(x.dtype))
    c_skip, c_out, c_in, c_noise = (broadcast_to_batch(c, x) for c in precond.coefficients(sigma))
    if temb is None:
      # A scalar sigma (every solver step) runs the time MLP once, on a batch of one, and broadcasts it.
      temb = backbone.time_embedding(params, jnp.reshape(c_noise, (-1,)))
    temb = {name: jnp.broadcast_to(leaf, (batch, leaf.shape[-1])) for name, leaf in temb.items()}
    temb = backbone.add_label(params, temb, label)
    out = backbone.body(params, (c_in * x).astype(x.dtype), temb, train=train, rng=rng)
    return (c_skip * x + c_out * out).astype(x.dtype)

  # Host-side checks for callers that pass labels later, at call time under a trace (e.g. reference solves).
  denoiser.check_label = backbone.check_label
  return denoiser
