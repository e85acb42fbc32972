"""Backbones: the lifted time embedding reproduces the plain forward pass; one leaf per conditioned layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_lifted_identity
from mteo_jax import Preconditioning, get_backbone, make_denoiser

UNET_TINY = dict(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=(4,), dropout=0.0)


def _mlp(**kwargs):
  return get_backbone("mlp", (3,), **{"data_dim": 3, "width": 32, "depth": 3, "emb_dim": 16, "noise_channels": 16,
                                      **kwargs})


def _unet(**kwargs):
  return get_backbone("unet", (8, 8, 1), **{**UNET_TINY, **kwargs})


def _perturbed_init(backbone, seed=0):
  """Random init plus noise on every leaf, so that near-zero initialisations cannot hide an unused input."""
  params = backbone.init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _inputs(backbone, batch=3):
  x = jax.random.normal(jax.random.key(7), (batch,) + backbone.data_shape)
  c_noise = jnp.linspace(-1.0, 1.0, batch)
  label = jnp.arange(batch) % max(backbone.num_classes, 1) if backbone.num_classes else None
  return x, c_noise, label


@pytest.mark.parametrize("eager", [False, True], ids=["jit", "eager"])
@pytest.mark.parametrize("make", [_mlp, lambda: _unet(), lambda: _unet(num_classes=10)], ids=["mlp", "unet", "unet-cond"])
def test_lifted_embedding_equals_plain_forward_pass_bit_for_bit(make, eager):
  backbone = make()
  params = _perturbed_init(backbone)
  x, c_noise, label = _inputs(backbone)
  assert_lifted_identity(backbone, params, x, c_noise, label, eager=eager)


def _expected_unet_layers(levels, num_blocks):
  encoder = levels * num_blocks + (levels - 1)          # residual blocks + one down-sampling block per lower level
  decoder = 2 + levels * (num_blocks + 1) + (levels - 1)  # two middle blocks, blocks with skips, up-sampling blocks
  return encoder + decoder


@pytest.mark.parametrize("channel_mult,num_blocks", [((1, 2), 1), ((1, 2, 2), 2), ((1,), 3)])
def test_unet_has_one_leaf_per_conditioned_layer(channel_mult, num_blocks):
  backbone = _unet(channel_mult=channel_mult, num_blocks=num_blocks)
  params = backbone.init(jax.random.key(0))
  temb = backbone.embed_time(params, jnp.zeros(2))
  assert len(temb) == _expected_unet_layers(len(channel_mult), num_blocks)
  # Every conditioned block owns exactly one time projection in the parameter tree, and vice versa.
  projections = sorted(name for name, block in params.items() if isinstance(block, dict) and "temb_proj" in block)
  assert projections == sorted(temb)
  assert all(leaf.shape == (2, backbone.emb_dim) for leaf in temb.values())


def test_mlp_has_one_leaf_per_hidden_block():
  backbone = _mlp(depth=5)
  temb = backbone.embed_time(backbone.init(jax.random.key(0)), jnp.zeros(4))
  assert sorted(temb) == [f"block{l:02d}" for l in range(5)]


@pytest.mark.parametrize("make", [_mlp, _unet], ids=["mlp", "unet"])
def test_every_leaf_conditions_its_layer(make):
  """The body sees the noise level only through temb, and each leaf reaches the output."""
  backbone = make()
  params = _perturbed_init(backbone)
  x, c_noise, _ = _inputs(backbone)
  temb = backbone.embed_time(params, c_noise)
  base = backbone.body(params, x, temb)
  for name in temb:
    changed = dict(temb, **{name: temb[name] + 1.0})
    assert not np.allclose(backbone.body(params, x, changed), base), f"leaf {name} has no effect"


def test_denoiser_with_replaced_time_embedding_matches_the_default_path():
  backbone = _unet(num_classes=10)
  params = _perturbed_init(backbone)
  precond = Preconditioning("edm")
  x, _, label = _inputs(backbone)
  denoiser = make_denoiser(backbone, params, precond, label)
  sigma = jnp.float32(1.7)
  row = {k: v[0] for k, v in backbone.time_embedding(params, precond.c_noise(sigma[None])).items()}
  np.testing.assert_allclose(denoiser(x, sigma, temb=row), denoiser(x, sigma), rtol=1e-6, atol=1e-6)
  # The preconditioning is applied around the body: D = c_skip x + c_out F(c_in x).
  c_skip, c_out, c_in, c_noise = precond.coefficients(sigma)
  f = backbone.apply(params, c_in * x, jnp.full((3,), c_noise), label)
  np.testing.assert_allclose(denoiser(x, sigma), c_skip * x + c_out * f, rtol=1e-5, atol=1e-6)
  # A replaced embedding changes the output (the hook is live).
  other = jax.tree.map(lambda t: t + 0.5, row)
  assert not np.allclose(denoiser(x, sigma, temb=other), denoiser(x, sigma))


def test_clear_errors():
  with pytest.raises(KeyError, match=r"unknown backbone 'resnet'; expected one of \['dit', 'mlp', 'unet'\]"):
    get_backbone("resnet", (2,))
  with pytest.raises(TypeError, match="bad options for backbone 'mlp'"):
    get_backbone("mlp", (2,), data_dim=2, widht=3)
  backbone = _unet()
  params = backbone.init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"expected input of shape \[batch, 8, 8, 1\], got \(2, 8, 8, 3\)"):
    backbone.apply(params, jnp.zeros((2, 8, 8, 3)), jnp.zeros(2))
  temb = backbone.embed_time(params, jnp.zeros(2))
  del temb["dec_8x8_up"]
  with pytest.raises(ValueError, match="one leaf per conditioned layer"):
    backbone.body(params, jnp.zeros((2, 8, 8, 1)), temb)
  with pytest.raises(ValueError, match="unconditional"):
    backbone.embed_time(params, jnp.zeros(2), jnp.zeros(2, jnp.int32))
  conditional = _unet(num_classes=10)
  with pytest.raises(ValueError, match="class-conditional"):
    conditional.embed_time(conditional.init(jax.random.key(0)), jnp.zeros(2))
  with pytest.raises(ValueError, match="not divisible"):
    get_backbone("unet", (6, 6, 1), **{**UNET_TINY, "image_size": 6, "channel_mult": (1, 2, 2)})
  with pytest.raises(ValueError, match="unknown embedding_type"):
    _mlp(embedding_type="rotary").init(jax.random.key(0))


# --- low precision, labels and data shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["edm", "vp", "ve"])
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_state_gets_float32_preconditioning(kind, dtype):
  """c_skip, c_out, c_in, c_noise in float32 whatever the state's dtype: at sigma = 300 a float16 ``sigma ** 2``
  overflows and EDM's D(x, 300) used to come out as exactly 0."""
  backbone = _mlp()
  params = _perturbed_init(backbone)
  denoiser = make_denoiser(backbone, params, Preconditioning(kind))
  eps = float(jnp.finfo(dtype).eps)
  for sigma in (0.002, 1.0, 80.0, 300.0, 1000.0):
    x = sigma * jax.random.normal(jax.random.key(3), (4, 3))
    x_low = x.astype(dtype)
    expected = denoiser(x_low.astype(jnp.float32), sigma)   # the same input, in float32
    got = denoiser(x_low, jnp.asarray(sigma, dtype))
    assert got.dtype == dtype
    scale = float(jnp.max(jnp.abs(expected))) + 1.0
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=8 * eps * scale, err_msg=f"sigma={sigma}")


def test_issue_case_edm_float16_at_sigma_300_is_not_zero():
  backbone = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=16, noise_channels=8)
  denoiser = make_denoiser(backbone, _perturbed_init(backbone), Preconditioning("edm"))
  x = jnp.asarray([[1.0, -1.0]])
  expected = denoiser(x, 300.0)
  assert float(jnp.max(jnp.abs(expected))) > 0.01
  np.testing.assert_allclose(np.asarray(denoiser(x.astype(jnp.float16), 300.0), np.float32), expected, rtol=2e-3,
                             atol=1e-3)


@pytest.mark.parametrize("labels, match", [
    ([3], r"must lie in \[0, 2\] \(num_classes=3\), but label\[0\] = 3"),
    ([0, -1], r"must lie in \[0, 2\].*label\[1\] = -1"),
    ([[1]], r"shape \[batch\]"),
])
def test_out_of_range_or_misshapen_labels_are_errors(labels, match):
  for backbone in (_mlp(num_classes=3), _unet(num_classes=3)):
    params = jax.eval_shape(backbone.init, jax.random.key(0))   # the labels are refused before any parameter is read
    with pytest.raises(ValueError, match=match):
      make_denoiser(backbone, params, Preconditioning(), jnp.asarray(labels))
    with pytest.raises(ValueError, match=match):
      backbone.embed_time(params, jnp.zeros((len(labels),)), jnp.asarray(labels))


def test_label_dtype_and_count_must_fit_the_batch():
  backbone = _mlp(num_classes=3)
  params = backbone.init(jax.random.key(0))
  with pytest.raises(TypeError, match="integers"):
    make_denoiser(backbone, params, Preconditioning(), jnp.asarray([1.0]))
  x = jnp.ones((3, 3))
  for labels in ([1], [0, 1], [0, 1, 2, 0]):   # one label used to broadcast silently to the whole batch
    denoiser = make_denoiser(backbone, params, Preconditioning(), jnp.asarray(labels))
    with pytest.raises(ValueError, match=rf"{len(labels)} class label\(s\) for a batch of 3 samples"):
      denoiser(x, 1.0)
    with pytest.raises(ValueError, match="for a batch of 3"):
      jax.jit(denoiser)(x, 1.0)   # the count is a shape: checked under jit too
    with pytest.raises(ValueError, match="for a batch of 3"):
      backbone.apply(params, x, jnp.zeros((3,)), jnp.asarray(labels))
  out = make_denoiser(backbone, params, Preconditioning(), jnp.asarray([0, 1, 2]))(x, 1.0)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="unconditional"):
    make_denoiser(_mlp(), _mlp().init(jax.random.key(0)), Preconditioning(), jnp.asarray([0]))


@pytest.mark.parametrize("name, data_shape, options, match", [
    ("unet", (8, 8, 3), dict(UNET_TINY), r"UNet\(image_size=8, in_channels=1\) takes samples of shape \(8, 8, 1\), "
                                         r"but the data shape is \(8, 8, 3\)"),
    ("unet", (9, 9, 1), dict(UNET_TINY), r"shape \(8, 8, 1\), but the data shape is \(9, 9, 1\)"),
    ("unet", (8, 4, 1), dict(UNET_TINY), r"but the data shape is \(8, 4, 1\)"),
    ("unet", (8, 8), dict(UNET_TINY), r"but the data shape is \(8, 8\)"),
    ("unet", (8, 8, 1), dict(UNET_TINY, out_channels=3), r"out_channels=3 differs from in_channels=1"),
    ("mlp", (3,), dict(data_dim=2), r"MLP\(data_dim=2\) takes samples of shape \(2,\), but the data shape is \(3,\)"),
    ("mlp", (2, 1), dict(data_dim=2), r"but the data shape is \(2, 1\)"),
    ("mlp", (0,), dict(data_dim=0), r"positive integers"),
])
def test_backbone_options_that_disagree_with_the_data_shape_are_errors(name, data_shape, options, match):
  with pytest.raises(ValueError, match=match):
    get_backbone(name, data_shape, **options)


def test_data_shape_must_be_positive_integers_and_unet_options_consistent():
  for shape in ("2", (2.5,), (2, True), (), (0,)):
    with pytest.raises(ValueError, match="data_shape must be a non-empty tuple of positive integers"):
      get_backbone("mlp", shape, data_dim=2)
  with pytest.raises(ValueError, match=r"channel_mult must list at least one level"):
    get_backbone("unet", (8, 8, 1), **{**UNET_TINY, "channel_mult": ()})
  with pytest.raises(ValueError, match=r"16 channels, which 5 attention heads \(channels_per_head=3\) do not divide"):
    get_backbone("unet", (8, 8, 1), **{**UNET_TINY, "attn_resolutions": (8,), "channels_per_head": 3})


def test_labels_at_call_time_replace_and_are_checked():
  backbone = _mlp(num_classes=3)
  params = _perturbed_init(backbone)
  x = jax.random.normal(jax.random.key(0), (3, 3))
  labels = jnp.asarray([0, 2, 1])
  at_creation = make_denoiser(backbone, params, Preconditioning(), labels)(x, 2.0)
  denoiser = make_denoiser(backbone, params, Preconditioning())
  np.testing.assert_array_equal(denoiser(x, 2.0, label=labels), at_creation)
  np.testing.assert_allclose(jax.jit(lambda x, y: denoiser(x, 2.0, label=y))(x, labels), at_creation, atol=1e-6)
  assert not np.allclose(denoiser(x, 2.0, label=jnp.asarray([1, 1, 1])), at_creation)
  with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
    denoiser(x, 2.0, label=jnp.asarray([0, 1, 3]))
  with pytest.raises(ValueError, match="for a batch of 3"):
    denoiser(x, 2.0, label=jnp.asarray([0, 1]))
  with pytest.raises(ValueError, match=r"must lie in \[0, 2\]"):
    denoiser.check_label(jnp.asarray([5]))
