"""INDIS on the harness: an instance-aware schedule, one grid per sample predicted from its noise (arXiv 2603.17671).

A small network phi(x_T, label) (``learned_schedules.SchedulePredictor``: an MLP over the flattened noise, divided by
``sigma_max``, with a label embedding for a conditional teacher) predicts each sample's N schedule logits and,
optionally, a bounded time shift ``b_shift tanh(o / 2)`` and output scale ``1 + b_scale tanh(o / 2)`` per evaluation.
Its head starts at zero and its global logits at the cell's base schedule, so training starts from the base solver.
It is trained with the library's loop on all the harness's training trajectories (Adam, cosine decay) on the same
endpoint loss as LD3. Sampling runs phi once per sample, then the solver with per-sample sigmas, in one jitted call.

The INDIS paper's code is not released; third-party notes (unverified) describe a light MLP over the full ``x_T`` with
three outputs per step (logit, shift, scale), an iPNDM teacher and student, and Adam with cosine decay. What is not
stated is chosen here and documented in ``INDISSettings``.

phi's parameters are saved to ``WORKDIR/schedules/indis_<solver>_nfe<N>`` (``load_predictor`` reads them back and
refuses those of another teacher, solver or NFE).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from mteo_jax import learned_schedules as ls
from mteo_jax import loop
from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.methods.base import METHODS, Method
from mteo_jax.methods.ld3 import EndpointSettings, own_settings


@dataclasses.dataclass(frozen=True)
class INDISSettings(EndpointSettings):
  """INDIS's settings: the training loop's (``loop.LoopConfig`` with INDIS's defaults: 600 Adam steps at lr 3e-3, 30
  warm-up steps, cosine to 5 %, clipping at 1, batch 64) and phi's.

  Attributes:
    hidden, depth: phi's hidden width and number of hidden SiLU layers (128, 2: a light MLP).
    label_dim: the label embedding's width (conditional teachers only).
    normalise_input: feed phi ``x_T / sigma_max`` (unit variance) rather than ``x_T``.
    time_shift, b_shift: predict the time shift, bounded by ``b_shift`` in log-sigma units (> 0).
    output_scale, b_scale: predict the scale of the denoiser output, in ``(1 - b_scale, 1 + b_scale)``
      (``0 < b_scale < 1``).
    loss, radius, min_fraction: the endpoint loss and the gap floor (``ld3.EndpointSettings``).
    eval_every: held-out RMSE on 256 evaluation noises every this many steps (0 = never), in ``metrics.jsonl``.
    save_params: save phi to ``WORKDIR/schedules/indis_<solver>_nfe<N>``.
  """
  steps: int = 600
  batch_size: int = 64
  lr: float = 3e-3
  warmup_steps: int = 30
  lr_decay: str = "cosine"
  lr_end_factor: float = 0.05
  grad_clip: float = 1.0
  log_every: int = 50
  checkpoint_every: int = 200
  hidden: int = 128
  depth: int = 2
  label_dim: int = 32
  normalise_input: bool = True
  time_shift: bool = True
  b_shift: float = 0.2
  output_scale: bool = True
  b_scale: float = 0.1
  eval_every: int = 0
  save_params: bool = True

  section: ClassVar[str] = "indis"

  def check(self, where: str) -> None:
    super().check(where)
    for name in ("hidden", "label_dim"):
      if getattr(self, name) < 1:
        raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("depth", "eval_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")
    if not self.b_shift > 0:
      raise ValueError(f"{where}.b_shift must be > 0, got {self.b_shift}")
    if not 0 < self.b_scale < 1:
      raise ValueError(f"{where}.b_scale must be in (0, 1), got {self.b_scale}")


def build_predictor(settings: INDISSettings, cell: Cell, num_classes: int, sigma_max: float) -> ls.SchedulePredictor:
  """phi for ``cell``: its global logits start at the cell's base schedule."""
  base = ls.logits_from_sigmas(cell.sigmas, settings.min_fraction)
  return ls.SchedulePredictor(
      base_logits=tuple(float(v) for v in base), nfe=cell.nfe, hidden=settings.hidden, depth=settings.depth,
      num_classes=num_classes, label_dim=settings.label_dim,
      input_scale=1.0 / sigma_max if settings.normalise_input else 1.0, predict_shift=settings.time_shift,
      b_shift=settings.b_shift, predict_scale=settings.output_scale, b_scale=settings.b_scale)


def make_instance_sampler(predictor: ls.SchedulePredictor, solver: Any, backbone: Any, precond: Any,
                          sigma_min: float, sigma_max: float, min_fraction: float):
  """``sample(phi_params, params, x_T, label) -> x_0``: phi once per sample ([B, N] logits, [B, NFE] shift and scale),
  then ``solver`` on each sample's own grid [B, N + 1] (``learned_schedules.schedule_sample``)."""

  def sample(phi_params: Any, params: Any, x_T: jax.Array, label: jax.Array | None) -> jax.Array:
    out = predictor.apply({"params": phi_params}, x_T, label)
    sigmas = ls.sigmas_from_logits(out["logits"], sigma_min, sigma_max, min_fraction)
    return ls.schedule_sample(solver, backbone, params, precond, x_T, sigmas, label, shift=out.get("shift"),
                              scale=out.get("scale"))

  return sample


@METHODS.register("indis")
class INDIS(Method):
  """Trains phi per cell on all the harness's training trajectories with ``loop.fit`` in
  ``WORKDIR/indis/<solver>_nfe<N>``; the artefact's payload is ``(phi_params, sample)`` with
  ``sample(phi_params, x_T, label)``."""

  name = "indis"

  def __init__(self, settings: INDISSettings = INDISSettings()):
    self.settings = settings

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    settings, teacher = self.settings, harness.teacher
    if settings.batch_size > harness.config.num_train:
      raise ValueError(f"indis.batch_size={settings.batch_size} exceeds num_train={harness.config.num_train}")
    data = harness.train_data(cell)
    rows = {"x_T": data["x_T"], "target": data["ref"][:, -1]}
    if "label" in data:
      rows["label"] = data["label"]
    sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])
    predictor = build_predictor(settings, cell, teacher.num_classes, sigma_max)
    label0 = None if "label" not in rows else jnp.asarray(rows["label"][:1])
    phi_params = predictor.init(jax.random.key(harness.train_seed), jnp.asarray(rows["x_T"][:1]), label0)["params"]
    sample = make_instance_sampler(predictor, cell.solver, teacher.backbone, teacher.precond, sigma_min, sigma_max,
                                   settings.min_fraction)
    loss_fn = ls.endpoint_loss(settings.loss, settings.radius)

    def objective(phi_params, params, batch):
      return loss_fn(sample(phi_params, params, batch["x_T"], batch.get("label")), batch["target"])

    task = loop.ArrayTask(phi_params, objective, rows, batch_size=settings.batch_size, seed=harness.train_seed,
                          frozen=teacher.params)
    identity = {"teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
                "sigmas": [float(s) for s in cell.sigmas],
                "settings": own_settings(settings, ("eval_every", "save_params")),
                "num_train": harness.config.num_train, "noise_seed": harness.train_seed,
                "reference": dataclasses.asdict(harness.config.reference)}
    held_out = jax.jit(sample)

    def evaluate(step: int, state: loop.TrainState) -> dict[str, float]:
      return {"held_out_rmse": harness.held_out_rmse(lambda x, y: held_out(state.params, teacher.params, x, y))}

    result = loop.fit(task, settings, harness.run_dir(self.name, cell), seed=harness.train_seed, identity=identity,
                      eval_fn=evaluate, eval_every=settings.eval_every, desc=f"INDIS {cell.solver_name} NFE {cell.nfe}")
    phi_params = jax.device_get(result.state.params)
    path = None
    if settings.save_params:
      path = ls.save_artefact(harness.workdir / "schedules" / f"{self.name}_{cell.tag}", phi_params, {
          "method": self.name, "teacher": teacher.identity, "solver": cell.solver_name, "nfe": cell.nfe,
          "sigma_min": sigma_min, "sigma_max": sigma_max, "base_sigmas": [float(s) for s in cell.sigmas],
          "predictor": predictor_config(predictor), "min_fraction": settings.min_fraction,
          "settings": own_settings(settings)})
    steps, losses = result.losses
    eval_steps, rmses = result.evals("held_out_rmse")

    def bound(phi_params, x_T, label):
      return sample(phi_params, teacher.params, x_T, label)

    # The spread of the per-sample grids on the first evaluation noises (for results.json and the schedule picture).
    num = min(ls.DESCRIBE_SAMPLES, harness.config.num_eval)
    labels = None if harness.label_eval is None else jnp.asarray(harness.label_eval[:num])
    logits = jax.jit(predictor.apply)({"params": phi_params}, jnp.asarray(harness.x_T_eval[:num]), labels)["logits"]
    grids = ls.sigmas_from_logits(logits, sigma_min, sigma_max, settings.min_fraction)
    return Artefact(self.name, cell, payload=(phi_params, bound), train_seconds=result.train_seconds,
                    path=None if path is None else str(path),
                    curves={"loss_curve": {"step": steps, "loss": losses},
                            "held_out_curve": {"step": eval_steps, "rmse": rmses},
                            "schedule": ls.describe_grids(grids)})

  def sampler(self, artefact: Artefact) -> Sampler:
    phi_params, sample = artefact.payload
    run = jax.jit(sample)
    return lambda x_T, label: run(phi_params, x_T, label)


def predictor_config(predictor: ls.SchedulePredictor) -> dict:
  """phi's constructor arguments, JSON-able (``SchedulePredictor(**config)`` rebuilds it)."""
  return {f.name: getattr(predictor, f.name) for f in dataclasses.fields(predictor) if f.name not in ("parent",
                                                                                                       "name")}


def load_predictor(path: str | os.PathLike, teacher: Any, *, solver_name: str, nfe: int) -> tuple[Any, Any, dict]:
  """phi saved by ``INDIS`` for ``teacher`` (a ``teachers.Teacher``), this solver and NFE.

  Returns:
    ``(predictor, phi_params, metadata)``; sample with ``make_instance_sampler(predictor, solver, teacher.backbone,
    teacher.precond, metadata["sigma_min"], metadata["sigma_max"], metadata["min_fraction"])``.
  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: not an INDIS artefact, or one of another teacher, solver or
    NFE (the message names each difference).
  """
  arrays, metadata = ls.load_artefact(path, method=INDIS.name, teacher=teacher, solver_name=solver_name, nfe=nfe)
  config = dict(metadata["predictor"])
  config["base_logits"] = tuple(config["base_logits"])
  return ls.SchedulePredictor(**config), jax.tree.map(jnp.asarray, arrays), metadata
