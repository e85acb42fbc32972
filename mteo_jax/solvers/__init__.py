"""Few-step probability-flow ODE solvers (DESIGN §4) by name: ``get_solver("dpmpp_2m").sample(D, x_T, sigmas)``.

Registered names: ``euler``, ``heun``, ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``, ``ipndm``, ``deis``. Every solver has
``name``, ``order``, ``nfe(num_steps)``, ``num_steps_for_nfe(nfe)``, ``eval_sigmas(sigmas)`` and
``sample(denoiser, x_T, sigmas, *, temb_table=None, return_trajectory=False, remat=None)``. ``sigmas`` is one grid
[N + 1] for the batch or one grid per sample [B, N + 1] (instance-aware schedules).
"""

from __future__ import annotations

import inspect

from mteo_jax.solvers.base import SOLVERS, Solver, check_temb_table, phi, phis, solve_transposed_vandermonde
# Importing a solver's module registers it (``@SOLVERS.register`` next to each class).
from mteo_jax.solvers.deis import DEIS, deis_coefficients, deis_update
from mteo_jax.solvers.dpm_solver import DPMSolverPP, dpmpp_2m, dpmpp_3m, dpmpp_update
from mteo_jax.solvers.euler import Euler
from mteo_jax.solvers.heun import Heun
from mteo_jax.solvers.ipndm import IPNDM, ipndm_update
from mteo_jax.solvers.unipc import UniPC, unic_update, unip_update


def solver_options(name: str) -> dict[str, object]:
  """The options of the named solver and their defaults."""
  return {p.name: p.default for p in inspect.signature(SOLVERS.get(name)).parameters.values()}


def get_solver(name: str, **options) -> Solver:
  """Builds the named solver; an unknown name or option is an error that lists the valid ones."""
  valid = solver_options(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise TypeError(f"unknown option(s) {unknown} for solver {name!r}; valid options: {sorted(valid)}")
  return SOLVERS.get(name)(**options)


__all__ = ["SOLVERS", "Solver", "Euler", "Heun", "DPMSolverPP", "UniPC", "IPNDM", "DEIS", "get_solver",
           "solver_options", "check_temb_table", "phi", "phis", "solve_transposed_vandermonde", "dpmpp_update",
           "unip_update", "unic_update", "ipndm_update", "deis_update", "deis_coefficients"]
