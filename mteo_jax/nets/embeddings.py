"""Noise-level features and the shared time-embedding MLP that every backbone uses."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

EMBEDDING_TYPES = ("positional", "fourier")


def positional_features(c_noise: jnp.ndarray, num_channels: int, max_positions: int = 10000) -> jnp.ndarray:
  """Transformer-style sinusoidal features of ``c_noise`` [B] -> [B, num_channels] (EDM's ``endpoint=True`` variant)."""
  half = num_channels // 2
  freqs = jnp.arange(half, dtype=jnp.float32) / (half - 1)
  freqs = (1.0 / max_positions) ** freqs
  angles = c_noise[:, None].astype(jnp.float32) * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def fourier_features(c_noise: jnp.ndarray, num_channels: int, scale: float, seed: int = 0) -> jnp.ndarray:
  """Random Fourier features (NCSN++): fixed frequencies ~ N(0, scale^2), drawn from ``seed`` (not trained)."""
  freqs = np.random.RandomState(seed).randn(num_channels // 2).astype(np.float32) * scale
  angles = c_noise[:, None].astype(jnp.float32) * (2.0 * np.pi * freqs)[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimeMLP(nn.Module):
  """``c_noise`` [B] -> time embedding [B, emb_dim]: features, Dense, SiLU, Dense (the pre-activation embedding)."""
  emb_dim: int
  noise_channels: int
  embedding_type: str = "positional"
  fourier_scale: float = 16.0

  @nn.compact
  def __call__(self, c_noise: jnp.ndarray) -> jnp.ndarray:
    if self.embedding_type == "positional":
      features = positional_features(c_noise, self.noise_channels)
    elif self.embedding_type == "fourier":
      features = fourier_features(c_noise, self.noise_channels, self.fourier_scale)
    else:
      raise ValueError(f"unknown embedding_type {self.embedding_type!r}; expected one of {list(EMBEDDING_TYPES)}")
    h = nn.silu(nn.Dense(self.emb_dim, name="map_layer0")(features))
    return nn.Dense(self.emb_dim, name="map_layer1")(h)


class LiftedTimeEmbedding(nn.Module):
  """Base of every backbone: the forward pass split at the time embedding (DESIGN §3).

  A subclass defines ``layer_names`` (one per conditioned layer), ``time_embedding(c_noise) -> {name: [B, D]}``,
  ``label_embedding(label) -> [B, D]`` (when ``num_classes > 0``) and ``body(x, temb, train)``, which sees the noise
  level only through ``temb``. The label term is additive, as in ADM, so a replaced time part keeps the label.
  """

  def expected_data_shape(self) -> tuple[int, ...] | None:
    """The shape of one sample that the module's options fix (None: any shape); ``Backbone`` checks it."""
    return None

  def describe_data_shape(self) -> str:
    """The options that fix ``expected_data_shape``, for error messages, e.g. ``UNet(image_size=8, in_channels=1)``."""
    return type(self).__name__

  def embed_time(self, c_noise: jnp.ndarray, label: jnp.ndarray | None = None) -> dict[str, jnp.ndarray]:
    return self.add_label(self.time_embedding(c_noise), label)

  def add_label(self, temb: dict[str, jnp.ndarray], label: jnp.ndarray | None) -> dict[str, jnp.ndarray]:
    if self.num_classes == 0:
      if label is not None:
        raise ValueError("this backbone is unconditional (num_classes=0) but a label was given")
      return temb
    if label is None:
      raise ValueError(f"this backbone is class-conditional (num_classes={self.num_classes}); pass a label")
    label_emb = self.label_embedding(label)
    return {name: leaf + label_emb for name, leaf in temb.items()}

  def __call__(self, x: jnp.ndarray, c_noise: jnp.ndarray, label: jnp.ndarray | None = None,
               train: bool = False) -> jnp.ndarray:
    """The ordinary forward pass ``F(x, c_noise, label)``."""
    return self.body(x, self.embed_time(c_noise, label), train)
