"""Learned sigma schedules: a global one (LD3) and one per sample (INDIS), with an optional time shift and output scale.

The pieces are pure functions of arrays (habit 1 of STYLE.md); ``methods/ld3.py`` and ``methods/indis.py`` put them on
the harness.

Parameterisation (after LD3, Tong et al. 2024, arXiv 2405.15506): a schedule of N steps is given by N logits, one per
gap. ``softmax`` turns them into N positive fractions of the log-sigma range that sum to 1, mixed with a uniform floor
so that no gap can vanish; the cumulative sum, with a leading 0, places N + 1 points from 0 to 1, mapped linearly onto
``[log sigma_max, log sigma_min]``:

    f = m + (1 - N m) softmax(logits),   log sigma_i = log sigma_max - (sum_{j < i} f_j) log(sigma_max / sigma_min).

So the grid is strictly decreasing by construction (every log-gap is at least ``m log(sigma_max / sigma_min)``) and
its endpoints are exactly ``sigma_max`` and ``sigma_min`` (set, not computed). The issue's "N + 1 logits" counts the
N + 1 grid points; N gap logits are the whole degree of freedom (an (N+1)-th logit would only shift all of them,
which softmax ignores). ``logits_from_sigmas`` inverts the map, so training starts from the EDM (rho = 7) schedule.

Time shift (LD3's decoupled time input): at evaluation i the network is told ``sigma_i exp(shift_i)`` (its time
embedding is computed there) while the solver and the preconditioning (``c_skip``, ``c_out``, ``c_in``) use
``sigma_i``. It reaches the denoiser through the solver's table hook (``temb_table``): one row per evaluation,
[NFE, D] for a shared shift, [NFE, B, D] for a per-sample one.

Output scale (INDIS, arXiv 2603.17671; its code is not released): at evaluation i the denoiser output is multiplied,
``x0_hat <- scale_i x0_hat``. Read as a scale of the denoiser's prediction (not of the solver's update), so that it
means the same for every solver; it rides in the same table as the shift.

Endpoint losses: the student's final sample against the teacher's from the same noise: ``l2`` (mean squared error),
or LD3's soft teacher read as a ball of radius r around the teacher's sample, ``max(0, rms(x - x_ref) - r)^2`` (see
``soft_teacher_loss``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mteo_jax import files
from mteo_jax.diffusion import broadcast_to_batch, coefficient_dtype
from mteo_jax.schedules import is_concrete

DEFAULT_MIN_FRACTION = 1e-3
ENDPOINT_LOSSES = ("l2", "soft_teacher")
ARTEFACT_FORMAT = "mteo_jax.learned_schedule/1"


# --- the parameterisation -------------------------------------------------------------------------------------------

def _log_range(sigma_min, sigma_max, dtype) -> tuple[jax.Array, jax.Array]:
  smin, smax = jnp.asarray(sigma_min, dtype), jnp.asarray(sigma_max, dtype)
  if smin.ndim or smax.ndim:
    raise ValueError(f"sigma_min and sigma_max must be scalars, got shapes {smin.shape} and {smax.shape}")
  if is_concrete(smin) and is_concrete(smax) and not 0 < float(smin) < float(smax) < np.inf:
    raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={float(smin)}, sigma_max={float(smax)}")
  return smin, smax


def _check_min_fraction(min_fraction: float, num_steps: int, log_hi: jax.Array, log_lo: jax.Array, dtype) -> None:
  """The floor ``m`` must leave room for the softmax (``N m < 1``) and keep every log-gap resolvable in ``dtype``."""
  if not (0 < min_fraction and num_steps * min_fraction < 1):
    raise ValueError(f"min_fraction must be in (0, 1 / num_steps) = (0, {1 / num_steps:.3g}) for {num_steps} steps, "
                     f"got {min_fraction}")
  if is_concrete(log_hi) and is_concrete(log_lo):
    # log sigma carries a rounding error of about (1 + |log sigma|) eps, the cumulative sum at most N eps of the range
    # more: the smallest gap must stand clear of both, with a margin.
    magnitude = 1.0 + max(abs(float(log_hi)), abs(float(log_lo)))
    resolution = float(jnp.finfo(dtype).eps) * (16 * magnitude + 4 * num_steps * float(log_hi - log_lo))
    if min_fraction * float(log_hi - log_lo) < resolution:
      raise ValueError(f"min_fraction={min_fraction} gives log-gaps of {min_fraction * float(log_hi - log_lo):.3g}, "
                       f"below the {np.dtype(dtype).name} resolution of log sigma (~{resolution:.3g}); neighbouring "
                       "noise levels could collapse. Use a larger min_fraction or a wider dtype.")


def gap_fractions(logits: jax.Array, min_fraction: float = DEFAULT_MIN_FRACTION) -> jax.Array:
  """``m + (1 - N m) softmax(logits)`` [..., N]: positive, at least ``m`` each, summing to 1 along the last axis."""
  num_steps = logits.shape[-1]
  return min_fraction + (1.0 - num_steps * min_fraction) * jax.nn.softmax(logits, axis=-1)


def sigmas_from_logits(logits: jax.Array, sigma_min: float, sigma_max: float,
                       min_fraction: float = DEFAULT_MIN_FRACTION) -> jax.Array:
  """The schedule of N steps given by N gap logits (module docstring; LD3, arXiv 2405.15506).

  Args:
    logits: [..., N] float (any batch axes), any finite values (``±1e4`` included: softmax is shift-invariant and
      saturates without overflow).
    sigma_min, sigma_max: the endpoints, ``0 < sigma_min < sigma_max`` (scalars, concrete or traced).
    min_fraction: the floor ``m`` of each gap's share of ``log(sigma_max / sigma_min)``; ``0 < N m < 1``.
  Returns:
    [..., N + 1] in ``coefficient_dtype(logits.dtype)`` (float32 or wider): strictly decreasing along the last axis,
    ``[..., 0] == sigma_max`` and ``[..., -1] == sigma_min`` exactly (in that dtype). Differentiable in ``logits``
    (the endpoints carry no gradient).
  Raises:
    ValueError: an empty last axis, endpoints out of order, or ``min_fraction`` out of range or too small for the
      dtype to keep the gaps apart (concrete values only).
  """
  logits = jnp.asarray(logits)
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"logits must be [..., num_steps] with num_steps >= 1, got shape {logits.shape}")
  dtype = coefficient_dtype(logits.dtype)
  smin, smax = _log_range(sigma_min, sigma_max, dtype)
  log_hi, log_lo = jnp.log(smax), jnp.log(smin)
  _check_min_fraction(min_fraction, logits.shape[-1], log_hi, log_lo, dtype)
  fractions = gap_fractions(logits.astype(dtype), min_fraction)
  position = jnp.cumsum(fractions, axis=-1)                                           # [..., N], last ~ 1
  position = jnp.concatenate([jnp.zeros_like(position[..., :1]), position], axis=-1)  # [..., N + 1]
  sigmas = jnp.exp(log_hi + position * (log_lo - log_hi))
  # Exact endpoints: the cumulative sum reaches 1 only up to rounding.
  return sigmas.at[..., 0].set(smax).at[..., -1].set(smin)


def logits_from_sigmas(sigmas: jax.Array, min_fraction: float = DEFAULT_MIN_FRACTION) -> jax.Array:
  """The logits whose ``sigmas_from_logits(logits, sigmas[..., -1], sigmas[..., 0], min_fraction)`` is ``sigmas``.

  Solves ``f_j = m + (1 - N m) softmax(logits)_j`` for the log-gap fractions ``f_j`` of the grid: ``logits_j =
  log((f_j - m) / (1 - N m))``, centred to mean 0 (softmax ignores a common shift). Used to start a learned schedule
  from a closed-form one (e.g. EDM, rho = 7).

  Args:
    sigmas: [..., N + 1] strictly decreasing positive noise levels (every row shares N).
    min_fraction: the floor ``m`` the logits will be used with.
  Returns:
    [..., N] logits in ``coefficient_dtype(sigmas.dtype)``.
  Raises:
    ValueError: fewer than two levels; or (concrete values only) a grid that is not strictly decreasing and positive,
      or a gap at or below the floor, which no logits can give.
  """
  sigmas = jnp.asarray(sigmas)
  if sigmas.ndim < 1 or sigmas.shape[-1] < 2:
    raise ValueError(f"sigmas must be [..., num_steps + 1] with at least 2 levels, got shape {sigmas.shape}")
  sigmas = sigmas.astype(coefficient_dtype(sigmas.dtype))
  num_steps = sigmas.shape[-1] - 1
  if is_concrete(sigmas):
    values = np.asarray(sigmas)
    if not (np.all(values > 0) and np.all(np.diff(values, axis=-1) < 0)):
      raise ValueError(f"sigmas must be positive and strictly decreasing, got {values}")
  log_sigma = jnp.log(sigmas)
  gaps = log_sigma[..., :-1] - log_sigma[..., 1:]
  fractions = gaps / jnp.sum(gaps, axis=-1, keepdims=True)
  shares = (fractions - min_fraction) / (1.0 - num_steps * min_fraction)
  if is_concrete(shares) and np.any(np.asarray(shares) <= 0):
    raise ValueError(f"a gap of the grid is at most min_fraction={min_fraction} of its log-sigma range (fractions "
                     f"{np.asarray(fractions)}); use a smaller min_fraction")
  logits = jnp.log(shares)
  return logits - jnp.mean(logits, axis=-1, keepdims=True)


def bounded(raw: jax.Array, bound: float) -> jax.Array:
  """``bound * tanh(raw / 2)``: in ``(-bound, bound)``, 0 at ``raw = 0`` (INDIS's bounded outputs)."""
  return bound * jnp.tanh(raw / 2.0)


# --- endpoint losses ------------------------------------------------------------------------------------------------

def _per_sample_mse(x: jax.Array, ref: jax.Array) -> jax.Array:
  if x.shape != ref.shape:
    raise ValueError(f"the student's samples {x.shape} and the teacher's {ref.shape} must have the same shape")
  return jnp.mean(((x - ref) ** 2).reshape(x.shape[0], -1), axis=-1)


def l2_loss(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Mean over the batch of each sample's mean squared error to the teacher's: ``x``, ``ref`` [B, ...] -> scalar."""
  return jnp.mean(_per_sample_mse(x, ref))


def soft_teacher_loss(x: jax.Array, ref: jax.Array, radius: float) -> jax.Array:
  """LD3's soft teacher as a ball around the teacher's sample: ``mean_b max(0, rms_b - radius)^2``.

  ``rms_b = sqrt(mean over features of (x_b - ref_b)^2)`` (data units, independent of the dimension). Errors inside
  the ball cost nothing, outside it the loss grows like the squared distance to the ball; ``radius = 0`` gives
  ``l2_loss``. LD3 itself (arXiv 2405.15506, as we read it) places the ball around the *input* noise, ``||x'_T -
  x_T|| <= r sigma_T``, and optimises ``x'_T`` with the schedule; this reading relaxes the target instead and adds no
  variables.

  Args:
    x, ref: [B, ...] the student's and the teacher's samples from the same noise. radius: >= 0, data units.
  Returns:
    The scalar loss (finite gradients everywhere, also at ``x == ref``).
  """
  mse = _per_sample_mse(x, ref)
  positive = mse > 0
  rms = jnp.where(positive, jnp.sqrt(jnp.where(positive, mse, 1.0)), 0.0)  # no 0 * inf at x == ref
  return jnp.mean(jnp.maximum(rms - radius, 0.0) ** 2)


def endpoint_loss(name: str, radius: float = 0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``loss(x, ref) -> scalar`` by name: ``l2`` (``radius`` must be 0) or ``soft_teacher`` (``radius > 0``).

  Raises:
    KeyError: an unknown name (listing the valid ones). ValueError: a radius that the loss would not use, or <= 0.
  """
  if name not in ENDPOINT_LOSSES:
    raise KeyError(f"unknown endpoint loss {name!r}; expected one of {list(ENDPOINT_LOSSES)}")
  if name == "l2":
    if radius != 0:
      raise ValueError(f"the l2 loss has no radius (got radius={radius}); use loss='soft_teacher'")
    return l2_loss
  if not radius > 0:
    raise ValueError(f"the soft_teacher loss needs radius > 0 (radius 0 is the l2 loss), got {radius}")
  return lambda x, ref: soft_teacher_loss(x, ref, radius)


# --- sampling on a learned schedule ---------------------------------------------------------------------------------

def _check_per_eval(name: str, value: jax.Array | None, nfe: int, batch: int) -> jax.Array | None:
  if value is None:
    return None
  value = jnp.asarray(value)
  if value.shape not in ((nfe,), (batch, nfe)):
    raise ValueError(f"{name} must be [nfe] = [{nfe}] (shared) or [B, nfe] = [{batch}, {nfe}] (per sample), got "
                     f"shape {value.shape}")
  return value


def shift_table(backbone: Any, params: Any, precond: Any, eval_sigmas: jax.Array, shift: jax.Array) -> dict:
  """The time embeddings at the shifted noise levels ``eval_sigmas * exp(shift)``, one row per evaluation.

  Args:
    backbone, params, precond: the teacher (``nets.Backbone``, its parameters, its ``Preconditioning``).
    eval_sigmas: [NFE] or [B, NFE], the solver's evaluation sigmas (``solver.eval_sigmas(sigmas)``).
    shift: [NFE] or [B, NFE], the log-shift of the noise level the network is told (dimensionless).
  Returns:
    ``{layer: [NFE, D]}`` when both are shared, else ``{layer: [NFE, B, D]}`` (a ``temb_table`` for the solver).
  """
  told = jnp.asarray(eval_sigmas) * jnp.exp(shift)
  temb = backbone.time_embedding(params, precond.c_noise(told.reshape(-1)))
  if told.ndim == 1:
    return temb
  batch, nfe = told.shape
  return {name: jnp.swapaxes(leaf.reshape(batch, nfe, leaf.shape[-1]), 0, 1) for name, leaf in temb.items()}


def sample_with_schedule(solver: Any, denoiser: Callable[..., jax.Array], x_T: jax.Array, sigmas: jax.Array, *,
                         temb_table: Any = None, scale: jax.Array | None = None, return_trajectory: bool = False):
  """``solver`` on ``denoiser`` along ``sigmas`` with per-evaluation time embeddings and output scales.

  Args:
    solver: a registered solver object. denoiser: ``D(x, sigma, temb=None) -> x0_hat`` (a closed form or
      ``nets.make_denoiser``).
    x_T: [B, ...] the noise at ``sigmas[0]``.
    sigmas: [N + 1] shared or [B, N + 1] per sample (``sigmas_from_logits``).
    temb_table: None (the denoiser's own embeddings) or ``{layer: [NFE, D] | [NFE, B, D]}`` (``shift_table``).
    scale: None, [NFE] or [B, NFE]: evaluation i returns ``scale_i * D(x, sigma_i)`` (dimensionless).
    return_trajectory: as in ``Solver.sample``.
  Returns:
    ``x`` at ``sigmas[-1]`` [B, ...] in ``x_T``'s dtype (and the states [N + 1, B, ...] when ``return_trajectory``).
  Raises:
    ValueError: ``scale`` of another shape, or what ``Solver.sample`` raises.
  """
  x_T = jnp.asarray(x_T)
  num_steps = jnp.shape(sigmas)[-1] - 1
  scale = _check_per_eval("scale", scale, solver.nfe(num_steps), x_T.shape[0])
  if scale is None:
    return solver.sample(denoiser, x_T, sigmas, temb_table=temb_table, return_trajectory=return_trajectory)
  table = {"scale": scale if scale.ndim == 1 else scale.T}
  if temb_table is not None:
    table["temb"] = temb_table

  def scaled(x, sigma, temb):
    x0_hat = denoiser(x, sigma) if "temb" not in temb else denoiser(x, sigma, temb=temb["temb"])
    return (broadcast_to_batch(temb["scale"], x0_hat) * x0_hat).astype(x0_hat.dtype)

  return solver.sample(scaled, x_T, sigmas, temb_table=table, return_trajectory=return_trajectory)


def schedule_sample(solver: Any, backbone: Any, params: Any, precond: Any, x_T: jax.Array, sigmas: jax.Array,
                    label: jax.Array | None = None, *, shift: jax.Array | None = None,
                    scale: jax.Array | None = None, return_trajectory: bool = False):
  """The teacher's few-step sample along a learned schedule, with LD3's time shift and INDIS's output scale.

  Args:
    solver: a registered solver object. backbone, params, precond: the teacher.
    x_T: [B, *data_shape] float, the noise at ``sigmas[0]``. label: [B] int for a conditional teacher, else None.
    sigmas: [N + 1] (global schedule) or [B, N + 1] (one per sample).
    shift: None, [NFE] or [B, NFE]: the network is told ``sigma_i exp(shift_i)`` at evaluation i, the solver and the
      preconditioning use ``sigma_i`` (module docstring).
    scale: None, [NFE] or [B, NFE]: ``x0_hat <- scale_i x0_hat`` at evaluation i.
    return_trajectory: also return the states [N + 1, B, ...].
  Returns:
    [B, *data_shape] in ``x_T``'s dtype. With ``shift`` and ``scale`` None it is the plain solver on ``sigmas``.
  Raises:
    ValueError: ``shift`` or ``scale`` of another shape; what the solver and the denoiser raise.
  """
  from mteo_jax.nets import make_denoiser  # noqa: PLC0415 (keeps this module free of network code at import)
  x_T = jnp.asarray(x_T)
  nfe = solver.nfe(jnp.shape(sigmas)[-1] - 1)
  shift = _check_per_eval("shift", shift, nfe, x_T.shape[0])
  table = None
  if shift is not None:
    table = shift_table(backbone, params, precond, solver.eval_sigmas(sigmas), shift)
  return sample_with_schedule(solver, make_denoiser(backbone, params, precond, label), x_T, sigmas,
                              temb_table=table, scale=scale, return_trajectory=return_trajectory)


DESCRIBE_SAMPLES = 256
GRID_QUANTILES = (5, 25, 50, 75, 95)


def describe_grids(sigmas: Any) -> dict:
  """A schedule for ``results.json`` and the schedule picture: ``{"sigmas": [N + 1]}`` for a global grid [N + 1];
  for per-sample grids [B, N + 1], the median grid as ``"sigmas"`` and ``"quantiles": {"5": [N + 1], "25", "50",
  "75", "95"}`` of each grid point over the samples, with ``"num_samples": B``."""
  sigmas = np.asarray(sigmas, np.float64)
  if sigmas.ndim == 1:
    return {"sigmas": sigmas.tolist()}
  if sigmas.ndim != 2:
    raise ValueError(f"sigmas must be [N + 1] or [B, N + 1], got shape {sigmas.shape}")
  quantiles = {str(q): np.percentile(sigmas, q, axis=0).tolist() for q in GRID_QUANTILES}
  return {"sigmas": quantiles["50"], "quantiles": quantiles, "num_samples": int(sigmas.shape[0])}


# --- phi: the instance-aware schedule network -----------------------------------------------------------------------

class SchedulePredictor(nn.Module):
  """INDIS's phi(x_T, label): an MLP over the flattened noise (and a label embedding) that outputs each sample's
  schedule logits and, optionally, a bounded time shift and output scale per evaluation (arXiv 2603.17671).

  ``logits = global_logits + head[:N]``; ``shift = b_shift tanh(head[N:N+NFE] / 2)``; ``scale = 1 + b_scale
  tanh(head[...] / 2)``. ``global_logits`` is a parameter initialised to ``base_logits`` (e.g. the EDM schedule's,
  ``logits_from_sigmas``) and the head (the last Dense) to zero, so an untrained phi is the global schedule with no
  shift and unit scale for every sample; the hidden layers learn from the second step on.

  Attributes:
    base_logits: the N initial schedule logits. nfe: evaluations per sample (the solver's ``nfe(N)``).
    hidden, depth: width and number of hidden SiLU layers (depth 0: the head reads the input directly).
    num_classes: > 0 for a conditional teacher (then a label [B] is required); label_dim: its embedding's width.
    input_scale: the flattened ``x_T`` is multiplied by it (``1 / sigma_max`` makes it unit variance).
    predict_shift, b_shift: output the time shift, bounded by ``b_shift`` (log-sigma units).
    predict_scale, b_scale: output the scale, in ``(1 - b_scale, 1 + b_scale)``.
  """
  base_logits: tuple[float, ...]
  nfe: int
  hidden: int = 128
  depth: int = 2
  num_classes: int = 0
  label_dim: int = 32
  input_scale: float = 1.0
  predict_shift: bool = False
  b_shift: float = 0.2
  predict_scale: bool = False
  b_scale: float = 0.1

  @nn.compact
  def __call__(self, x_T: jax.Array, label: jax.Array | None = None) -> dict[str, jax.Array]:
    """``x_T`` [B, ...] float, ``label`` [B] int or None -> ``{"logits": [B, N], "shift"?: [B, NFE], "scale"?:
    [B, NFE]}`` (only the outputs asked for).

    Raises:
      ValueError: a label missing for a conditional phi, or given to an unconditional one.
    """
    batch = x_T.shape[0]
    h = x_T.reshape(batch, -1) * self.input_scale
    if self.num_classes > 0:
      if label is None:
        raise ValueError(f"this phi is class-conditional (num_classes={self.num_classes}); pass labels [B]")
      h = jnp.concatenate([h, nn.Embed(self.num_classes, self.label_dim, name="label_embed")(label)], axis=-1)
    elif label is not None:
      raise ValueError("this phi is unconditional (num_classes=0) but a label was given")
    for layer in range(self.depth):
      h = nn.silu(nn.Dense(self.hidden, name=f"hidden{layer}")(h))
    num_steps = len(self.base_logits)
    width = num_steps + self.nfe * (int(self.predict_shift) + int(self.predict_scale))
    head = nn.Dense(width, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros, name="head")(h)
    global_logits = self.param("global_logits", lambda key: jnp.asarray(self.base_logits, jnp.float32))
    out = {"logits": global_logits + head[:, :num_steps]}
    start = num_steps
    if self.predict_shift:
      out["shift"] = bounded(head[:, start:start + self.nfe], self.b_shift)
      start += self.nfe
    if self.predict_scale:
      out["scale"] = 1.0 + bounded(head[:, start:start + self.nfe], self.b_scale)
    return out


# --- artefacts ------------------------------------------------------------------------------------------------------

def save_artefact(path: str | os.PathLike, arrays: Any, metadata: dict) -> Path:
  """Writes a learned schedule: ``path/arrays.npz`` (the pytree's leaves, keys ``a/b/c``) and ``path/metadata.json``.

  ``metadata`` must say what the arrays belong to (``method``, ``teacher``, ``solver``, ``nfe``; ``load_artefact``
  checks them). Written to a staging directory and renamed into place; an existing directory is replaced only if it
  holds such an artefact.

  Returns:
    The absolute path. Raises: ValueError: metadata without those keys. files.UnreadableFileError (a ValueError):
    ``path`` holds something other than a readable learned-schedule artefact (left as it is).
  """
  missing = [key for key in ("method", "teacher", "solver", "nfe") if key not in metadata]
  if missing:
    raise ValueError(f"artefact metadata needs {missing}")
  path = Path(path).absolute()
  if path.exists():   # refuses to replace anything that is not a readable learned-schedule artefact
    _read_metadata(path, f"it is not replaced unread: delete {path} (the run's checkpoints remake it)")
  flat = traverse_util.flatten_dict(jax.device_get(arrays), sep="/") if isinstance(arrays, dict) else {"": arrays}
  staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  np.savez(staging / "arrays.npz", **{key: np.asarray(value) for key, value in flat.items()})
  (staging / "metadata.json").write_text(json.dumps({"format": ARTEFACT_FORMAT, **metadata}, indent=2,
                                                    sort_keys=True))
  if path.exists():
    shutil.rmtree(path)
  staging.rename(path)
  return path


def _read_metadata(path: Path, advice: str) -> dict:
  """The artefact's metadata; ``files.UnreadableFileError`` (a ValueError) naming the file and ``advice`` where it is
  missing, unreadable or not a learned schedule's."""
  try:
    metadata = files.read_json(path / "metadata.json", advice)
  except FileNotFoundError:
    raise files.UnreadableFileError(f"{path} is not a learned-schedule artefact: it has no metadata.json; "
                                    f"{advice}") from None
  if metadata.get("format") != ARTEFACT_FORMAT:
    raise files.UnreadableFileError(f"{path} is not a learned-schedule artefact (format {metadata.get('format')!r} in "
                                    f"its metadata.json, expected {ARTEFACT_FORMAT!r}); {advice}")
  return metadata


def load_artefact(path: str | os.PathLike, *, method: str, teacher: Any, solver_name: str,
                  nfe: int) -> tuple[Any, dict]:
  """Reads what ``save_artefact`` wrote, checking that it was learned by ``method`` for this teacher, solver and NFE.

  Args:
    teacher: a ``teachers.Teacher`` (its ``identity``) or the identity string itself.
  Returns:
    ``(arrays, metadata)``: the pytree of numpy arrays and the metadata.
  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: one of another method, teacher, solver or NFE (the message
      lists each difference, ``key: saved -> expected``). files.UnreadableFileError (a ValueError): not such an
      artefact, or a truncated or corrupted one (the message names the file and says to delete it).
  """
  path = Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no learned schedule at {path}")
  advice = f"delete {path} and rerun the job that wrote it"
  metadata = _read_metadata(path, advice)
  identity = teacher if isinstance(teacher, str) else getattr(teacher, "identity", None)
  expected = {"method": method, "teacher": identity, "solver": solver_name, "nfe": nfe}
  mismatches = [f"{key}: {metadata.get(key, '<missing>')!r} -> {value!r}" for key, value in expected.items()
                if metadata.get(key) != value]
  if mismatches:
    raise ValueError(f"the learned schedule at {path} belongs to another run: {'; '.join(mismatches)} (saved -> "
                     "expected)")
  try:
    with np.load(path / "arrays.npz", allow_pickle=False) as stored:
      flat = {key: stored[key] for key in stored.files}
  except Exception as error:  # noqa: BLE001 (zipfile.BadZipFile, EOFError, OSError, ValueError, ...)
    raise files.UnreadableFileError(f"{path / 'arrays.npz'} cannot be read ({files.reason(error)}); {advice}") \
        from None
  arrays = flat[""] if set(flat) == {""} else traverse_util.unflatten_dict(flat, sep="/")
  return arrays, metadata
