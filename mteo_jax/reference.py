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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
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

from mteo_jax.diffusion import Preconditioning
from mteo_jax.hashing import canonical_json, hash_json, hash_pytree, to_jsonable
from mteo_jax.registry import Registry

# Bump when the meaning of a cached reference changes (integration variable, NFE accounting, file layout).
REFERENCE_FORMAT_VERSION = 1


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


def reference_trajectories(denoiser: Callable[..., jax.Array], x_T: jax.Array, save_sigmas: Any, *,
                           sigma_start: float | None = None, solver: str = "tsit5", rtol: float = 1e-5,
                           atol: float = 1e-5, max_steps: int = 16384, batch_size: int | None = None,
                           labels: jax.Array | None = None, progress: bool = True) -> Reference:
  """Solves ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``x_T`` at ``sigma_start`` and saves it at ``save_sigmas``.

  Args:
    denoiser: ``D(x [b, *data_shape], sigma) -> x0_hat``, e.g. ``make_denoiser(...)`` or ``Gaussian(...).denoise``.
      With ``labels``, it is called as ``denoiser(x, sigma, label=label [b])``.
    x_T: [B, *data_shape], the noise at ``sigma_start``; its dtype is the dtype of the solve.
    save_sigmas: [S] strictly decreasing, > 0, the noise levels at which states are saved.
    sigma_start: the noise level of ``x_T`` (default ``save_sigmas[0]``, whose state is then ``x_T`` itself).
    solver: ``tsit5``, ``dopri5`` or ``dopri8`` (``REFERENCE_SOLVERS``).
    rtol, atol: tolerances of diffrax's ``PIDController``, per sample.
    max_steps: the most steps one sample may take; reaching it is an error.
    batch_size: samples per jitted call (default: all at once); the last chunk is padded so that it compiles once.
    labels: optional per-sample class labels [B], chunked with ``x_T`` and passed to the denoiser.
    progress: show a tqdm bar over samples (rate and ETA).
  """
  method = REFERENCE_SOLVERS.get(solver)()
  evals = evals_per_step(method)
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 2 or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a floating array of shape [batch, *data_shape], got {x_T.dtype}{list(x_T.shape)}")
  num = x_T.shape[0]
  if labels is not None:
    labels = jnp.asarray(labels)
    if labels.shape != (num,):
      raise ValueError(f"labels must have shape ({num},) (one per sample of x_T), got {labels.shape}")
  if not (rtol > 0 and atol > 0):
    raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
  if max_steps < 1:
    raise ValueError(f"max_steps must be >= 1, got {max_steps}")
  batch_size = num if batch_size is None else int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  batch_size = min(batch_size, num)
  sigmas, start = _check_save_sigmas(save_sigmas, sigma_start, x_T.dtype)

  if start == float(sigmas[-1]):  # a single save sigma at the start: nothing to integrate
    return Reference(np.asarray(x_T)[None], np.zeros((num,), np.int64), sigmas)

  dtype = x_T.dtype
  t_start = -np.log(np.asarray(start, dtype))
  ts = -np.log(sigmas)
  # float rounding of log must not push a save time outside [t0, t1]
  ts = np.clip(ts, t_start, ts[-1])

  def vector_field(t, x, label):
    sigma = jnp.exp(-t).astype(dtype)
    if label is None:
      x0_hat = denoiser(x[None], sigma)
    else:
      x0_hat = denoiser(x[None], sigma, label=label[None])
    return x0_hat[0].astype(dtype) - x          # dx/dt with t = -log(sigma)

  def solve_one(x, label):
    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field), method, t0=t_start, t1=ts[-1], dt0=None, y0=x, args=label,
        saveat=diffrax.SaveAt(ts=ts), stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps, throw=False,
        # References are targets, never differentiated: a plain while loop (no checkpointing scaffolding for
        # reverse-mode AD) gives the same numbers and traces faster.
        adjoint=diffrax.ForwardMode())
    ok = solution.result == diffrax.RESULTS.successful
    out_of_steps = solution.result == diffrax.RESULTS.max_steps_reached
    return solution.ys, solution.stats["num_steps"], ok, out_of_steps

  solve_chunk = jax.jit(jax.vmap(solve_one))
  states, num_steps = [], []
  with tqdm.tqdm(total=num, unit="sample", desc=f"reference ({solver})", disable=not progress,
                 dynamic_ncols=True) as bar:
    for begin in range(0, num, batch_size):
      end = min(begin + batch_size, num)
      pad = batch_size - (end - begin)
      x_chunk = _pad_rows(x_T[begin:end], pad)
      label_chunk = None if labels is None else _pad_rows(labels[begin:end], pad)
      ys, steps, ok, out_of_steps = jax.device_get(solve_chunk(x_chunk, label_chunk))
      ys, steps, ok, out_of_steps = ys[:end - begin], steps[:end - begin], ok[:end - begin], out_of_steps[:end - begin]
      if not np.all(ok):
        bad = np.flatnonzero(~ok) + begin
        why = (f"max_steps={max_steps} reached; raise max_steps or loosen rtol/atol" if np.any(out_of_steps)
               else "the solver stopped (non-finite values or step size underflow); check the denoiser")
        raise RuntimeError(f"reference solve failed for {bad.size} sample(s), first indices {bad[:8].tolist()}: {why}")
      states.append(ys)
      num_steps.append(steps)
      bar.update(end - begin)
      bar.set_postfix(nfe=f"{float(np.mean(steps)) * evals + 1:.0f}")
  states = np.ascontiguousarray(np.moveaxis(np.concatenate(states), 0, 1))   # [B, S, ...] -> [S, B, ...]
  if start == float(sigmas[0]):
    states[0] = np.asarray(x_T)  # the state at the start is x_T by definition; make it so bit for bit
  nfe = np.concatenate(num_steps).astype(np.int64) * evals + 1
  return Reference(states, nfe, sigmas)


def _pad_rows(x: jax.Array, pad: int) -> jax.Array:
  """Appends ``pad`` copies of the last row (real data, so the padding cannot produce NaNs); dropped afterwards."""
  if pad == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])


# --- cache keys -------------------------------------------------------------------------------------------------------

def teacher_identity(params: Any, backbone: Any = None) -> str:
  """Hash of a network teacher: ``hash_pytree(params)`` together with the backbone's class, data shape and options.

  Closed-form teachers (``Gaussian``, ``GaussianMixture``) are dataclasses of arrays: use ``hash_json(teacher)``.
  """
  config = None
  if backbone is not None:
    module = backbone.module
    options = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
    config = {"class": type(module).__name__, "data_shape": list(backbone.data_shape), "options": options}
  return hash_json({"params": hash_pytree(params), "backbone": config})


def reference_key(teacher_hash: str, precond: Preconditioning | None, noise_seed: int, num: int,
                  data_shape: tuple[int, ...], save_sigmas: Any, solver: str, rtol: float, atol: float,
                  extra: dict | None = None, *, sigma_start: float | None = None, noise_dtype: Any = jnp.float32,
                  label_seed: int | None = None) -> dict:
  """The key parts that identify a reference: teacher, noise, save sigmas (exact bytes), solver and tolerances.

  ``sigma_start`` is the noise level of ``x_T`` (default ``save_sigmas[0]``); ``noise_dtype`` the dtype of ``x_T``
  (and of the solve); ``label_seed`` the seed of a conditional teacher's labels; ``extra`` anything else that changes
  the result (a JSON-able dict).
  """
  if not isinstance(teacher_hash, str) or not teacher_hash:
    raise TypeError(f"teacher_hash must be a non-empty string (e.g. teacher_identity(params, backbone)), "
                    f"got {teacher_hash!r}")
  REFERENCE_SOLVERS.get(solver)
  sigmas = np.asarray(save_sigmas)
  if sigmas.ndim != 1 or sigmas.shape[0] < 1 or not np.issubdtype(sigmas.dtype, np.floating):
    raise ValueError(f"save_sigmas must be a 1-D floating array, got {sigmas.dtype}{list(sigmas.shape)}")
  sigmas = np.ascontiguousarray(sigmas)
  key = {
      "format": REFERENCE_FORMAT_VERSION,
      "teacher": teacher_hash,
      "precond": to_jsonable(precond),
      "noise": {"seed": int(noise_seed), "num": int(num), "data_shape": [int(d) for d in data_shape],
                "dtype": np.dtype(noise_dtype).name,
                "sigma_start": float(sigmas[0] if sigma_start is None else sigma_start)},
      "save_sigmas": {"dtype": sigmas.dtype.name, "values": [float(s) for s in sigmas],
                      "bytes": sigmas.astype(sigmas.dtype.newbyteorder("<")).tobytes().hex()},
      "solver": {"name": solver, "rtol": float(rtol), "atol": float(atol)},
      "extra": to_jsonable(extra if extra is not None else {}),
  }
  if label_seed is not None:
    key["labels"] = {"seed": int(label_seed)}
  return key


# --- the cache --------------------------------------------------------------------------------------------------------

class CacheError(RuntimeError):
  """A cached file exists but cannot be used (corrupt, truncated, or holding another key)."""


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
      raise CacheError(f"cached reference {path} cannot be loaded ({type(e).__name__}: {e}); "
                       f"delete it to recompute") from e
    if stored_key != canonical_json(key_parts):
      raise CacheError(f"cached reference {path} holds a different key than its name says; delete it to recompute")
    _check_reference(reference, f"cached reference {path}", CacheError)
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
  """``(x_T, reference)`` for the noise ``reference_noise(noise_seed, num, data_shape, sigma_max)``, from ``cache``
  when it holds it (``sigma_max`` defaults to ``save_sigmas[0]``; ``labels`` need their ``label_seed`` for the key)."""
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
                      sigma_start=sigma_max, noise_dtype=dtype, label_seed=label_seed)
  return x_T, cache.get_or_compute(key, compute)
