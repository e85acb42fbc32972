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
    teacher = harness.teacher
    return Artefact(self.name, cell, payload=(teacher.backbone, teacher.params, teacher.precond),
                    curves={"schedule": {"sigmas": [float(s) for s in cell.sigmas]}})

  def sampler(self, artefact: Artefact) -> Sampler:
    backbone, params, precond = artefact.payload
    cell = artefact.cell
    run = jax.jit(lambda x_T, label: mteo.student_sample(cell.solver, backbone, params, precond, None, x_T,
                                                         cell.sigmas, label))
    return run
