"""EDM's deterministic sampler (Karras et al. 2022, Algorithm 1 without churn): Heun's second-order method in sigma."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mteo_jax.solvers.base import SOLVERS, Evaluate, Solver


@SOLVERS.register("heun")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Heun(Solver):
  """Heun (explicit trapezoid) on ``dx/dsigma = (x - D)/sigma``; the last step is a plain Euler step, as in EDM.

  Steps 0..N-2 call the denoiser at ``sigma_i`` and at ``sigma_{i+1}`` (on the Euler prediction); the last step calls
  it once, so ``nfe(N) = 2N - 1`` and only odd NFE are reachable. EDM drops the correction there because its last
  sigma is 0; we keep that convention so that NFE counts match the literature. The single Euler step has local error
  O(h^2), so the global order stays 2.
  """
  name: ClassVar[str] = "heun"
  order: ClassVar[int] = 2

  def _step_eval_offsets(self, step: int, num_steps: int) -> tuple[int, ...]:
    return (0,) if step == num_steps - 1 else (0, 1)

  def _step(self, step: int, num_steps: int, evaluate: Evaluate, x: jax.Array, carry: Any,
            sigmas: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    d = (x - evaluate(0, x)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if step == num_steps - 1:
      return x_euler, carry, x
    d_next = (x_euler - evaluate(1, x_euler)) / sigma_next
    return x + (sigma_next - sigma) * (0.5 * d + 0.5 * d_next), carry, x
