"""Reference trajectories of the teacher's probability-flow ODE (diffrax, adaptive, tight tolerance), cached on disk.

Every student is scored against these: the teacher's ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` is solved from the
noise ``x_T`` at ``sigma_start`` with an adaptive explicit Runge-Kutta method, and the states are saved at the student's
own noise levels, so that a few-step sampler can be matched at each of its steps and at the end (DESIGN §4).

We integrate in ``t = -log(sigma)`` (half the logSNR), where the ODE reads ``dx/dt = D(x, e^{-t}) - x``.
Why: in sigma the solution changes on the scale of sigma itself (for a Gaussian, ``x - mu`` is proportional to
``sqrt(s^2 + sigma^2)``), so a step length that suits sigma = 80 is four orders of magnitude too long at sigma = 0.002,
and the field's ``1/sigma`` factor amplifies every denoiser error near sigma_min. In ``t`` the field ``D - x`` is of the
size of the state at every noise level, the whole range 80 -> 0.002 is ~10.6 units long, and the solution varies on
an O(1) scale in ``t`` throughout, so the controller's steps stay in a narrow range (fewer evaluations and rejections
for the same tolerance; measured with Tsit5 on a 4-D Gaussian, 64 samples, rtol=atol=1e-5: 121 evaluations per sample
and max error 1.7e-5 in t, against 316 and 5.5e-5 in sigma). It is also the variable of DPM-Solver (lambda = t).

Each sample is solved as its own ODE (``jax.vmap`` over the batch), so every sample gets its own step sizes and
error control: a sample's reference does not depend on which other samples share its chunk (a test checks
batched == unbatched; equal up to rounding, as XLA may vectorise the same arithmetic differently for another chunk
size), and the tolerance holds per sample rather than for an RMS over the batch.

A denoiser that returns NaN or inf stops its samples' solves where it does, after a few rejected steps, and the call
raises ``NonFiniteDenoiserError`` naming the samples and the sigma (not ``max_steps`` later). The compiled solve is
kept per denoiser object, solver, tolerances and ``max_steps``, so later calls on other noise, labels or save grids of
the same shapes compile nothing. The disk cache is keyed by the content of the noise and labels, not their seeds.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mteo_jax import files, parallel
from mteo_jax.diffusion import Preconditioning, coefficient_dtype
from mteo_jax.hashing import canonical_json, hash_json, hash_pytree, to_jsonable
from mteo_jax.registry import Registry

# Bump when the meaning of a cached reference or of its key changes (integration variable, NFE accounting, file
# layout, what the key covers). 2: the key holds content hashes of x_T and of the labels, not only their seeds.
REFERENCE_FORMAT_VERSION = 2


REFERENCE_SOLVERS: Registry[type[diffrax.AbstractERK]] = Registry("reference solver")
REFERENCE_SOLVERS.register("tsit5")(diffrax.Tsit5)     # 7 stages, order 5(4)
REFERENCE_SOLVERS.register("dopri5")(diffrax.Dopri5)   # 7 stages, order 5(4)
REFERENCE_SOLVERS.register("dopri8")(diffrax.Dopri8)   # 14 stages, order 8(7)


def evals_per_step(method: diffrax.AbstractERK) -> int:
  """Vector-field evaluations per attempted (accepted or rejected) step of an explicit RK method.

  A first-same-as-last method reuses its last stage as the next step's first, so a step costs one evaluation less
  than its stage count; a solve costs one more evaluation at its start. (Checked against a call counter in
  tests/test_reference.py.)
  """
  tableau = method.tableau
  return len(tableau.c) + 1 - int(tableau.fsal)


class Reference(NamedTuple):
  """Reference states of the probability-flow ODE, as host (numpy) arrays.

  Attributes:
    states: [S, B, *data_shape], the solution at each of ``sigmas`` (``states[-1]`` is the reference sample).
    nfe: [B] int64, the denoiser evaluations each sample's adaptive solve used (per sample, not per chunk: every
      sample is its own ODE; the total work is ``nfe.sum()`` evaluations of one sample).
    sigmas: [S], the save noise levels, strictly decreasing.
  """
  states: np.ndarray
  nfe: np.ndarray
  sigmas: np.ndarray

  @property
  def final(self) -> np.ndarray:
    """[B, *data_shape]: the state at the last save sigma."""
    return self.states[-1]


def reference_noise(seed: int, num: int, data_shape: tuple[int, ...], sigma_max: float,
                    dtype: Any = jnp.float32) -> jax.Array:
  """``x_T = sigma_max * N(0, I)`` of shape [num, *data_shape] from ``jax.random.key(seed)``.

  Training and evaluation noise must come from different seeds (DESIGN §6); the seed and count are part of the key of
  every cached reference.
  """
  if num < 1:
    raise ValueError(f"reference_noise: num must be >= 1, got {num}")
  if not sigma_max > 0:
    raise ValueError(f"reference_noise: sigma_max must be positive, got {sigma_max}")
  return sigma_max * jax.random.normal(jax.random.key(seed), (num, *tuple(data_shape)), dtype)


def _check_save_sigmas(save_sigmas: Any, sigma_start: float | None, dtype: Any) -> tuple[np.ndarray, float]:
  sigmas = np.asarray(save_sigmas)
  if sigmas.ndim != 1 or sigmas.shape[0] < 1:
    raise ValueError(f"save_sigmas must be a 1-D array of at least one noise level, got shape {sigmas.shape}")
  sigmas = sigmas.astype(dtype)
  if not np.all(np.isfinite(sigmas)) or not np.all(sigmas > 0):
    raise ValueError(f"save_sigmas must be finite and > 0 (log-sigma integration cannot reach sigma = 0; the sample "
                     f"of a solver is its state at sigma_min), got {sigmas}")
  steps = np.diff(sigmas)
  if np.any(steps >= 0):
    first = int(np.argmax(steps >= 0))
    raise ValueError(f"save_sigmas must be strictly decreasing; sigmas[{first}]={sigmas[first]} is followed by "
                     f"sigmas[{first + 1}]={sigmas[first + 1]}")
  start = float(sigmas[0]) if sigma_start is None else float(np.asarray(sigma_start, dtype))
  if not (math.isfinite(start) and start >= float(sigmas[0])):
    raise ValueError(f"sigma_start (the noise level of x_T) must be finite and >= save_sigmas[0]={sigmas[0]}, "
                     f"got {sigma_start}")
  return sigmas, start


def union_sigmas(grids: Sequence[Any]) -> tuple[np.ndarray, list[np.ndarray]]:
  """One decreasing grid holding every grid of ``grids``, and where each grid's levels sit in it.

  The adaptive solve does not step to its save points (it interpolates between its own steps), so one solve saved at
  the union gives every grid's states: ``union_ref.states[index]`` for each returned ``index``. Grids of several
  student schedules (one per NFE) then share one reference solve instead of one each.

  Returns:
    ``(union [U], indices)``: ``union`` strictly decreasing, ``union[indices[k]] == grids[k]`` exactly.
  """
  if not grids:
    raise ValueError("union_sigmas needs at least one grid of noise levels")
  dtype = np.result_type(*(np.asarray(g) for g in grids))
  arrays = [_check_save_sigmas(g, None, dtype)[0] for g in grids]
  union = np.unique(np.concatenate(arrays))[::-1]
  ascending = union[::-1]
  indices = [len(union) - 1 - np.searchsorted(ascending, g) for g in arrays]
  return np.ascontiguousarray(union), indices


class ReferenceSolveError(RuntimeError):
  """The adaptive reference solve failed for some samples (``max_steps`` reached, or the step size underflowed).

  Attributes:
    indices: [n] int64, the global indices (into ``x_T``) of the failed samples, ascending. When ``x_T`` is solved in
      chunks (``batch_size``), the first failing chunk raises: later chunks are not solved.
    sigmas: [n] float64, the noise level each failed sample's solve had reached (its last accepted step).
    num_steps: [n] int64, the steps (accepted and rejected) each failed sample's solve took.
  """

  def __init__(self, message: str, indices: Any = (), sigmas: Any = (), num_steps: Any = ()):
    super().__init__(message)
    self.indices = np.asarray(indices, np.int64)
    self.sigmas = np.asarray(sigmas, np.float64)
    self.num_steps = np.asarray(num_steps, np.int64)


class NonFiniteDenoiserError(ReferenceSolveError, FloatingPointError):
  """The denoiser returned NaN or inf during a reference solve; the solve stopped where that happened.

  A ``ReferenceSolveError`` (so a ``RuntimeError``) and a ``FloatingPointError``. ``sigmas`` are the noise levels at
  which each failed sample's solve stopped: just above where its denoiser output became non-finite (within a few
  smallest steps, a relative ~3e-5 in sigma when the times are float32; the first sigma when it is non-finite there).
  The samples are found non-finite by evaluating the denoiser on the host at the stuck state and at the stages of
  steps of a few smallest step lengths from it.
  """


# The smallest step, in t = -log(sigma), as a number of float ulps of the larger |t| of the span: a step of a few ulps
# resolves nothing more, and the controller shrinks its step geometrically (5x per rejection after a non-finite
# value), so reaching it takes a few tens of steps. In float32 over sigma 80 -> 0.002 it is 5.9e-6 (~6e-7 of the
# span); steps of a legitimate solve at rtol = atol = 1e-5 are ~0.1, and steps across a jump J in the field need
# ~tol / J: far above it in float64 (dtmin ~1e-14 there), at the edge of what float32 resolves anyway.
_DTMIN_ULPS = 8


def _dtmin(t0: Any, t1: Any, dtype: Any) -> Any:
  """The smallest step of a solve over [t0, t1] in ``dtype`` (traced or numpy)."""
  return _DTMIN_ULPS * float(jnp.finfo(dtype).eps) * jnp.maximum(jnp.abs(t0), jnp.abs(t1))


class _FiniteStepPIDController(diffrax.PIDController):
  """``diffrax.PIDController`` that ends the solve (``RESULTS.dt_min_reached``) when its step underflows.

  A step whose candidate state is non-finite is rejected as one with infinite error (the next step is
  ``factormin`` = 0.2 times shorter); once a rejected step's retry would be shorter than ``stall_dt`` (or its length
  is NaN) the solve stops with ``dt_min_reached`` at the last accepted state. A non-finite first step (a NaN field at
  t0 makes diffrax's initial step NaN) becomes ``stall_dt``. Plain diffrax instead runs such a solve to
  ``max_steps``: it rejects a NaN error estimate, but an inf candidate or a NaN initial step gives NaN step sizes.

  Why not ``PIDController(dtmin=...)``: any op between diffrax's ``dt = prev_dt * factor`` and ``t + dt`` (its
  ``maximum(dt, dtmin)``) stops XLA from contracting them into one fused multiply-add, which moves step times by an
  ulp and legitimate solves by ~rtol. Here the step-size arithmetic is left alone; the additions are selects that are
  identities on finite steps and a comparison of the result, so legitimate solves are unchanged bit for bit.
  """
  stall_dt: Any = None

  def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
    tnext, state = super().init(terms, t0, t1, y0, dt0, args, func, error_order)
    return jnp.where(jnp.isfinite(tnext), tnext, t0 + self.stall_dt), state

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(y1_candidate)]))
    y1_candidate = jax.tree.map(lambda y1, y: jnp.where(finite, y1, y), y1_candidate, y0)
    y_error = jax.tree.map(lambda e: jnp.where(finite, e, jnp.inf), y_error)
    keep_step, next_t0, next_t1, made_jump, state, result = super().adapt_step_size(
        t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state)
    dt = next_t1 - next_t0
    stalled = (~keep_step & (dt < self.stall_dt)) | jnp.isnan(dt)
    result = diffrax.RESULTS.where(stalled, diffrax.RESULTS.dt_min_reached, result)
    return keep_step, next_t0, next_t1, made_jump, state, result


def _call_denoiser(denoiser: Callable[..., jax.Array], dtype: Any, x: jax.Array, t: jax.Array,
                   label: jax.Array | None) -> jax.Array:
  """``D(x, sigma = exp(-t))`` for one sample ``x`` [*data_shape] (called with a batch of one), with sigma and the
  output in ``dtype`` (x_T's: diffrax carries the state in the promotion of x_T's and the time's dtypes)."""
  sigma = jnp.exp(-t).astype(dtype)
  if label is None:
    return denoiser(x[None], sigma)[0].astype(dtype)
  return denoiser(x[None], sigma, label=label[None])[0].astype(dtype)


def _build_solve(denoiser: Callable[..., jax.Array], solver: str, rtol: float, atol: float,
                 max_steps: int) -> Callable[..., tuple]:
  method = REFERENCE_SOLVERS.get(solver)()

  def solve_one(x, label, t0, ts):
    t1 = ts[-1]

    def vector_field(t, y, label):
      return _call_denoiser(denoiser, x.dtype, y, t, label) - y          # dx/dt with t = -log(sigma)

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), method, t0=t0, t1=t1, dt0=None, y0=x, args=label,
        # the states at ts, and the last state reached (where a failed solve stopped)
        saveat=diffrax.SaveAt(subs=[diffrax.SubSaveAt(ts=ts), diffrax.SubSaveAt(t1=True)]),
        stepsize_controller=_FiniteStepPIDController(
            rtol=rtol, atol=atol, stall_dt=_dtmin(t0, t1, jnp.promote_types(t0.dtype, ts.dtype))),
        max_steps=max_steps, throw=False,
        # References are targets, never differentiated: a plain while loop (no checkpointing scaffolding for
        # reverse-mode AD) gives the same numbers and traces faster.
        adjoint=diffrax.ForwardMode())
    ys, y_end = solution.ys
    t_end = solution.ts[1][0]
    stalled = solution.result == diffrax.RESULTS.dt_min_reached
    ok = solution.result == diffrax.RESULTS.successful
    out_of_steps = solution.result == diffrax.RESULTS.max_steps_reached
    return ys, solution.stats["num_steps"], ok, out_of_steps, stalled, t_end, y_end[0]

  return jax.jit(jax.vmap(solve_one, in_axes=(0, 0, None, None)))


# A compiled solve per (denoiser, solver, rtol, atol, max_steps): the jitted function keeps its executables per input
# shape, dtype, labels or not and x64 mode, and takes the times as arguments, so another call with the same denoiser
# object (a bound method ``g.denoise`` equals the next ``g.denoise``) and shapes compiles nothing, whatever its x_T,
# labels or save sigmas (of the same count). The entries keep their denoisers (and what those hold) alive: bounded.
_cached_build_solve = functools.lru_cache(maxsize=8)(_build_solve)


def _solve_fn(denoiser: Callable[..., jax.Array], solver: str, rtol: float, atol: float,
              max_steps: int) -> Callable[..., tuple]:
  try:
    hash(denoiser)
  except TypeError:   # an unhashable callable (e.g. an instance of an eq-dataclass with __call__): compiled per call
    return _build_solve(denoiser, solver, rtol, atol, max_steps)
  return _cached_build_solve(denoiser, solver, rtol, atol, max_steps)


def reference_trajectories(denoiser: Callable[..., jax.Array], x_T: jax.Array, save_sigmas: Any, *,
                           sigma_start: float | None = None, solver: str = "tsit5", rtol: float = 1e-5,
                           atol: float = 1e-5, max_steps: int = 16384, batch_size: int | None = None,
                           labels: jax.Array | None = None, progress: bool = True) -> Reference:
  """Solves ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``x_T`` at ``sigma_start`` and saves it at ``save_sigmas``.

  The solve is compiled once per denoiser object, solver, tolerances, ``max_steps`` and input shapes/dtypes, and
  reused by later calls (another ``x_T``, ``labels`` or save grid of the same length compiles nothing). So the
  denoiser must be a pure function of its arguments: what it reads from elsewhere is frozen at its first trace.

  Args:
    denoiser: ``D(x [b, *data_shape], sigma) -> x0_hat``, e.g. ``make_denoiser(...)`` or ``Gaussian(...).denoise``;
      ``sigma`` is a scalar of the solve's dtype, ``b`` is 1 (each sample is its own ODE, vmapped). With ``labels``,
      it is called as ``denoiser(x, sigma, label=label [b])`` (``make_denoiser``'s denoiser takes ``label=``), and
      ``denoiser.check_label(labels, B)``, when the denoiser has it, checks the labels on the host first.
    x_T: [B, *data_shape], finite floating, the noise at ``sigma_start``. The solve runs in its dtype, or in float32
      for a bfloat16 or float16 ``x_T`` (``coefficient_dtype``: a low-precision state cannot meet rtol ~1e-5).
    save_sigmas: [S] strictly decreasing, > 0, the noise levels at which states are saved.
    sigma_start: the noise level of ``x_T`` (default ``save_sigmas[0]``, whose state is then ``x_T`` itself).
    solver: ``tsit5``, ``dopri5`` or ``dopri8`` (``REFERENCE_SOLVERS``).
    rtol, atol: tolerances of diffrax's ``PIDController``, per sample.
    max_steps: the most steps (accepted and rejected) one sample may take; reaching it is an error.
    batch_size: samples per jitted call (default: all at once); the last chunk is padded so that it compiles once.
    labels: optional per-sample class labels [B], chunked with ``x_T`` and passed to the denoiser.
    progress: show a tqdm bar over samples (rate and ETA).

  Returns:
    A ``Reference``: states [S, B, *data_shape] in the solve's dtype (``coefficient_dtype(x_T.dtype)``), nfe [B]
    int64, sigmas [S] (``save_sigmas`` in that dtype).

  Raises:
    TypeError: ``labels`` that are not integers.
    ValueError: bad ``x_T`` (not floating [B, ...], or not finite), ``labels`` (shape; values out of the denoiser's
      range, or negative), ``save_sigmas``, ``sigma_start``,
      tolerances, ``max_steps`` or ``batch_size``. KeyError: an unknown ``solver``.
    NonFiniteDenoiserError: the denoiser returned NaN or inf for some samples (the solve stops at the first such
      evaluation, after a few rejected steps, not at ``max_steps``); it names the samples and the sigma.
    ReferenceSolveError: ``max_steps`` reached, or the step size fell below the float resolution of the time (a
      finite field too stiff or discontinuous for ``rtol``/``atol`` in this dtype). Both are ``RuntimeError``s.
  """
  REFERENCE_SOLVERS.get(solver)
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 2 or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a floating array of shape [batch, *data_shape], got {x_T.dtype}{list(x_T.shape)}")
  # A reference is a target at rtol ~1e-5: a bfloat16 or float16 state cannot hold it (its step control stalls), so
  # the solve runs in float32 or wider (``coefficient_dtype``) and so do the returned states.
  x_T = x_T.astype(coefficient_dtype(x_T.dtype))
  num = x_T.shape[0]
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.shape != (num,):
      raise ValueError(f"labels must have shape ({num},) (one per sample of x_T), got {labels.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise TypeError(f"labels must be integer class labels, got dtype {labels.dtype}")
    # Inside the solve the labels are traced and their values cannot be checked: check them here, with the
    # denoiser's own check when it has one (make_denoiser's names the valid range), else for negative values.
    check_label = getattr(denoiser, "check_label", None)
    if callable(check_label):
      check_label(labels, num)
    elif np.any(np.asarray(labels) < 0):
      raise ValueError(f"labels must be >= 0, but labels[{int(np.argmax(np.asarray(labels) < 0))}] < 0")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
  if max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  batch_size = num if batch_size is None else int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = min(batch_size, num)
  # Data-parallel over this process's devices: each chunk is split over the mesh (padded to a multiple of its size).
  mesh = parallel.local_mesh()
  batch_size = -(-batch_size // mesh.size) * mesh.size
  sharding = parallel.data_sharding(mesh) if mesh.size > 1 else None
  sigmas, start = _check_save_sigmas(save_sigmas, sigma_start, x_T.dtype)
  finite = np.isfinite(np.asarray(x_T)).reshape(num, -1).all(axis=1)
  if not finite.all():
    raise ValueError(f"x_T must be finite; samples {np.flatnonzero(~finite)[:8].tolist()} are not")

  if start == float(sigmas[-1]):  # a single save sigma at the start: nothing to integrate
    return Reference(np.asarray(x_T)[None], np.zeros((num,), np.int64), sigmas)

  dtype = x_T.dtype
  t_start = -np.log(np.asarray(start, dtype))
  ts = -np.log(sigmas)
  # float rounding of log must not push a save time outside [t0, t1]
  ts = np.clip(ts, t_start, ts[-1])
  times = (jnp.asarray(t_start), jnp.asarray(ts))   # their own dtypes (ts of bfloat16 sigmas is float32, say)
  rtol, atol, max_steps = float(rtol), float(atol), int(max_steps)
  solve_chunk = _solve_fn(denoiser, solver, rtol, atol, max_steps)
  evals = evals_per_step(REFERENCE_SOLVERS.get(solver)())

  states, num_steps = [], []
  with tqdm.tqdm(total=num, unit="sample", desc=f"reference ({solver})", disable=not progress,
                 dynamic_ncols=True) as bar:
    for begin in range(0, num, batch_size):
      end = min(begin + batch_size, num)
      pad = batch_size - (end - begin)
      x_chunk = _pad_rows(x_T[begin:end], pad)
      label_chunk = None if labels is None else _pad_rows(labels[begin:end], pad)
      if sharding is not None:
        x_chunk = jax.device_put(x_chunk, sharding)
        label_chunk = None if label_chunk is None else jax.device_put(label_chunk, sharding)
      out = jax.device_get(solve_chunk(x_chunk, label_chunk, *times))
      ys, steps, ok, out_of_steps, stalled, t_end, y_end = (a[:end - begin] for a in out)
      if not np.all(ok):
        _raise_failure(denoiser, solver, rtol, atol, max_steps, dtype, begin, ok, out_of_steps, stalled, steps,
                       t_end, y_end, None if labels is None else labels[begin:end], times)
      states.append(ys)
      num_steps.append(steps)
      bar.update(end - begin)
      bar.set_postfix(nfe=f"{float(np.mean(steps)) * evals + 1:.0f}")
  states = np.ascontiguousarray(np.moveaxis(np.concatenate(states), 0, 1))   # [B, S, ...] -> [S, B, ...]
  if start == float(sigmas[0]):
    states[0] = np.asarray(x_T)  # the state at the start is x_T by definition; make it so bit for bit
  nfe = np.concatenate(num_steps).astype(np.int64) * evals + 1
  return Reference(states, nfe, sigmas)


def _nonfinite_nearby(denoiser: Callable[..., jax.Array], solver: str, dtype: Any, x: np.ndarray, t: np.ndarray,
                      labels: jax.Array | None, dtmin: float) -> np.ndarray:
  """[n] bool: does the denoiser return a non-finite value at ``(x[i], exp(-t[i]))`` or at a stage of a step of
  ``solver`` from there of length 1, 2, 5, 10 or 100 x ``dtmin``? (A solve that stopped at ``(t, x)`` with its step
  size below ``dtmin`` last tried a step of length in [dtmin, 5 dtmin).) ``dtype``: x_T's, as in the solve."""
  evaluate = jax.jit(jax.vmap(functools.partial(_call_denoiser, denoiser, dtype)))
  tableau = REFERENCE_SOLVERS.get(solver)().tableau
  x, t = np.asarray(x), np.asarray(t)
  axes = tuple(range(1, x.ndim))
  with np.errstate(all="ignore"):        # samples already found non-finite carry NaNs through the stages

    def field(time, y):
      d = np.asarray(evaluate(jnp.asarray(y, x.dtype), jnp.asarray(time, t.dtype), labels))
      return ~np.isfinite(d).all(axis=axes), d.astype(x.dtype) - y

    bad, k0 = field(t, x)
    for multiple in (1, 2, 5, 10, 100):
      h = multiple * dtmin
      ks = [k0]
      for c, a in zip(tableau.c, tableau.a_lower):
        y = x + sum(float(h * a_j) * k_j for a_j, k_j in zip(a, ks))
        stage_bad, k = field(t + np.asarray(c * h, t.dtype), y.astype(x.dtype))
        bad |= stage_bad
        ks.append(k)
  return bad


def _raise_failure(denoiser, solver, rtol, atol, max_steps, dtype, begin, ok, out_of_steps, stalled, steps, t_end,
                   y_end, labels, times) -> None:
  """Raises the error for the failed samples (``~ok``) of the chunk that starts at sample ``begin``."""

  def details(mask):
    idx = np.flatnonzero(mask)
    sigma = np.exp(-np.asarray(t_end[idx], np.float64))
    where = f"at sigma ≈ {sigma[0]:.6g}"
    if idx.size > 1 and sigma.min() != sigma.max():
      where += f" (sample {idx[0] + begin}; sigma {sigma.min():.6g} to {sigma.max():.6g} over these samples)"
    head = f"{idx.size} sample(s), first indices {(idx[:8] + begin).tolist()}"
    return head, where, dict(indices=idx + begin, sigmas=sigma, num_steps=steps[idx])

  t0, ts = (np.asarray(a) for a in times)
  dtmin = float(_dtmin(float(t0), float(ts[-1]), jnp.promote_types(t0.dtype, ts.dtype)))
  nonfinite = np.zeros_like(stalled)
  if np.any(stalled):
    stuck = np.flatnonzero(stalled)
    nonfinite[stuck] = _nonfinite_nearby(denoiser, solver, dtype, y_end[stuck], t_end[stuck],
                                         None if labels is None else labels[stuck], dtmin)
  if np.any(nonfinite):
    head, where, info = details(nonfinite)
    others = int(np.sum(~ok & ~nonfinite))
    raise NonFiniteDenoiserError(
        f"reference solve stopped: the denoiser returned non-finite values (nan/inf) for {head}, {where}; "
        f"check the denoiser (and its parameters) there"
        + (f" ({others} other sample(s) of samples {begin}..{begin + ok.size - 1} failed otherwise)" if others else ""),
        **info)
  if np.any(stalled):
    head, where, info = details(stalled)
    raise ReferenceSolveError(
        f"reference solve failed for {head}: the step size fell below dtmin={dtmin:.3g} (in log-sigma) {where}, "
        f"with finite denoiser values there: the field is too stiff or discontinuous for rtol={rtol}, atol={atol} "
        f"in {np.dtype(dtype).name}; loosen rtol/atol or solve in float64", **info)
  if np.any(out_of_steps):
    head, where, info = details(out_of_steps)
    raise ReferenceSolveError(f"reference solve failed for {head}: max_steps={max_steps} reached ({where}); raise "
                              f"max_steps or loosen rtol/atol", **info)
  head, where, info = details(~ok)
  raise ReferenceSolveError(f"reference solve failed for {head}: the solver stopped {where}", **info)


def _pad_rows(x: jax.Array, pad: int) -> jax.Array:
  """Appends ``pad`` copies of the last row (real data, so the padding cannot produce NaNs); dropped afterwards."""
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])


# --- cache keys -------------------------------------------------------------------------------------------------------

def reference_key(teacher_hash: str, precond: Preconditioning | None, noise_seed: int, num: int,
                  data_shape: tuple[int, ...], save_sigmas: Any, solver: str, rtol: float, atol: float,
                  extra: dict | None = None, *, x_T: Any, sigma_start: float | None = None, noise_dtype: Any = None,
                  labels: Any = None, label_seed: int | None = None) -> dict:
  """The key parts that identify a reference: teacher, noise (its content), labels (their content), save sigmas
  (exact bytes), solver and tolerances.

  The noise and the labels are keyed by a hash of their bytes, dtype and shape (``hash_pytree``), not by the seeds
  they were drawn from: the same seed gives other noise under another PRNG implementation, JAX version or
  ``jax_threefry_partitionable`` setting, and a cached reference of other noise must not be served for it.

  Args:
    teacher_hash: e.g. ``teachers.Teacher.identity`` (``teachers.teacher_identity(backbone, params, precond)``), or
      ``hash_json(teacher)`` for a closed-form teacher.
    precond: the teacher's preconditioning (None for a closed-form teacher).
    noise_seed: the seed ``x_T`` was drawn from (kept in the key for the readable ``.json``).
    num, data_shape: ``x_T``'s shape is ``(num, *data_shape)``.
    save_sigmas: [S] floating, the save noise levels.
    solver, rtol, atol: as given to ``reference_trajectories``.
    extra: anything else that changes the result (a JSON-able dict).
    x_T: [num, *data_shape] floating (numpy or jax), the noise itself (required).
    sigma_start: the noise level of ``x_T`` (default ``save_sigmas[0]``).
    noise_dtype: the dtype of ``x_T`` and of the solve; default ``x_T``'s, and if given it must be ``x_T``'s.
    labels: [num] integer, a conditional teacher's class labels (None: unconditional).
    label_seed: the seed the labels were drawn from (readable only; needs ``labels``).

  Raises:
    TypeError: ``teacher_hash`` is not a non-empty string. KeyError: an unknown solver. ValueError: ``save_sigmas``
      not a 1-D floating array; ``x_T`` not of shape ``(num, *data_shape)``, not floating, or not of ``noise_dtype``;
      ``labels`` not of shape ``(num,)``; ``label_seed`` without ``labels``.
  """
  if not isinstance(teacher_hash, str) or not teacher_hash:
    raise TypeError(f"teacher_hash must be a non-empty string (e.g. Teacher.identity), "
                    f"got {teacher_hash!r}")
  REFERENCE_SOLVERS.get(solver)
  sigmas = np.asarray(save_sigmas)
  if sigmas.ndim != 1 or sigmas.shape[0] < 1 or not np.issubdtype(sigmas.dtype, np.floating):
    raise ValueError(f"save_sigmas must be a 1-D floating array, got {sigmas.dtype}{list(sigmas.shape)}")
  sigmas = np.ascontiguousarray(sigmas)
  shape = (int(num), *(int(d) for d in data_shape))
  noise = np.asarray(x_T)
  if noise.shape != shape or not jnp.issubdtype(noise.dtype, jnp.floating):
    raise ValueError(f"x_T must be a floating array of shape (num, *data_shape) = {shape}, got "
                     f"{noise.dtype}{list(noise.shape)}")
  if noise_dtype is not None and np.dtype(noise_dtype) != noise.dtype:
    raise ValueError(f"noise_dtype={np.dtype(noise_dtype).name} but x_T is {noise.dtype.name}")
  if label_seed is not None and labels is None:
    raise ValueError("label_seed without labels: the key holds the labels themselves; pass labels=")
  key = {
      "format": REFERENCE_FORMAT_VERSION,
      "teacher": teacher_hash,
      "precond": to_jsonable(precond),
      "noise": {"seed": int(noise_seed), "num": shape[0], "data_shape": list(shape[1:]),
                "dtype": noise.dtype.name, "sha256": hash_pytree(noise),
                "sigma_start": float(sigmas[0] if sigma_start is None else sigma_start)},
      "save_sigmas": {"dtype": sigmas.dtype.name, "values": [float(s) for s in sigmas],
                      "bytes": sigmas.astype(sigmas.dtype.newbyteorder("<")).tobytes().hex()},
      "solver": {"name": solver, "rtol": float(rtol), "atol": float(atol)},
      "extra": to_jsonable(extra if extra is not None else {}),
  }
  if labels is not None:
    label_array = np.asarray(labels)
    if label_array.shape != (shape[0],):
      raise ValueError(f"labels must have shape ({shape[0]},) (one per sample of x_T), got {label_array.shape}")
    key["labels"] = {"seed": None if label_seed is None else int(label_seed), "dtype": label_array.dtype.name,
                     "sha256": hash_pytree(label_array)}
  return key


# --- the cache --------------------------------------------------------------------------------------------------------

class CacheError(files.UnreadableFileError, RuntimeError):
  """A cached file exists but cannot be used (corrupt, truncated, or holding another key); the message says to delete
  it."""


class ReferenceCache:
  """Directory of ``reference-<sha256 of key parts>.npz`` files, each with a readable ``.json`` of its key parts.

  A file that fails to load is an error naming it (delete it to recompute): a silent recompute would hide a
  disk or concurrency problem and could quietly change what a reported number was measured against. Writes go to a
  temporary file in the same directory and are renamed into place, so an interrupted run leaves no half file.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = Path(directory)
    self.directory.mkdir(parents=True, exist_ok=True)

  def path(self, key_parts: dict) -> Path:
    return self.directory / f"reference-{hash_json(key_parts)}.npz"

  def load(self, key_parts: dict) -> Reference | None:
    """The cached reference for ``key_parts``, or None if there is none; a file that cannot be read raises."""
    path = self.path(key_parts)
    if not path.exists():
      return None
    try:
      with np.load(path, allow_pickle=False) as data:
        stored_key = str(data["key"])
        reference = Reference(np.array(data["states"]), np.array(data["nfe"]), np.array(data["sigmas"]))
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError, ...
      raise CacheError(f"cached reference {path} cannot be loaded ({files.reason(e)}); delete it to recompute") from e
    if stored_key != canonical_json(key_parts):
      raise CacheError(f"cached reference {path} holds a different key than its name says; delete it to recompute")
    try:
      _check_reference(reference, f"cached reference {path}", CacheError)
    except CacheError as error:
      raise CacheError(f"{error}; delete it to recompute") from None
    return reference

  def save(self, key_parts: dict, reference: Reference) -> Path:
    """Writes ``reference`` (and its key parts as JSON) atomically; returns the ``.npz`` path."""
    path = self.path(key_parts)
    info = {"key": to_jsonable(key_parts), "file": path.name,
            "states_shape": list(reference.states.shape), "dtype": reference.states.dtype.name,
            "nfe_mean": float(np.mean(reference.nfe)), "nfe_max": int(np.max(reference.nfe)),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    # The JSON goes first: the .npz is what marks the entry complete.
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(info, indent=2, sort_keys=True).encode()))
    _atomic_write(path, lambda f: np.savez(f, states=reference.states, nfe=reference.nfe, sigmas=reference.sigmas,
                                           key=np.asarray(canonical_json(key_parts))))
    return path

  def get_or_compute(self, key_parts: dict, compute_fn: Callable[[], Reference]) -> Reference:
    """Loads the reference for ``key_parts``, or calls ``compute_fn()``, stores its result and returns it."""
    cached = self.load(key_parts)
    if cached is not None:
      return cached
    computed = compute_fn()
    if not isinstance(computed, Reference):
      raise TypeError(f"compute_fn must return a Reference, got {type(computed).__name__}")
    reference = Reference(np.asarray(computed.states), np.asarray(computed.nfe), np.asarray(computed.sigmas))
    _check_reference(reference, "compute_fn's result", ValueError)
    self.save(key_parts, reference)
    return reference


def _check_reference(reference: Reference, what: str, error: type[Exception]) -> None:
  states, nfe, sigmas = reference
  if sigmas.ndim != 1 or states.ndim < 3 or states.shape[0] != sigmas.shape[0] or nfe.shape != states.shape[1:2]:
    raise error(f"{what}: expected states [S, B, ...], nfe [B], sigmas [S]; got states {states.shape}, "
                f"nfe {nfe.shape}, sigmas {sigmas.shape}")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def seeded_reference(denoiser: Callable[..., jax.Array], *, teacher_hash: str, precond: Preconditioning | None,
                     noise_seed: int, num: int, data_shape: tuple[int, ...], save_sigmas: Any,
                     sigma_max: float | None = None, dtype: Any = jnp.float32, solver: str = "tsit5",
                     rtol: float = 1e-5, atol: float = 1e-5, extra: dict | None = None,
                     labels: jax.Array | None = None, label_seed: int | None = None,
                     cache: ReferenceCache | None = None, batch_size: int | None = None,
                     progress: bool = True) -> tuple[jax.Array, Reference]:
  """``(x_T, reference)`` for the noise ``x_T = reference_noise(noise_seed, num, data_shape, sigma_max, dtype)``,
  from ``cache`` when it holds a reference of this very ``x_T`` (and ``labels``; the key holds their content hashes,
  so noise that the same seed draws differently, e.g. under another PRNG implementation, is a miss).

  ``sigma_max`` defaults to ``save_sigmas[0]``; ``labels`` [num] and their ``label_seed`` go together (the seed is
  recorded in the key's JSON). Returns ``x_T`` [num, *data_shape] of ``dtype`` and the ``Reference``; raises what
  ``reference_trajectories`` and ``reference_key`` raise.
  """
  if (labels is None) != (label_seed is None):
    raise ValueError("labels and label_seed go together: the seed names the labels in the cache key")
  sigma_max = float(np.asarray(save_sigmas)[0]) if sigma_max is None else float(sigma_max)
  x_T = reference_noise(noise_seed, num, data_shape, sigma_max, dtype)

  def compute() -> Reference:
    return reference_trajectories(denoiser, x_T, save_sigmas, sigma_start=sigma_max, solver=solver, rtol=rtol,
                                  atol=atol, batch_size=batch_size, labels=labels, progress=progress)

  if cache is None:
    return x_T, compute()
  key = reference_key(teacher_hash, precond, noise_seed, num, data_shape, save_sigmas, solver, rtol, atol, extra,
                      x_T=x_T, sigma_start=sigma_max, labels=labels, label_seed=label_seed)
  return x_T, cache.get_or_compute(key, compute)
