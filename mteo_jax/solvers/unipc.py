"""UniPC (Zhao et al. 2023, arXiv 2302.04867), B(h) = e^h - 1 ("bh2") variant, data prediction, in the EDM variables.

With ``h = lambda_t - lambda_s`` and the last denoiser outputs ``m_0`` (at s), ``m_k`` (at s_k, earlier),
``r_k = (lambda_{s_k} - lambda_s) / h`` and ``D_k = (m_k - m_0) / r_k``:
    UniP-p (predictor):  x_t = (sigma_t/sigma_s) x_s + h phi_1(-h) (m_0 + sum_{k<p} rho^p_k D_k)
    UniC-p (corrector):  x_t^c = (sigma_t/sigma_s) x_s + h phi_1(-h) (m_0 + sum_{k<p} rho^c_k D_k + rho^c_p (m_t - m_0))
where ``m_t = D(x_t, sigma_t)`` is the call the next step needs anyway, so the corrector costs no extra NFE. The
weights solve ``R rho = b`` with ``R_{jk} = r_k^(j-1)`` (nodes ``r_k`` and, for UniC, 1) and
``b_j = j! phi_{j+1}(-h) / phi_1(-h)`` (UniPC's
``h phi_{j+1} j! / B(h)`` with ``B(h) = h phi_1``); as in the paper's code, UniP-2 uses ``rho = 1/2`` (then it is
DPM-Solver++(2M)) and UniC-1 uses ``rho = 1/2``. UniC-p raises the local order of UniP-p by one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from mteo_jax.solvers.base import (SOLVERS, Evaluate, Solver, check_bool, check_order, jit_when_eager, log_ratio, phis,
                                   solve_transposed_vandermonde)


def _weights_rhs(phi_values: Sequence[jax.Array], count: int) -> list[jax.Array]:
  """``b_j = j! phi_{j+1}(-h) / phi_1(-h)`` for j = 1..count, from ``phi_values = phis(count + 1, -h)``."""
  return [math.factorial(j) * phi_values[j] / phi_values[0] for j in range(1, count + 1)]


def _differences(h: jax.Array, sigma: jax.Array, sigmas_hist: Sequence[jax.Array], x0_hist: Sequence[jax.Array],
                 order: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """``r_k`` and ``D_k`` for k = 1..order-1 (history entries 1..order-1, most recent first)."""
  rks, d1s = [], []
  for k in range(1, order):
    r_k = log_ratio(sigma, sigmas_hist[k]) / h  # (lambda_{s_k} - lambda_s) / h: negative, s_k is earlier
    rks.append(r_k)
    d1s.append((x0_hist[k] - x0_hist[0]) / r_k)
  return rks, d1s



def _check_history(name: str, order: int, sigmas_hist: Sequence[jax.Array], x0_hist: Sequence[jax.Array]) -> None:
  if order not in (1, 2, 3):
    raise ValueError(f"{name} supports orders 1, 2, 3; got {order}")
  if len(sigmas_hist) < order or len(x0_hist) < order:
    raise ValueError(f"order {order} needs {order} history entries, got {len(sigmas_hist)} and {len(x0_hist)}")


@jit_when_eager(static_argnames=("order",))
def unip_update(x: jax.Array, sigma_next: jax.Array, sigmas_hist: Sequence[jax.Array],
                x0_hist: Sequence[jax.Array], order: int) -> jax.Array:
  """UniP-``order`` from ``sigmas_hist[0]`` to ``sigma_next``; histories most recent first (``order`` entries).

  Noise levels are scalars, or per-sample columns [B, 1, ..., 1] that broadcast against ``x`` [B, ...] (then ``h``,
  ``r_k``, ``B(h)`` and the weights ``rho`` are per sample).
  """
  _check_history("UniP", order, sigmas_hist, x0_hist)
  sigma = sigmas_hist[0]
  h = log_ratio(sigma, sigma_next)
  phi_values = phis(3 if order == 3 else 1, -h)
  rks, d1s = _differences(h, sigma, sigmas_hist, x0_hist, order)
  residual = jnp.zeros_like(x0_hist[0])
  if order == 2:
    residual = 0.5 * d1s[0]
  elif order == 3:
    rhos = solve_transposed_vandermonde(rks, _weights_rhs(phi_values, 2))
    residual = rhos[0] * d1s[0] + rhos[1] * d1s[1]
  return (sigma_next / sigma) * x + (h * phi_values[0]) * (x0_hist[0] + residual)


@jit_when_eager(static_argnames=("order",))
def unic_update(x_prev: jax.Array, sigma: jax.Array, sigmas_hist: Sequence[jax.Array],
                x0_hist: Sequence[jax.Array], x0_new: jax.Array, order: int) -> jax.Array:
  """UniC-``order``: the corrected state at ``sigma`` from ``x_prev`` at ``sigmas_hist[0]``.

  ``x0_hist``: denoiser outputs at ``sigmas_hist`` (most recent first); ``x0_new``: the denoiser at the predicted state.
  Noise levels are scalars or per-sample columns [B, 1, ..., 1], as in ``unip_update``.
  """
  _check_history("UniC", order, sigmas_hist, x0_hist)
  sigma_prev = sigmas_hist[0]
  h = log_ratio(sigma_prev, sigma)
  phi_values = phis(order + 1 if order > 1 else 1, -h)
  rks, d1s = _differences(h, sigma_prev, sigmas_hist, x0_hist, order)
  if order == 1:
    rhos = [0.5]
  else:
    rhos = solve_transposed_vandermonde(rks + [jnp.ones_like(h)], _weights_rhs(phi_values, order))
  residual = rhos[-1] * (x0_new - x0_hist[0])
  for k, d1 in enumerate(d1s):
    residual = residual + rhos[k] * d1
  return (sigma / sigma_prev) * x_prev + (h * phi_values[0]) * (x0_hist[0] + residual)


@SOLVERS.register("unipc")
@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPC(Solver):
  """UniPC-p (bh2): UniP-p predictor; UniC-p corrects each new state with the call made there, except the last.

  N steps, N NFE. Step i predicts with order ``min(order, i + 1)`` (warm-up) and, with ``lower_order_final`` (default,
  as in the UniPC code and diffusers, for any N), also at most ``N - i``; the corrector at step i uses the order
  of the prediction it corrects. Global order as implemented: p + 1 capped by the warm-up (UniP-1 + UniC-1 first step:
  local O(h^3)) and by the uncorrected last step, i.e. 2, 3, 3 for p = 1, 2, 3 without ``lower_order_final``, and 2
  with it (the last step is then an uncorrected first-order step).
  """
  name: ClassVar[str] = "unipc"
  order: int = 3
  lower_order_final: bool = True

  def __post_init__(self):
    super().__post_init__()
    check_order("unipc", self.order, (1, 2, 3))
    check_bool("lower_order_final", self.lower_order_final)

  def step_order(self, step: int, num_steps: int) -> int:
    """The predictor order used by step ``step`` of ``num_steps``."""
    order = min(self.order, step + 1)
    if self.lower_order_final:
      order = min(order, num_steps - step)
    return order

  def _init_carry(self, x_T: jax.Array) -> Any:
    return (x_T, ())  # (corrected state at the previous noise level, denoiser history most recent first)

  def _step(self, step: int, num_steps: int, evaluate: Evaluate, x: jax.Array, carry: Any,
            sigmas: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    x_prev, x0_hist = carry
    x0 = evaluate(0, x)
    if step > 0:
      corrector_order = self.step_order(step - 1, num_steps)
      x = unic_update(x_prev, sigmas[step], [sigmas[step - 1 - k] for k in range(corrector_order)],
                      x0_hist[:corrector_order], x0, corrector_order)
    x0_hist = (x0,) + tuple(x0_hist)[: self.order - 1]
    order = self.step_order(step, num_steps)
    x_next = unip_update(x, sigmas[step + 1], [sigmas[step - k] for k in range(order)], x0_hist[:order], order)
    return x_next, (x, x0_hist), x
