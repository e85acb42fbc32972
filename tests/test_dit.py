"""DiT (Peebles & Xie 2023): the lifted time embedding is the plain forward pass, one leaf per adaLN-modulated layer,
adaLN-Zero's identity start, shapes and option errors, MTEO's untrained-table identity, and the paper's sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_lifted_identity
from mteo_jax import Preconditioning, get_backbone, mteo
from mteo_jax.nets import make_denoiser
from mteo_jax.nets.backbone import BACKBONES
from mteo_jax.nets.dit import DIT_SIZES, DiT, sincos_1d, sincos_pos_embed_2d
from mteo_jax.reference import reference_noise
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver

TINY = dict(image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, noise_channels=32)
PRECOND = Preconditioning("edm", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


def _dit(data_shape=(8, 8, 1), **kwargs):
  return get_backbone("dit", data_shape, **{**TINY, **kwargs})


def _init(backbone, seed=0):
  """``backbone.init`` under jit (eagerly, every initialiser of every shape compiles on its own)."""
  return jax.jit(backbone.init)(jax.random.key(seed))


def _random_params(backbone, seed=0, scale=0.1):
  """Every parameter ~ N(0, scale^2), so that adaLN-Zero's zero initialisation cannot hide an unused input; drawn
  with numpy on the shapes of ``init`` (nothing to compile)."""
  shapes = jax.eval_shape(backbone.init, jax.random.key(0))
  rng = np.random.RandomState(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(scale * rng.randn(*leaf.shape), leaf.dtype), shapes)


def _inputs(backbone, batch=3):
  x = jax.random.normal(jax.random.key(7), (batch,) + backbone.data_shape)
  c_noise = jnp.linspace(-1.0, 1.0, batch)
  label = jnp.arange(batch) % backbone.num_classes if backbone.num_classes else None
  return x, c_noise, label


def test_dit_is_registered():
  assert BACKBONES.get("dit") is DiT


@pytest.mark.parametrize("eager", [False, True], ids=["jit", "eager"])
@pytest.mark.parametrize("num_classes", [0, 10], ids=["uncond", "cond"])
def test_lifted_embedding_equals_plain_forward_pass_bit_for_bit(num_classes, eager):
  backbone = _dit(num_classes=num_classes)
  params = _random_params(backbone)
  x, c_noise, label = _inputs(backbone)
  plain = assert_lifted_identity(backbone, params, x, c_noise, label, eager=eager)
  assert float(jnp.std(plain)) > 1e-3   # a live network, not adaLN-Zero's zeros
  # ``train`` is accepted for the common interface and changes nothing (DiT has no dropout).
  apply = jax.jit(lambda x, c, y, train: backbone.apply(params, x, c, y, train=train), static_argnames="train")
  np.testing.assert_array_equal(apply(x, c_noise, label, train=True), apply(x, c_noise, label, train=False))


@pytest.mark.parametrize("depth", [1, 3])
def test_one_leaf_per_block_and_the_final_layer(depth):
  backbone = _dit(depth=depth)
  params = _random_params(backbone)
  temb = backbone.embed_time(params, jnp.zeros(2))
  assert list(temb) == [f"block{l:02d}" for l in range(depth)] + ["final"]
  assert backbone.layer_names == tuple(temb)
  # Every conditioned layer owns exactly one adaLN modulation in the parameter tree, and vice versa.
  modulated = sorted(name for name, sub in params.items() if isinstance(sub, dict) and "adaLN_modulation" in sub)
  assert modulated == sorted(temb)
  assert params["final"]["adaLN_modulation"]["kernel"].shape == (32, 2 * 32)
  assert all(params[f"block{l:02d}"]["adaLN_modulation"]["kernel"].shape == (32, 6 * 32) for l in range(depth))
  assert backbone.emb_dim == 32 and all(leaf.shape == (2, 32) for leaf in temb.values())


@pytest.mark.parametrize("num_classes", [0, 10], ids=["uncond", "cond"])
def test_every_leaf_reaches_the_output(num_classes):
  """The body sees the noise level only through temb, and each leaf (each block, the final layer) changes F."""
  backbone = _dit(num_classes=num_classes)
  params = _random_params(backbone)
  x, c_noise, label = _inputs(backbone)
  temb = backbone.embed_time(params, c_noise, label)
  body = jax.jit(backbone.body)
  base = body(params, x, temb)
  for name in temb:
    changed = dict(temb, **{name: temb[name] + 1.0})
    assert not np.allclose(body(params, x, changed), base, rtol=1e-4, atol=1e-5), f"leaf {name} has no effect"


@pytest.fixture(scope="module")
def fresh():
  """A freshly initialised conditional tiny DiT (the real init, adaLN-Zero included)."""
  backbone = _dit(num_classes=10)
  return backbone, _init(backbone)


def test_adaln_zero_fresh_dit_outputs_zero_and_every_block_starts_as_the_identity(fresh):
  """Paper §3.2 (adaLN-Zero): gates and the final linear layer start at zero."""
  backbone, params = fresh
  x, c_noise, label = _inputs(backbone)
  np.testing.assert_array_equal(backbone.apply(params, x, c_noise, label), jnp.zeros_like(x))
  # Every block returns its input exactly: all of them return the patch embedding (with positions).
  temb = backbone.embed_time(params, c_noise, label)
  _, state = backbone.module.apply({"params": params}, x, temb, method=DiT.body, mutable=["intermediates"],
                                   capture_intermediates=lambda module, method: method in ("patchify", "__call__"))
  tokens = state["intermediates"]["patchify"][0]
  assert tokens.shape == (3, 16, 32) and float(jnp.std(tokens)) > 0.1
  for l in range(2):
    np.testing.assert_array_equal(state["intermediates"][f"block{l:02d}"]["__call__"][0], tokens)


def test_patch_tokens_go_back_where_they_came_from(fresh):
  """At init (blocks = identity) with a non-zero final linear layer, F is patch-local: changing the pixels of one
  p x p patch changes exactly that patch of the output; and unpatchify is the inverse of a row-major patch split."""
  backbone, params = fresh
  final = params["final"]["linear"]
  params = dict(params, final=dict(params["final"], linear=dict(
      final, kernel=jnp.asarray(np.random.RandomState(1).randn(*final["kernel"].shape), jnp.float32))))
  x, c_noise, label = _inputs(backbone)
  base = backbone.apply(params, x, c_noise, label)
  changed = backbone.apply(params, x.at[1, 2:4, 4:6, 0].add(1.0), c_noise, label)   # patch (row 1, column 2)
  moved = np.any(np.asarray(changed != base), axis=3)
  expected = np.zeros((3, 8, 8), bool)
  expected[1, 2:4, 4:6] = True
  np.testing.assert_array_equal(moved, expected)
  # tokens[b, i g + j, (u p + v) C + c] is pixel x[b, i p + u, j p + v, c] (g = 2 patches a side, p = 4, C = 2).
  image = np.arange(2 * 8 * 8 * 2, dtype=np.float32).reshape(2, 8, 8, 2)
  tokens = image.reshape(2, 2, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 32)
  module = DiT(image_size=8, in_channels=2, patch_size=4, hidden_size=32, depth=1, num_heads=2)
  np.testing.assert_array_equal(module.apply({}, jnp.asarray(tokens), method=DiT.unpatchify), image)
  assert tokens[0, 1 * 2 + 0, (2 * 4 + 3) * 2 + 1] == image[0, 1 * 4 + 2, 0 * 4 + 3, 1]


def test_sincos_position_embedding_layout():
  """MAE's/DiT's ``get_2d_sincos_pos_embed``: row-major patches; first half of the channels the column, then the
  row; each half [sin, cos] with frequencies 10000^(-k / (D/4))."""
  table = sincos_pos_embed_2d(16, 3)
  assert table.shape == (9, 16)
  row, col = 2, 1
  np.testing.assert_allclose(table[row * 3 + col], np.concatenate([sincos_1d(8, np.array([col])),
                                                                   sincos_1d(8, np.array([row]))], axis=1)[0])
  np.testing.assert_allclose(sincos_1d(4, np.array([1.0]))[0], [np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01)])
  assert len({tuple(np.round(r, 6)) for r in table}) == 9


def test_shapes():
  backbone = get_backbone("dit", (8, 8, 1), image_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2,
                          num_heads=2)
  params = _random_params(backbone)
  for batch in (1, 4):
    assert backbone.apply(params, jnp.ones((batch, 8, 8, 1)), jnp.zeros(batch)).shape == (batch, 8, 8, 1)
  wide = _dit(image_size=12, in_channels=3, patch_size=3, hidden_size=24, num_heads=3, data_shape=(12, 12, 3))
  out = jax.jit(wide.apply)(_random_params(wide), jnp.ones((2, 12, 12, 3)), jnp.zeros(2))
  assert out.shape == (2, 12, 12, 3)
  # A low-precision state gives a state of the same dtype through the denoiser.
  x = jnp.ones((2, 8, 8, 1), jnp.bfloat16)
  out = jax.jit(make_denoiser(backbone, params, PRECOND))(x, 1.0)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape


@pytest.mark.parametrize("options, data_shape, error, match", [
    (dict(patch_size=3), (8, 8, 1), ValueError, r"DiT image_size=8 is not divisible by patch_size=3"),
    (dict(num_heads=3), (8, 8, 1), ValueError, r"DiT hidden_size=32 is not divisible by num_heads=3"),
    (dict(hidden_size=18, num_heads=2), (8, 8, 1), ValueError, r"hidden_size=18 is not divisible by 4"),
    (dict(depth=0), (8, 8, 1), ValueError, r"DiT depth must be a positive integer, got 0"),
    (dict(), (8, 8, 3), ValueError, r"DiT\(image_size=8, in_channels=1\) takes samples of shape \(8, 8, 1\), but "
                                    r"the data shape is \(8, 8, 3\)"),
    (dict(), (16, 16, 1), ValueError, r"but the data shape is \(16, 16, 1\)"),
    (dict(learn_sigma=True), (8, 8, 1), TypeError, r"bad options for backbone 'dit'"),
])
def test_bad_options_are_clear_errors(options, data_shape, error, match):
  with pytest.raises(error, match=match):
    _dit(data_shape=data_shape, **options)


def test_label_errors():
  backbone = _dit()
  params = _random_params(backbone)
  with pytest.raises(ValueError, match="unconditional"):
    backbone.embed_time(params, jnp.zeros(2), jnp.zeros(2, jnp.int32))
  conditional = _dit(num_classes=10)
  with pytest.raises(ValueError, match=r"must lie in \[0, 9\]"):
    conditional.embed_time(_random_params(conditional), jnp.zeros(1), jnp.asarray([10]))


@pytest.mark.parametrize("solver_name, num_classes", [("dpmpp_2m", 0), ("heun", 10)])
def test_untrained_table_reproduces_the_base_solver(solver_name, num_classes):
  """MTEO on a DiT teacher: the table initialised from the DiT's own embeddings is the base solver; moving the final
  layer's row changes the sample (the table is live)."""
  backbone = _dit(num_classes=num_classes)
  params = _random_params(backbone, scale=0.2)
  solver = get_solver(solver_name)
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(5 if solver_name == "heun" else 4), PRECOND.sigma_min,
                        PRECOND.sigma_max, rho=7.0)
  label = jnp.arange(3) % num_classes if num_classes else None
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(sigmas))
  assert sorted(table) == sorted(backbone.layer_names)
  x_T = reference_noise(3, 3, backbone.data_shape, PRECOND.sigma_max)
  run = jax.jit(lambda table, x: mteo.student_sample(solver, backbone, params, PRECOND, table, x, sigmas, label))
  base = run(None, x_T)
  np.testing.assert_allclose(run(table, x_T), base, rtol=0, atol=1e-5)
  assert float(jnp.std(base)) > 1e-2
  moved = dict(table, final=table["final"] + 0.5)
  assert not np.allclose(run(moved, x_T), base, atol=1e-4)


# --- sizes against the paper's Table 1 ----------------------------------------------------------------------------

def _analytic_count(hidden, depth, in_channels, out_channels, num_classes, patch=2, noise=256):
  """Parameters of ``DiT`` by layer: blocks (adaLN, qkv, proj, fc1, fc2), time MLP, labels, patch embedding, final."""
  block = (hidden * 6 * hidden + 6 * hidden) + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) \
      + (hidden * 4 * hidden + 4 * hidden) + (4 * hidden * hidden + hidden)
  time_mlp = (noise * hidden + hidden) + (hidden * hidden + hidden)
  patch_embed = patch * patch * in_channels * hidden + hidden
  final = (hidden * 2 * hidden + 2 * hidden) + (hidden * patch * patch * out_channels + patch * patch * out_channels)
  return depth * block + time_mlp + num_classes * hidden + patch_embed + final


def _count(backbone):
  shapes = jax.eval_shape(backbone.init, jax.random.key(0))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def test_dit_s2_parameter_count():
  """DiT-S/2, unconditional, 32x32x3, output 3 channels: 32,471,436 parameters, 1.6 % under the paper's 33M (Table
  1), which counts 1001 label rows, 8 output channels (learned sigma) and 4 input channels (see below)."""
  backbone = get_backbone("dit", (32, 32, 3), image_size=32, in_channels=3, patch_size=2, **DIT_SIZES["S"])
  count = _count(backbone)
  assert count == _analytic_count(384, 12, in_channels=3, out_channels=3, num_classes=0) == 32_471_436
  assert abs(count / 33e6 - 1) < 0.03


@pytest.mark.parametrize("size, paper_millions", [("S", 33), ("B", 130), ("L", 458), ("XL", 675)])
def test_sizes_reproduce_table_1_in_the_papers_setting(size, paper_millions):
  """In the paper's setting (32x32x4 latents, 1000 classes, patch 2) this DiT plus what the reference code adds
  (a "null" label row for classifier-free guidance, 4 learned-sigma output channels, and the frozen 2-D position
  table, which its parameter count includes) rounds to Table 1's count; for DiT-XL/2 it is the reference code's
  675,129,632 exactly."""
  hidden, depth = DIT_SIZES[size]["hidden_size"], DIT_SIZES[size]["depth"]
  backbone = get_backbone("dit", (32, 32, 4), image_size=32, in_channels=4, patch_size=2, num_classes=1000,
                          **DIT_SIZES[size])
  count = _count(backbone)
  assert count == _analytic_count(hidden, depth, in_channels=4, out_channels=4, num_classes=1000)
  null_label, sigma_channels, positions = hidden, hidden * 2 * 2 * 4 + 2 * 2 * 4, 16 * 16 * hidden
  reference_code = count + null_label + sigma_channels + positions
  assert abs(reference_code / (paper_millions * 1e6) - 1) < 0.005   # Table 1 rounds B's 130.5M to 130M
  if size == "XL":
    assert reference_code == 675_129_632
  assert abs(count / (paper_millions * 1e6) - 1) < 0.01
