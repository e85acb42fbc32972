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
from mteo_jax.nets import get_backbone
from mteo_jax.reference import (REFERENCE_SOLVERS, CacheError, Reference, ReferenceCache, evals_per_step,
                                reference_key, reference_noise, reference_trajectories, seeded_reference,
                                teacher_identity, union_sigmas)
from mteo_jax.schedules import get_schedule

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
  with pytest.raises(RuntimeError, match="max_steps=3 reached"):
    reference_trajectories(teacher.denoise, x_T, [80.0, 0.002], max_steps=3, progress=False)


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


def _mlp_key(params, **overrides):
  backbone = _BACKBONE
  args = dict(teacher_hash=teacher_identity(params, backbone), precond=Preconditioning(), noise_seed=0, num=4,
              data_shape=(2,), save_sigmas=np.array([80.0, 1.0, 0.002], np.float32), solver="tsit5", rtol=1e-5,
              atol=1e-5)
  args.update(overrides)
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
      _mlp_key(params, rtol=1e-6),
      _mlp_key(params, atol=1e-6),
      _mlp_key(params, solver="dopri8"),
      _mlp_key(params, precond=Preconditioning(sigma_data=1.0)),
      _mlp_key(params, label_seed=7),
      _mlp_key(params, extra={"labels": "balanced"}),
      _mlp_key(params, sigma_start=100.0),
      _mlp_key(params, noise_dtype=jnp.float64),
  ]
  for i, other in enumerate(misses):
    cache.get_or_compute(other, compute)
    assert compute.calls == 2 + i, f"miss {i} was served from the cache"
  # a different backbone config with the same params is a different teacher
  wider = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=8, noise_channels=8, fourier_scale=1.0)
  assert teacher_identity(params, wider) != teacher_identity(params, _BACKBONE)
  assert teacher_identity(_params(1), _BACKBONE) != teacher_identity(params, _BACKBONE)


def test_cache_files_are_readable_and_complete(tmp_path):
  cache = ReferenceCache(tmp_path)
  key = _mlp_key({"w": np.ones(2)})
  cache.get_or_compute(key, _Counter())
  npz = cache.path(key)
  assert npz.exists() and npz.name.startswith("reference-")
  info = json.loads(npz.with_suffix(".json").read_text())
  assert info["key"]["noise"]["seed"] == 0 and info["key"]["solver"] == {"name": "tsit5", "rtol": 1e-5, "atol": 1e-5}
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
  kwargs = dict(teacher_hash=teacher_identity({"mixture": (teacher.weights, teacher.means, teacher.stds)}),
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
