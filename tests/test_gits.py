"""GITS (``mteo_jax.methods.gits``): the dynamic programme is exact, the jump costs are the solver's own steps, the
searched grid beats EDM's on an exact Gaussian teacher, and the method runs, saves and reloads on the harness."""

from __future__ import annotations

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import Teacher, closed_form, harness, loop
from mteo_jax.methods import gits
from mteo_jax.methods.plain import BaseSolver
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import SOLVERS, get_solver


def brute_force(cost: np.ndarray, num_steps: int, coeff: float) -> tuple[tuple[int, ...], float]:
  """The least weighted cost over every path 0 -> M - 1 of exactly ``num_steps`` jumps, by enumeration."""
  last = cost.shape[0] - 1
  best = (None, np.inf)
  for middle in itertools.combinations(range(1, last), num_steps - 1):
    path = (0, *middle, last)
    total = sum(coeff ** n * cost[a, b] for n, (a, b) in enumerate(itertools.pairwise(path)))
    if total < best[1]:
      best = (path, total)
  return best


@pytest.mark.parametrize("coeff", [1.0, 1.15])
def test_dynamic_programme_equals_brute_force(coeff):
  """On random costs (lower triangle NaN: never read), every N from 1 to M - 1 gives the enumerated optimum."""
  rng = np.random.default_rng(0)
  num_points = 8
  cost = rng.uniform(0.1, 2.0, (num_points, num_points))
  cost[np.tril_indices(num_points)] = np.nan
  for num_steps in range(1, num_points):
    indices, total = gits.gits_schedule(cost, num_steps, coeff=coeff)
    path, expected = brute_force(cost, num_steps, coeff)
    assert tuple(indices.tolist()) == path, num_steps
    assert indices.dtype == np.int64 and indices.shape == (num_steps + 1,)
    np.testing.assert_allclose(total, expected, rtol=1e-12)


def test_dynamic_programme_rejects_impossible_paths_and_bad_costs():
  cost = np.triu(np.ones((6, 6)), 1)
  for num_steps in (0, -1, 6):
    with pytest.raises(ValueError, match="1 to 5 jumps"):
      gits.gits_schedule(cost, num_steps)
  with pytest.raises(TypeError, match="integer"):
    gits.gits_schedule(cost, 2.0)
  with pytest.raises(ValueError, match="square"):
    gits.gits_schedule(cost[:, :5], 2)
  with pytest.raises(ValueError, match="coeff"):
    gits.gits_schedule(cost, 2, coeff=0.0)
  # One jump uses only (0, 5): a NaN elsewhere is never read; on (0, 5) it is an error, as is +inf on a jump that a
  # 2-jump path can take.
  holes = cost.copy()
  holes[0, 1] = holes[2, 3] = np.nan
  assert gits.gits_schedule(holes, 1)[0].tolist() == [0, 5]
  holes[0, 5] = np.nan
  with pytest.raises(ValueError, match=r"cost\[0, 5\] = nan"):
    gits.gits_schedule(holes, 1)
  holes = cost.copy()
  holes[3, 5] = np.inf
  with pytest.raises(ValueError, match=r"cost\[3, 5\] = inf"):
    gits.gits_schedule(holes, 2)
  assert gits.path_pairs(6, 1).sum() == 1 and not gits.path_pairs(6, 5)[0, 2]


def brute_force_with_history(cost, history_cost, num_steps, coeff, history):
  """The enumerated optimum when jump n costs ``history_cost[p_{n-1}, p_n, p_{n+1}]`` where ``history[n]``."""
  last = cost.shape[0] - 1
  best = (None, np.inf)
  for middle in itertools.combinations(range(1, last), num_steps - 1):
    path = (0, *middle, last)
    total = sum(coeff ** n * (history_cost[path[n - 1], path[n], path[n + 1]] if history[n] else cost[path[n],
                                                                                                     path[n + 1]])
                for n in range(num_steps))
    if total < best[1]:
      best = (path, total)
  return best


@pytest.mark.parametrize("coeff", [1.0, 1.3])
def test_dynamic_programme_with_history_equals_brute_force(coeff):
  """The pair-state programme: every N and any pattern of history flags give the enumerated optimum; all flags False
  is the plain programme."""
  rng = np.random.default_rng(1)
  num_points = 7
  cost = rng.uniform(0.1, 2.0, (num_points, num_points))
  history_cost = rng.uniform(0.1, 2.0, (num_points,) * 3)
  history_cost[0, 0, 1] = np.nan   # not h < i < j: never read
  for num_steps in range(1, num_points):
    for flags in itertools.product((False, True), repeat=num_steps - 1):
      history = (False, *flags)
      indices, total = gits.gits_schedule(cost, num_steps, coeff=coeff, history_cost=history_cost, history=history)
      path, expected = brute_force_with_history(cost, history_cost, num_steps, coeff, history)
      assert tuple(indices.tolist()) == path, (num_steps, history)
      np.testing.assert_allclose(total, expected, rtol=1e-12)
      if not any(history):
        assert gits.gits_schedule(cost, num_steps, coeff=coeff)[0].tolist() == list(path)
  for bad, match in (({"history": None}, "history must hold"), ({"history": (True, False)}, "history must hold"),
                     ({"history": (False,)}, "history must hold"),
                     ({"history_cost": history_cost[:, :, :3]}, "history_cost must be")):
    with pytest.raises(ValueError, match=match):
      gits.gits_schedule(cost, 2, **{"history_cost": history_cost, "history": (False, True), **bad})
  holes = history_cost.copy()
  holes[0, 2, 4] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    gits.gits_schedule(cost, 2, history_cost=holes, history=(False, True))
  with pytest.raises(ValueError, match="without a history_cost"):
    gits.gits_schedule(cost, 2, history=(False, True))


@pytest.fixture(scope="module")
def gaussian():
  with jax.enable_x64(True):
    yield closed_form.Gaussian(jnp.array([0.3, -1.0, 2.0]), jnp.array([0.5, 1.5, 0.05]))


def exact_states(gaussian, x_T, sigmas):
  """[M, K, 3]: the exact probability-flow ODE flow of ``x_T`` (at sigmas[0]) to every sigma."""
  return jnp.stack([gaussian.ode_solution(x_T, sigmas[0], s) for s in sigmas])


@pytest.mark.parametrize("solver_name", SOLVERS.names())
def test_jump_costs_are_the_solvers_own_first_step(gaussian, solver_name):
  """``C[i, j]`` = the distance from the state at j of ``solver.sample`` started at the state at i: to the last fine
  sigma, a one-step run (Heun's Euler step; a multistep solver's first, lower-order step); to any other sigma, the
  first step of a longer run, [s_i, s_j, s_j / 2] (Heun's two-evaluation step; the same one-step update for the
  others, UniPC's uncorrected prediction included). Labels reach every call; chunks with padding change nothing."""
  with jax.enable_x64(True):
    solver = get_solver(solver_name)
    fine = np.asarray(get_schedule("edm", 4, 0.002, 80.0, rho=7.0))
    x_T = 80.0 * jax.random.normal(jax.random.key(0), (3, 3), jnp.float64)
    states = exact_states(gaussian, x_T, fine)
    labels = jnp.array([0, 1, 2])

    def denoiser(x, sigma, temb=None, *, label):
      return gaussian.denoise(x, sigma, temb) + 0.1 * label[:, None]   # an imperfect, label-dependent teacher

    labelled = functools.partial(denoiser, label=labels)
    first_of_two = jax.jit(lambda x, s_i, s_j: solver.sample(labelled, x, jnp.stack([s_i, s_j, s_j / 2]),
                                                             return_trajectory=True)[1][1])
    one_step = jax.jit(lambda x, s_i, s_j: solver.sample(labelled, x, jnp.stack([s_i, s_j])))
    mse = np.full((5, 5, 3), np.inf)
    for i, j in itertools.combinations(range(5), 2):
      run = first_of_two if j < 4 and solver_name == "heun" else one_step
      mse[i, j] = jnp.mean((run(states[i], fine[i], fine[j]) - states[j]) ** 2, axis=-1)
    for distance, expected in (("l2", mse.mean(-1)), ("rmse", np.sqrt(mse).mean(-1))):
      cost = gits.jump_costs(denoiser, solver, fine, states, labels, distance=distance, batch_size=7)
      np.testing.assert_allclose(cost, expected, rtol=1e-10)


def test_jump_costs_check_their_inputs(gaussian):
  fine = np.asarray(get_schedule("edm", 3, 0.002, 80.0))
  states = jnp.zeros((4, 2, 3))
  euler = get_solver("euler")
  with pytest.raises(ValueError, match="states must be"):
    gits.jump_costs(gaussian.denoise, euler, fine, states[:3])
  with pytest.raises(ValueError, match="labels must be"):
    gits.jump_costs(gaussian.denoise, euler, fine, states, jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="unknown distance"):
    gits.jump_costs(gaussian.denoise, euler, fine, states, distance="l1")
  with pytest.raises(ValueError, match="strictly decreasing"):
    gits.jump_costs(gaussian.denoise, euler, fine[::-1], states)


def test_history_costs_are_the_solvers_second_order_step(gaussian):
  """``C3[h, i, j]`` against the update formulas written out: iPNDM's order-2 Adams-Bashforth step from x_i with the
  derivatives at i and h, and DPM-Solver++(2M)'s second-order step with x0_hat at i and h; every entry outside
  h < i < j is inf; which steps use history follows the solver's own orders."""
  with jax.enable_x64(True):
    fine = np.asarray(get_schedule("edm", 5, 0.002, 80.0, rho=7.0))
    x_T = 80.0 * jax.random.normal(jax.random.key(2), (4, 3), jnp.float64)
    states = exact_states(gaussian, x_T, fine)
    x0_hat = gits.denoised_states(gaussian.denoise, fine, states)
    np.testing.assert_allclose(x0_hat[2], gaussian.denoise(states[2], fine[2]), rtol=1e-12)
    d = [(states[k] - x0_hat[k]) / fine[k] for k in range(5)]
    lam = -np.log(fine)

    def ipndm(h, i, j):
      return states[i] + (fine[j] - fine[i]) * (1.5 * d[i] - 0.5 * d[h])

    def dpmpp_2m(h, i, j):
      step, r = lam[j] - lam[i], (lam[i] - lam[h]) / (lam[j] - lam[i])
      x0 = (1 + 1 / (2 * r)) * x0_hat[i] - 1 / (2 * r) * x0_hat[h]
      return fine[j] / fine[i] * states[i] - np.expm1(-step) * x0

    for name, formula in (("ipndm", ipndm), ("dpmpp_2m", dpmpp_2m)):
      cost = gits.history_jump_costs(get_solver(name), fine, states, x0_hat, distance="l2", batch_size=5)
      for h, i, j in itertools.product(range(6), repeat=3):
        if h < i < j:
          expected = jnp.mean(jnp.mean((formula(h, i, j) - states[j]) ** 2, axis=-1))
          np.testing.assert_allclose(cost[h, i, j], expected, rtol=1e-9, err_msg=f"{name} {(h, i, j)}")
        else:
          assert cost[h, i, j] == np.inf
  assert gits.history_steps(get_solver("ipndm"), 4) == (False, True, True, True)
  assert gits.history_steps(get_solver("dpmpp_2m"), 4) == (False, True, True, False)   # lower-order final step
  assert gits.history_steps(get_solver("heun"), 3) == (False, False, False)
  with pytest.raises(ValueError, match="no second-order multistep step"):
    gits.history_jump_costs(get_solver("euler"), fine, states, x0_hat)
  with pytest.raises(ValueError, match="x0_hat must be"):
    gits.history_jump_costs(get_solver("ipndm"), fine, states, x0_hat[:3])


@pytest.mark.parametrize("solver_name", ["euler", "ipndm"])
def test_searched_grid_beats_edm_on_an_exact_gaussian(gaussian, solver_name):
  """Exact teacher, exact warm-up states: at NFE 3 the searched grid's final error on held-out noise is below the
  EDM rho = 7 grid's (which lies on the fine grid, so the search could have returned it)."""
  with jax.enable_x64(True):
    solver = get_solver(solver_name)
    num_steps = solver.num_steps_for_nfe(3)
    fine = np.asarray(get_schedule("edm", 30, 0.002, 80.0, rho=7.0))
    edm = np.asarray(get_schedule("edm", num_steps, 0.002, 80.0, rho=7.0))
    assert np.all(np.isin(edm, fine))
    x_T = 80.0 * jax.random.normal(jax.random.key(0), (64, 3), jnp.float64)
    indices, total = gits.gits_schedule(gits.jump_costs(gaussian.denoise, solver, fine, exact_states(gaussian, x_T,
                                                                                                     fine)), num_steps)
    assert np.isfinite(total) and indices[0] == 0 and indices[-1] == 30
    held_out = 80.0 * jax.random.normal(jax.random.key(1), (256, 3), jnp.float64)
    exact = gaussian.ode_solution(held_out, 80.0, 0.002)

    def error(sigmas):
      return float(jnp.sqrt(jnp.mean((solver.sample(gaussian.denoise, held_out, jnp.asarray(sigmas)) - exact) ** 2)))

    assert error(fine[indices]) < 0.8 * error(edm)


def test_settings_are_checked():
  for name, bad in (("fine_grid_size", 1), ("num_warmup", 0), ("schedule", "explicit"), ("rho", 0.0),
                    ("distance", "l1"), ("coeffs", (-1.0,)), ("coeffs", ()), ("coeffs", (1.0, 1.0)),
                    ("coeffs", (float("inf"),)), ("costs", ("dev",)), ("costs", ()), ("batch_size", 0)):
    with pytest.raises(ValueError, match=name if name != "schedule" else "explicit"):
      gits.GITSSettings(**{name: bad})
  assert gits.GITSSettings(coeffs=[1, 2.5], costs=["history"]).coeffs == (1.0, 2.5)
  with pytest.raises(KeyError, match="unknown schedule"):
    gits.GITSSettings(schedule="cosine")
  grid = gits.GITSSettings(fine_grid_size=5, schedule="logsnr_uniform").fine_grid(0.002, 80.0)
  np.testing.assert_allclose(np.diff(np.log(grid)), np.log(0.002 / 80.0) / 4, rtol=1e-5)


def test_gits_on_the_harness_searches_saves_and_reloads(tmp_path, monkeypatch):
  """On the shipped GMM teacher: the schedule has N + 1 strictly decreasing entries from sigma_max to sigma_min, it
  beats the base solver on held-out noise, a rerun reads its file without solving or searching, and a file of
  other settings is refused and left as it was."""
  teacher = Teacher.load("pretrained:gmm")
  h = harness.Harness(teacher, tmp_path, harness.HarnessConfig(num_train=128, num_eval=128, teacher_steps=5,
                                                                progress=False))
  cells = h.cells(("ipndm",), (3,))
  settings = gits.GITSSettings(fine_grid_size=24, num_warmup=64)
  method = gits.GITS(settings)
  base_row, gits_row = h.run([BaseSolver(), method], cells)
  cell = cells[0]
  schedule = np.asarray(gits_row["schedule"]["sigmas"], np.float32)
  assert schedule.shape == (cell.solver.num_steps_for_nfe(3) + 1,) and np.all(np.diff(schedule) < 0)
  assert schedule[0] == np.float32(teacher.precond.sigma_max) and schedule[-1] == np.float32(teacher.precond.sigma_min)
  assert gits_row["fine_grid_size"] == 24 and gits_row["train_seconds"] > 0 and np.isfinite(gits_row["total_cost"])
  assert gits_row["rmse"] < 0.8 * base_row["rmse"], (gits_row["rmse"], base_row["rmse"])

  path = tmp_path / "schedules" / f"gits_{cell.tag}.json"
  saved = json.loads(path.read_text())
  assert saved["sigmas"] == gits_row["schedule"]["sigmas"] and saved["identity"]["teacher"] == teacher.identity
  assert saved["identity"]["num_warmup"] == 64 and saved["identity"]["nfe"] == 3
  assert len(saved["identity"]["fine_grid"]) == 24 and len(saved["jump_costs"]) == 23
  # One candidate per (cost, coeff); the schedule is the one of least warm-up RMSE; the paper's search (first-step
  # costs, coeff 1.15) is one of them, the DP on the saved costs.
  candidates = saved["candidates"]
  assert [(c["cost"], c["coeff"]) for c in candidates] == [(k, c) for k in settings.costs for c in settings.coeffs]
  assert saved["chosen"] == int(np.argmin([c["warmup_rmse"] for c in candidates]))
  assert candidates[saved["chosen"]]["indices"] == saved["indices"] and gits_row["warmup_rmse"] == min(
      c["warmup_rmse"] for c in candidates)
  cost = np.full((24, 24), np.inf)
  for i, row in enumerate(saved["jump_costs"]):
    cost[i, i + 1:] = row
  paper = next(c for c in candidates if c["cost"] == "first_step" and c["coeff"] == 1.15)
  assert paper["indices"] == gits.gits_schedule(cost, 3, coeff=1.15)[0].tolist()
  assert {tuple(c["indices"]) for c in candidates if c["cost"] == "history"} != {
      tuple(c["indices"]) for c in candidates if c["cost"] == "first_step"}   # history costs change the paths

  def no_search(*args, **kwargs):
    raise AssertionError("a saved schedule must be reused, not searched again")
  for name in ("jump_costs", "history_jump_costs", "denoised_states"):
    monkeypatch.setattr(gits, name, no_search)
  monkeypatch.setattr(h, "reference", no_search)
  again = gits.GITS(settings).fit(h, cell)
  np.testing.assert_array_equal(again.payload, schedule)
  assert again.train_seconds == saved["search_seconds"]
  with pytest.raises(ValueError, match="call fit first"):
    gits.GITS(settings).sampler(again)

  for field, value in (("teacher", "another teacher"), ("nfe", 4)):
    other = json.loads(path.read_text())
    other["identity"][field] = value
    path.write_text(json.dumps(other))
    with pytest.raises(loop.ResumeMismatchError, match=field):
      gits.GITS(settings).fit(h, cell)
    assert json.loads(path.read_text()) == other   # refused, not overwritten
  path.write_text(json.dumps(saved))
  with pytest.raises(loop.ResumeMismatchError, match="num_warmup: 64 -> 32"):
    gits.GITS(gits.GITSSettings(fine_grid_size=24, num_warmup=32)).fit(h, cell)
  with pytest.raises(loop.ResumeMismatchError, match="coeffs"):
    gits.GITS(gits.GITSSettings(fine_grid_size=24, num_warmup=64, coeffs=(1.15,))).fit(h, cell)

  assert gits.GITS(gits.GITSSettings(num_warmup=10_000)).identity(h, cell)["num_warmup"] == 128   # capped
  with pytest.raises(ValueError, match="at most 2 steps"):
    gits.GITS(gits.GITSSettings(fine_grid_size=3)).fit(h, h.cells(("ipndm",), (3,))[0])
