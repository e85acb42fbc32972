"""A UNet in the style of EDM's DDPM++ (SongUNet): residual blocks with a per-block time projection, self-attention at
chosen resolutions, optional class label. Every residual block (including the down- and up-sampling ones) is a
conditioned layer with its own time-embedding leaf."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mteo_jax.nets.embeddings import LiftedTimeEmbedding, TimeMLP


def _num_groups(channels: int, max_groups: int = 32, min_channels_per_group: int = 4) -> int:
  groups = max(1, min(max_groups, channels // min_channels_per_group))
  while channels % groups:
    groups -= 1
  return groups


def _group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=_num_groups(channels), epsilon=1e-6)


class SelfAttention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    b, h, w, c = x.shape
    y = _group_norm(c)(x).reshape(b, h * w, c)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=c, out_features=c)(y)
    return y.reshape(b, h, w, c)


class ResBlock(nn.Module):
  """GN-SiLU-(resample)-Conv, FiLM from SiLU(temb), GN-SiLU-Dropout-Conv, skip; optional self-attention after."""
  out_channels: int
  resample: str | None = None  # None, "down" (2x2 average pool) or "up" (nearest)
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, temb: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    skip_scale = 1.0 / math.sqrt(2.0)
    h = nn.silu(_group_norm(x.shape[-1])(x))
    if self.resample == "down":
      h, x = (nn.avg_pool(t, (2, 2), strides=(2, 2)) for t in (h, x))
    elif self.resample == "up":
      h, x = (jax.image.resize(t, (t.shape[0], 2 * t.shape[1], 2 * t.shape[2], t.shape[3]), "nearest") for t in (h, x))
    h = nn.Conv(self.out_channels, (3, 3))(h)
    film = nn.Dense(2 * self.out_channels, name="temb_proj")(nn.silu(temb))
    scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
    h = nn.silu(_group_norm(self.out_channels)(h) * (1.0 + scale) + shift)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.variance_scaling(1e-5, "fan_avg", "uniform"))(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="skip")(x)
    x = (h + x) * skip_scale
    if self.attention:
      x = (x + SelfAttention(self.num_heads)(x)) * skip_scale
    return x


class UNet(LiftedTimeEmbedding):
  """x [B, H, W, C] -> F(x) [B, H, W, C]. Defaults follow EDM's DDPM++ at CIFAR-10 size (61M parameters here; EDM
  reports 56M for its own)."""
  image_size: int = 32
  in_channels: int = 3
  out_channels: int | None = None
  model_channels: int = 128
  channel_mult: Sequence[int] = (2, 2, 2)
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  channels_per_head: int = 64
  dropout: float = 0.1
  num_classes: int = 0
  emb_mult: int = 4
  embedding_type: str = "positional"
  fourier_scale: float = 16.0

  @property
  def emb_dim(self) -> int:
    return self.model_channels * self.emb_mult

  def _plan(self) -> list[tuple[str, str, int, str | None, bool]]:
    """(name, part, out_channels, resample, attention) for every conditioned block, in execution order."""
    if self.image_size % (2 ** (len(self.channel_mult) - 1)):
      raise ValueError(f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1} "
                       f"(channel_mult has {len(self.channel_mult)} levels)")
    if not self.channel_mult:
      raise ValueError("UNet channel_mult must list at least one level, got ()")
    plan = []
    for level, mult in enumerate(self.channel_mult):
      res, ch = self.image_size >> level, self.model_channels * mult
      if level > 0:
        plan.append((f"enc_{res}x{res}_down", "enc", ch, "down", False))
      for j in range(self.num_blocks):
        plan.append((f"enc_{res}x{res}_block{j}", "enc", ch, None, res in self.attn_resolutions))
    for level in reversed(range(len(self.channel_mult))):
      res, ch = self.image_size >> level, self.model_channels * self.channel_mult[level]
      if level == len(self.channel_mult) - 1:
        plan.append((f"dec_{res}x{res}_in0", "mid", ch, None, True))
        plan.append((f"dec_{res}x{res}_in1", "mid", ch, None, False))
      else:
        plan.append((f"dec_{res}x{res}_up", "up", ch, "up", False))
      for j in range(self.num_blocks + 1):
        plan.append((f"dec_{res}x{res}_block{j}", "dec", ch, None, res in self.attn_resolutions))
    for name, _, ch, _, attention in plan:
      heads = max(1, ch // self.channels_per_head)
      if attention and ch % heads:
        raise ValueError(f"UNet block {name} has {ch} channels, which {heads} attention heads (channels_per_head="
                         f"{self.channels_per_head}) do not divide; choose channels_per_head dividing "
                         f"model_channels * channel_mult")
    return plan

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(entry[0] for entry in self._plan())

  def expected_data_shape(self) -> tuple[int, ...]:
    """``(image_size, image_size, in_channels)``; a denoiser maps x to x0_hat of the same shape, so ``out_channels``
    (when set) must equal ``in_channels``."""
    if self.out_channels is not None and self.out_channels != self.in_channels:
      raise ValueError(f"UNet out_channels={self.out_channels} differs from in_channels={self.in_channels}: a "
                       "denoiser's output x0_hat has the shape of its input; leave out_channels unset")
    return (self.image_size, self.image_size, self.in_channels)

  def describe_data_shape(self) -> str:
    return f"UNet(image_size={self.image_size}, in_channels={self.in_channels})"

  def setup(self):
    self.time_mlp = TimeMLP(self.emb_dim, self.model_channels, self.embedding_type, self.fourier_scale)
    if self.num_classes > 0:
      self.label_embed = nn.Embed(self.num_classes, self.emb_dim)
    self.conv_in = nn.Conv(self.model_channels, (3, 3))
    plan = self._plan()
    self.parts = [part for _, part, _, _, _ in plan]
    self.blocks = [
        ResBlock(ch, resample, attention, max(1, ch // self.channels_per_head), self.dropout, name=name)
        for name, _, ch, resample, attention in plan]
    self.out_norm = _group_norm(self.model_channels * self.channel_mult[0])
    self.conv_out = nn.Conv(self.out_channels or self.in_channels, (3, 3),
                            kernel_init=nn.initializers.variance_scaling(1e-5, "fan_avg", "uniform"))

  def time_embedding(self, c_noise: jnp.ndarray) -> dict[str, jnp.ndarray]:
    emb = self.time_mlp(c_noise)
    return {name: emb for name in self.layer_names}

  def label_embedding(self, label: jnp.ndarray) -> jnp.ndarray:
    return self.label_embed(label)

  def body(self, x: jnp.ndarray, temb: dict[str, jnp.ndarray], train: bool = False) -> jnp.ndarray:
    h = self.conv_in(x)
    skips = [h]
    for name, part, block in zip(self.layer_names, self.parts, self.blocks):
      if part == "dec":
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = block(h, temb[name], train)
      if part == "enc":
        skips.append(h)
    return self.conv_out(nn.silu(self.out_norm(h)))
