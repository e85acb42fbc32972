"""MTEO on the harness: a table of step-wise, layer-wise time embeddings per (solver, NFE) (``mteo_jax.mteo``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from mteo_jax import loop, mteo
from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.methods.base import METHODS, Method


@dataclasses.dataclass(frozen=True)
class MTEOSettings(loop.LoopConfig):
  """MTEO's settings: the training loop's (``loop.LoopConfig``, with MTEO's defaults: 300 Adam steps at lr 1e-2, 20
  warm-up steps, cosine to 10 %, clipping at 1, batch 32) and the table's.

  Attributes:
    granularity: ``layer`` (one vector per conditioned layer and evaluation) or ``shared`` (one per evaluation).
    distance: the per-sample distance of the loss (``mteo.LossConfig``): ``l2`` (mean squared error), ``l1`` (mean
      absolute error) or ``pseudo_huber`` (``sqrt(mse + huber_c^2) - huber_c``).
    intermediate_weight: the weight of the mean distance at the intermediate states (the final state's is 1; 0
      matches the final state only).
    huber_c: ``c`` of the ``pseudo_huber`` distance (quadratic below it, linear above).
    eval_every: held-out RMSE on 256 evaluation noises every this many steps (0 = never), in ``metrics.jsonl``.
    save_tables: save each trained table to ``WORKDIR/tables/<solver>_nfe<N>`` (``mteo.load_table`` reads it).
  """
  steps: int = 300
  batch_size: int = 32
  lr: float = 1e-2
  warmup_steps: int = 20
  lr_decay: str = "cosine"
  lr_end_factor: float = 0.1
  grad_clip: float = 1.0
  log_every: int = 10
  checkpoint_every: int = 100
  granularity: str = "layer"
  distance: str = "l2"
  intermediate_weight: float = 0.1
  huber_c: float = 0.03
  eval_every: int = 100
  save_tables: bool = True

  section: ClassVar[str] = "mteo"

  def check(self, where: str) -> None:
    super().check(where)
    if self.granularity not in mteo.GRANULARITIES:
      raise ValueError(f"unknown {where}.granularity {self.granularity!r}; expected one of {list(mteo.GRANULARITIES)}")
    for name in ("intermediate_weight", "huber_c", "eval_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
    self.loss_config()   # the distance name

  def loss_config(self) -> mteo.LossConfig:
    return mteo.LossConfig(self.distance, self.intermediate_weight, self.huber_c)


@METHODS.register("mteo")
class MTEO(Method):
  """Distils a table per cell from the harness's training references (``mteo.make_loss_fn``), with ``loop.fit`` in
  ``WORKDIR/mteo/<solver>_nfe<N>``; the artefact's payload is the table ``{layer: [nfe, D]}``."""

  name = "mteo"

  def __init__(self, settings: MTEOSettings = MTEOSettings(), *, name: str = "mteo"):
    self.settings = settings
    self.name = name   # another name keeps another run directory and table (MTEO on a learned schedule)

  def fit(self, harness: Harness, cell: Cell, *, initial_table: mteo.Table | None = None,
          identity: dict | None = None) -> Artefact:
    """The table for ``cell`` (any global schedule: the harness's base one or a searched or learned one), started
    from the teacher's embeddings at the cell's evaluation sigmas or from ``initial_table``; ``identity`` adds what
    else the run depends on (e.g. the schedule's origin)."""
    settings, teacher = self.settings, harness.teacher
    if settings.batch_size > harness.config.num_train:
      raise ValueError(f"mteo.batch_size={settings.batch_size} exceeds num_train={harness.config.num_train}")
    loss = settings.loss_config()
    table = initial_table
    if table is None:
      table = mteo.init_table(teacher.backbone, teacher.params, teacher.precond,
                              cell.solver.eval_sigmas(cell.sigmas), settings.granularity)
    task = mteo.table_task(cell.solver, teacher.backbone, teacher.params, teacher.precond, cell.sigmas, table,
                           harness.train_data(cell), loss, batch_size=settings.batch_size, seed=harness.train_seed)
    identity = {"teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
                "sigmas": [float(s) for s in cell.sigmas], "granularity": settings.granularity,
                "loss": dataclasses.asdict(loss), "num_train": harness.config.num_train,
                "noise_seed": harness.train_seed, "reference": dataclasses.asdict(harness.config.reference),
                **(identity or {})}
    held_out = harness.table_sampler(cell)   # the program the row runs: compiled once

    def evaluate(step: int, state: loop.TrainState) -> dict[str, float]:
      table = jax.device_get(state.params)   # on the host, as the row's table: the same compiled program
      return {"held_out_rmse": harness.held_out_rmse(lambda x, y: held_out(table, x, y))}

    result = loop.fit(task, settings, harness.run_dir(self.name, cell), seed=harness.train_seed, identity=identity,
                      eval_fn=evaluate, eval_every=settings.eval_every,
                      desc=f"{self.name.upper()} {cell.solver_name} NFE {cell.nfe}")
    table = jax.device_get(result.state.params)
    path = None
    if settings.save_tables:
      path = harness.workdir / "tables" / (cell.tag if self.name == "mteo" else f"{self.name}_{cell.tag}")
      meta = mteo.table_metadata(teacher.identity, cell.solver_name, {}, harness.config.schedule, cell.sigmas, table,
                                 teacher.backbone.layer_names, loss, {"steps": settings.steps,
                                                                      "seed": harness.config.seed})
      mteo.save_table(path, table, meta, overwrite=True)
    steps, losses = result.losses
    eval_steps, rmses = result.evals("held_out_rmse")
    return Artefact(self.name, cell, payload=(table, harness.table_sampler(cell)),
                    train_seconds=result.train_seconds, path=None if path is None else str(path),
                    curves={"loss_curve": {"step": steps, "loss": losses},
                            "held_out_curve": {"step": eval_steps, "rmse": rmses}})

  def sampler(self, artefact: Artefact) -> Sampler:
    table, run = artefact.payload
    return lambda x_T, label: run(table, x_T, label)
