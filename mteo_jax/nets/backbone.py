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

from mteo_jax.diffusion import Preconditioning, broadcast_to_batch
from mteo_jax.nets.mlp import MLP
from mteo_jax.nets.unet import UNet
from mteo_jax.registry import Registry

TimeEmb = dict[str, jax.Array]
Params = Any

BACKBONES: Registry[type[nn.Module]] = Registry("backbone")
BACKBONES.register("mlp")(MLP)
BACKBONES.register("unet")(UNet)


class Denoiser(Protocol):
  def __call__(self, x: jax.Array, sigma: jax.Array, temb: TimeEmb | None = None) -> jax.Array:
    """x0_hat = D(x, sigma); sigma is a scalar or per-sample [B]; ``temb`` replaces the time embedding."""


class Backbone:
  """A Flax backbone as pure functions over its parameter pytree.

  Args:
    module: a ``LiftedTimeEmbedding`` module (``MLP`` or ``UNet``).
    data_shape: shape of one sample, e.g. ``(2,)`` or ``(28, 28, 1)``.
  """

  def __init__(self, module: nn.Module, data_shape: tuple[int, ...]):
    self.module = module
    self.data_shape = tuple(data_shape)
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

  def time_embedding(self, params: Params, c_noise: jax.Array) -> TimeEmb:
    """The time part of the embedding, {layer: [B, D]} for ``c_noise`` of shape [B]."""
    return self.module.apply({"params": params}, jnp.atleast_1d(c_noise), method=type(self.module).time_embedding)

  def add_label(self, params: Params, temb: TimeEmb, label: jax.Array | None) -> TimeEmb:
    return self.module.apply({"params": params}, temb, label, method=type(self.module).add_label)

  def embed_time(self, params: Params, c_noise: jax.Array, label: jax.Array | None = None) -> TimeEmb:
    return self.module.apply({"params": params}, jnp.atleast_1d(c_noise), label,
                             method=type(self.module).embed_time)

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
    """The ordinary forward pass ``F(x, c_noise, label)``."""
    self.check_input(x)
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
  """``D(x, sigma, temb=None) = c_skip x + c_out F(c_in x, temb)`` with ``temb`` computed from ``c_noise(sigma)``
  by default, or taken from the caller (leaves [D] or [B, D]: the time part; the label term is added here)."""

  def denoiser(x: jax.Array, sigma: jax.Array, temb: TimeEmb | None = None) -> jax.Array:
    batch = x.shape[0]
    sigma = jnp.asarray(sigma, x.dtype)
    c_skip, c_out, c_in, c_noise = (broadcast_to_batch(c, x) for c in precond.coefficients(sigma))
    if temb is None:
      # A scalar sigma (every solver step) runs the time MLP once, on a batch of one, and broadcasts it.
      temb = backbone.time_embedding(params, jnp.reshape(c_noise, (-1,)))
    temb = {name: jnp.broadcast_to(leaf, (batch, leaf.shape[-1])) for name, leaf in temb.items()}
    temb = backbone.add_label(params, temb, label)
    return c_skip * x + c_out * backbone.body(params, c_in * x, temb, train=train, rng=rng)

  return denoiser

