"""LD3 on the harness: one learned global schedule (and time shift) per cell (Tong et al. 2024, arXiv 2405.15506).

What is learned for a cell (solver, NFE, base schedule from ``sigma_max`` to ``sigma_min``) is the N gap logits of
``learned_schedules.sigmas_from_logits`` (initialised to the cell's base schedule, EDM rho = 7 by default) and,
optionally, a bounded decoupled time shift per evaluation, ``shift_i = shift_bound tanh(o_i / 2)``: the network is told
``sigma_i exp(shift_i)`` while the solver uses ``sigma_i``. The loss compares the student's final sample with the
teacher's from the same noise (l2, or the soft-teacher ball). As in LD3, a small set of trajectories is enough
(``num_train = 100`` by default, of the harness's training noise); a validation split of them (20 %) picks the
parameters: early stopping keeps the parameters with the lowest validation loss among the initial ones and those
evaluated every ``eval_every`` steps.

The learned schedule is saved to ``WORKDIR/schedules/ld3_<solver>_nfe<N>`` (``load_schedule`` reads it back and
refuses one of another teacher, solver or NFE).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mteo_jax import learned_schedules as ls
from mteo_jax import files, loop
from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.methods.base import METHODS, Method


@dataclasses.dataclass(frozen=True)
class EndpointSettings(loop.LoopConfig):
  """The settings LD3 and INDIS share beside the training loop's: the endpoint loss and the schedule's gap floor.

  Attributes:
    loss: ``l2`` or ``soft_teacher`` (``learned_schedules.soft_teacher_loss``); radius: the soft teacher's radius in
      data units (RMS per coordinate; must be 0 for ``l2`` and > 0 for ``soft_teacher``).
    min_fraction: the floor of each gap's share of the log-sigma range (``sigmas_from_logits``).
  """
  loss: str = "l2"
  radius: float = 0.0
  min_fraction: float = ls.DEFAULT_MIN_FRACTION

  def check(self, where: str) -> None:
    super().check(where)
    try:
      ls.endpoint_loss(self.loss, self.radius)
    except (KeyError, ValueError) as e:
      raise ValueError(f"{where}.loss / {where}.radius: {e}") from None
    if not 0 < self.min_fraction < 1:
      raise ValueError(f"{where}.min_fraction must be in (0, 1), got {self.min_fraction}")


@dataclasses.dataclass(frozen=True)
class LD3Settings(EndpointSettings):
  """LD3's settings: the training loop's (``loop.LoopConfig`` with LD3's defaults: 200 Adam steps at lr 2e-2, 10
  warm-up steps, cosine to 10 %, clipping at 1, batch 16) and the schedule's.

  Attributes:
    num_train: training trajectories used, the first ``num_train`` of the harness's (``HarnessConfig.num_train`` must
      be at least this); LD3 uses about 100.
    val_fraction: the share of them held out for early stopping (the last rows; 0 = no validation, keep the final
      parameters).
    eval_every: the validation loss every this many steps (and at the end); the best parameters are kept.
    time_shift: learn the decoupled time shift; shift_bound: its bound, in log-sigma units (> 0).
    loss, radius, min_fraction: see ``EndpointSettings``.
    save_schedules: save each learned schedule to ``WORKDIR/schedules/ld3_<solver>_nfe<N>``.
  """
  steps: int = 200
  batch_size: int = 16
  lr: float = 2e-2
  warmup_steps: int = 10
  lr_decay: str = "cosine"
  lr_end_factor: float = 0.1
  grad_clip: float = 1.0
  log_every: int = 10
  checkpoint_every: int = 100
  num_train: int = 100
  val_fraction: float = 0.2
  eval_every: int = 20
  time_shift: bool = True
  shift_bound: float = 0.5
  save_schedules: bool = True

  section: ClassVar[str] = "ld3"

  def check(self, where: str) -> None:
    super().check(where)
    if self.num_train < 2:
      raise ValueError(f"{where}.num_train must be >= 2, got {self.num_train}")
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(f"{where}.val_fraction must be in [0, 1), got {self.val_fraction}")
    num_val = self.num_val
    if self.val_fraction > 0 and self.eval_every < 1:
      raise ValueError(f"{where}.eval_every must be >= 1 with a validation split (val_fraction > 0), got "
                       f"{self.eval_every}")
    if self.batch_size > self.num_train - num_val:
      raise ValueError(f"{where}.batch_size={self.batch_size} exceeds the {self.num_train - num_val} training "
                       f"trajectories (num_train={self.num_train} less {num_val} for validation)")
    if not self.shift_bound > 0:
      raise ValueError(f"{where}.shift_bound must be > 0, got {self.shift_bound}")

  @property
  def num_val(self) -> int:
    """Validation trajectories: ``round(val_fraction * num_train)``, at least 1 when ``val_fraction > 0``."""
    return max(1, round(self.val_fraction * self.num_train)) if self.val_fraction > 0 else 0


def own_settings(settings: loop.LoopConfig, exclude: tuple[str, ...] = ()) -> dict:
  """The fields a method adds to ``loop.LoopConfig`` (the loop's own are part of ``loop.run_identity`` already)."""
  loop_fields = {f.name for f in dataclasses.fields(loop.LoopConfig)}
  return {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
          if f.name not in loop_fields and f.name not in exclude}


class BestParameters:
  """The parameters with the lowest validation loss seen so far, kept in ``path`` (an ``.npz``) so that a resumed or
  finished run still knows them.

  Training is deterministic given the run's identity, so a file written by an earlier, interrupted call of the same
  run holds parameters of the same trajectory and is kept while it is better; a file of another run is ignored.
  """

  def __init__(self, path: Path, identity: dict):
    self.path, self.identity = Path(path), json.dumps(identity, sort_keys=True)

  def read(self) -> tuple[int, float, dict] | None:
    """``(step, validation loss, parameters)`` or None (no file, or one of another run).

    Raises:
      files.UnreadableFileError: a file that cannot be read (truncated, corrupted); the message says to delete it.
    """
    if not self.path.exists():
      return None
    try:
      with np.load(self.path, allow_pickle=False) as stored:
        if str(stored["identity"]) != self.identity:
          return None
        params = {key.removeprefix("param/"): stored[key] for key in stored.files if key.startswith("param/")}
        return int(stored["step"]), float(stored["value"]), params
    except Exception as error:  # noqa: BLE001 (zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError, ...)
      raise files.UnreadableFileError(
          f"{self.path} cannot be read ({files.reason(error)}); delete its run directory {self.path.parent} to train "
          "that run again") from None

  def offer(self, step: int, value: float, params: dict) -> bool:
    """Keeps ``params`` if ``value`` is finite and below the best so far (a file of another run is replaced: call this
    only once ``loop.fit`` has accepted the run directory); returns whether it did."""
    best = self.read()
    if not np.isfinite(value) or (best is not None and best[1] <= value):
      return False
    tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, identity=np.asarray(self.identity), step=np.asarray(step), value=np.asarray(value),
             **{f"param/{key}": np.asarray(leaf) for key, leaf in jax.device_get(params).items()})
    os.replace(tmp, self.path)
    return True


def make_schedule_sampler(cell: Cell, backbone: Any, precond: Any, *, min_fraction: float, shift_bound: float):
  """``sample(trainable, params, x_T, label) -> x_0`` for LD3's ``trainable = {"logits": [N], "shift"?: [NFE]}`` on
  the cell's solver, between the cell's endpoints."""
  sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])

  def sample(trainable: dict, params: Any, x_T: jax.Array, label: jax.Array | None) -> jax.Array:
    sigmas = ls.sigmas_from_logits(trainable["logits"], sigma_min, sigma_max, min_fraction)
    shift = ls.bounded(trainable["shift"], shift_bound) if "shift" in trainable else None
    return ls.schedule_sample(cell.solver, backbone, params, precond, x_T, sigmas, label, shift=shift)

  return sample


@METHODS.register("ld3")
class LD3(Method):
  """Learns a global schedule (and time shift) per cell with ``loop.fit`` in ``WORKDIR/ld3/<solver>_nfe<N>``; the
  artefact's payload is ``(trainable, sample)`` with the best-by-validation ``{"logits": [N], "shift"?: [NFE]}`` and
  ``sample(trainable, x_T, label)``."""

  name = "ld3"

  def __init__(self, settings: LD3Settings = LD3Settings()):
    self.settings = settings

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    settings, teacher = self.settings, harness.teacher
    if settings.num_train > harness.config.num_train:
      raise ValueError(f"ld3.num_train={settings.num_train} exceeds the harness's num_train="
                       f"{harness.config.num_train}")
    data = harness.train_data(cell)
    num_fit = settings.num_train - settings.num_val
    rows = {"x_T": data["x_T"][:settings.num_train], "target": data["ref"][:settings.num_train, -1]}
    if "label" in data:
      rows["label"] = data["label"][:settings.num_train]
    train = {k: v[:num_fit] for k, v in rows.items()}
    val = {k: v[num_fit:] for k, v in rows.items()}

    trainable = {"logits": jnp.asarray(ls.logits_from_sigmas(cell.sigmas, settings.min_fraction), jnp.float32)}
    if settings.time_shift:
      trainable["shift"] = jnp.zeros((cell.nfe,), jnp.float32)
    sample = make_schedule_sampler(cell, teacher.backbone, teacher.precond, min_fraction=settings.min_fraction,
                                   shift_bound=settings.shift_bound)
    loss_fn = ls.endpoint_loss(settings.loss, settings.radius)

    def objective(trainable, params, batch):
      return loss_fn(sample(trainable, params, batch["x_T"], batch.get("label")), batch["target"])

    task = loop.ArrayTask(trainable, objective, train, batch_size=settings.batch_size, seed=harness.train_seed,
                          frozen=teacher.params)
    identity = {"teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
                "sigmas": [float(s) for s in cell.sigmas], "settings": own_settings(settings, ("save_schedules",)),
                "harness_num_train": harness.config.num_train, "noise_seed": harness.train_seed,
                "reference": dataclasses.asdict(harness.config.reference)}
    run_dir = harness.run_dir(self.name, cell)
    run_dir.mkdir(parents=True, exist_ok=True)

    evaluate, best, initial = None, None, []
    if settings.num_val:
      val_loss = jax.jit(lambda t, p: objective(t, p, val))
      best = BestParameters(run_dir / "best_params.npz", loop.run_identity(settings, identity))

      def evaluate(step: int, state: loop.TrainState) -> dict[str, float]:
        # The base schedule is a candidate too; offered here, once loop.fit has accepted the run directory.
        if not initial:
          initial.append(float(val_loss(trainable, teacher.params)))
          best.offer(0, initial[0], trainable)
        value = float(val_loss(state.params, teacher.params))
        best.offer(step, value, state.params)
        return {"val_loss": value, "base_val_loss": initial[0]}

    result = loop.fit(task, settings, run_dir, seed=harness.train_seed, identity=identity, eval_fn=evaluate,
                      eval_every=settings.eval_every if settings.num_val else 0,
                      desc=f"LD3 {cell.solver_name} NFE {cell.nfe}")
    chosen, best_step = jax.device_get(result.state.params), settings.steps
    kept = best.read() if best is not None else None
    if kept is not None:
      best_step, _, chosen = kept
    elif best is not None:
      logging.warning("LD3 %s: no best parameters in %s; using the final ones", cell.tag, run_dir)
    chosen = {k: jnp.asarray(v) for k, v in chosen.items()}

    learned = self.describe(chosen, cell)
    path = None
    if settings.save_schedules:
      path = ls.save_artefact(harness.workdir / "schedules" / f"{self.name}_{cell.tag}", chosen, {
          "method": self.name, "teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
          "sigma_min": float(cell.sigmas[-1]), "sigma_max": float(cell.sigmas[0]),
          "base_sigmas": [float(s) for s in cell.sigmas], "best_step": best_step, **learned,
          "settings": own_settings(settings)})
    steps, losses = result.losses
    val_steps, val_losses = result.evals("val_loss")
    base_val = result.evals("base_val_loss")[1][:1]  # the same at every evaluation: the initial parameters'
    val_steps, val_losses = [0] * len(base_val) + val_steps, base_val + val_losses

    def bound(trainable, x_T, label):
      return sample(trainable, teacher.params, x_T, label)

    return Artefact(self.name, cell, payload=(chosen, bound), train_seconds=result.train_seconds,
                    path=None if path is None else str(path),
                    curves={"loss_curve": {"step": steps, "loss": losses},
                            "val_curve": {"step": val_steps, "val_loss": val_losses},
                            "schedule": {"best_step": best_step, **learned}})

  def describe(self, trainable: dict, cell: Cell) -> dict:
    """The learned grid and shift as lists: ``{"sigmas": [N + 1], "shift": [NFE] | None, "min_fraction",
    "shift_bound"}``."""
    settings = self.settings
    sigmas = ls.sigmas_from_logits(trainable["logits"], float(cell.sigmas[-1]), float(cell.sigmas[0]),
                                   settings.min_fraction)
    shift = ls.bounded(trainable["shift"], settings.shift_bound) if "shift" in trainable else None
    return {"sigmas": [float(s) for s in sigmas], "shift": None if shift is None else [float(s) for s in shift],
            "min_fraction": settings.min_fraction, "shift_bound": settings.shift_bound}

  def sampler(self, artefact: Artefact) -> Sampler:
    trainable, sample = artefact.payload
    run = jax.jit(sample)
    return lambda x_T, label: run(trainable, x_T, label)


def load_schedule(path: str | os.PathLike, teacher: Any, *, solver_name: str, nfe: int) -> dict:
  """A schedule saved by ``LD3`` for ``teacher`` (a ``teachers.Teacher``), this solver and NFE.

  Returns:
    ``{"sigmas": [N + 1] float32, "shift": [NFE] float32 | None, "logits": [N], "metadata": {...}}``; sample with
    ``learned_schedules.schedule_sample(solver, teacher.backbone, teacher.params, teacher.precond, x_T,
    out["sigmas"], label, shift=out["shift"])``.
  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: not an LD3 schedule, or one of another teacher, solver or NFE
    (the message names each difference).
  """
  arrays, metadata = ls.load_artefact(path, method=LD3.name, teacher=teacher, solver_name=solver_name, nfe=nfe)
  sigmas = ls.sigmas_from_logits(jnp.asarray(arrays["logits"]), metadata["sigma_min"], metadata["sigma_max"],
                                 metadata["min_fraction"])
  shift = None
  if "shift" in arrays:
    shift = ls.bounded(jnp.asarray(arrays["shift"]), metadata["shift_bound"])
  return {"sigmas": np.asarray(sigmas), "shift": None if shift is None else np.asarray(shift),
          "logits": arrays["logits"], "metadata": metadata}
