"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095): data prediction, exponential integrator in lambda.

In the EDM variables (``alpha = 1``, ``lambda = -log sigma``) the exact solution from ``s`` to ``t`` is
``x_t = (sigma_t/sigma_s) x_s + int_{lambda_s}^{lambda_t} e^{-(lambda_t - l)} D(l) dl``; the multistep method replaces
``D`` by the polynomial through the last ``k`` denoiser outputs, which with ``h = lambda_t - lambda_s`` gives
    x_t = (sigma_t/sigma_s) x_s + h phi_1(-h) D_0 + h phi_2(-h) D_1 + h phi_3(-h) D_2 + ...
with ``D_0 = D(s)`` and the scaled divided differences ``D_1 ~ h D'``, ``D_2 ~ h^2 D''``. The 2M update is the
"midpoint" form of the paper's Algorithm 2 (diffusers' default), ``h phi_1(-h) (D_0 + D_1/2)``. The 3M update is the
one of the authors' code (dpm-solver, then diffusers and diff-sampler), whose second difference is ``h^2 D''/2`` under
the weight ``h phi_3``, i.e. half the Taylor term (see ``DPMSolverPP``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax

from mteo_jax.solvers.base import SOLVERS, Evaluate, Solver, check_bool, check_order, jit_when_eager, log_ratio, phis

# diffusers lowers the order of the last steps only for short schedules (fewer than 15 steps), where a multistep
# extrapolation over a wide final interval is least reliable.
LOWER_ORDER_FINAL_BELOW_STEPS = 15


@jit_when_eager(static_argnames=("order", "taylor_third_order"))
def dpmpp_update(x: jax.Array, sigma_next: jax.Array, sigmas_hist: Sequence[jax.Array],
                 x0_hist: Sequence[jax.Array], order: int, taylor_third_order: bool = False) -> jax.Array:
  """One DPM-Solver++ multistep update from ``sigmas_hist[0]`` to ``sigma_next``.

  ``sigmas_hist`` / ``x0_hist``: the last ``order`` noise levels and denoiser outputs, most recent first. Noise levels
  are scalars, or per-sample columns [B, 1, ..., 1] that broadcast against ``x`` [B, ...] (then ``h`` and the ratios
  ``r`` are per sample).
  ``taylor_third_order``: weight the second difference by ``2 h phi_3`` instead of ``h phi_3`` (order 3 only; see
  ``DPMSolverPP``).
  """
  if len(sigmas_hist) < order or len(x0_hist) < order:
    raise ValueError(f"order {order} needs {order} history entries, got {len(sigmas_hist)} and {len(x0_hist)}")
  sigma = sigmas_hist[0]
  h = log_ratio(sigma, sigma_next)
  phi_values = phis(order, -h)
  x_base = (sigma_next / sigma) * x + (h * phi_values[0]) * x0_hist[0]
  if order == 1:
    return x_base
  m0, m1 = x0_hist[0], x0_hist[1]
  r0 = log_ratio(sigmas_hist[1], sigma) / h
  d1_0 = (m0 - m1) / r0
  if order == 2:
    return x_base + (0.5 * h * phi_values[0]) * d1_0
  if order == 3:
    m2 = x0_hist[2]
    r1 = log_ratio(sigmas_hist[2], sigmas_hist[1]) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)  # = h^2 D''/2 + O(h^3)
    # The reference implementations (dpm-solver, diffusers, diff-sampler) weight d2 by h phi_3(-h); the Taylor
    # expansion of the integral needs h^3 phi_3(-h) D'' = 2 h phi_3(-h) d2.
    d2_weight = (2.0 if taylor_third_order else 1.0) * h * phi_values[2]
    return x_base + (h * phi_values[1]) * d1 + d2_weight * d2
  raise ValueError(f"DPM-Solver++ multistep supports orders 1, 2, 3; got {order}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPMSolverPP(Solver):
  """DPM-Solver++(2M) or (3M); N steps, N NFE.

  Step i uses order ``min(order, i + 1)`` (warm-up: the first step is DDIM). With ``lower_order_final`` and fewer than
  15 steps, step i is also capped at ``N - i`` (the last step is first order, the one before at most second), as
  diffusers does; so with it 3M and 2M coincide for N <= 4 (both use orders 1, 2, ..., 2, 1).

  The third-order update of the reference implementations (the one the literature's DPM-Solver++(3M) figures come
  from, and the default here) weights the second divided difference by ``h phi_3`` where the Taylor expansion needs
  ``2 h phi_3``: its local error is O(h^3), the same order as 2M's. ``taylor_third_order`` (3M only) uses the
  consistent weight: local error O(h^4), and the update then equals UniP-3's. Either way the global order as
  implemented is 2 (the DDIM first step alone leaves an O(h^2) error).
  """
  order: int = 2
  lower_order_final: bool = True
  taylor_third_order: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_order("dpmpp", self.order, (2, 3))
    check_bool("lower_order_final", self.lower_order_final)
    check_bool("taylor_third_order", self.taylor_third_order)
    if self.taylor_third_order and self.order != 3:
      raise ValueError("taylor_third_order changes only the third-order update; it needs order=3 (dpmpp_3m)")

  @property
  def name(self) -> str:
    return f"dpmpp_{self.order}m"

  def step_order(self, step: int, num_steps: int) -> int:
    """The order used by step ``step`` of ``num_steps``."""
    order = min(self.order, step + 1)
    if self.lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW_STEPS:
      order = min(order, num_steps - step)
    return order

  def _step(self, step: int, num_steps: int, evaluate: Evaluate, x: jax.Array, carry: Any,
            sigmas: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    x0_hist = (evaluate(0, x),) + tuple(carry)[: self.order - 1]
    order = self.step_order(step, num_steps)
    sigmas_hist = [sigmas[step - k] for k in range(order)]
    x_next = dpmpp_update(x, sigmas[step + 1], sigmas_hist, x0_hist[:order], order, self.taylor_third_order)
    return x_next, x0_hist, x


@SOLVERS.register("dpmpp_2m")
def dpmpp_2m(*, lower_order_final: bool = True, remat: bool = False) -> DPMSolverPP:
  """DPM-Solver++(2M)."""
  return DPMSolverPP(order=2, lower_order_final=lower_order_final, remat=remat)


@SOLVERS.register("dpmpp_3m")
def dpmpp_3m(*, lower_order_final: bool = True, taylor_third_order: bool = False, remat: bool = False
             ) -> DPMSolverPP:
  """DPM-Solver++(3M)."""
  return DPMSolverPP(order=3, lower_order_final=lower_order_final, taylor_third_order=taylor_third_order, remat=remat)
