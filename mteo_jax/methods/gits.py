"""GITS: a sigma schedule searched by dynamic programming over a fine grid of teacher states; nothing is trained.

Chen, Zhou, Wang, Shen & Lyu 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML, arXiv
2405.11326, Algorithm 1; the authors' code: zju-pi/diff-sampler, ``gits-main/gits_utils.py``). The teacher's
trajectories from K warm-up noises are saved on a fine grid ``s_0 = sigma_max > ... > s_{M-1} = sigma_min``. The cost
of a jump ``i -> j`` (i < j) is the mean over the K trajectories of the distance between the chosen solver's step from
the teacher state ``x_i`` at ``s_i`` to ``s_j`` and the teacher state ``x_j``:

    C[i, j] = mean_k dist(step(x_i^k, s_i -> s_j), x_j^k)

and the schedule is the path ``0 = p_0 < p_1 < ... < p_N = M - 1`` with exactly N jumps of least total cost
``sum_n coeff^n C[p_n, p_{n+1}]`` (``coeff = 1``: the plain sum; the paper's code weights later jumps by
``coeff > 1``), found exactly by dynamic programming in O(N M^2).

The step is the solver's own. Heun's interior steps make two network evaluations and its last step is a plain Euler
step (``solvers.Heun``), so a jump to ``s_{M-1}`` uses the last-step map and every other jump the interior one; the
schedule then costs exactly the NFE asked for. A multistep solver (DPM-Solver++, iPNDM, DEIS, UniPC) has no history
at a teacher state, so its jump is its own first step, i.e. ``solver.sample(D, x_i, [s_i, s_j])`` (DDIM for all four,
UniPC without its corrector): the local error the DP sees is that of the warm-up step, as in the paper, whose code
scores every solver's schedule with Euler jumps. The schedule is a grid like any other: every solver can use it.

Two extensions, both options (``GITSSettings``): **history costs** score a multistep solver's jumps after its first
as what they are, a step of order 2 whose history comes from the path's previous point (``history_jump_costs``,
``C3[h, i, j]``; the DP's state becomes the pair of the last two points, O(N M^3)); and **selection**: one DP path
per (coeff, cost) pair, and the schedule is the path whose full N-step solve from the K warm-up noises ends nearest
the teacher's endpoints (warm-up RMSE). The DP's sum of local costs ranks paths only roughly: on the shipped gmm
teacher the paper's single path (coeff 1.15, first-step costs) lost to EDM-rho at iPNDM NFE 5, and no single coeff
or cost won everywhere, while the warm-up RMSE ranked the candidate paths as the held-out RMSE did.

``GITS`` runs this on the harness: K warm-up noises are the first K training noises (their reference is solved once
on the fine grid and cached), the search takes seconds on gmm and a few minutes on digits on 2 CPU cores, and the
schedule is saved, with every candidate path and its warm-up RMSE, to ``WORKDIR/schedules/gits_<solver>_nfe<N>.json``
and reused on a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import files, loop, metrics, mteo
from mteo_jax.diffusion import coefficient_dtype
from mteo_jax.harness import MAX_RHO, Artefact, Cell, Harness, Sampler, batched, write_json
from mteo_jax.methods.base import METHODS, Method
from mteo_jax.schedules import SCHEDULES, get_schedule, validate_sigmas

# ``l2``: the mean squared error of a sample (over its data axes); ``rmse``: its square root, proportional to the
# paper code's ``metric='l2'`` (the Euclidean norm), which gives the same schedule.
DISTANCES = ("l2", "rmse")


# --- the dynamic programme -------------------------------------------------------------------------------------------

def path_pairs(num_points: int, num_steps: int) -> np.ndarray:
  """[M, M] bool: the jumps ``i -> j`` that lie on some path ``0 -> M - 1`` of exactly ``num_steps`` jumps.

  Jump n (0-based) can leave i when i is reachable in n jumps (``i = 0`` for n = 0, else ``1 <= n <= i``) and can
  land on j when ``M - 1`` is reachable from j in the remaining ``N - n - 1`` jumps (``j = M - 1`` exactly when none
  remain, else ``1 <= N - n - 1 <= M - 1 - j``).
  """
  index = np.arange(num_points)
  mask = np.zeros((num_points, num_points), bool)
  for n in range(num_steps):
    leave = (index == 0) if n == 0 else (index >= n)
    remaining = num_steps - n - 1
    land = (index == num_points - 1) if remaining == 0 else (remaining <= num_points - 1 - index) & (index > 0)
    mask |= leave[:, None] & land[None, :]
  return mask & (index[:, None] < index[None, :])


def gits_schedule(cost: np.ndarray, num_steps: int, *, coeff: float = 1.0, history_cost: np.ndarray | None = None,
                  history: Any = None) -> tuple[np.ndarray, float]:
  """The path ``0 = p_0 < ... < p_N = M - 1`` with exactly ``num_steps`` jumps of least ``sum_n coeff^n C[p_n,
  p_{n+1}]`` (GITS, Algorithm 1), by dynamic programming in float64, O(N M^2) time and O(N M) memory.

  Args:
    cost: [M, M] jump costs, ``cost[i, j]`` for ``i < j`` (``jump_costs``); the diagonal and the lower triangle are
      ignored. Any float dtype; the programme runs in float64.
    num_steps: N, the number of jumps, ``1 <= N <= M - 1``.
    coeff: the weight ratio of consecutive jumps (jump n weighs ``coeff^n``): 1 for the plain total cost; the GITS
      code's default is 1.15 (later jumps weigh more). Finite and > 0.
    history_cost: None, or [M, M, M] ``C3[h, i, j]`` (``history_jump_costs``): the cost of jump i -> j when the
      path's previous point is h. Jump n then costs ``C3[p_{n-1}, p_n, p_{n+1}]`` where ``history[n]`` is True (the
      programme's state becomes the pair (previous point, point): O(N M^3) time, O(N M^2) memory) and
      ``C[p_n, p_{n+1}]`` elsewhere.
    history: [N] bool, which jumps use ``history_cost`` (``history_steps``); required with it. Jump 0 has no
      previous point and must be False.
  Returns:
    ``(indices, total)``: indices [N + 1] int64 into the fine grid, strictly increasing from 0 to M - 1; total, the
    weighted cost of that path (a Python float). Ties go to the smallest index at each step.
  Raises:
    TypeError: for a non-integer ``num_steps``.
    ValueError: for a cost that is not [M, M] with M >= 2, N outside 1..M-1, a non-finite or non-positive ``coeff``,
      a non-finite cost on a jump that some N-jump path uses (named ``cost[i, j]``), or a ``history_cost`` not
      [M, M, M], NaN where ``h < i < j``, or without a ``history`` of N flags with jump 0's False.
  """
  cost = np.asarray(cost, np.float64)
  if cost.ndim != 2 or cost.shape[0] != cost.shape[1] or cost.shape[0] < 2:
    raise ValueError(f"cost must be a square [M, M] matrix with M >= 2 grid points, got shape {cost.shape}")
  if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)):
    raise TypeError(f"num_steps must be an integer, got {num_steps!r}")
  num_points, num_steps = cost.shape[0], int(num_steps)
  if not 1 <= num_steps <= num_points - 1:
    raise ValueError(f"a path over {num_points} grid points has 1 to {num_points - 1} jumps; got num_steps={num_steps}")
  if not (math.isfinite(coeff) and coeff > 0):
    raise ValueError(f"coeff must be finite and > 0, got {coeff!r}")
  usable = path_pairs(num_points, num_steps)
  bad = np.argwhere(usable & ~np.isfinite(cost))
  if bad.size:
    i, j = (int(v) for v in bad[0])
    raise ValueError(f"cost[{i}, {j}] = {cost[i, j]} is not finite, but a path of {num_steps} jumps can use it "
                     f"({len(bad)} such entries)")
  masked = np.where(usable, cost, np.inf)
  if history_cost is not None:
    return _pair_schedule(masked, num_steps, coeff, history_cost, history)
  if history is not None:
    raise ValueError("history flags were given without a history_cost")
  best = np.full(num_points, np.inf)   # best[j]: least cost of reaching j in n jumps
  best[0] = 0.0
  came_from = np.zeros((num_steps, num_points), np.int64)
  for n in range(num_steps):
    total = best[:, None] + coeff ** n * masked    # [from, to]
    came_from[n] = np.argmin(total, axis=0)
    best = total[came_from[n], np.arange(num_points)]
  indices = [num_points - 1]
  for n in range(num_steps - 1, -1, -1):
    indices.append(int(came_from[n, indices[-1]]))
  return np.asarray(indices[::-1], np.int64), float(best[-1])


def _pair_schedule(masked: np.ndarray, num_steps: int, coeff: float, history_cost: Any,
                   history: Any) -> tuple[np.ndarray, float]:
  """``gits_schedule`` with history: the state after jump n is the pair (p_n, p_{n+1})."""
  num_points = masked.shape[0]
  history_cost = np.asarray(history_cost, np.float64)
  if history_cost.shape != (num_points,) * 3:
    raise ValueError(f"history_cost must be [M, M, M] = {(num_points,) * 3}, got shape {history_cost.shape}")
  if history is None or len(history) != num_steps or bool(history[0]):
    raise ValueError(f"history must hold {num_steps} flags (one per jump) with jump 0's False (it has no previous "
                     f"point), got {history!r}")
  h, i, j = np.ogrid[:num_points, :num_points, :num_points]
  ordered = (h < i) & (i < j)
  if np.isnan(history_cost[ordered]).any():
    raise ValueError("history_cost holds NaN where h < i < j")
  with_history = np.where(ordered & np.isfinite(history_cost), history_cost, np.inf)
  # best[h, i]: least cost of a path whose last two points are h and i; after jump 0, h = 0 only.
  best = np.full((num_points, num_points), np.inf)
  best[0] = masked[0]
  came_from = np.zeros((num_steps, num_points, num_points), np.int64)   # [n, i, j] -> h
  for n in range(1, num_steps):
    step = with_history if history[n] else masked[None, :, :]
    total = best[:, :, None] + coeff ** n * step        # [h, i, j]
    came_from[n] = np.argmin(total, axis=0)
    best = np.take_along_axis(total, came_from[n][None], axis=0)[0]
  last = num_points - 1
  previous = int(np.argmin(best[:, last]))
  total = float(best[previous, last])
  if not np.isfinite(total):
    raise ValueError(f"no path of {num_steps} jumps has a finite cost")
  indices = [last, previous]
  for n in range(num_steps - 1, 0, -1):
    indices.append(int(came_from[n, indices[-1], indices[-2]]))
  return np.asarray(indices[::-1], np.int64), total


# --- the jump costs --------------------------------------------------------------------------------------------------

def _first_step(solver: Any, evaluate: Callable[[int, jax.Array], jax.Array], x: jax.Array, grid: jax.Array,
                num_steps: int) -> jax.Array:
  """The solver's step 0 of ``num_steps`` from ``x`` at ``grid[0]`` to ``grid[1]`` (``Solver._step``: what
  ``solver.sample`` runs first), in the coefficient dtype, returned in ``x``'s dtype."""
  x_next, _, _ = solver._step(0, num_steps, evaluate, x, solver._init_carry(x), grid)
  return x_next.astype(x.dtype)


def _check_states(fine_sigmas: Any, states: Any, labels: Any, distance: str, batch_size: int):
  sigmas = np.asarray(validate_sigmas(fine_sigmas))
  states = jnp.asarray(states)
  num_points = sigmas.shape[0]
  if states.ndim < 2 or states.shape[0] != num_points:
    raise ValueError(f"states must be [M, K, *data_shape] with M = {num_points} (one per fine sigma), got shape "
                     f"{states.shape}")
  if not jnp.issubdtype(states.dtype, jnp.floating):
    raise TypeError(f"states must be floating, got dtype {states.dtype}")
  num_traj = states.shape[1]
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.shape != (num_traj,):
      raise ValueError(f"labels must be [K] = [{num_traj}] (one per trajectory), got shape {labels.shape}")
  if distance not in DISTANCES:
    raise ValueError(f"unknown distance {distance!r}; expected one of {list(DISTANCES)}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  return sigmas, states, labels


def _call(denoiser, x, sigma, label):
  return denoiser(x, sigma) if label is None else denoiser(x, sigma, label=label)


def denoised_states(denoiser: Callable[..., jax.Array], fine_sigmas: Any, states: Any, labels: Any = None, *,
                    batch_size: int = 2048) -> jax.Array:
  """``D(x_i, s_i)`` for every fine grid point but the last and every trajectory: [M - 1, K, *data_shape] in the
  states' dtype ((M - 1) K network evaluations in jitted chunks of ``batch_size``, the last padded so that one program
  serves them all). Arguments and errors as ``jump_costs``."""
  sigmas, states, labels = _check_states(fine_sigmas, states, labels, "rmse", batch_size)
  num_points, num_traj = sigmas.shape[0], states.shape[1]
  grid = jnp.asarray(sigmas, coefficient_dtype(states.dtype))
  rows = (num_points - 1) * num_traj
  flat = {"x": states[:-1].reshape((rows,) + states.shape[2:]), "sigma": jnp.repeat(grid[:-1], num_traj)}
  if labels is not None:
    flat["label"] = jnp.tile(labels, num_points - 1)
  chunk = min(batch_size, rows)
  denoise = jax.jit(lambda part: _call(denoiser, part["x"], part["sigma"], part.get("label")))
  outputs = []
  for start in range(0, rows, chunk):
    part = {k: v[start:start + chunk] for k, v in flat.items()}
    count = part["x"].shape[0]
    if count < chunk:
      part = {k: jnp.concatenate([v, jnp.repeat(v[-1:], chunk - count, axis=0)]) for k, v in part.items()}
    outputs.append(denoise(part)[:count])
  return jnp.concatenate(outputs).reshape(states[:-1].shape).astype(states.dtype)


def _distance(x: jax.Array, target: jax.Array, distance: str) -> jax.Array:
  """The mean over trajectories of the per-sample ``l2`` (mean squared error over data axes) or ``rmse``."""
  mse = jnp.mean(jnp.square(x - target), axis=tuple(range(1, x.ndim)))   # [K]
  return jnp.mean(mse if distance == "l2" else jnp.sqrt(mse))


def _chunked_pairs(fn: Callable[..., jax.Array], index: np.ndarray, size: int, *args) -> np.ndarray:
  """``fn(*args, *index.T)`` for the rows of ``index`` [P, k], in jitted, vmapped chunks of ``size`` (last padded)."""
  jumps = jax.jit(jax.vmap(fn, in_axes=(None,) * len(args) + (0,) * index.shape[1]))
  size = min(size, len(index))
  out = np.empty(len(index))
  for start in range(0, len(index), size):
    part = index[start:start + size]
    count = part.shape[0]
    if count < size:
      part = np.concatenate([part, np.repeat(part[-1:], size - count, axis=0)])
    values = jumps(*args, *(jnp.asarray(column) for column in part.T))
    out[start:start + count] = np.asarray(values)[:count]
  return out


def jump_costs(denoiser: Callable[..., jax.Array], solver: Any, fine_sigmas: Any, states: Any, labels: Any = None, *,
               distance: str = "rmse", batch_size: int = 2048, x0_hat: Any = None) -> np.ndarray:
  """``C[i, j]``: the mean over K trajectories of the distance between the solver's step from the teacher state at
  ``fine_sigmas[i]`` to ``fine_sigmas[j]`` and the teacher state there (GITS's cost matrix; see the module docstring
  for the step of Heun and of multistep solvers).

  The step's first call, ``D(x_i, s_i)``, is the same for every target j: it is made once per grid point and
  trajectory ((M - 1) K network evaluations, ``denoised_states``), so only solvers that evaluate at the target (Heun's
  interior steps) spend network evaluations per jump, (M - 1)(M - 2) K / 2 more. The jumps then run in jitted,
  vmapped chunks.

  Args:
    denoiser: ``D(x, sigma, temb=None)`` (``label=`` too when ``labels`` is given); ``sigma`` a scalar or per-sample
      [B] (``solvers.base.Denoiser``).
    solver: a ``Solver`` (``solvers.get_solver``).
    fine_sigmas: [M] strictly decreasing noise levels > 0, M >= 2.
    states: [M, K, *data_shape] floating, the teacher's states at ``fine_sigmas`` (``Reference.states``); the steps run
      in their dtype (coefficients in ``coefficient_dtype`` of it).
    labels: None, or [K] int class labels of the trajectories, passed to every denoiser call as ``label=``.
    distance: ``l2`` (per sample, the mean over data axes of the squared difference) or ``rmse`` (its square root);
      averaged over the K trajectories.
    batch_size: samples per jitted call, about: network evaluations are chunked to it, and jumps run
      ``max(1, batch_size // K)`` at a time.
    x0_hat: ``denoised_states(denoiser, fine_sigmas, states, labels)`` when already made (else made here).
  Returns:
    [M, M] float64: ``C[i, j]`` for ``i < j`` (in the state's units squared for ``l2``, in its units for ``rmse``),
    ``+inf`` on and below the diagonal.
  Raises:
    ValueError: for invalid ``fine_sigmas`` (``validate_sigmas``), ``states`` not [M, K, ...], labels not [K], an
      unknown ``distance``, ``batch_size < 1``, or a solver whose first call is not at its starting point.
    TypeError: for non-floating ``states``.
  """
  sigmas, states, labels = _check_states(fine_sigmas, states, labels, distance, batch_size)
  num_points, num_traj = sigmas.shape[0], states.shape[1]
  interior, final = solver._step_eval_offsets(0, 2), solver._step_eval_offsets(0, 1)
  if interior[0] != 0 or final[0] != 0:
    raise ValueError(f"solver {solver.name!r}: its first step's first network evaluation is not at its starting "
                     "point, so it cannot be shared between jumps")
  grid = jnp.asarray(sigmas, coefficient_dtype(states.dtype))
  if x0_hat is None:
    x0_hat = denoised_states(denoiser, sigmas, states, labels, batch_size=batch_size)

  # The jumps, vmapped over chunks of (i, j) pairs; the last jump (to s_{M-1}) and the others are two programs.
  def one_jump(states, x0_hat, grid, labels, i, j, last: bool):
    x_i, d_i = states[i], x0_hat[i]
    grid_ij = jnp.stack([grid[i], grid[j]] if last else [grid[i], grid[j], 0.5 * grid[j]])
    offsets = final if last else interior

    def evaluate(e, x_eval):
      if e == 0:
        return d_i   # the solver's first call, D(x_i, s_i): made by denoised_states
      return _call(denoiser, x_eval, grid_ij[offsets[e]], labels).astype(x_eval.dtype)
    x_next = _first_step(solver, evaluate, x_i, grid_ij, 1 if last else 2)
    return _distance(x_next, states[j], distance)

  per_call = max(1, batch_size // num_traj)
  cost = np.full((num_points, num_points), np.inf)
  for last in (False, True):
    if last:
      pairs = [(i, num_points - 1) for i in range(num_points - 1)]
    else:
      pairs = [(i, j) for i in range(num_points - 2) for j in range(i + 1, num_points - 1)]
    if pairs:
      index = np.asarray(pairs, np.int32)
      cost[index[:, 0], index[:, 1]] = _chunked_pairs(functools.partial(one_jump, last=last), index, per_call,
                                                      states, x0_hat, grid, labels)
  return cost


def history_steps(solver: Any, num_steps: int) -> tuple[bool, ...]:
  """[num_steps] bool: which steps of an N-step solve use the solver's history (a multistep solver's step of order
  >= 2, ``solver.step_order``); all False for a one-step solver (Euler, Heun)."""
  step_order = getattr(solver, "step_order", None)
  return tuple(bool(step_order is not None and step_order(n, num_steps) >= 2) for n in range(num_steps))


def history_jump_costs(solver: Any, fine_sigmas: Any, states: Any, x0_hat: Any, *, distance: str = "rmse",
                       batch_size: int = 2048) -> np.ndarray:
  """``C3[h, i, j]``: the multistep solver's second-order step from the teacher state at ``fine_sigmas[i]`` to
  ``fine_sigmas[j]`` with its history from the previous path point ``h`` (the solver's step 0 from the teacher state
  at h to i fills the history; its step 1 then runs from the teacher state at i), against the teacher state at j.

  This is the jump a multistep solver makes after its first step: ``jump_costs`` scores every jump as a first step
  (no history), so a dynamic programme over it serves a different solver than the one sampled. The history is one
  point deep (order 2; iPNDM's and DEIS's third and fourth orders are scored at order 2); no network evaluations
  beyond ``x0_hat``. (M choose 3) K steps in jitted, vmapped chunks.

  Args:
    solver: a multistep ``Solver`` with ``step_order`` (iPNDM, DPM-Solver++, DEIS, UniPC; UniPC's corrector then
      corrects the state at i from the one at h, as it would in a solve).
    fine_sigmas, states, distance, batch_size: as ``jump_costs``.
    x0_hat: [M - 1, K, *data_shape], ``denoised_states`` of the same states.
  Returns:
    [M, M, M] float64: ``C3[h, i, j]`` for ``h < i < j``, ``+inf`` elsewhere.
  Raises:
    ValueError: as ``jump_costs``; for a solver without ``step_order`` or one whose step 1 is not of order 2 on a
      4-point grid; for ``x0_hat`` not shaped like ``states[:-1]``.
  """
  sigmas, states, _ = _check_states(fine_sigmas, states, None, distance, batch_size)
  num_points, num_traj = sigmas.shape[0], states.shape[1]
  if getattr(solver, "step_order", None) is None or solver.step_order(1, 3) != 2:
    raise ValueError(f"solver {solver.name!r} has no second-order multistep step to score with history")
  x0_hat = jnp.asarray(x0_hat, states.dtype)
  if x0_hat.shape != states[:-1].shape:
    raise ValueError(f"x0_hat must be [M - 1, K, ...] = {states[:-1].shape}, got {x0_hat.shape}")
  grid = jnp.asarray(sigmas, coefficient_dtype(states.dtype))

  def one_jump(states, x0_hat, grid, h, i, j):
    # step 1 of 3 on [s_h, s_i, s_j, s_j / 2]: of order 2 (the fourth point keeps lower-order-final caps away)
    grid_hij = jnp.stack([grid[h], grid[i], grid[j], 0.5 * grid[j]])
    _, carry, _ = solver._step(0, 3, lambda e, x: x0_hat[h], states[h], solver._init_carry(states[h]), grid_hij)
    x_next, _, _ = solver._step(1, 3, lambda e, x: x0_hat[i], states[i], carry, grid_hij)
    return _distance(x_next.astype(states.dtype), states[j], distance)

  index = np.asarray([(h, i, j) for h in range(num_points - 2) for i in range(h + 1, num_points - 1)
                      for j in range(i + 1, num_points)], np.int32)
  cost = np.full((num_points,) * 3, np.inf)
  cost[index[:, 0], index[:, 1], index[:, 2]] = _chunked_pairs(one_jump, index, max(1, batch_size // num_traj),
                                                               states, x0_hat, grid)
  return cost


# --- the method on the harness ---------------------------------------------------------------------------------------

COSTS = ("first_step", "history")


@dataclasses.dataclass(frozen=True)
class GITSSettings:
  """GITS's settings. The paper's search is ``coeffs=(1.15,), costs=("first_step",)`` (the authors' code's
  ``--num_steps_tea=61 --schedule_type=polynomial --schedule_rho=7 --num_warmup=256 --coeff=1.15``, their ``l2``
  metric, our ``rmse``: the same schedule). The default searches more and selects: one DP path per (coeff, cost)
  pair, and the one whose full solve from the K warm-up noises ends nearest the teacher's (warm-up RMSE; never the
  evaluation noise) is the schedule. Why: on the shipped gmm teacher (iPNDM and DPM-Solver++(2M), NFE 3-5, held-out
  RMSE) the paper's search lost to EDM-rho at iPNDM NFE 5 (0.0628 vs 0.0473), no single coeff won in every cell, the
  warm-up RMSE ranked the paths as the held-out RMSE did, and the selected path beat EDM-rho in all six cells
  (README, "Schedules and MTEO on them, GMM").

  Attributes:
    fine_grid_size: M, the points of the fine grid (both endpoints included); at least N + 1.
    schedule, rho: the fine grid's schedule (``schedules.SCHEDULES``, not ``explicit``); ``rho`` for ``edm`` only.
    num_warmup: K, the warm-up trajectories: the first K training noises (the compare config refuses more than
      ``compare.num_train``; on a harness in Python, K is capped at its ``num_train``).
    distance: ``l2`` or ``rmse`` (``jump_costs``).
    coeffs: the weight ratios searched (``gits_schedule``'s ``coeff``: jump n of a path weighs ``coeff^n``; 1 = the
      least total cost); each finite and > 0, no repeats.
    costs: which jump costs the DP uses, one path per entry and coeff: ``first_step`` (GITS: every jump scored as the
      solver's first step, ``jump_costs``) and ``history`` (a multistep solver's jumps after its first scored with its
      history from the path's previous point, ``history_jump_costs``; for Euler and Heun it equals ``first_step``).
    batch_size: samples per jitted call of ``jump_costs`` and of the warm-up solves.
  """
  fine_grid_size: int = 61
  schedule: str = "edm"
  rho: float = 7.0
  num_warmup: int = 256
  distance: str = "rmse"
  coeffs: tuple[float, ...] = (1.0, 1.1, 1.15, 1.3)
  costs: tuple[str, ...] = ("first_step", "history")
  batch_size: int = 2048

  def __post_init__(self):
    for name, least in (("fine_grid_size", 2), ("num_warmup", 1), ("batch_size", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"gits.{name} must be an integer >= {least}, got {value!r}")
    if self.schedule == "explicit":
      raise ValueError("gits.schedule='explicit' has no fine grid to build; use edm, time_uniform or logsnr_uniform")
    SCHEDULES.get(self.schedule)   # KeyError listing the valid names
    if self.schedule == "edm" and not 0 < self.rho <= MAX_RHO:
      raise ValueError(f"gits.rho must be finite, > 0 and <= {MAX_RHO:g}, got {self.rho!r}")
    if self.distance not in DISTANCES:
      raise ValueError(f"unknown gits.distance {self.distance!r}; expected one of {list(DISTANCES)}")
    coeffs = tuple(self.coeffs) if isinstance(self.coeffs, (tuple, list)) else None
    if (not coeffs or len(set(coeffs)) != len(coeffs)
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c > 0
                   for c in coeffs)):
      raise ValueError(f"gits.coeffs must be a non-empty tuple of distinct finite numbers > 0, got {self.coeffs!r}")
    costs = tuple(self.costs) if isinstance(self.costs, (tuple, list)) else None
    if not costs or len(set(costs)) != len(costs) or not set(costs) <= set(COSTS):
      raise ValueError(f"gits.costs must be a non-empty tuple of distinct names from {list(COSTS)}, got "
                       f"{self.costs!r}")
    object.__setattr__(self, "coeffs", tuple(float(c) for c in coeffs))
    object.__setattr__(self, "costs", costs)

  def fine_grid(self, sigma_min: float, sigma_max: float) -> np.ndarray:
    """[fine_grid_size] float32, strictly decreasing from ``sigma_max`` to ``sigma_min`` (both exact)."""
    options = {"rho": self.rho} if self.schedule == "edm" else {}
    return np.asarray(get_schedule(self.schedule, self.fine_grid_size - 1, sigma_min, sigma_max, **options),
                      np.float32)


@METHODS.register("gits")
class GITS(Method):
  """Searches a schedule per cell (``jump_costs`` + ``gits_schedule``) and samples the cell's solver on it with the
  teacher's own denoiser. The artefact's payload is the schedule, [N + 1] float32 from ``sigma_max`` to
  ``sigma_min``; its ``path`` is the schedule file, ``WORKDIR/schedules/gits_<solver>_nfe<N>.json``."""

  name: ClassVar[str] = "gits"

  def __init__(self, settings: GITSSettings = GITSSettings()):
    self.settings = settings
    self._teachers: dict[str, Any] = {}   # schedule file -> the teacher it was searched on (for ``sampler``)

  def identity(self, harness: Harness, cell: Cell) -> dict:
    """What the schedule of ``cell`` depends on; a saved schedule is reused only when its identity equals this."""
    settings, solver = self.settings, cell.solver
    fine = settings.fine_grid(float(cell.sigmas[-1]), float(cell.sigmas[0]))
    identity = {"method": self.name, "teacher": harness.teacher.identity, "solver": cell.solver_name,
                "solver_options": {f.name: getattr(solver, f.name) for f in dataclasses.fields(solver)},
                "nfe": cell.nfe, "num_steps": solver.num_steps_for_nfe(cell.nfe),
                "fine_grid": [float(s) for s in fine], "fine_schedule": settings.schedule,
                "rho": settings.rho if settings.schedule == "edm" else None,
                "num_warmup": min(settings.num_warmup, harness.config.num_train), "distance": settings.distance,
                "coeffs": list(settings.coeffs), "costs": list(settings.costs), "noise_seed": harness.train_seed,
                "reference": dataclasses.asdict(harness.config.reference)}
    return json.loads(json.dumps(identity))   # as it reads back from the file (tuples become lists)

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    """The schedule for ``cell``: loaded from its file when one with the same identity exists, else searched.

    Raises:
      loop.ResumeMismatchError: the schedule file exists with another identity (teacher, solver, NFE, settings,
        noise); it is neither reused nor overwritten. files.UnreadableFileError: the schedule file cannot be read
        (the message says to delete it).
      ValueError: a fine grid with fewer than N + 1 points.
    """
    settings, teacher = self.settings, harness.teacher
    identity = self.identity(harness, cell)
    if identity["num_steps"] > settings.fine_grid_size - 1:
      raise ValueError(f"gits.fine_grid_size={settings.fine_grid_size} allows at most {settings.fine_grid_size - 1} "
                       f"steps; {cell.solver_name} at NFE {cell.nfe} needs {identity['num_steps']}")
    path = harness.workdir / "schedules" / f"gits_{cell.tag}.json"
    if path.exists():
      saved = files.read_json(path, "delete it to search again")
      if not {"identity", "sigmas", "candidates", "chosen", "search_seconds"} <= set(saved):
        raise files.UnreadableFileError(f"{path} cannot be read (not a GITS schedule record); delete it to search "
                                        "again")
      if saved.get("identity") != identity:
        raise loop.ResumeMismatchError(
            f"{path} holds a GITS schedule searched with other settings: "
            f"{loop.describe_differences(saved.get('identity') or {}, identity)}. Delete it to search again, or use "
            "another workdir.")
      record = saved
    else:
      record = self._search(harness, cell, identity)
      path.parent.mkdir(parents=True, exist_ok=True)
      write_json(path, record)
    sigmas = np.asarray(record["sigmas"], np.float32)
    self._teachers[str(path)] = teacher
    chosen = record["candidates"][record["chosen"]]
    return Artefact(self.name, cell, payload=sigmas, train_seconds=float(record["search_seconds"]), path=str(path),
                    curves={"schedule": {"sigmas": record["sigmas"]}, "fine_grid_size": len(identity["fine_grid"]),
                            "total_cost": chosen["total_cost"], "coeff": chosen["coeff"], "cost": chosen["cost"],
                            "warmup_rmse": chosen["warmup_rmse"]})

  def _search(self, harness: Harness, cell: Cell, identity: dict) -> dict:
    """Jump costs on the warm-up trajectories, one DP path per (coeff, cost), and the one whose full solve from the
    warm-up noise ends nearest the teacher's; the record saved to the schedule file."""
    settings, teacher = self.settings, harness.teacher
    num_warmup, num_steps = identity["num_warmup"], identity["num_steps"]
    fine = np.asarray(identity["fine_grid"], np.float32)
    x_T = harness.x_T_train[:num_warmup]
    labels = None if harness.label_train is None else harness.label_train[:num_warmup]
    start = time.perf_counter()
    reference = harness.reference(x_T, labels, harness.train_seed, fine)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    x0_hat = denoised_states(teacher.denoiser, fine, reference.states, labels, batch_size=settings.batch_size)
    cost = jump_costs(teacher.denoiser, cell.solver, fine, reference.states, labels, distance=settings.distance,
                      batch_size=settings.batch_size, x0_hat=x0_hat)
    history = history_steps(cell.solver, num_steps)
    history_cost = None
    if "history" in settings.costs and any(history):
      history_cost = history_jump_costs(cell.solver, fine, reference.states, x0_hat, distance=settings.distance,
                                        batch_size=settings.batch_size)
    solve = jax.jit(lambda x, label, sigmas: mteo.student_sample(cell.solver, teacher.backbone, teacher.params,
                                                                 teacher.precond, None, x, sigmas, label))
    candidates, by_path = [], {}
    for kind in settings.costs:
      for coeff in settings.coeffs:
        if kind == "history" and history_cost is not None:
          indices, total = gits_schedule(cost, num_steps, coeff=coeff, history_cost=history_cost, history=history)
        else:
          indices, total = gits_schedule(cost, num_steps, coeff=coeff)
        key = tuple(int(i) for i in indices)
        if key not in by_path:   # one warm-up solve per distinct path
          sigmas = jnp.asarray(fine[indices])
          final = batched(lambda x, label, sigmas=sigmas: solve(x, label, sigmas), settings.batch_size, x_T, labels)
          by_path[key] = float(metrics.rmse(final, reference.final))
        candidates.append({"cost": kind, "coeff": coeff, "indices": list(key), "total_cost": total,
                           "warmup_rmse": by_path[key]})
    chosen = min(range(len(candidates)), key=lambda c: candidates[c]["warmup_rmse"])   # ties: the first
    indices = candidates[chosen]["indices"]
    return {"identity": identity, "indices": indices, "sigmas": [float(s) for s in fine[indices]],
            "chosen": chosen, "candidates": candidates, "search_seconds": time.perf_counter() - start,
            "reference_seconds": reference_seconds,
            # C[i, j] for i < j, row i from j = i + 1 (the rest is +inf, which strict JSON cannot hold)
            "jump_costs": [cost[i, i + 1:].tolist() for i in range(fine.shape[0] - 1)]}

  def sampler(self, artefact: Artefact) -> Sampler:
    """The cell's solver on the searched schedule with the teacher's denoiser, jitted.

    Raises:
      ValueError: for an artefact this object did not fit (its teacher is unknown here).
    """
    teacher = self._teachers.get(artefact.path or "")
    if teacher is None:
      raise ValueError(f"GITS.sampler: no teacher known for the artefact at {artefact.path!r}; call fit first")
    cell, sigmas = artefact.cell, np.asarray(artefact.payload, np.float32)
    return jax.jit(lambda x_T, label: mteo.student_sample(cell.solver, teacher.backbone, teacher.params,
                                                          teacher.precond, None, x_T, sigmas, label))
