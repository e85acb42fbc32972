"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers", arXiv 2212.09748, §3.2 and Fig. 3), with the time embedding lifted out (DESIGN §3).

x [B, H, W, C] is cut into non-overlapping p x p patches, each embedded linearly and given a fixed 2-D sin-cos position
(the "patchify" layer, §3.2), passed through ``depth`` transformer blocks and a final layer, both modulated by the
conditioning vector c [B, hidden_size], and reassembled ("unpatchify") into F(x) [B, H, W, C]. Every block's adaLN
modulation and the final layer's is a conditioned layer with its own time-embedding leaf: ``block00`` ...
``block{depth-1}``, ``final``.

Kept from the paper's reference code (facebookresearch/DiT ``models.py``): LayerNorm without affine, eps 1e-6; fused
qkv attention with biases; MLP with tanh-approximated GELU; Xavier-uniform linear layers with zero biases; the patch
embedding initialised as a flattened linear layer; label embedding ~ N(0, 0.02^2); every adaLN modulation and the
final linear layer zero-initialised (adaLN-Zero), so a fresh DiT outputs exactly 0 and every block starts as the
identity. Changed for this library: the time features are this library's ``TimeMLP`` (EDM's sinusoidal features of
c_noise, default init) rather than DiT's timestep embedder of t in [0, 1000); the label embedding has no extra
"null" class (no classifier-free guidance dropout); no learned-sigma output channels (the EDM/VP/VE preconditioning
wraps the network); no dropout (DiT uses none).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mteo_jax.nets.embeddings import LiftedTimeEmbedding, TimeMLP

# Named sizes of the paper's Table 1 (the patch size is set separately: DiT-S/2 is DIT_SIZES["S"] with patch_size=2).
# Parameter counts of this implementation (unconditional, image_size=32, in_channels=3, patch_size=2; checked in
# tests/test_dit.py): tiny 49,508 (8x8x1 data); S 32,471,436; B 129,528,588; L 456,791,052; XL 673,653,900.
DIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, depth=2, num_heads=2),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
  """positions [M] -> [M, embed_dim]: ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000^(-k / (embed_dim/2))``."""
  omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
  angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
  """Fixed 2-D position embedding [grid_size^2, embed_dim] of a row-major grid of patches (MAE's and DiT's
  ``get_2d_sincos_pos_embed``): the first half of the channels encodes the column, the second half the row."""
  if embed_dim % 4:
    raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
  rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
  return np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """adaLN: ``x (1 + scale) + shift`` for tokens x [B, T, D] and per-sample shift, scale [B, D]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm() -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False)


class Attention(nn.Module):
  """Multi-head self-attention over tokens [B, T, D] with a fused qkv projection (timm's ``Attention``)."""
  num_heads: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    batch, tokens, width = x.shape
    qkv = nn.Dense(3 * width, kernel_init=_xavier, name="qkv")(x)
    q, k, v = jnp.split(qkv.reshape(batch, tokens, 3, self.num_heads, width // self.num_heads), 3, axis=2)
    y = nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])   # [B, T, heads, head_dim]
    return nn.Dense(width, kernel_init=_xavier, name="proj")(y.reshape(batch, tokens, width))


class DiTBlock(nn.Module):
  """adaLN-Zero block (paper Fig. 3): ``(shift, scale, gate) x 2 = Dense(6 D)(SiLU(c))``, zero-initialised;
  ``x += gate_msa * Attn(modulate(LN(x)))``, ``x += gate_mlp * MLP(modulate(LN(x)))``. x [B, T, D], c [B, D]."""
  num_heads: int
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    width = x.shape[-1]
    modulation = nn.Dense(6 * width, kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
    h = Attention(self.num_heads, name="attn")(modulate(_layer_norm()(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None, :] * h
    h = modulate(_layer_norm()(x), shift_mlp, scale_mlp)
    h = nn.Dense(int(width * self.mlp_ratio), kernel_init=_xavier, name="fc1")(h)
    h = nn.Dense(width, kernel_init=_xavier, name="fc2")(nn.gelu(h, approximate=True))
    return x + gate_mlp[:, None, :] * h


class FinalLayer(nn.Module):
  """adaLN (shift, scale from ``Dense(2 D)(SiLU(c))``, zero-initialised), then a zero-initialised linear map of every
  token [B, T, D] to its patch [B, T, p * p * out_channels]."""
  patch_size: int
  out_channels: int

  @nn.compact
  def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    shift, scale = jnp.split(nn.Dense(2 * x.shape[-1], kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c)), 2,
                             axis=-1)
    x = modulate(_layer_norm()(x), shift, scale)
    return nn.Dense(self.patch_size ** 2 * self.out_channels, kernel_init=_zeros, name="linear")(x)


class DiT(LiftedTimeEmbedding):
  """x [B, image_size, image_size, in_channels] -> F(x) of the same shape; c = TimeMLP(c_noise) [+ Embed(label)].

  Sizes (paper Table 1; ``DIT_SIZES``), with parameter counts of this implementation for unconditional 32x32x3 data
  and patch_size=2 (``DiT-S/2`` etc.):

  ======  ===========  =====  =========  ===========================================================
  name    hidden_size  depth  num_heads  parameters
  ======  ===========  =====  =========  ===========================================================
  tiny    32           2      2          49,508 on 8x8x1 data (the tests; 9,280 of them in the time MLP)
  S       384          12     6          32,471,436 (paper: 33M)
  B       768          12     12         129,528,588 (paper: 130M)
  L       1024         24     16         456,791,052 (paper: 458M)
  XL      1152         28     16         673,653,900 (paper: 675M)
  ======  ===========  =====  =========  ===========================================================

  The paper's counts are for its ImageNet-256 setting: 32x32x4 latents, 1000 classes plus a "null" class, a
  learned-sigma output (2 x 4 channels), and the frozen position table counted as a parameter. In that setting this
  implementation has 32,858,512 parameters at DiT-S/2; adding the null-class row (384), the sigma channels (6,160)
  and the position table (98,304) gives 32,963,360, the reference code's count (``tests/test_dit.py``). The token
  count is (image_size / patch_size)^2; compute grows with it, the parameter count hardly at all.

  Raises (when the backbone is built, from ``expected_data_shape``): ValueError if image_size is not divisible by
  patch_size, hidden_size by num_heads or by 4 (the 2-D sin-cos table), or a size is not positive.
  """
  image_size: int = 32
  in_channels: int = 3
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  num_classes: int = 0
  noise_channels: int = 256  # DiT's frequency_embedding_size
  embedding_type: str = "positional"
  fourier_scale: float = 16.0

  @property
  def emb_dim(self) -> int:
    return self.hidden_size

  @property
  def layer_names(self) -> tuple[str, ...]:
    return tuple(f"block{l:02d}" for l in range(self.depth)) + ("final",)

  def check_options(self) -> None:
    """Raises ValueError naming the option that makes this DiT impossible to build."""
    for name in ("image_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"DiT {name} must be a positive integer, got {getattr(self, name)!r}")
    if not self.mlp_ratio > 0:
      raise ValueError(f"DiT mlp_ratio must be > 0, got {self.mlp_ratio!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"DiT image_size={self.image_size} is not divisible by patch_size={self.patch_size}: the "
                       "image must tile into whole patches")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"DiT hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.hidden_size % 4:
      raise ValueError(f"DiT hidden_size={self.hidden_size} is not divisible by 4, which the 2-D sin-cos position "
                       "embedding needs")

  def expected_data_shape(self) -> tuple[int, ...]:
    self.check_options()
    return (self.image_size, self.image_size, self.in_channels)

  def describe_data_shape(self) -> str:
    return f"DiT(image_size={self.image_size}, in_channels={self.in_channels})"

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  def setup(self):
    self.check_options()
    self.time_mlp = TimeMLP(self.emb_dim, self.noise_channels, self.embedding_type, self.fourier_scale)
    if self.num_classes > 0:
      self.label_embed = nn.Embed(self.num_classes, self.emb_dim, embedding_init=nn.initializers.normal(0.02))
    p = self.patch_size
    # A p x p stride-p convolution is a linear map of each flattened patch; Xavier over (p*p*C_in, D) as in DiT.
    self.patch_embed = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                               kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                                            in_axis=(0, 1, 2), out_axis=3))
    self.pos_embed = sincos_pos_embed_2d(self.hidden_size, self.grid_size).astype(np.float32)  # a constant
    self.blocks = [DiTBlock(self.num_heads, self.mlp_ratio, name=name) for name in self.layer_names[:-1]]
    self.final = FinalLayer(self.patch_size, self.in_channels, name="final")

  def time_embedding(self, c_noise: jnp.ndarray) -> dict[str, jnp.ndarray]:
    emb = self.time_mlp(c_noise)
    return {name: emb for name in self.layer_names}

  def label_embedding(self, label: jnp.ndarray) -> jnp.ndarray:
    return self.label_embed(label)

  def patchify(self, x: jnp.ndarray) -> jnp.ndarray:
    """x [B, H, W, C] -> tokens [B, (H/p) (W/p), D] (row-major patches) plus the fixed position embedding."""
    h = self.patch_embed(x)
    h = h.reshape(h.shape[0], -1, h.shape[-1])
    return h + self.pos_embed.astype(h.dtype)

  def unpatchify(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """[B, (H/p) (W/p), p * p * C] -> [B, H, W, C]."""
    batch, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.in_channels
    x = tokens.reshape(batch, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, g * p, g * p, c)

  def body(self, x: jnp.ndarray, temb: dict[str, jnp.ndarray], train: bool = False) -> jnp.ndarray:
    del train  # no dropout in DiT
    h = self.patchify(x)
    for name, block in zip(self.layer_names, self.blocks):
      h = block(h, temb[name])
    return self.unpatchify(self.final(h, temb["final"]))
