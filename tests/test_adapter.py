"""Any Flax model (DESIGN §3): a Linen model written elsewhere becomes a Backbone without being rewritten. The lifted
identity holds bit for bit, every conditioned layer gets its own leaf, the noise level reaches the output only through
temb, an untrained MTEO table is the base solver, MTEO lowers the NFE-3 error, and misuse fails with a clear message."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mteo_jax import Preconditioning, data, loop, make_denoiser, metrics, mteo
from mteo_jax.diffusion import edm_training_loss
from mteo_jax.nets import Backbone
from mteo_jax.nets.adapter import LinenBackbone
from mteo_jax.reference import reference_noise, reference_trajectories
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher, teacher_identity

PRECOND = Preconditioning("edm", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


# --- third-party models: their own names and conventions, nothing from mteo_jax -----------------------------------

def timestep_features(t, dim):
  half = dim // 2
  freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half) / half)
  angles = t[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class TimestepEmbedder(nn.Module):
  dim: int

  @nn.compact
  def __call__(self, t):
    h = nn.Dense(2 * self.dim)(timestep_features(t, self.dim))
    return nn.Dense(self.dim)(nn.gelu(h))


class ResnetBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x, temb):
    h = nn.Conv(self.channels, (3, 3))(nn.swish(nn.GroupNorm(num_groups=2)(x)))
    h = h + nn.Dense(self.channels, name="time_proj")(nn.swish(temb))[:, None, None, :]
    h = nn.Conv(self.channels, (3, 3))(nn.swish(nn.GroupNorm(num_groups=2)(h)))
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), name="shortcut")(x)
    return x + h


class TinyUNet(nn.Module):
  """8x8 images; the time MLP is built inside ``__call__``; every block projects the time embedding itself."""
  channels: int = 8
  temb_dim: int = 16
  leak: bool = False  # also feed t as an extra input channel (a path the adapter must refuse)

  @nn.compact
  def __call__(self, x, t):
    temb = TimestepEmbedder(self.temb_dim, name="time_net")(t)
    if self.leak:
      x = jnp.concatenate([x, jnp.broadcast_to(t[:, None, None, None], x.shape)], axis=-1)
    h = nn.Conv(self.channels, (3, 3), name="stem")(x)
    skip = ResnetBlock(self.channels, name="down1")(h, temb)
    h = nn.avg_pool(skip, (2, 2), strides=(2, 2))
    h = ResnetBlock(2 * self.channels, name="down2")(h, temb)
    h = ResnetBlock(2 * self.channels, name="mid")(h, temb)
    h = jax.image.resize(h, (h.shape[0], 8, 8, h.shape[-1]), "nearest")
    h = ResnetBlock(self.channels, name="up1")(jnp.concatenate([h, skip], axis=-1), temb)
    return nn.Conv(x.shape[-1] - self.leak, (3, 3), name="head")(nn.swish(nn.GroupNorm(num_groups=2)(h)))


class FourierDenoiserMLP(nn.Module):
  """2-D data; trained on sigma itself with a ``train`` flag; Fourier features of log(sigma), then an MLP named
  ``noise_cond`` (an ``nn.Sequential``), FiLM in every layer."""
  width: int = 32
  depth: int = 3

  @nn.compact
  def __call__(self, x, sigma, train: bool = False):
    freqs = self.param("freqs", nn.initializers.normal(2.0), (8,))
    angles = jnp.log(sigma)[:, None] * freqs[None, :]
    cond = nn.Sequential([nn.Dense(24), nn.silu, nn.Dense(24)], name="noise_cond")(
        jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1))
    h = nn.Dense(self.width, name="inp")(x)
    for i in range(self.depth):
      scale, shift = jnp.split(nn.Dense(2 * self.width, name=f"film{i}")(cond), 2, axis=-1)
      y = nn.Dense(self.width, name=f"layer{i}")(nn.LayerNorm()(h))
      h = h + nn.Dropout(0.1, deterministic=not train)(nn.silu(y * (1 + scale) + shift))
    return nn.Dense(2, name="out")(h)


UNET_LAYERS = ("down1/time_proj", "down2/time_proj", "mid/time_proj", "up1/time_proj")


def _random_params(backbone, seed):
  """Random parameters drawn on the host (no compilation): kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2),
  biases N(0, 0.2^2), so that the teacher's field and every leaf's effect are nontrivial."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if "scale" in name:
      return jnp.asarray(1.0 + 0.2 * noise)
    if "bias" in name:
      return jnp.asarray(0.2 * noise)
    return jnp.asarray(noise / np.sqrt(max(1, math.prod(leaf.shape[:-1]))))

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(backbone.init, jax.random.key(seed)))


@pytest.fixture(scope="module")
def unet():
  backbone = LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net")
  return backbone, _random_params(backbone, 0)


@pytest.fixture(scope="module")
def mlp():
  backbone = LinenBackbone(FourierDenoiserMLP(), (2,), time_embedding="noise_cond",
                           call=lambda module, x, c_noise: module(x, jnp.exp(4.0 * c_noise), train=False))
  return backbone, _random_params(backbone, 2)


def _inputs(backbone, batch=3):
  x = jax.random.normal(jax.random.key(7), (batch,) + backbone.data_shape)
  return x, jnp.linspace(-1.2, 1.0, batch)


def _assert_lifted_identity(backbone, params):
  x, c_noise = _inputs(backbone)
  np.testing.assert_array_equal(backbone.apply(params, x, c_noise),
                                backbone.body(params, x, backbone.embed_time(params, c_noise)))
  plain = jax.jit(backbone.apply)(params, x, c_noise)
  lifted = jax.jit(lambda p, x, c: backbone.body(p, x, backbone.embed_time(p, c)))(params, x, c_noise)
  np.testing.assert_array_equal(plain, lifted)


# --- the lifted embedding --------------------------------------------------------------------------------------------

def test_unet_lifted_identity_bit_for_bit_with_one_leaf_per_time_projection(unet):
  backbone, params = unet
  assert isinstance(backbone, Backbone)
  assert backbone.layer_names == UNET_LAYERS  # every block's time projection, in call order
  assert backbone.emb_dim == 16 and backbone.num_classes == 0
  _assert_lifted_identity(backbone, params)
  x, c_noise = _inputs(backbone)  # apply is the module's own forward pass
  np.testing.assert_array_equal(backbone.apply(params, x, c_noise), TinyUNet().apply({"params": params}, x, c_noise))
  temb = backbone.embed_time(params, c_noise)
  assert sorted(temb) == sorted(UNET_LAYERS) and all(leaf.shape == (3, 16) for leaf in temb.values())
  # Each leaf is what that projection receives: swish of the time MLP's output.
  time_net = TimestepEmbedder(16).apply({"params": params["time_net"]}, c_noise)
  np.testing.assert_allclose(temb["mid/time_proj"], nn.swish(time_net), rtol=1e-6, atol=1e-6)


def test_body_sees_the_noise_level_only_through_temb(unet):
  backbone, params = unet
  x, c_noise = _inputs(backbone)
  temb = backbone.embed_time(params, c_noise)
  out = backbone.body(params, x, temb)
  other = LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net")
  other.placeholder_c_noise = 123.0  # the model's own noise input is a placeholder that reaches nothing
  np.testing.assert_array_equal(other.body(params, x, temb), out)
  # ... while every leaf conditions its layer.
  for name in backbone.layer_names:
    moved = dict(temb, **{name: temb[name] + 0.5})
    assert not np.allclose(backbone.body(params, x, moved), out), name
  with pytest.raises(ValueError, match="one leaf per conditioned layer"):
    backbone.body(params, x, {name: temb[name] for name in UNET_LAYERS[:2]})
  with pytest.raises(ValueError, match=r"expected \[batch, D\] = \(3, 16\)"):
    backbone.body(params, x, dict(temb, **{"mid/time_proj": temb["mid/time_proj"][:, :8]}))


def test_conditioned_layers_can_be_named(unet):
  backbone, params = unet
  named = LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers="time_proj")
  assert named.layer_names == UNET_LAYERS
  # The blocks instead of their projections: the leaves are the time MLP's output, before the blocks' swish.
  blocks = LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers=r"down\d|mid|up\d")
  assert blocks.layer_names == ("down1", "down2", "mid", "up1")
  x, c_noise = _inputs(blocks)
  np.testing.assert_array_equal(blocks.apply(params, x, c_noise),
                                blocks.body(params, x, blocks.embed_time(params, c_noise)))
  np.testing.assert_allclose(backbone.embed_time(params, c_noise)["up1/time_proj"],
                             nn.swish(blocks.embed_time(params, c_noise)["up1"]), rtol=1e-6, atol=1e-6)


def test_mlp_style_model_with_its_own_calling_convention(mlp):
  backbone, params = mlp
  assert backbone.layer_names == ("film0", "film1", "film2")
  _assert_lifted_identity(backbone, params)
  # `call` fed the model sigma = exp(4 c_noise): the same as calling it on sigma directly.
  x, c_noise = _inputs(backbone)
  np.testing.assert_array_equal(backbone.apply(params, x, c_noise),
                                backbone.module.apply({"params": params}, x, jnp.exp(4.0 * c_noise)))
  # The denoiser and a solver with an (untrained) table run on it as on a built-in backbone.
  solver = get_solver("dpmpp_2m")
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(4), PRECOND.sigma_min, PRECOND.sigma_max, rho=7.0)
  init_table = jax.jit(lambda p, granularity: mteo.init_table(backbone, p, PRECOND, solver.eval_sigmas(sigmas),
                                                                granularity), static_argnums=1)
  table = init_table(params, "layer")
  assert sorted(table) == ["film0", "film1", "film2"] and table["film0"].shape == (4, 24)
  # Reference caches and tables can key this teacher: one identity, in memory or through Teacher.
  identity = teacher_identity(backbone, params, PRECOND)
  assert isinstance(identity, str) and Teacher.from_model(backbone, params, PRECOND).identity == identity
  assert teacher_identity(backbone, jax.tree.map(lambda p: p + 1.0, params), PRECOND) != identity
  x_T = reference_noise(3, 16, (2,), PRECOND.sigma_max)
  run = jax.jit(lambda table, x: mteo.student_sample(solver, backbone, params, PRECOND, table, x, sigmas))
  base = run(None, x_T)
  np.testing.assert_allclose(run(table, x_T), base, rtol=0, atol=1e-5)
  # Every FiLM layer receives the same embedding, so the shared granularity applies too.
  np.testing.assert_allclose(run(init_table(params, "shared"), x_T), base, rtol=0, atol=1e-5)


# --- MTEO on the third-party UNet --------------------------------------------------------------------------------

def _train_teacher(backbone, params, steps=150, batch_size=48, learning_rate=5e-3):
  """A few hundred EDM steps on sklearn digits (8x8): a real teacher, whose smooth field MTEO can correct; trained
  through the adapter (``make_denoiser`` on the LinenBackbone), all steps in one compiled scan."""
  digits = jnp.asarray(data.get_dataset("digits", "train").get_batch(np.arange(1024))["x"])
  optimizer = optax.adam(optax.warmup_cosine_decay_schedule(0.0, learning_rate, 20, steps, 0.1 * learning_rate))

  def step(carry, key):
    params, opt_state = carry
    batch_key, loss_key = jax.random.split(key)
    x0 = digits[jax.random.randint(batch_key, (batch_size,), 0, digits.shape[0])]
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(edm_training_loss(make_denoiser(backbone, p, PRECOND), x0, loss_key, PRECOND)))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  train = jax.jit(lambda p, key: jax.lax.scan(step, (p, optimizer.init(p)), jax.random.split(key, steps)))
  (params, _), losses = train(params, jax.random.key(0))
  assert float(jnp.mean(losses[-20:])) < 0.8 * float(jnp.mean(losses[:20])), losses  # it learned
  return params


def test_mteo_lowers_the_nfe3_error_of_a_third_party_unet(unet, tmp_path):
  backbone, params = unet
  params = _train_teacher(backbone, params)  # ~15 s of the ~30 s this test takes on 2 busy CPU cores
  frozen = jax.tree.map(np.array, params)
  solver = get_solver("dpmpp_2m")
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(3), PRECOND.sigma_min, PRECOND.sigma_max, rho=7.0)
  num_train = 256
  x_train = reference_noise(10, num_train, (8, 8, 1), PRECOND.sigma_max)
  x_eval = reference_noise(11, 128, (8, 8, 1), PRECOND.sigma_max)  # held out: another seed
  ref = reference_trajectories(make_denoiser(backbone, params, PRECOND), jnp.concatenate([x_train, x_eval]), sigmas,
                               rtol=1e-4, atol=1e-4, progress=False)
  train_ref, eval_final = ref.states[:, :num_train], ref.final[num_train:]
  table = jax.jit(lambda p: mteo.init_table(backbone, p, PRECOND, solver.eval_sigmas(sigmas)))(params)
  assert sorted(table) == sorted(UNET_LAYERS) and all(leaf.shape == (3, 16) for leaf in table.values())
  sample = jax.jit(lambda table, x: mteo.student_sample(solver, backbone, params, PRECOND, table, x, sigmas))
  base = np.asarray(sample(None, x_eval))
  np.testing.assert_allclose(sample(table, x_eval), base, rtol=0, atol=1e-5)  # the untrained table is the base solver
  train_data = {"x_T": np.asarray(x_train), "ref": np.swapaxes(train_ref, 0, 1)}
  task = mteo.table_task(solver, backbone, params, PRECOND, sigmas, table, train_data, mteo.LossConfig(),
                         batch_size=32, seed=10)
  result = loop.fit(task, mteo.train_settings(steps=80, lr=1e-1, warmup_steps=10, progress=False), tmp_path, seed=10,
                    identity={"teacher": Teacher.from_model(backbone, params, PRECOND).identity, "solver": "dpmpp_2m"})
  trained = result.state.params
  rmse_before = metrics.rmse(base, eval_final)
  rmse_after = metrics.rmse(np.asarray(sample(trained, x_eval)), eval_final)
  assert rmse_after < 0.8 * rmse_before, (rmse_before, rmse_after)  # measured: 0.211 -> 0.146
  losses = result.losses[1]
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, frozen, jax.tree.map(np.array, params))  # the teacher stays frozen


# --- clear errors ------------------------------------------------------------------------------------------------

def test_unknown_time_embedding_lists_the_called_submodules():
  with pytest.raises(ValueError, match=r"time_embedding \['temb_mlp'\] matches no submodule.*called: .*time_net.*"
                                       r"down1/time_proj"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="temb_mlp")
  with pytest.raises(ValueError, match=r"conditioned_layers 'temb_proj' matches no submodule.*called: .*"
                                       r"down1/time_proj"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers="temb_proj")


def test_conditioned_layers_must_carry_the_whole_time_embedding():
  with pytest.raises(ValueError, match="conditioned layer head must receive the time embedding .* mixes it with the "
                                       "data x"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers="head")
  with pytest.raises(ValueError, match="conditioned layer stem .* does not receive it"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers="stem")
  with pytest.raises(ValueError, match=r"reaches the output .* other than through the conditioned layers "
                                       r"\['down1/time_proj'\]; calls that receive it and are not conditioned layers: "
                                       r"down2, down2/time_proj"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers="down1/time_proj")
  with pytest.raises(ValueError, match="are nested"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", conditioned_layers=["down1", "time_proj"])
  with pytest.raises(ValueError, match="depends on its noise input other than through the time embedding"):
    LinenBackbone(TinyUNet(leak=True), (8, 8, 1), time_embedding="time_net")


def test_unsupported_models_and_options():
  from flax import nnx

  class NNXModel(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(2, 2, rngs=rngs)

  with pytest.raises(TypeError, match="Flax NNX module NNXModel.*intercept_methods.*nnx.bridge.to_linen"):
    LinenBackbone(NNXModel(nnx.Rngs(0)), (2,), time_embedding="time_net")
  with pytest.raises(TypeError, match="takes a flax.linen Module, got function"):
    LinenBackbone(lambda x, t: x, (2,), time_embedding="time_net")
  with pytest.raises(NotImplementedError, match="unconditional models only.*LiftedTimeEmbedding"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net", num_classes=10)
  with pytest.raises(ValueError, match=r"returns .*\(2, 8, 8, 2\).*select or reshape it with `call`"):
    LinenBackbone(TinyUNet(), (8, 8, 2), time_embedding="time_net",
                  call=lambda m, x, c: jnp.concatenate([m(x[..., :1], c)] * 4, axis=-1))
  with pytest.raises(ValueError, match="not a valid regular expression"):
    LinenBackbone(TinyUNet(), (8, 8, 1), time_embedding="time_net(")


def test_inference_only_and_unconditional(unet):
  backbone, params = unet
  x, c_noise = _inputs(backbone)
  with pytest.raises(ValueError, match="inference mode"):
    backbone.apply(params, x, c_noise, train=True)
  with pytest.raises(ValueError, match="unconditional"):
    backbone.embed_time(params, c_noise, jnp.zeros(3, jnp.int32))
