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

``GITS`` runs this on the harness: K warm-up noises are the first K training noises (their reference is solved once
on the fine grid and cached), the search takes seconds, and the schedule is saved to
``WORKDIR/schedules/gits_<solver>_nfe<N>.json`` and reused on a rerun with the same settings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import loop, mteo
from mteo_jax.diffusion import coefficient_dtype
from mteo_jax.harness import MAX_RHO, Artefact, Cell, Harness, Sampler
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


def gits_schedule(cost: np.ndarray, num_steps: int, *, coeff: float = 1.0) -> tuple[np.ndarray, float]:
  """The path ``0 = p_0 < ... < p_N = M - 1`` with exactly ``num_steps`` jumps of least ``sum_n coeff^n C[p_n,
  p_{n+1}]`` (GITS, Algorithm 1), by dynamic programming in float64, O(N M^2) time and O(N M) memory.

  Args:
    cost: [M, M] jump costs, ``cost[i, j]`` for ``i < j`` (``jump_costs``); the diagonal and the lower triangle are
      ignored. Any float dtype; the programme runs in float64.
    num_steps: N, the number of jumps, ``1 <= N <= M - 1``.
    coeff: the weight ratio of consecutive jumps (jump n weighs ``coeff^n``): 1 for the plain total cost; the GITS
      code's default is 1.15 (later jumps weigh more). Finite and > 0.
  Returns:
    ``(indices, total)``: indices [N + 1] int64 into the fine grid, strictly increasing from 0 to M - 1; total, the
    weighted cost of that path (a Python float). Ties go to the smallest index at each step.
  Raises:
    TypeError: for a non-integer ``num_steps``.
    ValueError: for a cost that is not [M, M] with M >= 2, N outside 1..M-1, a non-finite or non-positive ``coeff``,
      or a non-finite cost on a jump that some N-jump path uses (named ``cost[i, j]``).
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


# --- the jump costs --------------------------------------------------------------------------------------------------

def _first_step(solver: Any, evaluate: Callable[[int, jax.Array], jax.Array], x: jax.Array, grid: jax.Array,
                num_steps: int) -> jax.Array:
  """The solver's step 0 of ``num_steps`` from ``x`` at ``grid[0]`` to ``grid[1]`` (``Solver._step``: what
  ``solver.sample`` runs first), in the coefficient dtype, returned in ``x``'s dtype."""
  x_next, _, _ = solver._step(0, num_steps, evaluate, x, solver._init_carry(x), grid)
  return x_next.astype(x.dtype)


def jump_costs(denoiser: Callable[..., jax.Array], solver: Any, fine_sigmas: Any, states: Any, labels: Any = None, *,
               distance: str = "rmse", batch_size: int = 2048) -> np.ndarray:
  """``C[i, j]``: the mean over K trajectories of the distance between the solver's step from the teacher state at
  ``fine_sigmas[i]`` to ``fine_sigmas[j]`` and the teacher state there (GITS's cost matrix; see the module docstring
  for the step of Heun and of multistep solvers).

  The step's first call, ``D(x_i, s_i)``, is the same for every target j: it is made once per grid point and
  trajectory ((M - 1) K network evaluations), so only solvers that evaluate at the target (Heun's interior steps)
  spend network evaluations per jump, (M - 1)(M - 2) K / 2 more. The jumps then run in jitted, vmapped chunks.

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
  Returns:
    [M, M] float64: ``C[i, j]`` for ``i < j`` (in the state's units squared for ``l2``, in its units for ``rmse``),
    ``+inf`` on and below the diagonal.
  Raises:
    ValueError: for invalid ``fine_sigmas`` (``validate_sigmas``), ``states`` not [M, K, ...], labels not [K], an
      unknown ``distance``, ``batch_size < 1``, or a solver whose first call is not at its starting point.
    TypeError: for non-floating ``states``.
  """
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
  interior, final = solver._step_eval_offsets(0, 2), solver._step_eval_offsets(0, 1)
  if interior[0] != 0 or final[0] != 0:
    raise ValueError(f"solver {solver.name!r}: its first step's first network evaluation is not at its starting "
                     "point, so it cannot be shared between jumps")
  grid = jnp.asarray(sigmas, coefficient_dtype(states.dtype))

  def call(x, sigma, label):
    return denoiser(x, sigma) if label is None else denoiser(x, sigma, label=label)

  # 1. D(x_i, s_i) for every grid point but the last and every trajectory: rows with their own sigma, in chunks (the
  # last one padded, so that one program serves them all).
  rows = (num_points - 1) * num_traj
  flat = {"x": states[:-1].reshape((rows,) + states.shape[2:]), "sigma": jnp.repeat(grid[:-1], num_traj)}
  if labels is not None:
    flat["label"] = jnp.tile(labels, num_points - 1)
  chunk = min(batch_size, rows)
  denoise = jax.jit(lambda part: call(part["x"], part["sigma"], part.get("label")))
  outputs = []
  for start in range(0, rows, chunk):
    part = {k: v[start:start + chunk] for k, v in flat.items()}
    count = part["x"].shape[0]
    if count < chunk:
      part = {k: jnp.concatenate([v, jnp.repeat(v[-1:], chunk - count, axis=0)]) for k, v in part.items()}
    outputs.append(denoise(part)[:count])
  x0_hat = jnp.concatenate(outputs).reshape(states[:-1].shape).astype(states.dtype)

  # 2. The jumps, vmapped over a chunk of (i, j) pairs; the last jump (to s_{M-1}) and the others are two programs.
  def one_jump(states, x0_hat, grid, labels, i, j, last: bool):
    x_i, d_i = states[i], x0_hat[i]
    grid_ij = jnp.stack([grid[i], grid[j]] if last else [grid[i], grid[j], 0.5 * grid[j]])
    offsets = final if last else interior

    def evaluate(e, x_eval):
      if e == 0:
        return d_i   # the solver's first call, D(x_i, s_i): made in stage 1
      return call(x_eval, grid_ij[offsets[e]], labels).astype(x_eval.dtype)
    x_next = _first_step(solver, evaluate, x_i, grid_ij, 1 if last else 2)
    mse = jnp.mean(jnp.square(x_next - states[j]), axis=tuple(range(1, x_next.ndim)))   # [K]
    return jnp.mean(mse if distance == "l2" else jnp.sqrt(mse))

  per_call = max(1, batch_size // num_traj)
  cost = np.full((num_points, num_points), np.inf)
  for last in (False, True):
    if last:
      pairs = [(i, num_points - 1) for i in range(num_points - 1)]
    else:
      pairs = [(i, j) for i in range(num_points - 2) for j in range(i + 1, num_points - 1)]
    if not pairs:
      continue
    size = min(per_call, len(pairs))
    jumps = jax.jit(jax.vmap(functools.partial(one_jump, last=last), in_axes=(None, None, None, None, 0, 0)))
    index = np.asarray(pairs, np.int32)
    for start in range(0, len(pairs), size):
      part = index[start:start + size]
      count = part.shape[0]
      if count < size:
        part = np.concatenate([part, np.repeat(part[-1:], size - count, axis=0)])
      values = jumps(states, x0_hat, grid, labels, jnp.asarray(part[:, 0]), jnp.asarray(part[:, 1]))
      cost[part[:count, 0], part[:count, 1]] = np.asarray(values)[:count]
  return cost


# --- the method on the harness ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GITSSettings:
  """GITS's settings. Defaults: the authors' code's ``--num_steps_tea=61 --schedule_type=polynomial --schedule_rho=7
  --num_warmup=256 --coeff=1.15``; there ``--metric=dev`` by default, here their ``l2`` metric (our ``rmse``, the same
  schedule). Measured on the shipped gmm teacher (iPNDM and DPM-Solver++(2M) at NFE 3, 4, 5, held-out RMSE):
  ``coeff = 1.15`` beat the EDM schedule in 5 of the 6 cells, the plain least total cost (``coeff = 1``) in 3; ``rmse``
  matched or beat the squared ``l2`` in 4 of 6 at ``coeff = 1.15``; a 121-point fine grid changed little.

  Attributes:
    fine_grid_size: M, the points of the fine grid (both endpoints included); at least N + 1.
    schedule, rho: the fine grid's schedule (``schedules.SCHEDULES``, not ``explicit``); ``rho`` for ``edm`` only.
    num_warmup: K, the warm-up trajectories: the first K training noises (at most ``num_train``).
    distance: ``l2`` or ``rmse`` (``jump_costs``).
    coeff: jump n of the path weighs ``coeff^n`` (``gits_schedule``); 1 = the least total cost.
    batch_size: samples per jitted call of ``jump_costs``.
  """
  fine_grid_size: int = 61
  schedule: str = "edm"
  rho: float = 7.0
  num_warmup: int = 256
  distance: str = "rmse"
  coeff: float = 1.15
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
    if not (math.isfinite(self.coeff) and self.coeff > 0):
      raise ValueError(f"gits.coeff must be finite and > 0, got {self.coeff!r}")

  def fine_grid(self, sigma_min: float, sigma_max: float) -> np.ndarray:
    """[fine_grid_size] float32, strictly decreasing from ``sigma_max`` to ``sigma_min`` (both exact)."""
    options = {"rho": self.rho} if self.schedule == "edm" else {}
    return np.asarray(get_schedule(self.schedule, self.fine_grid_size - 1, sigma_min, sigma_max, **options),
                      np.float32)


def _write_json(path: Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=1))
  os.replace(tmp, path)


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
                "coeff": settings.coeff, "noise_seed": harness.train_seed,
                "reference": dataclasses.asdict(harness.config.reference)}
    return json.loads(json.dumps(identity))   # as it reads back from the file (tuples become lists)

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    """The schedule for ``cell``: loaded from its file when one with the same identity exists, else searched.

    Raises:
      loop.ResumeMismatchError: the schedule file exists with another identity (teacher, solver, NFE, settings,
        noise); it is neither reused nor overwritten.
      ValueError: a fine grid with fewer than N + 1 points.
    """
    settings, teacher = self.settings, harness.teacher
    identity = self.identity(harness, cell)
    if identity["num_steps"] > settings.fine_grid_size - 1:
      raise ValueError(f"gits.fine_grid_size={settings.fine_grid_size} allows at most {settings.fine_grid_size - 1} "
                       f"steps; {cell.solver_name} at NFE {cell.nfe} needs {identity['num_steps']}")
    path = harness.workdir / "schedules" / f"gits_{cell.tag}.json"
    if path.exists():
      saved = json.loads(path.read_text())
      if saved.get("identity") != identity:
        raise loop.ResumeMismatchError(
            f"{path} holds a GITS schedule searched with other settings: "
            f"{loop.describe_differences(saved.get('identity') or {}, identity)}. Delete it to search again, or use "
            "another workdir.")
      record = saved
    else:
      num_warmup, num_steps = identity["num_warmup"], identity["num_steps"]
      fine = np.asarray(identity["fine_grid"], np.float32)
      labels = None if harness.label_train is None else harness.label_train[:num_warmup]
      start = time.perf_counter()
      reference = harness.reference(harness.x_T_train[:num_warmup], labels, harness.train_seed, fine)
      reference_seconds = time.perf_counter() - start
      start = time.perf_counter()
      cost = jump_costs(teacher.denoiser, cell.solver, fine, reference.states, labels, distance=settings.distance,
                        batch_size=settings.batch_size)
      indices, total = gits_schedule(cost, num_steps, coeff=settings.coeff)
      search_seconds = time.perf_counter() - start
      record = {"identity": identity, "indices": indices.tolist(), "sigmas": [float(s) for s in fine[indices]],
                "total_cost": total, "search_seconds": search_seconds, "reference_seconds": reference_seconds,
                # C[i, j] for i < j, row i from j = i + 1 (the rest is +inf, which strict JSON cannot hold)
                "jump_costs": [cost[i, i + 1:].tolist() for i in range(fine.shape[0] - 1)]}
      _write_json(path, record)
    sigmas = np.asarray(record["sigmas"], np.float32)
    self._teachers[str(path)] = teacher
    return Artefact(self.name, cell, payload=sigmas, train_seconds=float(record["search_seconds"]), path=str(path),
                    curves={"schedule": {"sigmas": record["sigmas"]}, "fine_grid_size": len(identity["fine_grid"]),
                            "total_cost": record["total_cost"]})

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
