"""MTEO: the untrained table is the base solver, training moves only the table and lowers the loss, the artefact
knows what it belongs to, and the options change behaviour."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import Preconditioning, fitting, get_backbone, mteo
from mteo_jax.experiment import noise_seeds
from mteo_jax.nets import make_denoiser
from mteo_jax.reference import reference_noise, reference_trajectories
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import SOLVERS, get_solver

PRECOND = Preconditioning("edm", sigma_data=0.5, sigma_min=0.002, sigma_max=80.0)


@pytest.fixture(scope="module")
def teacher():
  """A small random MLP teacher on 2-D data: any network defines a valid probability-flow ODE."""
  backbone = get_backbone("mlp", (2,), data_dim=2, width=32, depth=3, emb_dim=16, noise_channels=16)
  params = backbone.init(jax.random.key(0))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return backbone, params


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


_REFERENCES = {}   # (id of the teacher's params, solver name) -> (x_T, reference): one diffrax solve per solver


def _training_reference(teacher, solver, sigmas):
  backbone, params = teacher
  key = (id(params), solver.name)
  if key not in _REFERENCES:
    train_seed, _ = noise_seeds(0)
    x_T = reference_noise(train_seed, 128, (2,), PRECOND.sigma_max)
    _REFERENCES[key] = x_T, reference_trajectories(make_denoiser(backbone, params, PRECOND), x_T, sigmas,
                                                    progress=False)
  return _REFERENCES[key]


def _train(teacher, granularity="layer", distance="l2", intermediate_weight=0.1, steps=60, solver_name="euler",
           checkpoint_dir=None, metadata=None, crash_at=None):
  backbone, params = teacher
  solver = get_solver(solver_name)
  sigmas = _sigmas(solver)
  train_seed, _ = noise_seeds(0)
  x_T, ref = _training_reference(teacher, solver, sigmas)
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(sigmas), granularity)
  loss_fn = mteo.make_loss_fn(solver, backbone, PRECOND, sigmas, mteo.LossConfig(distance, intermediate_weight))
  data = {"x_T": np.asarray(x_T), "ref": np.swapaxes(ref.states, 0, 1)}

  def crash(table):  # a run killed right after its checkpoint at step `crash_at`
    raise KeyboardInterrupt

  trained, history = fitting.fit(loss_fn, table, params, data, fitting.make_optimizer(3e-2, steps, 5), steps=steps,
                                 batch_size=32, seed=train_seed, progress=False, checkpoint_dir=checkpoint_dir,
                                 checkpoint_every=10 if checkpoint_dir else 0, metadata=metadata,
                                 eval_fn=crash if crash_at else None, eval_every=crash_at or 0)
  return table, trained, history, (loss_fn, data)


def test_training_lowers_the_loss_and_never_touches_the_backbone(teacher):
  backbone, params = teacher
  table, trained, history, (loss_fn, data) = _train(teacher)
  # The backbone is an undifferentiated argument: the step neither donates it (its buffers stay alive) nor gives
  # the optimizer a state for it (Adam's moments and count cover exactly the table's leaves).
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
  optimizer = fitting.make_optimizer(3e-2, 60, 5)
  moments = [leaf for leaf in jax.tree.leaves(fitting.init_state(table, optimizer).opt_state) if leaf.ndim > 0]
  assert sorted(m.shape for m in moments) == sorted(2 * [leaf.shape for leaf in jax.tree.leaves(table)])
  step_state, _ = jax.jit(fitting.make_train_step(loss_fn, optimizer))(
      fitting.init_state(table, optimizer), params, {k: jnp.asarray(v[:8]) for k, v in data.items()})
  assert jax.tree.structure(step_state.trainable) == jax.tree.structure(table)
  full = {k: jnp.asarray(v) for k, v in data.items()}
  loss_before, loss_after = float(loss_fn(table, params, full)), float(loss_fn(trained, params, full))
  assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
  assert history["loss"][-1] < history["loss"][0]
  assert any(not np.allclose(trained[k], table[k]) for k in table)


def test_options_change_the_learned_table(teacher):
  _, layer, _, _ = _train(teacher, granularity="layer", steps=20)
  _, shared, _, _ = _train(teacher, granularity="shared", steps=20)
  assert list(shared) == ["shared"]
  # Layer tables learn different vectors per layer; the shared one by construction cannot.
  assert not np.allclose(layer["block00"], layer["block01"])
  assert not np.allclose(mteo.expand_table(shared, tuple(layer))["block00"], layer["block00"])
  _, l1, _, _ = _train(teacher, distance="l1", steps=20)
  _, final_only, _, _ = _train(teacher, intermediate_weight=0.0, steps=20)
  for other in (l1, final_only):
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


def test_resume_continues_from_the_checkpoint(teacher, tmp_path):
  meta = {"run": "test"}
  _, uninterrupted, _, _ = _train(teacher, steps=40)
  with pytest.raises(KeyboardInterrupt):
    _train(teacher, steps=40, checkpoint_dir=str(tmp_path / "ck"), metadata=meta, crash_at=20)
  _, resumed, history, _ = _train(teacher, steps=40, checkpoint_dir=str(tmp_path / "ck"), metadata=meta)
  assert history["step"][0] > 20  # the first 20 steps were not redone
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), resumed, uninterrupted)
  with pytest.raises(ValueError, match="checkpoint of another run"):
    _train(teacher, steps=40, checkpoint_dir=str(tmp_path / "ck"), metadata={"run": "other"})


def test_artefact_round_trip_and_mismatch_errors(teacher, tmp_path):
  backbone, params = teacher
  solver = get_solver("dpmpp_2m")
  sigmas = _sigmas(solver)
  table = mteo.init_table(backbone, params, PRECOND, solver.eval_sigmas(sigmas))
  meta = mteo.table_metadata("teacher-hash", "dpmpp_2m", {}, "edm", sigmas, table, backbone.layer_names)
  path = str(tmp_path / "table")
  mteo.save_table(path, table, meta)
  loaded, stored = mteo.load_table(path, teacher_hash="teacher-hash", solver_name="dpmpp_2m", nfe=3, sigmas=sigmas)
  jax.tree.map(np.testing.assert_array_equal, loaded, table)
  assert stored["granularity"] == "layer"
  with pytest.raises(ValueError, match="teacher: table has 'teacher-hash', expected 'other'"):
    mteo.load_table(path, teacher_hash="other", solver_name="dpmpp_2m", nfe=3)
  with pytest.raises(ValueError, match="solver: table has 'dpmpp_2m', expected 'euler'"):
    mteo.load_table(path, teacher_hash="teacher-hash", solver_name="euler", nfe=3)
  with pytest.raises(ValueError, match="nfe: table has 3, expected 4"):
    mteo.load_table(path, teacher_hash="teacher-hash", solver_name="dpmpp_2m", nfe=4)
  assert sorted(os.listdir(path)) == ["metadata.json", "table"]  # an orbax checkpoint and its JSON
  with pytest.raises(FileExistsError, match="already exists"):
    mteo.save_table(path, table, meta)  # never silently overwritten
  mteo.save_table(path, jax.tree.map(lambda t: t + 1, table), meta, overwrite=True)
  reloaded, _ = mteo.load_table(path, teacher_hash="teacher-hash", solver_name="dpmpp_2m", nfe=3)
  np.testing.assert_allclose(reloaded["block00"], table["block00"] + 1)
  (tmp_path / "other").mkdir()
  with pytest.raises(ValueError, match="not an MTEO table"):
    mteo.save_table(str(tmp_path / "other"), table, meta, overwrite=True)  # refuses to delete a foreign directory
  assert (tmp_path / "other").exists()
  with pytest.raises(FileNotFoundError, match="no MTEO table"):
    mteo.load_table(str(tmp_path / "missing"), teacher_hash="teacher-hash", solver_name="dpmpp_2m", nfe=3)


def test_fit_table_on_a_model_in_memory(teacher):
  """The one-call entry point: references, table and training from (backbone, params, preconditioning); scored on
  held-out noise from another seed."""
  backbone, params = teacher
  solver = get_solver("dpmpp_2m")
  sigmas = _sigmas(solver)
  table, history = mteo.fit_table(backbone, params, PRECOND, solver, sigmas, num_train=128, noise_seed=0, steps=60,
                                  learning_rate=3e-2, warmup_steps=5, rtol=1e-4, atol=1e-4, progress=False)
  x_T = reference_noise(1, 64, (2,), PRECOND.sigma_max)
  ref = reference_trajectories(make_denoiser(backbone, params, PRECOND), x_T, sigmas, rtol=1e-4, atol=1e-4,
                               progress=False)
  rmse = lambda t: float(jnp.sqrt(jnp.mean((mteo.student_sample(solver, backbone, params, PRECOND, t, x_T, sigmas)  # noqa: E731
                                            - ref.final) ** 2)))
  assert mteo.table_nfe(table) == 3 and history["loss"][-1] < history["loss"][0]
  assert rmse(table) < 0.8 * rmse(None), (rmse(table), rmse(None))
  with pytest.raises(ValueError, match="unknown lr_schedule 'cosin'"):
    mteo.fit_table(backbone, params, PRECOND, solver, sigmas, lr_schedule="cosin")
