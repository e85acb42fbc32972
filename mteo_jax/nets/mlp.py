"""A residual MLP for low-dimensional data; every hidden block is conditioned on its own time-embedding leaf."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mteo_jax.nets.embeddings import LiftedTimeEmbedding, TimeMLP


class MLPBlock(nn.Module):
  """Pre-norm residual block: ``h + Dense(SiLU(FiLM(Dense(LN(h)), temb)))``."""
  width: int

  @nn.compact
  def __call__(self, h: jnp.ndarray, temb: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.width)(nn.LayerNorm()(h))
    scale, shift = jnp.split(nn.Dense(2 * self.width, name="temb_proj")(nn.silu(temb)), 2, axis=-1)
    y = nn.silu(y * (1.0 + scale) + shift)
    return h + nn.Dense(self.width)(y)


class MLP(LiftedTimeEmbedding):
  """x [B, data_dim] -> F(x) [B, data_dim], time enters only through the per-block leaves of ``temb``."""
  data_dim: int
  width: int = 256
  depth: int = 4
  emb_dim: int = 128
  noise_channels: int = 64
  num_classes: int = 0
  embedding_type: str = "fourier"
  fourier_scale: float = 16.0

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(f"block{l:02d}" for l in range(self.depth))

  def expected_data_shape(self) -> tuple[int, ...]:
    return (self.data_dim,)

  def describe_data_shape(self) -> str:
    return f"MLP(data_dim={self.data_dim})"

  def setup(self):
    self.time_mlp = TimeMLP(self.emb_dim, self.noise_channels, self.embedding_type, self.fourier_scale)
    if self.num_classes > 0:
      self.label_embed = nn.Embed(self.num_classes, self.emb_dim)
    self.input_proj = nn.Dense(self.width)
    self.blocks = [MLPBlock(self.width, name=name) for name in self.layer_names]
    self.out_norm = nn.LayerNorm()
    self.output_proj = nn.Dense(self.data_dim)

  def time_embedding(self, c_noise: jnp.ndarray) -> dict[str, jnp.ndarray]:
    emb = self.time_mlp(c_noise)
    return {name: emb for name in self.layer_names}

  def label_embedding(self, label: jnp.ndarray) -> jnp.ndarray:
    return self.label_embed(label)

  def body(self, x: jnp.ndarray, temb: dict[str, jnp.ndarray], train: bool = False) -> jnp.ndarray:
    del train  # no dropout in this backbone
    h = self.input_proj(x)
    for name, block in zip(self.layer_names, self.blocks):
      h = block(h, temb[name])
    return self.output_proj(nn.silu(self.out_norm(h)))
