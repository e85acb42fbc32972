"""Euler in sigma, which in the EDM variables is exactly DDIM (Song et al. 2021): first order, one call per step."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from mteo_jax.solvers.base import SOLVERS, Evaluate, Solver


@SOLVERS.register("euler")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Euler(Solver):
  """``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i``; N steps, N NFE, order 1.

  Equivalently ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i + (1 - sigma_{i+1}/sigma_i) D_i``: the DDIM / DPM-Solver++(1)
  update, exact when D is constant along the step.
  """
  name: ClassVar[str] = "euler"
  order: ClassVar[int] = 1

  def _step(self, step: int, num_steps: int, evaluate: Evaluate, x: jax.Array, carry: Any,
            sigmas: jax.Array) -> tuple[jax.Array, Any, jax.Array]:
    sigma, sigma_next = sigmas[step], sigmas[step + 1]
    d = (x - evaluate(0, x)) / sigma
    return x + (sigma_next - sigma) * d, carry, x
