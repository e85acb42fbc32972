"""Noise-level schedules: strictly decreasing ``sigmas`` [num_steps + 1] from sigma_max down to sigma_min (DESIGN §4).

A schedule is looked up by name (``get_schedule("edm", 3, 0.002, 80.0, rho=7.0)``). The closed-form schedules are
pure ``jnp`` functions of ``sigma_min``, ``sigma_max`` and their options, so they are jittable and differentiable in
those arguments (``num_steps`` is static). Values are validated only when they are concrete: a traced value cannot
raise, so under ``jit``/``grad`` the checks that need values are skipped and the shape checks still run.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import diffusion
from mteo_jax.registry import Registry

ScheduleFn = Callable[..., jax.Array]

SCHEDULES: Registry[ScheduleFn] = Registry("schedule")


def is_concrete(value) -> bool:
  """True when ``value`` holds actual numbers (not a tracer of jit/grad/vmap), so that it can be checked on the host."""
  return not isinstance(value, jax.core.Tracer)


def _as_float_array(value, name: str) -> jax.Array:
  """``value`` as a floating array (integers become the default float dtype)."""
  try:
    array = jnp.asarray(value)
  except TypeError as e:
    raise TypeError(f"{name} must be a number or an array of numbers, got {type(value).__name__}: {e}") from None
  if not jnp.issubdtype(array.dtype, jnp.floating):
    array = array.astype(jnp.result_type(float))
  return array


def validate_sigmas(sigmas, dtype=None, *, dtype_reason: str = "the dtype asked for") -> jax.Array:
  """Returns ``sigmas`` as a float array (in ``dtype``, when given) after checking it is 1-D, of length >= 2, finite,
  > 0 and strictly decreasing.

  Every entry must be a normal number of its dtype (>= ``finfo.tiny``, e.g. 1.2e-38 in float32): XLA on CPU flushes
  subnormals to zero, so ``log(1e-40)`` would be ``-inf`` there. The values are checked in the dtype they come in and
  again in the dtype they are returned in (the one JAX gives host input, or ``dtype``): a float64 grid whose levels
  collapse in float32 is an error that says why it was cast (``dtype_reason`` for ``dtype``). The shape checks always
  run; the value checks run only on concrete input (traced values are passed through).
  Raises:
    ValueError: naming the first bad entry.
  """
  return _validate_grid(sigmas, None, dtype, dtype_reason)


def validate_per_sample_sigmas(sigmas, batch: int | None = None, dtype=None, *,
                               dtype_reason: str = "the dtype asked for") -> jax.Array:
  """``validate_sigmas`` for one grid per sample: ``sigmas`` [B, num_steps + 1], every row a valid grid.

  Args:
    sigmas: [B, N + 1], row b the noise levels of sample b; any float (or integer) dtype, host or device array.
    batch: when given, the number of rows ``B`` must equal it (the batch of the state the grid belongs to).
    dtype, dtype_reason: as in ``validate_sigmas``.
  Returns:
    ``sigmas`` as a float array [B, N + 1] (in ``dtype``, when given).
  Raises:
    ValueError: for a shape other than [batch, >= 2], or (concrete values only) naming the first bad entry by row and
      column, e.g. ``sigmas[3, 2] = 0.5 <= sigmas[3, 3] = 0.7``; all rows share N by construction.
  """
  return _validate_grid(sigmas, batch, dtype, dtype_reason, per_sample=True)


def _grid_shape_error(shape: tuple[int, ...], per_sample: bool, batch: int | None) -> str | None:
  """Why ``shape`` is not that of a grid ([N + 1], or [batch, N + 1] when ``per_sample``), or None when it is."""
  if not per_sample:
    if len(shape) != 1:
      return f"sigmas must be a 1-D array [num_steps + 1] (sigma_max ... sigma_min), got shape {shape}"
    if shape[0] < 2:
      return f"sigmas must hold at least 2 noise levels (sigma_max ... sigma_min), got {shape[0]}"
    return None
  if len(shape) != 2:
    return f"per-sample sigmas must be a 2-D array [B, num_steps + 1] (one grid per sample), got shape {shape}"
  if shape[1] < 2:
    return f"per-sample sigmas must hold at least 2 noise levels in each row (sigma_max ... sigma_min), got {shape[1]}"
  if batch is not None and shape[0] != batch:
    return (f"per-sample sigmas have {shape[0]} rows (shape {shape}) but the batch has {batch} samples; need one row "
            "per sample")
  return None


def _validate_grid(sigmas, batch: int | None, dtype, dtype_reason: str, *, per_sample: bool = False) -> jax.Array:
  """``validate_sigmas`` (``per_sample=False``) and ``validate_per_sample_sigmas`` (``per_sample=True``)."""
  given = None
  if is_concrete(sigmas) and not isinstance(sigmas, jax.Array):
    given = np.asarray(sigmas)
    if given.dtype.kind in "biu":
      given = given.astype(np.float64)
    if given.dtype.kind == "f" and _grid_shape_error(given.shape, per_sample, batch) is None:
      _check_sigma_values(given)
  sigmas = _as_float_array(sigmas, "sigmas")
  shape_error = _grid_shape_error(tuple(sigmas.shape), per_sample, batch)
  if shape_error is not None:
    raise ValueError(shape_error)
  reason = f"the dtype JAX gives them (jax_enable_x64 is {'on' if jax.config.jax_enable_x64 else 'off'})"
  if is_concrete(sigmas) and given is None:
    _check_sigma_values(np.asarray(sigmas))   # in the dtype they came in
    given = np.asarray(sigmas)
  if dtype is not None and sigmas.dtype != dtype:
    sigmas, reason = sigmas.astype(dtype), dtype_reason
  if not is_concrete(sigmas) or given.dtype == np.dtype(sigmas.dtype):
    return sigmas
  try:
    _check_sigma_values(np.asarray(sigmas))
  except ValueError as error:
    raise ValueError(f"sigmas are valid in {given.dtype} but not in {np.dtype(sigmas.dtype).name}, {reason}: "
                     f"{error}") from None
  return sigmas


def _check_sigma_values(values: np.ndarray) -> None:
  """Raises ValueError naming the first entry of ``values`` ([S], or [B, S] with one grid per row) that is not
  finite, not a normal number > 0, or not below its predecessor in its row."""
  def entry(index) -> str:
    index = tuple(int(i) for i in index)
    return f"sigmas[{', '.join(map(str, index))}] = {values[index]}"

  def first(mask):
    bad = np.argwhere(mask)
    return tuple(bad[0]) if bad.size else None

  if (index := first(~np.isfinite(values))) is not None:
    raise ValueError(f"sigmas must be finite, but {entry(index)}")
  if (index := first(values <= 0)) is not None:
    raise ValueError(f"sigmas must all be > 0, but {entry(index)}")
  tiny = float(jnp.finfo(values.dtype).tiny)
  if (index := first(values < tiny)) is not None:
    raise ValueError(f"{entry(index)} is below the smallest normal {values.dtype.name} "
                     f"({tiny:.3g}); XLA flushes such values to 0 on CPU (log sigma = -inf)")
  if (index := first(values[..., 1:] >= values[..., :-1])) is not None:
    following = index[:-1] + (index[-1] + 1,)
    raise ValueError(f"sigmas must be strictly decreasing, but {entry(index)} <= {entry(following)}")


def check_num_steps(num_steps) -> int:
  """``num_steps`` as a Python int >= 1 (it fixes array shapes, so it must be static)."""
  if isinstance(num_steps, (bool, np.bool_)) or not isinstance(num_steps, (int, np.integer)):
    raise TypeError(f"num_steps must be a Python integer >= 1, got {num_steps!r} of type {type(num_steps).__name__}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return int(num_steps)


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
  if not is_concrete(value):
    return
  v = np.asarray(value)
  if v.ndim != 0 or not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
    expected = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be a finite scalar {expected}, got {value!r}")


def _sigma_range(name: str, sigma_min, sigma_max) -> tuple[jax.Array, jax.Array]:
  """Checks ``0 < sigma_min < sigma_max`` (concrete values only) and returns both as float scalars of one dtype."""
  if sigma_min is None or sigma_max is None:
    raise ValueError(f"schedule {name!r} needs sigma_min and sigma_max, got sigma_min={sigma_min}, "
                     f"sigma_max={sigma_max}")
  smin, smax = _as_float_array(sigma_min, "sigma_min"), _as_float_array(sigma_max, "sigma_max")
  if smin.ndim != 0 or smax.ndim != 0:
    raise ValueError(f"sigma_min and sigma_max must be scalars, got shapes {smin.shape} and {smax.shape}")
  # float32 or wider: a float16 grid would collapse neighbouring levels (and overflow sigma ** 2 above 256).
  dtype = diffusion.coefficient_dtype(smin.dtype, smax.dtype)
  smin, smax = smin.astype(dtype), smax.astype(dtype)
  if is_concrete(smin) and is_concrete(smax):
    lo, hi = float(smin), float(smax)
    if not (np.isfinite(lo) and np.isfinite(hi)):
      raise ValueError(f"sigma_min and sigma_max must be finite, got sigma_min={lo}, sigma_max={hi}")
    if lo <= 0:
      raise ValueError(f"sigma_min must be > 0 (the ODE is integrated in log sigma), got sigma_min={lo}")
    if lo >= hi:
      raise ValueError(f"need sigma_min < sigma_max, got sigma_min={lo}, sigma_max={hi}")
  return smin, smax


def _finish(sigmas: jax.Array, smin: jax.Array, smax: jax.Array) -> jax.Array:
  # Pin both endpoints to the requested values: the closed forms round-trip them only up to a few ulps, and
  # "sigma_max ... sigma_min, both included" should hold exactly. Gradients still flow through both endpoints.
  sigmas = sigmas.at[0].set(smax).at[-1].set(smin)
  # A fine schedule in low precision can produce equal neighbours; fail loudly rather than take a zero step.
  return validate_sigmas(sigmas)


def _ramp(num_steps: int, dtype) -> jax.Array:
  return jnp.linspace(0.0, 1.0, num_steps + 1, dtype=dtype)


@SCHEDULES.register("edm")
def edm_schedule(num_steps: int, sigma_min, sigma_max, *, rho: float = 7.0) -> jax.Array:
  """EDM (Karras et al. 2022, eq. 5): ``sigma_i = (smax^(1/rho) + i/N (smin^(1/rho) - smax^(1/rho)))^rho``."""
  smin, smax = _sigma_range("edm", sigma_min, sigma_max)
  _check_positive("rho", rho)
  inv_rho = 1.0 / jnp.asarray(rho, smin.dtype)
  lo, hi = smin ** inv_rho, smax ** inv_rho
  return _finish((hi + _ramp(num_steps, smin.dtype) * (lo - hi)) ** (1.0 / inv_rho), smin, smax)


@SCHEDULES.register("time_uniform")
def time_uniform_schedule(num_steps: int, sigma_min, sigma_max, *, beta_d: float = 19.9,
                          beta_min: float = 0.1) -> jax.Array:
  """Uniform in the VP-SDE time ``t``: ``sigma_i = sigma_vp(t(smax) + i/N (t(smin) - t(smax)))``."""
  smin, smax = _sigma_range("time_uniform", sigma_min, sigma_max)
  _check_positive("beta_d", beta_d)
  _check_positive("beta_min", beta_min, allow_zero=True)
  t_max = diffusion.vp_sigma_to_t(smax, beta_d, beta_min)
  t_min = diffusion.vp_sigma_to_t(smin, beta_d, beta_min)
  t = t_max + _ramp(num_steps, smin.dtype) * (t_min - t_max)
  return _finish(diffusion.vp_t_to_sigma(t, beta_d, beta_min), smin, smax)


@SCHEDULES.register("logsnr_uniform")
def logsnr_uniform_schedule(num_steps: int, sigma_min, sigma_max) -> jax.Array:
  """Uniform in logSNR = -2 log sigma: ``sigma_i = smax (smin / smax)^(i/N)``."""
  smin, smax = _sigma_range("logsnr_uniform", sigma_min, sigma_max)
  log_hi, log_lo = jnp.log(smax), jnp.log(smin)
  return _finish(jnp.exp(log_hi + _ramp(num_steps, smin.dtype) * (log_lo - log_hi)), smin, smax)


@SCHEDULES.register("explicit")
def explicit_schedule(num_steps: int, sigma_min=None, sigma_max=None, *, sigmas: Sequence[float] | jax.Array
                      ) -> jax.Array:
  """A given list ``sigmas`` (validated); ``sigma_min``/``sigma_max``, when given, must match its last/first entry."""
  sigmas = validate_sigmas(sigmas)
  if sigmas.shape[0] != num_steps + 1:
    raise ValueError(f"explicit sigmas have {sigmas.shape[0]} entries, so {sigmas.shape[0] - 1} steps, but "
                     f"num_steps={num_steps} (expected {num_steps + 1} entries)")
  if is_concrete(sigmas):
    for label, given, index in (("sigma_max", sigma_max, 0), ("sigma_min", sigma_min, -1)):
      if given is not None and is_concrete(given):
        # A relative tolerance: the list may have been stored in float32 while the config holds a Python float.
        if not np.isclose(float(sigmas[index]), float(given), rtol=1e-5, atol=0.0):
          raise ValueError(f"explicit sigmas[{index}] = {float(sigmas[index])} does not match {label}={given}")
  return sigmas


def get_schedule(name: str, num_steps: int, sigma_min=None, sigma_max=None, **options) -> jax.Array:
  """``sigmas`` [num_steps + 1], strictly decreasing from ``sigma_max`` to ``sigma_min``, from the named schedule."""
  fn = SCHEDULES.get(name)
  num_steps = check_num_steps(num_steps)
  valid = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for schedule {name!r}; valid options: {valid}")
  missing = [p.name for p in inspect.signature(fn).parameters.values()
             if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
             and p.name not in options]
  if missing:
    raise TypeError(f"schedule {name!r} needs option(s) {missing}")
  return fn(num_steps, sigma_min, sigma_max, **options)
