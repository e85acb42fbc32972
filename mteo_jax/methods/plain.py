"""The plain solver on the harness's base schedule: nothing is learned (the ``base`` rows)."""

from __future__ import annotations

import jax

from mteo_jax import mteo
from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.methods.base import METHODS, Method


@METHODS.register("base")
class BaseSolver(Method):
  """The cell's solver on its base schedule with the teacher's own time embeddings."""

  name = "base"

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    """The payload is ``(sample, table)``: the harness's compiled table sampler of the cell (``table_sampler``, the
    program MTEO's row runs) and the teacher's own embeddings at the cell's evaluation sigmas (``mteo.init_table``),
    which give the pretrained network's function exactly."""
    teacher = harness.teacher
    table = jax.device_get(mteo.init_table(teacher.backbone, teacher.params, teacher.precond,
                                           cell.solver.eval_sigmas(cell.sigmas)))   # on the host, as MTEO's table
    return Artefact(self.name, cell, payload=(harness.table_sampler(cell), table),
                    curves={"schedule": {"sigmas": [float(s) for s in cell.sigmas]}})

  def sampler(self, artefact: Artefact) -> Sampler:
    run, table = artefact.payload
    return lambda x_T, label: run(table, x_T, label)
