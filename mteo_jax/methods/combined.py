"""MTEO combined with a searched (GITS), learned (LD3) or instance-aware (INDIS) schedule: in sequence and jointly.

An MTEO table replaces the teacher's time embeddings at each network evaluation; a schedule moves the evaluations.
The two can be learned one after the other or together:

``mteo_on_<gits|ld3|indis>`` (sequence): the schedule method's artefact first (fitted, or reloaded from the same
  workdir when that method already ran there), frozen; then a table on it.

  * A global grid (GITS, LD3): ``MTEO.fit`` on a cell with that grid, with MTEO's full loss (the teacher's states at
    the new grid come from the harness: one more reference solve, cached in ``WORKDIR/references``). LD3's time shift
    is where the table starts (the teacher's embeddings at the shifted levels), and the table replaces it.
  * INDIS: phi's per-sample grids (and output scales) on the training noise are computed once; the table, one row
    per evaluation shared by all samples, is trained through the per-sample solver on the final-state distance (no
    teacher states exist at every sample's own grid, so ``mteo.intermediate_weight`` is not used). The table starts
    at the teacher's embeddings at the geometric mean of the samples' evaluation sigmas and replaces phi's time shift.

``mteo_on_best`` (sequence): on the schedule, among GITS, LD3 and INDIS, whose few-step samples from the first
  ``num_select`` training noises are closest (RMSE) to the teacher's; the evaluation noise is never used. INDIS was
  trained on those noises and LD3 on some of them, so the choice leans towards the learned schedules. The table is
  the run of ``mteo_on_<chosen>`` (its directory), so it is trained once when both are asked for.

``mteo_joint_<ld3|indis>`` (joint): the table and the schedule's parameters (LD3's gap logits; phi without its time
  shift, which the table subsumes) in one Adam optimizer, from the base schedule and the teacher's embeddings, on the
  final-state distance. The schedule's parameters are written ``p = p_0 + (lr_schedule / lr) r`` with ``r`` from 0,
  so that Adam (invariant to the scale of a gradient) moves them at their own method's learning rate (``ld3.lr``,
  ``indis.lr``) while the table moves at ``mteo.lr``; steps, warm-up, decay and clipping are MTEO's. GITS's grid is a
  discrete search and has no joint form.

Which is best is a measured result (README). Every run goes through ``loop.fit`` in ``WORKDIR/<name>/<solver>_nfe<N>``;
a global-grid table is saved as an MTEO table (``WORKDIR/tables/<name>_<solver>_nfe<N>``), the others as a
learned-schedule artefact (``WORKDIR/schedules/<name>_<solver>_nfe<N>``, read back by ``load_combined``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import learned_schedules as ls
from mteo_jax import loop, metrics, mteo
from mteo_jax.harness import Artefact, Cell, Harness, Sampler, batched
from mteo_jax.hashing import hash_pytree
from mteo_jax.methods.base import METHODS, Method
from mteo_jax.methods.gits import GITS
from mteo_jax.methods.indis import (
  INDIS,
  INDISSettings,
  build_predictor,
  predictor_config,
)
from mteo_jax.methods.ld3 import LD3
from mteo_jax.methods.mteo import MTEO, MTEOSettings
from mteo_jax.nets import make_denoiser

ORDERS = ("sequence", "joint")
SCHEDULE_METHODS = ("gits", "ld3", "indis")
JOINT_SCHEDULES = ("ld3", "indis")


def default_schedule_methods() -> dict[str, Method]:
  return {"gits": GITS(), "ld3": LD3(), "indis": INDIS()}


def _final_distance(settings: MTEOSettings) -> Callable[[jax.Array, jax.Array], jax.Array]:
  distance = mteo.DISTANCES.get(settings.distance)
  return lambda x, ref: jnp.mean(distance(x, ref, settings.huber_c))


def _global_grid(artefact: Artefact) -> tuple[np.ndarray, np.ndarray | None]:
  """(sigmas [N + 1] float32, shift [NFE] float32 | None) of a GITS or LD3 artefact."""
  schedule = artefact.curves["schedule"]
  shift = schedule.get("shift")
  return np.asarray(schedule["sigmas"], np.float32), None if shift is None else np.asarray(shift, np.float32)


class ScheduledMTEO(Method):
  """MTEO on a searched, learned or instance-aware schedule (module docstring).

  Args:
    schedule: ``gits``, ``ld3``, ``indis`` or ``best`` (sequence only).
    order: ``sequence`` (schedule first, then the table) or ``joint`` (``ld3`` or ``indis``: one optimizer).
    mteo_settings: the table's settings and training loop (``methods.MTEOSettings``).
    schedule_methods: ``{"gits": GITS(...), "ld3": LD3(...), "indis": INDIS(...)}``: the schedule methods whose
      artefacts a sequence reuses and whose settings a joint run takes (phi's architecture, ``min_fraction``, the
      schedule's learning rate); the defaults when omitted. Pass the instances the run also scores, so that their
      artefacts are fitted once.
    num_select: training noises ``best`` compares the schedules on.
  Raises:
    ValueError: an unknown schedule or order, a joint order with ``gits`` or ``best``, ``num_select < 1``.
  """

  def __init__(self, schedule: str, order: str = "sequence", *, mteo_settings: MTEOSettings = MTEOSettings(),
               schedule_methods: dict[str, Method] | None = None, num_select: int = 256):
    if order not in ORDERS:
      raise ValueError(f"unknown order {order!r}; expected one of {list(ORDERS)}")
    valid = JOINT_SCHEDULES if order == "joint" else SCHEDULE_METHODS + ("best",)
    if schedule not in valid:
      raise ValueError(f"unknown schedule {schedule!r} for order {order!r}; expected one of {list(valid)}"
                       + (" (GITS's grid is a discrete search: it has no joint form)" if schedule == "gits" else ""))
    if num_select < 1:
      raise ValueError(f"num_select must be >= 1, got {num_select}")
    self.schedule, self.order, self.settings, self.num_select = schedule, order, mteo_settings, num_select
    self.schedule_methods = {**default_schedule_methods(), **(schedule_methods or {})}
    self.name = f"mteo_{'on' if order == 'sequence' else 'joint'}_{schedule}"
    self._artefacts: dict[tuple[str, str], Artefact] = {}

  # --- the schedule under the table ----------------------------------------------------------------------------------

  def schedule_artefact(self, harness: Harness, cell: Cell, name: str) -> Artefact:
    """The artefact of schedule method ``name`` on ``cell`` (fitted once per harness run; a finished run reloads)."""
    key = (name, cell.tag)
    if key not in self._artefacts:
      self._artefacts[key] = self.schedule_methods[name].fit(harness, cell)
    return self._artefacts[key]

  def choose(self, harness: Harness, cell: Cell) -> tuple[str, dict[str, float]]:
    """``(name, {name: RMSE})``: the schedule whose samples from the first ``num_select`` training noises are closest
    to the teacher's."""
    num = min(self.num_select, harness.config.num_train)
    data = harness.train_data(cell)
    labels = data["label"][:num] if "label" in data else None
    scores = {}
    for name in SCHEDULE_METHODS:
      method = self.schedule_methods[name]
      sampler = method.sampler(self.schedule_artefact(harness, cell, name))
      samples = batched(sampler, harness.config.eval_batch_size, data["x_T"][:num], labels)
      scores[name] = float(metrics.rmse(samples, data["ref"][:num, -1]))
    return min(scores, key=scores.get), scores

  # --- fitting -------------------------------------------------------------------------------------------------------

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    if self.order == "joint":
      return self._fit_joint(harness, cell)
    name, selection = self.schedule, None
    if name == "best":
      # MTEO on the chosen schedule is the run of ``mteo_on_<chosen>`` (the same directory: trained once if both run).
      name, selection = self.choose(harness, cell)
      chosen = ScheduledMTEO(name, mteo_settings=self.settings, schedule_methods=self.schedule_methods)
      chosen._artefacts = self._artefacts
      artefact = chosen.fit(harness, cell)
      artefact.method = self.name
      artefact.curves["selection_rmse"] = selection
      return artefact
    schedule = self.schedule_artefact(harness, cell, name)
    if name == "indis":
      artefact = self._fit_on_instances(harness, cell, schedule)
    else:
      artefact = self._fit_on_grid(harness, cell, name, schedule)
    artefact.curves.update({"schedule_from": name, "schedule_seconds": schedule.train_seconds,
                            "table_seconds": artefact.train_seconds})
    artefact.train_seconds += schedule.train_seconds
    return artefact

  def _fit_on_grid(self, harness: Harness, cell: Cell, name: str, schedule: Artefact) -> Artefact:
    teacher = harness.teacher
    sigmas, shift = _global_grid(schedule)
    on_grid = Cell(cell.solver_name, cell.nfe, cell.solver, sigmas)
    initial = None
    if shift is not None:
      initial = ls.shift_table(teacher.backbone, teacher.params, teacher.precond, cell.solver.eval_sigmas(sigmas),
                               jnp.asarray(shift))
      if self.settings.granularity == "shared":
        initial = {mteo.SHARED_KEY: initial[teacher.backbone.layer_names[0]]}
      initial = {k: jnp.array(v, copy=True) for k, v in initial.items()}
    identity = {"schedule_from": name, "schedule_shift": None if shift is None else [float(s) for s in shift]}
    artefact = MTEO(self.settings, name=self.name).fit(harness, on_grid, initial_table=initial, identity=identity)
    artefact.cell = cell
    artefact.curves["schedule"] = {"sigmas": [float(s) for s in sigmas]}
    return artefact

  def _indis_predictor(self, cell: Cell, teacher: Any, **overrides: Any):
    settings: INDISSettings = dataclasses.replace(self.schedule_methods["indis"].settings, **overrides)
    return settings, build_predictor(settings, cell, teacher.num_classes, float(cell.sigmas[0]))

  def _fit_on_instances(self, harness: Harness, cell: Cell, schedule: Artefact) -> Artefact:
    teacher, settings = harness.teacher, self.settings
    indis_settings, predictor = self._indis_predictor(cell, teacher)
    phi_params, _ = schedule.payload
    sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])
    data = harness.train_data(cell)

    @jax.jit
    def grids(x_T, label):
      out = predictor.apply({"params": phi_params}, x_T, label)
      sigmas = ls.sigmas_from_logits(out["logits"], sigma_min, sigma_max, indis_settings.min_fraction)
      return sigmas, out.get("scale", jnp.ones(sigmas.shape[:1] + (cell.nfe,), sigmas.dtype))

    labels = data.get("label")
    sigmas = batched(lambda x, y: jnp.concatenate(grids(x, y), axis=-1), harness.config.eval_batch_size,
                      data["x_T"], labels)
    rows = {"x_T": data["x_T"], "target": data["ref"][:, -1], "sigmas": sigmas[:, :cell.sigmas.shape[0]],
            "scale": sigmas[:, cell.sigmas.shape[0]:]}
    if labels is not None:
      rows["label"] = labels
    mean_eval = np.exp(np.mean(np.log(np.asarray(cell.solver.eval_sigmas(rows["sigmas"]))), axis=0))
    table = mteo.init_table(teacher.backbone, teacher.params, teacher.precond, mean_eval, settings.granularity)
    distance = _final_distance(settings)

    def objective(trainable, params, batch):
      x = self._sample_instances(teacher, cell, trainable["table"], params, batch["x_T"], batch.get("label"),
                                 batch["sigmas"], batch["scale"])
      return distance(x, batch["target"])

    identity = {"schedule_from": "indis", "phi": predictor_config(predictor), "phi_params": hash_pytree(phi_params)}

    def sample(trainable, x_T, label):
      sigmas, scale = grids(x_T, label)
      return self._sample_instances(teacher, cell, trainable["table"], teacher.params, x_T, label, sigmas, scale)

    artefact = self._train(harness, cell, {"table": table}, objective, rows, identity, sample, extra_arrays={
        "phi": phi_params}, metadata={"predictor": predictor_config(predictor),
                                      "min_fraction": indis_settings.min_fraction})
    artefact.curves["schedule"] = schedule.curves.get("schedule")
    return artefact

  @staticmethod
  def _sample_instances(teacher, cell, table, params, x_T, label, sigmas, scale):
    denoiser = make_denoiser(teacher.backbone, params, teacher.precond, label)
    return ls.sample_with_schedule(cell.solver, denoiser, x_T, sigmas,
                                   temb_table=mteo.expand_table(table, teacher.backbone.layer_names), scale=scale)

  def _fit_joint(self, harness: Harness, cell: Cell) -> Artefact:
    teacher, settings = harness.teacher, self.settings
    sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])
    data = harness.train_data(cell)
    rows = {"x_T": data["x_T"], "target": data["ref"][:, -1]}
    if "label" in data:
      rows["label"] = data["label"]
    table = mteo.init_table(teacher.backbone, teacher.params, teacher.precond, cell.solver.eval_sigmas(cell.sigmas),
                            settings.granularity)
    method = self.schedule_methods[self.schedule]
    factor = method.settings.lr / settings.lr
    distance = _final_distance(settings)
    if self.schedule == "ld3":
      min_fraction = method.settings.min_fraction
      base = jnp.asarray(ls.logits_from_sigmas(cell.sigmas, min_fraction), jnp.float32)

      def schedule_of(raw, x_T, label):
        del x_T, label
        return ls.sigmas_from_logits(base + factor * raw, sigma_min, sigma_max, min_fraction), None

      raw0 = jnp.zeros_like(base)
      extra, metadata = {"base_logits": base}, {"min_fraction": min_fraction}
    else:
      indis_settings, predictor = self._indis_predictor(cell, teacher, time_shift=False)
      label0 = None if "label" not in rows else jnp.asarray(rows["label"][:1])
      phi0 = predictor.init(jax.random.key(harness.train_seed), jnp.asarray(rows["x_T"][:1]), label0)["params"]

      def schedule_of(raw, x_T, label):
        phi = jax.tree.map(lambda p, r: p + factor * r, phi0, raw)
        out = predictor.apply({"params": phi}, x_T, label)
        return (ls.sigmas_from_logits(out["logits"], sigma_min, sigma_max, indis_settings.min_fraction),
                out.get("scale"))

      raw0 = jax.tree.map(jnp.zeros_like, phi0)
      extra = {"phi0": phi0}
      metadata = {"predictor": predictor_config(predictor), "min_fraction": indis_settings.min_fraction}

    def sample_with(trainable, params, x_T, label):
      sigmas, scale = schedule_of(trainable["schedule"], x_T, label)
      denoiser = make_denoiser(teacher.backbone, params, teacher.precond, label)
      return ls.sample_with_schedule(cell.solver, denoiser, x_T, sigmas, scale=scale,
                                     temb_table=mteo.expand_table(trainable["table"], teacher.backbone.layer_names))

    def objective(trainable, params, batch):
      return distance(sample_with(trainable, params, batch["x_T"], batch.get("label")), batch["target"])

    metadata.update({"schedule_lr_factor": factor})
    artefact = self._train(harness, cell, {"table": table, "schedule": raw0}, objective, rows,
                           {"schedule_from": self.schedule, **metadata},
                           lambda trainable, x_T, label: sample_with(trainable, teacher.params, x_T, label),
                           extra_arrays=extra, metadata=metadata)
    raw = artefact.payload[0]["schedule"]
    num = min(ls.DESCRIBE_SAMPLES, harness.config.num_eval)
    labels = None if harness.label_eval is None else jnp.asarray(harness.label_eval[:num])
    grids, _ = jax.jit(schedule_of)(raw, jnp.asarray(harness.x_T_eval[:num]), labels)
    artefact.curves["schedule"] = ls.describe_grids(grids)
    return artefact

  def _train(self, harness: Harness, cell: Cell, initial: Any, objective: Callable, rows: dict, identity: dict,
             sample: Callable, *, extra_arrays: dict, metadata: dict) -> Artefact:
    """``loop.fit`` on ``objective`` over ``rows`` in the method's run directory; saves the learned-schedule
    artefact; ``sample(trainable, x_T, label)`` is the sampler."""
    settings, teacher = self.settings, harness.teacher
    if settings.batch_size > harness.config.num_train:
      raise ValueError(f"mteo.batch_size={settings.batch_size} exceeds num_train={harness.config.num_train}")
    task = loop.ArrayTask(initial, objective, rows, batch_size=settings.batch_size, seed=harness.train_seed,
                          frozen=teacher.params)
    identity = {"teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe, "order": self.order,
                "sigmas": [float(s) for s in cell.sigmas], "granularity": settings.granularity,
                "distance": settings.distance, "huber_c": settings.huber_c, "num_train": harness.config.num_train,
                "noise_seed": harness.train_seed, "reference": dataclasses.asdict(harness.config.reference),
                **identity}
    held_out = jax.jit(sample)

    def evaluate(step: int, state: loop.TrainState) -> dict[str, float]:
      return {"held_out_rmse": harness.held_out_rmse(lambda x, y: held_out(state.params, x, y))}

    result = loop.fit(task, settings, harness.run_dir(self.name, cell), seed=harness.train_seed, identity=identity,
                      eval_fn=evaluate, eval_every=settings.eval_every, desc=f"{self.name} {cell.solver_name} NFE "
                                                                             f"{cell.nfe}")
    trainable = jax.device_get(result.state.params)
    path = None
    if settings.save_tables:
      path = ls.save_artefact(harness.workdir / "schedules" / f"{self.name}_{cell.tag}",
                              {"trainable": trainable, **extra_arrays}, {
          "method": self.name, "teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
          "order": self.order, "schedule_from": identity["schedule_from"], "sigma_min": float(cell.sigmas[-1]),
          "sigma_max": float(cell.sigmas[0]), "base_sigmas": [float(s) for s in cell.sigmas],
          "granularity": settings.granularity, **metadata})
    steps, losses = result.losses
    eval_steps, rmses = result.evals("held_out_rmse")
    return Artefact(self.name, cell, payload=(trainable, sample), train_seconds=result.train_seconds,
                    path=None if path is None else str(path),
                    curves={"loss_curve": {"step": steps, "loss": losses},
                            "held_out_curve": {"step": eval_steps, "rmse": rmses}})

  def sampler(self, artefact: Artefact) -> Sampler:
    trainable, sample = artefact.payload
    run = jax.jit(sample)
    return lambda x_T, label: run(trainable, x_T, label)


for _schedule in SCHEDULE_METHODS + ("best",):
  METHODS.register(f"mteo_on_{_schedule}")(functools.partial(ScheduledMTEO, _schedule, "sequence"))
for _schedule in JOINT_SCHEDULES:
  METHODS.register(f"mteo_joint_{_schedule}")(functools.partial(ScheduledMTEO, _schedule, "joint"))


def load_combined(path: str | os.PathLike, teacher: Any, *, method: str, solver_name: str,
                  nfe: int) -> tuple[dict, dict]:
  """An artefact saved by ``mteo_on_indis`` or ``mteo_joint_<ld3|indis>`` for ``teacher``, this solver and NFE.

  Returns:
    ``(arrays, metadata)``: ``arrays["trainable"]`` is ``{"table": {layer: [NFE, D]}, "schedule"?: ...}`` as trained
    (joint: the schedule's raw parameters ``r``, with ``p = p_0 + schedule_lr_factor r`` and ``p_0`` in
    ``arrays["base_logits"]`` or ``arrays["phi0"]``; ``mteo_on_indis``: phi in ``arrays["phi"]``).
  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: another method, teacher, solver or NFE (each named).
  """
  return ls.load_artefact(path, method=method, teacher=teacher, solver_name=solver_name, nfe=nfe)
