"""The solver contract (DESIGN §4) and what every solver shares: the step loop, MTEO table rows, remat, phi functions.

All solvers integrate the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``sigmas[0]`` to
``sigmas[-1]`` by calling only a denoiser ``D(x, sigma, temb=None)``. In the EDM variables ``alpha = 1`` and
``sigma_t = sigma``, so ``lambda = -log sigma`` and ``dx/dlambda = D - x``; the exponential integrators (DPM-Solver++,
UniPC) are written in that form.

The loop over steps is unrolled in Python: the number of steps is static (it is the length of ``sigmas``), every step
may have its own static order (warm-up, lower order at the end), and each step can be wrapped in ``jax.checkpoint``.

The grid is shared by the batch (``sigmas`` [N + 1]) or given per sample (``sigmas`` [B, N + 1], e.g. predicted for
each sample by an instance-aware schedule). A per-sample grid is laid out once as ``[N + 1, B, 1, ..., 1]`` (see
``per_sample_layout``), so that ``sigmas[i]`` broadcasts against the state ``[B, ...]``: every step and update formula
is elementwise in the noise levels and runs unchanged on scalars or on such per-sample columns, and the denoiser gets
each sample's own ``sigma`` [B].
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax.diffusion import coefficient_dtype
from mteo_jax.registry import Registry
from mteo_jax.schedules import check_num_steps, validate_per_sample_sigmas, validate_sigmas

# ``D(x, sigma, temb=None) -> x0_hat`` (see ``mteo_jax.nets.Denoiser``), ``sigma`` a scalar or per-sample [B]; kept as
# a plain callable here so that the solvers depend on no network code and run on closed-form denoisers.
Denoiser = Callable[..., jax.Array]
TembTable = Any  # a pytree whose every leaf has leading axis nfe; row i feeds network evaluation i
Evaluate = Callable[[int, jax.Array], jax.Array]  # (index of the evaluation within the step, x) -> x0_hat


# Every solver registers itself next to its class (``@SOLVERS.register("name")``); ``get_solver(name, **options)``
# builds it. A registered object is a class or factory whose keyword arguments are the solver's options.
SOLVERS: Registry[Callable[..., "Solver"]] = Registry("solver")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Solver(abc.ABC):
  """A few-step ODE solver: ``sample(denoiser, x_T, sigmas) -> x at sigmas[-1]``.

  Attributes:
    remat: wrap every step in ``jax.checkpoint``: the same values and gradients (up to float round-off, as XLA may
      fuse a checkpointed step differently), with only the per-step states kept for the backward pass.
  Subclasses provide ``name``, ``order`` (the order of the method as configured) and ``_step``.
  """
  remat: bool = False

  def __post_init__(self):
    check_bool("remat", self.remat)

  # --- network evaluations ------------------------------------------------------------------------------------------

  def _step_eval_offsets(self, step: int, num_steps: int) -> tuple[int, ...]:
    """Where step ``step`` calls the denoiser, as offsets into ``sigmas`` from ``step`` (0: sigmas[step], 1: next)."""
    del step, num_steps
    return (0,)

  def nfe(self, num_steps: int) -> int:
    """Number of denoiser calls for ``num_steps`` steps."""
    num_steps = check_num_steps(num_steps)
    return sum(len(self._step_eval_offsets(i, num_steps)) for i in range(num_steps))

  def num_steps_for_nfe(self, nfe: int) -> int:
    """The number of steps that makes exactly ``nfe`` denoiser calls (inverse of ``nfe``)."""
    if isinstance(nfe, (bool, np.bool_)) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
      raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    nfe = int(nfe)
    # nfe(N) >= N and is increasing in N, so the answer, if any, lies in 1..nfe.
    reachable = {self.nfe(n): n for n in range(1, nfe + 2)}
    if nfe in reachable:
      return reachable[nfe]
    below = max((k for k in reachable if k < nfe), default=None)
    above = min(k for k in reachable if k > nfe)
    nearest = ([f"{below} (N={reachable[below]})"] if below is not None else []) + [f"{above} (N={reachable[above]})"]
    raise ValueError(f"solver {self.name!r} cannot make exactly {nfe} network evaluations; nearest reachable NFE: "
                     f"{' or '.join(nearest)}")

  def eval_sigmas(self, sigmas: jax.Array) -> jax.Array:
    """The noise level of each denoiser call, in call order (MTEO table row i is initialised there).

    Args:
      sigmas: a shared grid [N + 1] or per-sample grids [B, N + 1], validated as in ``sample`` (in their own dtype).
    Returns:
      [nfe(N)] for a shared grid, [B, nfe(N)] for per-sample grids (row b: sample b's calls), in the grid's dtype.
    Raises:
      ValueError: for a grid of another rank or an invalid entry (see ``validate_grid``).
    """
    sigmas = validate_grid(sigmas)
    num_steps = sigmas.shape[-1] - 1
    index = [i + offset for i in range(num_steps) for offset in self._step_eval_offsets(i, num_steps)]
    if sigmas.ndim == 1:
      return sigmas[jnp.asarray(index)]
    return sigmas[:, jnp.asarray(index)]

  # --- sampling -----------------------------------------------------------------------------------------------------

  def _init_carry(self, x_T: jax.Array) -> Any:
    """What a step hands to the next besides the state (e.g. the history of a multistep method)."""
    del x_T
    return ()

  @abc.abstractmethod
  def _step(self, step: int, num_steps: int, evaluate: Evaluate, x: jax.Array, carry: Any,
            sigmas: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    """One step from ``sigmas[step]`` to ``sigmas[step + 1]``.

    ``sigmas``: the shared grid [N + 1], or per-sample grids in the layout [N + 1, B, 1, ..., 1] (``sigmas[i]``
    broadcasts against ``x``); a step must use the noise levels only elementwise so that both work.
    ``evaluate(j, x)`` makes the step's j-th denoiser call (at ``sigmas[step + offsets[j]]``, with its table row).
    Returns ``(x_next, carry, x_here)``: the state at the next noise level, the new carry, and the final value of the
    state at ``sigmas[step]`` (differs from the input only for predictor-corrector methods).
    """

  def sample(self, denoiser: Denoiser, x_T: jax.Array, sigmas: jax.Array, *, temb_table: TembTable | None = None,
             return_trajectory: bool = False, remat: bool | None = None):
    """Integrates the PF-ODE from ``x_T`` at ``sigmas[0]`` to ``sigmas[-1]`` (each sample along its own row of a
    per-sample grid).

    Args:
      denoiser: ``D(x, sigma, temb=None) -> x0_hat`` with ``sigma`` a scalar (shared grid) or [B] (per-sample grid:
        entry b is sample b's noise level, at every call, the extra calls of Heun and UniPC's corrector included).
      x_T: the initial state at ``sigmas[0]`` (any shape the denoiser accepts, e.g. [B, ...]), any floating dtype;
        the states and the result keep it.
      sigmas: [N + 1] strictly decreasing noise levels, > 0, shared by the batch; or [B, N + 1] with
        ``B = x_T.shape[0]``, row b the grid of sample b, each row such a grid (the step count N is common to all).
        The grid and every step coefficient are computed in ``coefficient_dtype(x_T.dtype)`` (float32 for a bfloat16
        or float16 state, else the state's dtype), and the grid is validated in that dtype: a ValueError names an
        entry (``sigmas[i]``, or ``sigmas[b, i]`` per sample) that collapses or underflows when cast. Per-sample
        coefficients (step ratios, DPM-Solver++'s and UniPC's ``h`` and ``r``, DEIS's integrals) are computed per
        row and broadcast over the data axes.
      temb_table: None, or a pytree whose leaves have leading axis ``nfe(N)``; denoiser call i receives
        ``temb = jax.tree.map(lambda t: t[i], temb_table)``: one row per network evaluation, with or without a
        per-sample grid (a leaf may carry its own batch axis, [nfe, B, D], when the denoiser accepts [B, D]).
      return_trajectory: also return the states at every grid point, [N + 1, *x_T.shape] (state i at
        ``sigmas[i]``, or at ``sigmas[:, i]`` per sample).
      remat: overrides the solver's ``remat`` for this call.
    Returns:
      ``x`` at ``sigmas[-1]`` (``sigmas[:, -1]``), or ``(x, states)`` when ``return_trajectory``.
    Raises:
      TypeError: for a non-floating ``x_T`` or a non-bool ``remat``.
      ValueError: for an invalid grid (see ``validate_grid``; values are checked only when concrete, shapes always),
        a ``temb_table`` without ``nfe(N)`` rows, or a denoiser output of another shape than its input.
    """
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
      raise TypeError(f"x_T must be a floating-point array, got dtype {x_T.dtype}")
    state_dtype = x_T.dtype
    sigmas = validate_grid(sigmas, x_T.shape, coefficient_dtype(state_dtype), dtype_reason=(
        f"the dtype in which the solver computes its grid and coefficients for a {np.dtype(state_dtype).name} state"))
    num_steps = sigmas.shape[-1] - 1
    if sigmas.ndim == 2:
      sigmas = per_sample_layout(sigmas, x_T.ndim)
    check_temb_table(temb_table, self.nfe(num_steps), f"{self.name!r} with {num_steps} steps")
    use_remat = self.remat if remat is None else remat
    check_bool("remat", use_remat)

    x, carry, states, first_eval = x_T, self._init_carry(x_T), [], 0
    for step in range(num_steps):
      offsets = self._step_eval_offsets(step, num_steps)
      rows = None if temb_table is None else tuple(
          jax.tree.map(lambda leaf, k=first_eval + j: leaf[k], temb_table) for j in range(len(offsets)))
      first_eval += len(offsets)
      step_fn = self._bind_step(step, num_steps, offsets, denoiser)
      if use_remat:
        step_fn = jax.checkpoint(step_fn)
      x, carry, x_here = step_fn(x, carry, sigmas, rows)
      # The update is computed in the grid's dtype (float32 or wider); the state keeps the dtype of x_T.
      x, x_here = x.astype(state_dtype), x_here.astype(state_dtype)
      states.append(x_here)
    states.append(x)
    if return_trajectory:
      return x, jnp.stack(states)
    return x

  def _bind_step(self, step: int, num_steps: int, offsets: tuple[int, ...], denoiser: Denoiser):
    """The step as a function of arrays only, ``(x, carry, sigmas, rows) -> (x_next, carry, x_here)``."""

    def step_fn(x, carry, sigmas, rows):
      def evaluate(j: int, x_eval: jax.Array) -> jax.Array:
        sigma = sigmas[step + offsets[j]]
        if sigma.ndim:  # a per-sample column [B, 1, ..., 1]: the denoiser takes [B]
          sigma = sigma.reshape(sigma.shape[:1])
        x0_hat = denoiser(x_eval, sigma) if rows is None else denoiser(x_eval, sigma, temb=rows[j])
        if jnp.shape(x0_hat) != x_eval.shape:
          raise ValueError(f"the denoiser returned shape {jnp.shape(x0_hat)} for an input of shape {x_eval.shape}; "
                           "expected the same shape")
        return x0_hat
      return self._step(step, num_steps, evaluate, x, carry, sigmas)

    return step_fn


# --- shared helpers -------------------------------------------------------------------------------------------------

def validate_grid(sigmas, state_shape: tuple[int, ...] | None = None, dtype=None, *,
                  dtype_reason: str = "the dtype asked for") -> jax.Array:
  """A solver's grid: ``sigmas`` [N + 1] (``validate_sigmas``) or [B, N + 1] (``validate_per_sample_sigmas``).

  Args:
    sigmas: the grid, host or device, concrete or traced (then only its shape is checked).
    state_shape: when given, the shape of the state; a per-sample grid must then have ``state_shape[0]`` rows.
    dtype, dtype_reason: the dtype the grid is returned (and validated) in, and why (see ``validate_sigmas``).
  Returns:
    The grid as a float array of the same shape.
  Raises:
    ValueError: for a grid of rank other than 1 or 2, a per-sample grid with the wrong number of rows (or a state
      without a batch axis), or an invalid entry, named ``sigmas[i]`` or ``sigmas[b, i]``.
  """
  ndim = np.ndim(sigmas)
  if ndim == 1:
    return validate_sigmas(sigmas, dtype, dtype_reason=dtype_reason)
  if ndim != 2:
    raise ValueError(f"sigmas must be [num_steps + 1] (one grid for the batch) or [B, num_steps + 1] (one grid per "
                     f"sample), got shape {np.shape(sigmas)}")
  batch = None
  if state_shape is not None:
    if len(state_shape) == 0:
      raise ValueError(f"per-sample sigmas (shape {np.shape(sigmas)}) need a state with a leading batch axis, got "
                       "a scalar x_T")
    batch = state_shape[0]
  return validate_per_sample_sigmas(sigmas, batch, dtype, dtype_reason=dtype_reason)


def per_sample_layout(sigmas: jax.Array, state_ndim: int) -> jax.Array:
  """Per-sample grids [B, N + 1] as [N + 1, B, 1, ..., 1] (``state_ndim - 1`` trailing ones): ``layout[i]`` is the
  column of noise levels at grid point i, shaped to broadcast against a state [B, ...]."""
  if sigmas.ndim != 2 or state_ndim < 1:
    raise ValueError(f"need per-sample sigmas [B, N + 1] and a state with a batch axis, got shape {sigmas.shape} "
                     f"and a state of rank {state_ndim}")
  return jnp.transpose(sigmas).reshape(sigmas.shape[::-1] + (1,) * (state_ndim - 1))


def jit_when_eager(*, static_argnames: tuple[str, ...]):
  """Decorator for the update formulas: one compiled program per call on concrete arrays, a plain call otherwise.

  An eager sampling loop then dispatches one program per update instead of dozens of scalar ops. Under jit, grad,
  vmap or checkpoint the plain function is traced into the caller's program instead: a nested jit there would be
  compiled and differentiated as a separate sub-program for every order and history length, which costs far more
  compilation than it saves.
  """
  def decorator(fn):
    jitted = jax.jit(fn, static_argnames=static_argnames)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs))):
        return fn(*args, **kwargs)
      return jitted(*args, **kwargs)

    return wrapper

  return decorator


def check_bool(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_order(solver_name: str, order, allowed: tuple[int, ...]) -> None:
  if isinstance(order, bool) or not isinstance(order, int) or order not in allowed:
    raise ValueError(f"{solver_name}: order must be one of {list(allowed)}, got {order!r}")


def check_temb_table(temb_table: TembTable | None, nfe: int, what: str = "") -> None:
  """Every leaf of ``temb_table`` must have a leading axis of length ``nfe`` (one row per denoiser call)."""
  if temb_table is None:
    return
  leaves = jax.tree_util.tree_flatten_with_path(temb_table)[0]
  if not leaves:
    raise ValueError("temb_table has no leaves; pass None to use the denoiser's own time embedding")
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) == 0 or shape[0] != nfe:
      found = "a scalar" if len(shape) == 0 else f"leading axis {shape[0]} (shape {tuple(shape)})"
      raise ValueError(f"temb_table leaf {jax.tree_util.keystr(path) or '<root>'} has {found}; expected leading axis "
                       f"nfe={nfe} (one row per network evaluation{' of ' + what if what else ''})")


def log_ratio(sigma_from: jax.Array, sigma_to: jax.Array) -> jax.Array:
  """``lambda_to - lambda_from = log(sigma_from / sigma_to)`` (positive when integrating towards lower noise)."""
  return jnp.log(sigma_from) - jnp.log(sigma_to)


_PHI_SERIES_BELOW = 1.0  # below this |z| the upward recursion would lose ~log10(1/|z|) digits per order
_PHI_TAYLOR_TERMS = 18   # |z| < 1: truncation error below 1/(18 + k)! relative to phi_k(0) = 1/k!, under float64 eps


def phis(k_max: int, z: jax.Array) -> list[jax.Array]:
  """``[phi_1(z), ..., phi_kmax(z)]`` with ``phi_k(z) = sum_n z^n / (n + k)!``, stable for every z.

  ``phi_1 = (e^z - 1)/z`` and ``phi_{k+1} = (phi_k - 1/k!)/z``. That upward recursion is used for ``|z| >= 1``; near 0
  it cancels, so there ``phi_kmax`` comes from its series and the others from the stable downward recursion
  ``phi_k = 1/k! + z phi_{k+1}``.
  """
  if k_max < 1:
    raise ValueError(f"phi_k needs k >= 1, got k_max={k_max}")
  z = jnp.asarray(z)
  small = jnp.abs(z) < _PHI_SERIES_BELOW
  z_near = jnp.where(small, z, jnp.zeros_like(z))   # each branch sees only values it is accurate (and finite) for,
  z_far = jnp.where(small, jnp.ones_like(z), z)     # so the branch not taken cannot poison values or gradients
  series = jnp.zeros_like(z) + 1.0 / math.factorial(_PHI_TAYLOR_TERMS + k_max)
  for n in range(_PHI_TAYLOR_TERMS - 1, -1, -1):     # Horner: sum_{n <= M} z^n / (n + k_max)!
    series = series * z_near + 1.0 / math.factorial(n + k_max)
  near = [series]
  for k in range(k_max - 1, 0, -1):
    near.insert(0, 1.0 / math.factorial(k) + z_near * near[0])
  far = [jnp.expm1(z_far) / z_far]
  for k in range(1, k_max):
    far.append((far[-1] - 1.0 / math.factorial(k)) / z_far)
  return [jnp.where(small, a, b) for a, b in zip(near, far)]


def phi(k: int, z: jax.Array) -> jax.Array:
  """``phi_k(z)`` (see ``phis``)."""
  return phis(k, z)[-1]


def solve_transposed_vandermonde(nodes: Sequence[jax.Array], b: Sequence[jax.Array]) -> list[jax.Array]:
  """``rho`` with ``sum_k rho_k nodes_k^j = b_j`` for j = 0..n-1, in closed form.

  ``rho_k`` is the Lagrange basis polynomial ``L_k(y) = sum_j c_kj y^j`` of the nodes read as a functional
  ``y^j -> b_j``; for the 2- and 3-point systems of UniPC this is a handful of scalar operations (no LU, cheap to
  differentiate and to compile).
  """
  n = len(nodes)
  if len(b) != n:
    raise ValueError(f"need as many right-hand sides as nodes, got {len(b)} and {n}")
  rho = []
  for k in range(n):
    coefficients, denominator = [jnp.ones_like(nodes[k])], jnp.ones_like(nodes[k])
    for m in range(n):
      if m == k:
        continue
      # multiply the polynomial by (y - nodes[m]); coefficients are in increasing powers of y
      shifted = [jnp.zeros_like(nodes[k])] + coefficients
      scaled = [-nodes[m] * c for c in coefficients] + [jnp.zeros_like(nodes[k])]
      coefficients = [p + q for p, q in zip(shifted, scaled)]
      denominator = denominator * (nodes[k] - nodes[m])
    rho.append(sum(c * bj for c, bj in zip(coefficients, b)) / denominator)
  return rho
