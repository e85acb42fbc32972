"""The diffrax reference solver against exact and independent solutions, its NFE accounting, and its disk cache."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

from mteo_jax.closed_form import Gaussian, random_mixture
from mteo_jax.diffusion import Preconditioning
from mteo_jax.hashing import hash_json, hash_pytree
from mteo_jax.nets import get_backbone, make_denoiser
from mteo_jax.reference import (REFERENCE_FORMAT_VERSION, REFERENCE_SOLVERS, CacheError, NonFiniteDenoiserError,
                                Reference, ReferenceCache, ReferenceSolveError, evals_per_step, reference_key,
                                reference_noise, reference_trajectories, seeded_reference, union_sigmas)
from mteo_jax.schedules import get_schedule
from mteo_jax.teachers import teacher_identity

SIGMAS = np.array([80.0, 20.0, 3.0, 0.5, 0.05, 0.002])


def _gaussian():
  # several dims, stds over two orders of magnitude, nonzero mean
  return Gaussian(jnp.array([0.3, -1.0, 2.0, 0.0]), jnp.array([0.02, 0.1, 0.5, 1.5]))


@pytest.mark.parametrize("solver, sigma_start", [("tsit5", None), ("dopri8", 120.0)])
def test_gaussian_matches_exact_ode_solution(solver, sigma_start):
  with jax.enable_x64(True):
    teacher = _gaussian()
    start = SIGMAS[0] if sigma_start is None else sigma_start
    x_T = reference_noise(0, 6, (4,), start, jnp.float64)
    ref = reference_trajectories(teacher.denoise, x_T, SIGMAS, sigma_start=sigma_start, solver=solver, rtol=1e-10,
                                 atol=1e-10, progress=False)
    assert ref.states.shape == (len(SIGMAS), 6, 4) and ref.states.dtype == np.float64
    assert ref.nfe.shape == (6,) and np.all(ref.nfe > 10)
    np.testing.assert_array_equal(ref.sigmas, SIGMAS)
    np.testing.assert_array_equal(ref.final, ref.states[-1])
    exact = np.stack([teacher.ode_solution(x_T, start, sigma) for sigma in SIGMAS])
    relative_error = np.linalg.norm(ref.states - exact, axis=-1) / np.linalg.norm(exact, axis=-1)   # [S, B]
    assert relative_error.max() < 1e-6, relative_error.max(axis=1)
    if sigma_start is None:
      np.testing.assert_array_equal(ref.states[0], np.asarray(x_T))
      # the tolerance is what buys the accuracy: a loose solve is cheaper and visibly worse
      loose = reference_trajectories(teacher.denoise, x_T, SIGMAS, rtol=1e-3, atol=1e-3, progress=False)
      loose_error = np.linalg.norm(loose.states - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
      assert loose_error.max() > 100 * relative_error.max() and loose.nfe.mean() < ref.nfe.mean() / 4


@pytest.mark.parametrize("solver", ["tsit5", "dopri8"])   # dopri5 has Tsit5's stage count: same formula
def test_nfe_equals_counted_denoiser_calls(solver):
  teacher = random_mixture(0, 3, 2)
  calls = [0]

  def count() -> np.ndarray:
    calls[0] += 1
    return np.zeros((), np.float32)

  def counting_denoiser(x, sigma):
    return teacher.denoise(x, sigma) + io_callback(count, jax.ShapeDtypeStruct((), jnp.float32), ordered=False)

  # one sample: the vmapped solve then calls the denoiser exactly once per evaluation
  ref = reference_trajectories(counting_denoiser, reference_noise(3, 1, (2,), 80.0), SIGMAS.astype(np.float32),
                               solver=solver, progress=False)
  assert ref.nfe.tolist() == [calls[0]]
  assert evals_per_step(REFERENCE_SOLVERS.get(solver)()) == {"tsit5": 6, "dopri8": 13}[solver]
  assert evals_per_step(REFERENCE_SOLVERS.get("dopri5")()) == 6


def _conditional_gaussian_denoiser():
  """A class-conditional closed-form teacher: class k is N(means[k], diag(stds[k]^2))."""
  means = jnp.array([[1.0, -2.0], [-3.0, 0.5], [0.0, 4.0]])
  stds = jnp.array([[0.1, 0.3], [0.5, 0.05], [1.0, 1.0]])

  def denoiser(x, sigma, label):
    return Gaussian(means[label], stds[label]).denoise(x, sigma)

  return denoiser, lambda label: Gaussian(means[label], stds[label])


def test_batched_equals_unbatched_with_labels_and_progress_bar(capsys):
  with jax.enable_x64(True):
    denoiser, teacher_of = _conditional_gaussian_denoiser()
    labels = jnp.array([0, 2, 1, 1, 0, 2, 1])
    x_T = reference_noise(2, 7, (2,), 80.0, jnp.float64)
    whole = reference_trajectories(denoiser, x_T, SIGMAS, labels=labels, rtol=1e-9, atol=1e-9, progress=False)
    chunked = reference_trajectories(denoiser, x_T, SIGMAS, labels=labels, batch_size=3, rtol=1e-9, atol=1e-9,
                                     progress=True)
    exact = teacher_of(labels).ode_solution(x_T, 80.0, 0.002)
    with pytest.raises(ValueError, match=r"labels must have shape \(7,\)"):
      reference_trajectories(denoiser, x_T, SIGMAS, labels=labels[:3], progress=False)
  # labels travel with their samples through the chunks (and the padding of the last chunk)
  np.testing.assert_allclose(chunked.final, exact, rtol=1e-7, atol=1e-9)
  # Each sample is its own ODE, so chunking does not change it. Not bit for bit: XLA may vectorise the same
  # per-sample arithmetic differently for another chunk size (last-ulp differences; in float32 these can move an
  # adaptive step and give differences at the level of rtol).
  np.testing.assert_allclose(chunked.states, whole.states, rtol=1e-11, atol=1e-11)
  np.testing.assert_array_equal(chunked.nfe, whole.nfe)
  assert "7/7" in capsys.readouterr().err


def test_mixture_agrees_with_heun_within_its_error():
  from mteo_jax.schedules import get_schedule
  from mteo_jax.solvers import get_solver

  with jax.enable_x64(True):
    teacher = random_mixture(5, 4, 2, std=0.3, dtype=jnp.float64)
    x_T = reference_noise(6, 16, (2,), 80.0, jnp.float64)
    heun, denoiser = get_solver("heun"), jax.jit(teacher.denoise)
    # Heun's loop is unrolled in Python: run it eagerly around a jitted denoiser rather than compile 2000 steps
    coarse = np.asarray(heun.sample(denoiser, x_T, get_schedule("edm", 1000, 0.002, 80.0, rho=7.0)))
    fine = np.asarray(heun.sample(denoiser, x_T, get_schedule("edm", 2000, 0.002, 80.0, rho=7.0)))
    # Heun is second order: err(1000) ~ 4 err(2000), so |coarse - fine| ~ 3 err(2000) (measured: the estimate is
    # within 0.1 % of the true gap here)
    heun_error = np.abs(coarse - fine).max() / 3
    ref = reference_trajectories(teacher.denoise, x_T, np.array([80.0, 0.002]), rtol=1e-11, atol=1e-11,
                                 progress=False)
    gap = np.abs(ref.final - fine).max()
    assert heun_error < 1e-4      # the check has teeth: Heun at 2000 steps is accurate here
    assert gap < 2 * heun_error, (gap, heun_error)


def test_bad_inputs_are_clear_errors():
  teacher = random_mixture(0, 2, 2)
  x_T = reference_noise(0, 2, (2,), 80.0)
  with pytest.raises(ValueError, match=r"strictly decreasing; sigmas\[1\]"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 1.0, 2.0], progress=False)
  with pytest.raises(ValueError, match="finite and > 0"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 0.0], progress=False)
  with pytest.raises(ValueError, match="sigma_start"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 1.0], sigma_start=50.0, progress=False)
  with pytest.raises(KeyError, match="unknown reference solver 'rk4'.*dopri5"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 1.0], solver="rk4", progress=False)
  with pytest.raises(ValueError, match=r"shape \[batch, \*data_shape\]"):
    reference_trajectories(teacher.denoise, x_T[0], [80.0, 1.0], progress=False)
  with pytest.raises(RuntimeError, match=r"max_steps=3 reached \(at sigma ≈ .*\); raise max_steps"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 0.002], max_steps=3, progress=False)


# --- non-finite denoisers ---------------------------------------------------------------------------------------------

def test_nan_denoiser_stops_early_naming_the_sample_and_sigma():
  nan_denoiser = lambda x, s: jnp.full_like(x, jnp.nan)   # noqa: E731
  with pytest.raises(NonFiniteDenoiserError) as info:
    reference_trajectories(nan_denoiser, jnp.ones((1, 2)), np.array([80.0, 0.002], np.float32), progress=False)
  error = info.value
  assert str(error).startswith("reference solve stopped: the denoiser returned non-finite values (nan/inf) for "
                               "1 sample(s), first indices [0], at sigma ≈ 80;"), str(error)
  assert isinstance(error, FloatingPointError) and isinstance(error, RuntimeError)
  assert error.indices.tolist() == [0] and np.allclose(error.sigmas, 80.0)
  # It stopped after a few rejected steps (each 5x shorter), not after max_steps = 16384 of them.
  assert error.num_steps.tolist() and error.num_steps.max() < 50, error.num_steps


@pytest.mark.parametrize("kind", ["-inf", "nan_below_sigma_1", "inf_below_sigma_0.01"])
def test_nonfinite_denoiser_is_found_where_it_happens(kind):
  teacher = random_mixture(0, 3, 2)
  threshold = {"-inf": np.inf, "nan_below_sigma_1": 1.0, "inf_below_sigma_0.01": 0.01}[kind]
  bad_value = {"-inf": -jnp.inf, "nan_below_sigma_1": jnp.nan, "inf_below_sigma_0.01": jnp.inf}[kind]

  def denoiser(x, sigma):
    return jnp.where(sigma < threshold, bad_value, teacher.denoise(x, sigma))

  x_T = reference_noise(1, 3, (2,), 80.0)
  with pytest.raises(NonFiniteDenoiserError, match=r"non-finite values \(nan/inf\) for 3 sample\(s\), first indices "
                                                   r"\[0, 1, 2\], at sigma ≈ ") as info:
    reference_trajectories(denoiser, x_T, SIGMAS.astype(np.float32), progress=False)
  error = info.value
  assert error.indices.tolist() == [0, 1, 2]
  expected = 80.0 if np.isinf(threshold) else threshold
  # each solve stopped at the last state before the bad region: within a few minimal steps (~1e-5 in log sigma)
  np.testing.assert_allclose(error.sigmas, expected, rtol=1e-4)
  assert np.all(error.sigmas >= expected * (1 - 1e-6))
  assert error.num_steps.max() < 200      # a legitimate solve of this mixture takes ~20 steps; max_steps is 16384


def test_nonfinite_for_some_samples_with_labels_and_chunks_names_global_indices():
  denoiser, _ = _conditional_gaussian_denoiser()

  def broken(x, sigma, label):
    # class 2 is NaN below sigma = 0.5 (depends on the label); inf where the state's first coordinate is positive
    # for sigma in (20, 40) (depends on the state): there that sign is still x_T's (class means are within 4 of 0)
    bad_class = (label == 2)[:, None] & (sigma < 0.5)
    bad_state = (x[:, :1] > 0) & (sigma < 40.0) & (sigma > 20.0)
    out = denoiser(x, sigma, label)
    return jnp.where(bad_class, jnp.nan, jnp.where(bad_state, jnp.inf, out))

  labels = jnp.array([0, 0, 1, 1, 2, 0, 2, 1])
  x_T = jnp.stack([jnp.array([-50.0, -60.0, -70.0, -40.0, -30.0, 55.0, -45.0, 65.0]), jnp.full((8,), 20.0)], axis=1)
  with pytest.raises(NonFiniteDenoiserError) as info:
    # chunks [0, 3), [3, 6), [6, 8): the first failing chunk is the second; indices are into x_T
    reference_trajectories(broken, x_T, SIGMAS.astype(np.float32), labels=labels, batch_size=3, progress=False)
  error = info.value
  assert error.indices.tolist() == [4, 5]
  np.testing.assert_allclose(error.sigmas, [0.5, 40.0], rtol=1e-4)
  assert "for 2 sample(s), first indices [4, 5], at sigma ≈ 0.5" in str(error)
  assert error.num_steps.max() < 200
  # the same samples alone, unchunked: the same verdict (samples 6 and 7 fail too, in the one chunk)
  with pytest.raises(NonFiniteDenoiserError, match=r"for 4 sample\(s\), first indices \[4, 5, 6, 7\]"):
    reference_trajectories(broken, x_T, SIGMAS.astype(np.float32), labels=labels, progress=False)


def test_finite_step_size_underflow_and_max_steps_are_not_blamed_on_nans():
  teacher = random_mixture(0, 3, 2)

  def stiff(x, sigma):   # finite, but with a Lipschitz constant of 1e6 below sigma = 1: explicit RK steps underflow
    return teacher.denoise(x, sigma) + jnp.where(sigma < 1.0, 1e6 * x, 0.0)

  x_T = reference_noise(1, 2, (2,), 80.0)
  with pytest.raises(ReferenceSolveError, match=r"for 2 sample\(s\), first indices \[0, 1\]: the step size fell below "
                                                r"dtmin=.* at sigma ≈ 1.* with finite denoiser values") as info:
    reference_trajectories(stiff, x_T, SIGMAS.astype(np.float32), progress=False)
  assert not isinstance(info.value, NonFiniteDenoiserError)
  assert info.value.num_steps.max() < 500
  with pytest.raises(ReferenceSolveError, match="max_steps=3 reached") as info:
    reference_trajectories(teacher.denoise, x_T, [80.0, 0.002], max_steps=3, progress=False)
  assert not isinstance(info.value, NonFiniteDenoiserError) and info.value.num_steps.tolist() == [3, 3]
  with pytest.raises(ValueError, match=r"x_T must be finite; samples \[1\]"):
    reference_trajectories(teacher.denoise, x_T.at[1, 0].set(jnp.nan), [80.0, 0.002], progress=False)


def test_single_save_sigma_at_start_is_the_noise():
  teacher = random_mixture(0, 2, 2)
  x_T = reference_noise(0, 3, (2,), 80.0)
  ref = reference_trajectories(teacher.denoise, x_T, [80.0], progress=False)
  np.testing.assert_array_equal(ref.final, np.asarray(x_T))
  assert ref.nfe.tolist() == [0, 0, 0]


def test_union_sigmas_indexes_every_grid_exactly():
  grids = [np.asarray(get_schedule("edm", n, 0.002, 80.0, rho=7.0)) for n in (3, 4, 5)] + [SIGMAS.astype(np.float32)]
  union, indices = union_sigmas(grids)
  assert np.all(np.diff(union) < 0) and union[0] == 80.0 and np.isclose(union[-1], 0.002)
  assert len(union) == len(np.unique(np.concatenate(grids)))
  for grid, index in zip(grids, indices):
    np.testing.assert_array_equal(union[index], grid)
  with pytest.raises(ValueError, match="strictly decreasing"):
    union_sigmas([np.array([1.0, 2.0])])
  with pytest.raises(ValueError, match="at least one grid"):
    union_sigmas([])


def test_one_solve_at_the_union_equals_a_solve_per_grid():
  """The adaptive solve interpolates at its save points and does not step to them, so a solve saved at the union of
  several grids gives each grid's states, up to rounding: one reference solve serves every student schedule."""
  teacher = random_mixture(0, 3, 2)
  x_T = reference_noise(3, 5, (2,), 80.0)
  grids = [np.asarray(get_schedule("edm", n, 0.002, 80.0, rho=7.0)) for n in (3, 5)]
  union, indices = union_sigmas(grids)
  joint = reference_trajectories(teacher.denoise, x_T, union, progress=False)
  for grid, index in zip(grids, indices):
    alone = reference_trajectories(teacher.denoise, x_T, grid, progress=False)
    np.testing.assert_allclose(joint.states[index], alone.states, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(joint.nfe, alone.nfe)


class _CompileCounter:
  """Counts XLA compilations (jax.monitoring's backend-compile events) while active."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_second_call_with_the_same_denoiser_compiles_nothing():
  teacher = random_mixture(7, 3, 2)        # a new teacher: nothing of it is compiled yet
  traces = [0]

  def labelled_denoiser(x, sigma, label):
    traces[0] += 1
    return teacher.denoise(x, sigma) + 0.0 * label[:, None]

  grid = SIGMAS.astype(np.float32)
  other_grid = np.array([70.0, 10.0, 2.0, 0.3, 0.01, 0.002], np.float32)   # same length, other levels
  x_T, other_x_T = reference_noise(5, 4, (2,), 80.0), reference_noise(6, 4, (2,), 80.0)
  labels, other_labels = jnp.array([0, 1, 2, 1]), jnp.array([2, 2, 0, 1])
  # A bound method is a new object on each access, equal to the last: ``teacher.denoise`` finds the compiled solve.
  with _CompileCounter() as first:
    reference_trajectories(teacher.denoise, x_T, grid, progress=False)
  with _CompileCounter() as again:
    same = reference_trajectories(teacher.denoise, x_T, grid, progress=False)
    on_other_grid = reference_trajectories(teacher.denoise, x_T, other_grid, progress=False)
    of_other_noise = reference_trajectories(teacher.denoise, other_x_T, grid, progress=False)
  assert first.count > 0 and again.count == 0, (first.count, again.count)

  with _CompileCounter() as first_labelled:
    labelled = reference_trajectories(labelled_denoiser, x_T, grid, labels=labels, progress=False)
  traced = traces[0]
  with _CompileCounter() as again_labelled:
    labelled_again = reference_trajectories(labelled_denoiser, other_x_T, other_grid, labels=other_labels,
                                            progress=False)
  assert first_labelled.count > 0 and again_labelled.count == 0 and traces[0] == traced > 0

  # The reused solve computes the solve of its own inputs (times, noise and labels are arguments, not constants
  # baked in at the first call): the same numbers as a solve compiled afresh for them.
  fresh = lambda x, s: teacher.denoise(x, s)   # noqa: E731
  np.testing.assert_array_equal(on_other_grid.sigmas, other_grid)
  for ref, x, sigmas in [(same, x_T, grid), (on_other_grid, x_T, other_grid), (of_other_noise, other_x_T, grid),
                         (labelled, x_T, grid), (labelled_again, other_x_T, other_grid)]:
    np.testing.assert_array_equal(ref.states, reference_trajectories(fresh, x, sigmas, progress=False).states)


def test_reference_noise_is_seeded():
  a = reference_noise(0, 500, (4,), 80.0)
  assert a.shape == (500, 4) and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, reference_noise(0, 500, (4,), 80.0))
  assert not np.allclose(a, reference_noise(1, 500, (4,), 80.0))
  assert 70.0 < float(jnp.std(a)) < 90.0
  assert reference_noise(0, 2, (3,), 1.0, jnp.bfloat16).dtype == jnp.bfloat16


# --- the cache --------------------------------------------------------------------------------------------------------

def _fake_reference(seed: int = 0) -> Reference:
  rs = np.random.RandomState(seed)
  return Reference(rs.randn(3, 4, 2).astype(np.float32), np.full((4,), 100, np.int64),
                   np.array([80.0, 1.0, 0.002], np.float32))


class _Counter:
  def __init__(self):
    self.calls = 0

  def __call__(self) -> Reference:
    self.calls += 1
    return _fake_reference(self.calls)


_BACKBONE = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=8, noise_channels=8)


def _params(seed: int = 0) -> dict:
  """A Flax-style parameter dict (built by hand: an eager ``backbone.init`` costs seconds and adds nothing here)."""
  rs = np.random.RandomState(seed)
  return {"params": {"Dense_0": {"kernel": rs.randn(8, 16).astype(np.float32), "bias": np.zeros(16, np.float32)},
                     "Dense_1": {"kernel": rs.randn(16, 2).astype(np.float32), "bias": np.zeros(2, np.float32)}}}


def _noise(seed: int = 0, num: int = 4, dtype=np.float32) -> np.ndarray:
  return (80.0 * np.random.RandomState(seed).randn(num, 2)).astype(dtype)


def _mlp_key(params, **overrides):
  # the teacher's hash stays that of the default preconditioning: a precond override tests reference_key's own field
  args = dict(teacher_hash=teacher_identity(_BACKBONE, params, Preconditioning()), precond=Preconditioning(),
              noise_seed=0, num=4, data_shape=(2,), save_sigmas=np.array([80.0, 1.0, 0.002], np.float32),
              solver="tsit5", rtol=1e-5, atol=1e-5)
  args.update(overrides)
  args.setdefault("x_T", _noise(args["noise_seed"], args["num"]))
  return reference_key(**args)


def test_cache_hits_and_misses(tmp_path):
  params = _params()
  cache, compute = ReferenceCache(tmp_path / "refs"), _Counter()
  key = _mlp_key(params)

  first = cache.get_or_compute(key, compute)
  second = cache.get_or_compute(key, compute)
  assert compute.calls == 1
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == b.dtype
  assert ReferenceCache(tmp_path / "refs").get_or_compute(_mlp_key(params), compute) is not None   # new instance
  assert compute.calls == 1

  # one float of the teacher's parameters
  leaves, treedef = jax.tree.flatten(params)
  bumped = np.array(leaves[-1])
  bumped.flat[0] += 1e-3
  other_params = jax.tree.unflatten(treedef, leaves[:-1] + [jnp.asarray(bumped)])
  misses = [
      _mlp_key(other_params),
      _mlp_key(params, save_sigmas=np.array([80.0, 1.0, np.nextafter(np.float32(0.002), np.float32(1))], np.float32)),
      _mlp_key(params, noise_seed=1),
      _mlp_key(params, num=5),
      # the same seed, other noise (as another PRNG implementation would draw): one float one ulp off
      _mlp_key(params, x_T=_noise(0) * np.float32(1 + 2 ** -23)),
      _mlp_key(params, x_T=_noise(0)[::-1].copy()),
      _mlp_key(params, rtol=1e-6),
      _mlp_key(params, atol=1e-6),
      _mlp_key(params, solver="dopri8"),
      _mlp_key(params, precond=Preconditioning(sigma_data=1.0)),
      _mlp_key(params, labels=np.array([0, 1, 2, 0]), label_seed=7),
      _mlp_key(params, labels=np.array([0, 1, 2, 1]), label_seed=7),                   # same seed, other labels
      _mlp_key(params, labels=np.array([0, 1, 2, 1], np.int32), label_seed=7),         # same values, other dtype
      _mlp_key(params, extra={"labels": "balanced"}),
      _mlp_key(params, sigma_start=100.0),
      _mlp_key(params, x_T=_noise(0, dtype=np.float64)),
  ]
  for i, other in enumerate(misses):
    cache.get_or_compute(other, compute)
    assert compute.calls == 2 + i, f"miss {i} was served from the cache"
  # a different backbone config with the same params is a different teacher
  wider = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=8, noise_channels=8, fourier_scale=1.0)
  precond = Preconditioning()
  assert teacher_identity(wider, params, precond) != teacher_identity(_BACKBONE, params, precond)
  assert teacher_identity(_BACKBONE, _params(1), precond) != teacher_identity(_BACKBONE, params, precond)
  # ... and so is the same network under another preconditioning (its denoiser differs)
  assert teacher_identity(_BACKBONE, params, Preconditioning(sigma_data=1.0)) != \
      teacher_identity(_BACKBONE, params, precond)


def test_cache_files_are_readable_and_complete(tmp_path):
  cache = ReferenceCache(tmp_path)
  key = _mlp_key({"w": np.ones(2)})
  cache.get_or_compute(key, _Counter())
  npz = cache.path(key)
  assert npz.exists() and npz.name.startswith("reference-")
  info = json.loads(npz.with_suffix(".json").read_text())
  assert info["key"]["noise"]["seed"] == 0 and info["key"]["solver"] == {"name": "tsit5", "rtol": 1e-5, "atol": 1e-5}
  assert info["key"]["noise"]["sha256"] == hash_pytree(_noise(0)) and info["key"]["format"] == REFERENCE_FORMAT_VERSION
  assert info["states_shape"] == [3, 4, 2]
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([npz.name, npz.with_suffix(".json").name])


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_corrupt_cache_file_is_an_error_naming_it(tmp_path, damage):
  cache, compute = ReferenceCache(tmp_path), _Counter()
  key = _mlp_key({"w": np.ones(2)})
  cache.get_or_compute(key, compute)
  path = cache.path(key)
  data = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(data[: len(data) // 2])
  elif damage == "flip_bytes":
    # inside the states array (the first member of the zip), past its .npy header
    middle = data.index(b"states.npy") + 200
    path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])
  else:
    path.write_bytes(b"not a zip file")
  with pytest.raises(CacheError, match=str(path.name)):
    cache.get_or_compute(key, compute)
  assert compute.calls == 1                                   # never silently recomputed


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
  import mteo_jax.reference as reference_module

  cache, compute = ReferenceCache(tmp_path), _Counter()
  key = _mlp_key({"w": np.ones(2)})

  def dying_savez(file, **arrays):
    file.write(b"PK\x03\x04 half an archive")
    raise KeyboardInterrupt

  monkeypatch.setattr(reference_module.np, "savez", dying_savez)
  with pytest.raises(KeyboardInterrupt):
    cache.get_or_compute(key, compute)
  monkeypatch.undo()
  assert not cache.path(key).exists()
  assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]
  cache.get_or_compute(key, compute)                          # the next run computes and stores it
  assert compute.calls == 2 and cache.load(key) is not None


def test_compute_fn_must_return_a_reference(tmp_path):
  with pytest.raises(TypeError, match="must return a Reference"):
    ReferenceCache(tmp_path).get_or_compute(_mlp_key({"w": np.ones(2)}), lambda: np.zeros(3))
  bad = Reference(np.zeros((2, 4, 2)), np.zeros((4,)), np.zeros((3,)))
  with pytest.raises(ValueError, match=r"states \[S, B, \.\.\.\]"):
    ReferenceCache(tmp_path).get_or_compute(_mlp_key({"w": np.ones(2)}), lambda: bad)


def test_seeded_reference_computes_once_then_loads(tmp_path):
  teacher = random_mixture(2, 3, 2)
  cache = ReferenceCache(tmp_path)
  kwargs = dict(teacher_hash=hash_json(teacher),
                precond=None, noise_seed=11, num=3, data_shape=(2,), save_sigmas=np.array([80.0, 0.002], np.float32),
                cache=cache, progress=False)
  x_T, computed = seeded_reference(teacher.denoise, **kwargs)
  np.testing.assert_array_equal(x_T, reference_noise(11, 3, (2,), 80.0))
  loaded_x_T, loaded = seeded_reference(lambda x, sigma: 1 / 0, **kwargs)   # a cache hit never calls the teacher
  np.testing.assert_array_equal(loaded.states, computed.states)
  np.testing.assert_array_equal(loaded_x_T, x_T)
  assert len(list(tmp_path.glob("*.npz"))) == 1
  with pytest.raises(ValueError, match="labels and label_seed go together"):
    seeded_reference(teacher.denoise, label_seed=3, **kwargs)


def test_cache_is_keyed_by_the_noise_not_its_seed(tmp_path):
  """A cache filled while the seed drew other noise (here the old, non-partitionable threefry; likewise another PRNG
  implementation or JAX version) must not serve that noise's reference for the noise the seed draws now."""
  teacher = _gaussian()
  save_sigmas = np.array([80.0, 1.0, 0.002], np.float32)
  kwargs = dict(teacher_hash=hash_json(teacher), precond=None, noise_seed=3, num=5, data_shape=(4,),
                save_sigmas=save_sigmas, cache=ReferenceCache(tmp_path), progress=False)
  previous = jax.config.jax_threefry_partitionable
  try:
    jax.config.update("jax_threefry_partitionable", not previous)
    old_x_T, old_ref = seeded_reference(teacher.denoise, **kwargs)
  finally:
    jax.config.update("jax_threefry_partitionable", previous)
  x_T, ref = seeded_reference(teacher.denoise, **kwargs)
  assert not np.allclose(old_x_T, x_T)                          # the same seed drew other noise
  assert len(list(tmp_path.glob("*.npz"))) == 2                 # a miss: computed for this noise and stored
  exact = np.stack([teacher.ode_solution(np.asarray(x_T, np.float64), 80.0, s) for s in save_sigmas.astype(float)])
  assert np.abs(ref.states - exact).max() < 1e-3 * np.abs(exact).max()
  assert np.abs(old_ref.states - exact).max() > 1.0             # what the seed-keyed cache used to return
  _, loaded = seeded_reference(lambda x, sigma: 1 / 0, **kwargs)   # and now a hit
  np.testing.assert_array_equal(loaded.states, ref.states)


def test_cache_is_keyed_by_the_labels_not_their_seed(tmp_path):
  denoiser, teacher_of = _conditional_gaussian_denoiser()
  kwargs = dict(teacher_hash="conditional-gaussian", precond=None, noise_seed=2, num=4, data_shape=(2,),
                save_sigmas=np.array([80.0, 0.002], np.float32), label_seed=9, cache=ReferenceCache(tmp_path),
                progress=False)
  labels = jnp.array([0, 1, 2, 1])
  other_labels = jnp.array([2, 1, 0, 0])                     # the same seed, other labels
  x_T, ref = seeded_reference(denoiser, labels=labels, **kwargs)
  _, other = seeded_reference(denoiser, labels=other_labels, **kwargs)
  assert len(list(tmp_path.glob("*.npz"))) == 2
  for lab, result in [(labels, ref), (other_labels, other)]:
    np.testing.assert_allclose(result.final, teacher_of(lab).ode_solution(x_T, 80.0, 0.002), rtol=1e-3, atol=1e-3)
  _, loaded = seeded_reference(lambda x, sigma, label: 1 / 0, labels=other_labels, **kwargs)
  np.testing.assert_array_equal(loaded.states, other.states)


def test_reference_key_needs_the_noise_and_checks_it():
  args = dict(teacher_hash="t", precond=None, noise_seed=0, num=4, data_shape=(2,),
              save_sigmas=np.array([80.0, 0.002], np.float32), solver="tsit5", rtol=1e-5, atol=1e-5)
  with pytest.raises(TypeError, match="x_T"):
    reference_key(**args)                                      # the content is required, not only the seed
  key = reference_key(**args, x_T=_noise(0), labels=np.array([0, 1, 0, 1]))
  assert key["format"] == REFERENCE_FORMAT_VERSION == 2
  assert key["noise"]["sha256"] == hash_pytree(_noise(0)) and key["noise"]["dtype"] == "float32"
  assert key["labels"] == {"seed": None, "dtype": "int64", "sha256": hash_pytree(np.array([0, 1, 0, 1]))}
  with pytest.raises(ValueError, match=r"shape \(num, \*data_shape\) = \(4, 2\), got float32\[3, 2\]"):
    reference_key(**args, x_T=_noise(0, num=3))
  with pytest.raises(ValueError, match="noise_dtype=float64 but x_T is float32"):
    reference_key(**args, x_T=_noise(0), noise_dtype=np.float64)
  with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
    reference_key(**args, x_T=_noise(0), labels=np.array([0, 1]))
  with pytest.raises(ValueError, match="label_seed without labels"):
    reference_key(**args, x_T=_noise(0), label_seed=3)


# --- the benchmark ---------------------------------------------------------------------------------------------------

def _load_benchmark():
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "solver_error_vs_nfe.py"
  spec = importlib.util.spec_from_file_location("solver_error_vs_nfe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_benchmark_quick_mode(tmp_path):
  benchmark = _load_benchmark()
  # Two solvers keep the test short (the solvers' own tests cover the rest); the cache directory shows the reference
  # pipeline end to end.
  benchmark.main(["--quick", "--out-dir", str(tmp_path / "out"), "--solvers", "euler,dpmpp_2m",
                  "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
  results = json.loads((tmp_path / "out" / "solver_error_vs_nfe.json").read_text())
  assert (tmp_path / "out" / "solver_error_vs_nfe.png").stat().st_size > 1000
  assert sorted(results["results"]) == ["dpmpp_2m", "euler"]
  assert results["setup"]["quick"] and results["setup"]["num_samples"] == 128
  assert len(list((tmp_path / "cache").glob("reference-*.npz"))) == 1
  euler = results["results"]["euler"]
  nfes = sorted(int(n) for n in euler["rmse"])
  errors = [euler["rmse"][str(n)] for n in nfes]
  assert nfes == [3, 4, 5, 6] and all(b < a for a, b in zip(errors, errors[1:])), errors


def test_benchmark_options_are_checked():
  benchmark = _load_benchmark()
  labels = [label for label, _, _ in benchmark.solver_variants()]
  assert "unipc[order=2]" in labels and "unipc[order=3]" in labels and "euler" in labels
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--solvers", "rk4"])
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--nfe-max", "2"])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_noise_is_solved_in_float32(dtype):
  """A reference is a target at rtol ~1e-5, which a float16 state cannot meet (its step control stalled): the solve
  runs in float32 and equals the float32 solve from the same (rounded) noise."""
  teacher = random_mixture(0, 4, 2)
  x_T = (80.0 * jax.random.normal(jax.random.key(0), (4, 2))).astype(dtype)
  sigmas = np.array([80.0, 1.0, 0.002], np.float32)
  low = reference_trajectories(teacher.denoise, x_T, sigmas, progress=False)
  high = reference_trajectories(teacher.denoise, x_T.astype(jnp.float32), sigmas, progress=False)
  assert low.states.dtype == np.float32
  np.testing.assert_array_equal(low.states, high.states)
  np.testing.assert_array_equal(low.nfe, high.nfe)


def test_labels_are_checked_before_the_solve():
  """Inside the solve the labels are traced: their values are checked on the host first, with the denoiser's own
  check (make_denoiser names the valid range) or, for other denoisers, for negative values and integer dtype."""
  backbone = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=16, noise_channels=8, num_classes=3)
  denoiser = make_denoiser(backbone, backbone.init(jax.random.key(0)), Preconditioning())
  x_T = jnp.ones((4, 2))
  sigmas = np.array([80.0, 0.002], np.float32)
  for labels, match in (([0, 1, 2, 3], r"must lie in \[0, 2\] \(num_classes=3\), but label\[3\] = 3"),
                        ([-1, 0, 0, 0], r"must lie in \[0, 2\].*label\[0\] = -1")):
    with pytest.raises(ValueError, match=match):
      reference_trajectories(denoiser, x_T, sigmas, labels=jnp.asarray(labels), progress=False)
  with pytest.raises(TypeError, match="integer class labels"):
    reference_trajectories(denoiser, x_T, sigmas, labels=jnp.asarray([0.0, 1.0, 2.0, 0.0]), progress=False)
  plain = lambda x, sigma, label: x / (1.0 + sigma ** 2)   # noqa: E731  (no check_label of its own)
  with pytest.raises(ValueError, match="labels must be >= 0"):
    reference_trajectories(plain, x_T, sigmas, labels=jnp.asarray([0, -2, 0, 0]), progress=False)
