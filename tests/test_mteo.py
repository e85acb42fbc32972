"""MTEO: the untrained table is the base solver, training moves only the table and lowers the loss, the artefact
knows what it belongs to, and the options change behaviour."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import Preconditioning, get_backbone, loop, mteo
from mteo_jax.harness import noise_seeds
from mteo_jax.reference import reference_noise, reference_trajectories
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import SOLVERS, get_solver
from mteo_jax.teachers import Teacher

PRECOND = Preconditioning("edm", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


@pytest.fixture(scope="module")
def teacher():
  """A small random MLP teacher on 2-D data: any network defines a valid probability-flow ODE."""
  backbone = get_backbone("mlp", (2,), data_dim=2, width=32, depth=3, emb_dim=16, noise_channels=16)

  @jax.jit  # one program, not an eager dispatch (and compile) per operation
  def init(init_key, noise_key):
    params = backbone.init(init_key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(noise_key, len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

  return backbone, init(jax.random.key(0), jax.random.key(1))


def _sigmas(solver, nfe=3):
  return get_schedule("edm", solver.num_steps_for_nfe(nfe), PRECOND.sigma_min, PRECOND.sigma_max, rho=7.0)


@pytest.mark.parametrize("name", SOLVERS.names())
@pytest.mark.parametrize("granularity", mteo.GRANULARITIES)
def test_untrained_table_reproduces_the_base_solver(teacher, name, granularity):
  backbone, params = teacher
  solver = get_solver(name)
  sigmas = _sigmas(solver, nfe=5 if name == "heun" else 4)
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(sigmas), granularity)
  x_T = reference_noise(3, 16, (2,), PRECOND.sigma_max)
  run = jax.jit(lambda table, x: mteo.student_sample(solver, backbone, params, PRECOND, table, x, sigmas))
  # float32: equal up to rounding (XLA constant-folds log(sigma) in one path and not the other): |x0| ~ 1, 1e-5.
  np.testing.assert_allclose(run(table, x_T), run(None, x_T), rtol=0, atol=1e-5)
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
    sigmas64, x_T64 = jnp.asarray(sigmas, jnp.float64), jnp.asarray(x_T, jnp.float64)
    table64 = mteo.init_table(backbone, params64, PRECOND, solver.eval_sigmas(sigmas64), granularity)
    table64 = jax.tree.map(lambda t: jnp.asarray(t, jnp.float64), table64)
    base = mteo.student_sample(solver, backbone, params64, PRECOND, None, x_T64, sigmas64)
    with_table = mteo.student_sample(solver, backbone, params64, PRECOND, table64, x_T64, sigmas64)
    assert base.dtype == jnp.float64
    np.testing.assert_allclose(with_table, base, rtol=0, atol=1e-12)


def test_table_structure_and_granularity(teacher):
  backbone, params = teacher
  eval_sigmas = jnp.array([80.0, 5.0, 0.1])
  layer = mteo.init_table(backbone, params, PRECOND, eval_sigmas, "layer")
  shared = mteo.init_table(backbone, params, PRECOND, eval_sigmas, "shared")
  assert sorted(layer) == sorted(backbone.layer_names) and all(v.shape == (3, 16) for v in layer.values())
  assert list(shared) == ["shared"] and shared["shared"].shape == (3, 16)
  expanded = mteo.expand_table(shared, backbone.layer_names)
  assert sorted(expanded) == sorted(backbone.layer_names)
  assert mteo.table_nfe(layer) == 3
  with pytest.raises(ValueError, match="unknown granularity 'block'"):
    mteo.init_table(backbone, params, PRECOND, eval_sigmas, "block")
  with pytest.raises(ValueError, match="do not match the backbone's conditioned layers"):
    mteo.expand_table({"block00": layer["block00"]}, backbone.layer_names)


@pytest.fixture(scope="module")
def references(teacher):
  """The one diffrax solve of this module, shared by every test: the teacher's states at the NFE-3 EDM grid (the same
  for euler and dpmpp_2m) from the training noise (128 samples of the train seed) and from held-out noise (64 of the
  evaluation seed), in one call."""
  backbone, params = teacher
  sigmas = _sigmas(get_solver("euler"))
  np.testing.assert_array_equal(_sigmas(get_solver("dpmpp_2m")), sigmas)
  train_seed, eval_seed = noise_seeds(0)
  x_train = reference_noise(train_seed, 128, (2,), PRECOND.sigma_max)
  x_eval = reference_noise(eval_seed, 64, (2,), PRECOND.sigma_max)
  ref = reference_trajectories(Teacher.from_model(backbone, params, PRECOND).denoiser,
                               jnp.concatenate([x_train, x_eval]), sigmas, progress=False)
  return types.SimpleNamespace(sigmas=sigmas, train_seed=train_seed,
                               train_data={"x_T": np.asarray(x_train), "ref": np.swapaxes(ref.states[:, :128], 0, 1)},
                               x_eval=x_eval, eval_final=ref.final[128:])


def _train(teacher, references, run_dir, granularity="layer", distance="l2", intermediate_weight=0.1, steps=60,
           lr=3e-2, hooks=(), identity=None):
  """``loop.fit`` on ``mteo.table_task`` (euler, NFE 3): returns the initial table, the loop's result and the task."""
  backbone, params = teacher
  solver = get_solver("euler")
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(references.sigmas), granularity)
  task = mteo.table_task(solver, backbone, params, PRECOND, references.sigmas, table, references.train_data,
                         mteo.LossConfig(distance, intermediate_weight), batch_size=32, seed=references.train_seed)
  config = mteo.train_settings(steps=steps, lr=lr, warmup_steps=5, checkpoint_every=10, progress=False)
  result = loop.fit(task, config, run_dir, seed=references.train_seed, identity=identity or {"run": "test"},
                    hooks=hooks)
  return table, result, task


def test_training_lowers_the_loss_and_never_touches_the_backbone(teacher, references, tmp_path):
  _, params = teacher
  before = jax.tree.map(np.array, params)
  table, result, task = _train(teacher, references, tmp_path)
  trained = result.state.params
  # The backbone is an undifferentiated argument: the step neither donates it (its buffers stay alive) nor gives
  # the optimizer a state for it (Adam's moments and count cover exactly the table's leaves).
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, params))
  config = mteo.train_settings(steps=60, lr=3e-2, warmup_steps=5)
  state = loop.make_init(task, config)(jax.random.key(0))
  moments = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0]
  assert sorted(m.shape for m in moments) == sorted(2 * [leaf.shape for leaf in jax.tree.leaves(table)])
  assert state.ema_params is None   # MTEO keeps no EMA by default
  step_state, metrics = jax.jit(loop.make_step(task, config))(state, params, task.batch(0))
  assert jax.tree.structure(step_state.params) == jax.tree.structure(table) and bool(metrics["finite"])
  full = {k: jnp.asarray(v) for k, v in references.train_data.items()}
  loss = jax.jit(lambda t: task.loss(t, params, full, None))
  loss_before, loss_after = float(loss(table)), float(loss(trained))
  assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
  steps, losses = result.losses
  assert steps == [10, 20, 30, 40, 50, 60] and losses[-1] < losses[0]
  assert result.train_seconds > 0
  assert any(not np.allclose(trained[k], table[k]) for k in table)


def test_options_change_the_learned_table(teacher, references, tmp_path):
  def learned(name, **options):
    return _train(teacher, references, tmp_path / name, steps=20, **options)[1].state.params

  layer, shared = learned("layer", granularity="layer"), learned("shared", granularity="shared")
  assert list(shared) == ["shared"]
  # Layer tables learn different vectors per layer; the shared one by construction cannot.
  assert not np.allclose(layer["block00"], layer["block01"])
  assert not np.allclose(mteo.expand_table(shared, tuple(layer))["block00"], layer["block00"])
  for other in (learned("l1", distance="l1"), learned("final_only", intermediate_weight=0.0)):
    assert not np.allclose(other["block00"], layer["block00"])


def test_losses():
  x, y = jnp.zeros((2, 4)), jnp.ones((2, 4)) * 0.5
  np.testing.assert_allclose(mteo.l2_distance(x, y), [0.25, 0.25])
  np.testing.assert_allclose(mteo.l1_distance(x, y), [0.5, 0.5])
  np.testing.assert_allclose(mteo.pseudo_huber_distance(x, y, 0.03), np.sqrt(0.25 + 0.03 ** 2) - 0.03, rtol=1e-6)
  states = jnp.stack([jnp.zeros((2, 4)), y, 2 * y, 3 * y])  # [N+1, B, ...]
  ref = jnp.zeros_like(states)
  config = mteo.LossConfig("l2", intermediate_weight=0.5)
  expected = 2.25 + 0.5 * np.mean([0.25, 1.0])
  np.testing.assert_allclose(mteo.trajectory_loss(states, ref, config), expected, rtol=1e-6)
  with pytest.raises(KeyError, match="unknown MTEO loss 'l3'"):
    mteo.LossConfig("l3")
  with pytest.raises(ValueError, match="same shape"):
    mteo.trajectory_loss(states, ref[:-1], config)


def test_train_and_evaluation_noise_are_disjoint():
  for seed in range(5):
    train_seed, eval_seed = noise_seeds(seed)
    assert train_seed != eval_seed
    assert {train_seed, eval_seed}.isdisjoint(set(noise_seeds(seed + 1)))
  a, b = (reference_noise(s, 64, (2,), 80.0) for s in noise_seeds(0))
  assert not np.any(np.all(np.isclose(a[:, None], b[None]), axis=-1))


def test_resume_continues_from_the_checkpoint(teacher, references, tmp_path):
  _, uninterrupted, _ = _train(teacher, references, tmp_path / "uninterrupted", steps=40)

  def crash(step, state, metrics):  # a run killed after its checkpoint at step 20
    if step == 21:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _train(teacher, references, tmp_path / "run", steps=40, hooks=[crash])
  ran = []
  _, resumed, _ = _train(teacher, references, tmp_path / "run", steps=40, hooks=[lambda s, *_: ran.append(s)])
  assert ran == list(range(21, 41))  # the first 20 steps were not redone
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed.state.params,
               uninterrupted.state.params)
  # The history of the whole run, the part before the crash included, each step once.
  assert resumed.losses[0] == uninterrupted.losses[0] == [10, 20, 30, 40]
  np.testing.assert_allclose(resumed.losses[1], uninterrupted.losses[1], rtol=1e-5)
  with pytest.raises(loop.ResumeMismatchError, match=r"task.run: 'test' -> 'other'"):
    _train(teacher, references, tmp_path / "run", steps=40, identity={"run": "other"})
  with pytest.raises(loop.ResumeMismatchError, match=r"loop.lr: 0.03 -> 0.05"):
    _train(teacher, references, tmp_path / "run", steps=40, lr=5e-2)


def test_artefact_round_trip_and_mismatch_errors(teacher, tmp_path):
  backbone, params = teacher
  owner = Teacher.from_model(backbone, params, PRECOND)
  other = Teacher.from_model(backbone, jax.tree.map(lambda p: p * 1.01, params), PRECOND)   # another network
  solver = get_solver("dpmpp_2m")
  sigmas = _sigmas(solver)
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(sigmas))
  meta = mteo.table_metadata(owner.identity, "dpmpp_2m", {}, "edm", sigmas, table, backbone.layer_names)
  path = str(tmp_path / "table")
  mteo.save_table(path, table, meta)
  loaded, stored = mteo.load_table(path, owner, solver_name="dpmpp_2m", nfe=3, sigmas=sigmas)
  jax.tree.map(np.testing.assert_array_equal, loaded, table)
  assert stored["granularity"] == "layer" and stored["teacher"] == owner.identity
  with pytest.raises(ValueError, match=f"teacher: '{owner.identity}' -> '{other.identity}'"):
    mteo.load_table(path, other, solver_name="dpmpp_2m", nfe=3)
  with pytest.raises(TypeError, match="teacher must be a teachers.Teacher"):
    mteo.load_table(path, owner.identity, solver_name="dpmpp_2m", nfe=3)   # a hash is not a teacher
  with pytest.raises(ValueError, match="solver: 'dpmpp_2m' -> 'euler'"):
    mteo.load_table(path, owner, solver_name="euler", nfe=3)
  with pytest.raises(ValueError, match="nfe: 3 -> 4$"):
    mteo.load_table(path, owner, solver_name="dpmpp_2m", nfe=4)
  with pytest.raises(ValueError, match=r"\(table -> expected\): sigmas: \[80.0, "):
    mteo.load_table(path, owner, solver_name="dpmpp_2m", nfe=3, sigmas=np.asarray(sigmas) * 1.01)
  assert sorted(os.listdir(path)) == ["metadata.json", "table"]  # an orbax checkpoint and its JSON
  with pytest.raises(FileExistsError, match="already exists"):
    mteo.save_table(path, table, meta)  # never silently overwritten
  mteo.save_table(path, jax.tree.map(lambda t: t + 1, table), meta, overwrite=True)
  reloaded, _ = mteo.load_table(path, owner, solver_name="dpmpp_2m", nfe=3)
  np.testing.assert_allclose(reloaded["block00"], table["block00"] + 1)
  (tmp_path / "other").mkdir()
  with pytest.raises(ValueError, match="not an MTEO table"):
    mteo.save_table(str(tmp_path / "other"), table, meta, overwrite=True)  # refuses to delete a foreign directory
  assert (tmp_path / "other").exists()
  with pytest.raises(FileNotFoundError, match="no MTEO table"):
    mteo.load_table(str(tmp_path / "missing"), owner, solver_name="dpmpp_2m", nfe=3)


def test_fit_table_on_a_model_in_memory(teacher, references, tmp_path):
  """The one-call entry point: references, table and training from (backbone, params, preconditioning) with the
  library's loop in ``run_dir``; scored on held-out noise from another seed."""
  backbone, params = teacher
  solver = get_solver("dpmpp_2m")
  sigmas = references.sigmas
  sample = jax.jit(lambda table, x: mteo.student_sample(solver, backbone, params, PRECOND, table, x, sigmas))
  rmse = lambda t: float(jnp.sqrt(jnp.mean((sample(t, references.x_eval) - references.eval_final) ** 2)))  # noqa: E731
  train = mteo.train_settings(steps=60, lr=3e-2, warmup_steps=5, progress=False)
  table, result = mteo.fit_table(backbone, params, PRECOND, solver, sigmas, run_dir=tmp_path / "run", num_train=128,
                                 noise_seed=0, train=train, rtol=1e-4, atol=1e-4, eval_fn=rmse, eval_every=30)
  assert mteo.table_nfe(table) == 3 and result.losses[1][-1] < result.losses[1][0]
  assert rmse(table) < 0.8 * rmse(None), (rmse(table), rmse(None))
  eval_steps, curve = result.evals("eval")
  assert eval_steps == [30, 60] and curve[-1] == pytest.approx(rmse(table), rel=1e-5)
  assert (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / "checkpoints").is_dir()
  # Bad settings fail before the reference solve.
  with pytest.raises(ValueError, match="train.batch_size=32 exceeds num_train=16"):
    mteo.fit_table(backbone, params, PRECOND, solver, sigmas, run_dir=tmp_path / "small", num_train=16, train=train)
  with pytest.raises(ValueError, match="unknown granularity 'block'"):
    mteo.fit_table(backbone, params, PRECOND, solver, sigmas, run_dir=tmp_path / "block", granularity="block")
  with pytest.raises(ValueError, match="unknown train.lr_decay 'cosin'"):
    mteo.train_settings(lr_decay="cosin")
  assert not (tmp_path / "small").exists() and not (tmp_path / "block").exists()
