"""Progressive distillation on the harness (Salimans & Ho 2022, arXiv 2202.00512): the expensive baseline.

The student starts as a copy of the teacher's (EMA) weights. A round trains it so that one of its deterministic DDIM
steps matches two DDIM steps of the current teacher; then the student becomes the teacher and the step count halves:

    round k: teacher on 2N steps -> student on N steps,   N = start_steps / 2^k, ..., end_steps

DDIM in the library's EDM variables (``x = x0 + sigma eps``) is the Euler step of the probability-flow ODE,
``x' = x0_hat + (sigma' / sigma)(x - x0_hat)`` (``ddim_step``). With the VP variables ``alpha = 1 / sqrt(1 + sigma^2)``,
``sigma_vp = sigma alpha`` and ``z = alpha x``, the student's target at a grid point ``sigma`` is the ``x0`` for which
one DDIM step to ``sigma''`` (two teacher steps later) lands on the teacher's ``z''`` (the paper's Algorithm 2):

    x_target = (z'' - (sigma_vp'' / sigma_vp) z) / (alpha'' - (sigma_vp'' / sigma_vp) alpha)     (distillation_target)

The loss is ``w(sigma) ||x0_hat - x_target||^2`` (mean over features and the batch) with the truncated-SNR weight
``max(SNR, 1)`` (``SNR = alpha^2 / sigma_vp^2 = 1 / sigma^2``) or, as an option, ``SNR + 1``; training points are the
data of the teacher's training set, noised at a grid point of the student drawn uniformly. Each round has a fresh
Adam with a linearly decaying learning rate and, by default, no EMA and no dropout.

The student's output parameterisation. The paper trains students with an x-, v- or (x, eps)-output because an
eps-output is unstable at few steps. The library's backbones are EDM-preconditioned, ``x0_hat = c_skip x +
c_out F(c_in x, c_noise)`` (Karras et al. 2022, eq. 7); with ``sigma_data = 1`` this *is* the v-parameterisation
(``c_skip x = alpha z``, ``c_out = sigma_vp``, so ``F = -v``), and for other ``sigma_data`` it is v in units of
``sigma_data``. The student inherits it with the teacher's weights, so it never has the eps instability; an x-, eps- or
two-headed output would throw away the teacher's output layer, so it is not offered on these backbones. What the
paper's choice also sets, the space the loss is measured in, is the ``weighting`` option: ``max(SNR, 1)`` is the
larger of the x- and eps-space errors (the paper's "truncated SNR"), ``SNR + 1`` is the v-space error.

Rounds run with ``loop.fit`` in ``WORKDIR/pd/round<k>_<2N>to<N>`` (checkpoints, exact resume mid-round, a progress
bar per round, data parallel on the mesh). Each student is exported as a teacher-format model to
``WORKDIR/pd/students/steps<N>`` with its parent teacher's identity and step count (``load_student`` checks them).
Students are sampled with DDIM (``euler``) at their own step count, on the nested grid ``start grid[::start / N]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import config_utils, files, loop, mteo, parallel
from mteo_jax import data as data_lib
from mteo_jax.diffusion import broadcast_to_batch, sigma_to_alpha_sigma
from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.methods.base import METHODS, Method
from mteo_jax.nets import make_denoiser
from mteo_jax.solvers import get_solver

WEIGHTINGS = ("truncated_snr", "snr_plus_one")
STUDENT_FORMAT = "mteo_jax.pd_student/1"
SOLVER = "euler"   # DDIM in the EDM variables


# --- the maths -------------------------------------------------------------------------------------------------------

def ddim_step(x: jax.Array, x0_hat: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
  """One deterministic DDIM step (Song et al. 2021, eq. 12) in the EDM variables: ``x0_hat + (sigma'/sigma)(x -
  x0_hat)``, i.e. Euler on the probability-flow ODE. ``x``, ``x0_hat``: [B, ...]; ``sigma``, ``sigma_next``: scalars
  or [B]."""
  ratio = broadcast_to_batch(sigma_next / sigma, x)
  return x0_hat + ratio * (x - x0_hat)


def distillation_target(x: jax.Array, x_next2: jax.Array, sigma: jax.Array, sigma_next2: jax.Array) -> jax.Array:
  """The ``x0`` whose single DDIM step from ``(x, sigma)`` lands on ``(x_next2, sigma_next2)`` (PD, Algorithm 2):
  ``(z'' - (sigma_vp''/sigma_vp) z) / (alpha'' - (sigma_vp''/sigma_vp) alpha)`` in the VP variables, with ``z = alpha
  x``. ``x``, ``x_next2``: [B, ...] in the EDM variables; ``sigma > sigma_next2 >= 0``: scalars or [B]. Returns [B,
  ...] in the dtype of ``x`` (float64 in, float64 out)."""
  alpha, sigma_vp = sigma_to_alpha_sigma(jnp.asarray(sigma, x.dtype))
  alpha2, sigma_vp2 = sigma_to_alpha_sigma(jnp.asarray(sigma_next2, x.dtype))
  ratio = broadcast_to_batch(sigma_vp2 / sigma_vp, x)
  z, z2 = broadcast_to_batch(alpha, x) * x, broadcast_to_batch(alpha2, x) * x_next2
  return (z2 - ratio * z) / (broadcast_to_batch(alpha2, x) - ratio * broadcast_to_batch(alpha, x))


def loss_weight(sigma: jax.Array, weighting: str) -> jax.Array:
  """``max(SNR, 1)`` (``truncated_snr``) or ``SNR + 1`` (``snr_plus_one``) with ``SNR = 1 / sigma^2`` (PD, Sec. 4).

  Raises:
    ValueError: an unknown weighting (listing the valid ones).
  """
  snr = 1.0 / jnp.square(sigma)
  if weighting == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr_plus_one":
    return snr + 1.0
  raise ValueError(f"unknown weighting {weighting!r}; expected one of {list(WEIGHTINGS)}")


# --- settings --------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PDSettings(loop.LoopConfig):
  """PD's settings: the training loop's for *each round* (``loop.LoopConfig`` with PD's defaults: a fresh Adam per
  round, lr 2e-4 decaying linearly to 0, clipping at 1, batch 128, no EMA) and the distillation's.

  Attributes:
    start_steps: the DDIM step count of the first round's teacher (the original teacher); the first student has half.
    end_steps: the step count of the last student (>= 1); ``start_steps / end_steps`` is a power of two >= 2.
    weighting: ``truncated_snr`` (``max(SNR, 1)``, the paper's default) or ``snr_plus_one``.
    dropout: train the student with the backbone's dropout (the teacher's rate); off by default, as in the paper's
      distillation.
    export_students: export each round's student to ``WORKDIR/pd/students/steps<N>`` (teacher format).
  """
  steps: int = 2000
  batch_size: int = 128
  lr: float = 2e-4
  warmup_steps: int = 0
  lr_decay: str = "linear"
  lr_end_factor: float = 0.0
  grad_clip: float = 1.0
  log_every: int = 100
  checkpoint_every: int = 500
  start_steps: int = 64
  end_steps: int = 1
  weighting: str = "truncated_snr"
  dropout: bool = False
  export_students: bool = True

  section: ClassVar[str] = "pd"

  def check(self, where: str) -> None:
    super().check(where)
    for name in ("start_steps", "end_steps"):
      if type(getattr(self, name)) is not int:
        raise TypeError(f"{where}.{name} must be an int, got {getattr(self, name)!r}")
    for name in ("dropout", "export_students"):
      if type(getattr(self, name)) is not bool:
        raise TypeError(f"{where}.{name} must be a bool, got {getattr(self, name)!r}")
    if self.end_steps < 1:
      raise ValueError(f"{where}.end_steps must be >= 1, got {self.end_steps}")
    ratio, remainder = divmod(self.start_steps, self.end_steps)
    if remainder or ratio < 2 or ratio & (ratio - 1):
      raise ValueError(f"{where}.start_steps must be end_steps times a power of two >= 2 (each round halves the "
                       f"steps), got start_steps={self.start_steps}, end_steps={self.end_steps}")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"unknown {where}.weighting {self.weighting!r}; expected one of {list(WEIGHTINGS)}")

  @property
  def rounds(self) -> list[tuple[int, int]]:
    """``[(teacher steps, student steps)]`` of every round, from ``(start, start / 2)`` to ``(2 end, end)``."""
    out, steps = [], self.start_steps
    while steps > self.end_steps:
      out.append((steps, steps // 2))
      steps //= 2
    return out

  @property
  def student_steps(self) -> tuple[int, ...]:
    return tuple(student for _, student in self.rounds)


# --- one round as a loop task ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoundObjective:
  """The loss of a round: ``loss(student_params, teacher_params, batch, key)``.

  ``batch`` is ``{"x": [B, ...] data, "sigma", "sigma_mid", "sigma_next2": [B] float32, "label"?: [B]}``: each row's
  student step goes from ``sigma`` to ``sigma_next2`` and the teacher's two steps pass through ``sigma_mid``
  (``RoundTask`` draws them from the round's grid); ``key`` draws the noise and the student's dropout masks. The grid
  is data, not part of the program, so every round runs the same compiled step.
  """
  backbone: Any
  precond: Any
  weighting: str
  dropout: bool

  def __call__(self, params: Any, teacher_params: Any, batch: dict, key: jax.Array) -> jax.Array:
    x0, label = batch["x"], batch.get("label")
    sigma, sigma_mid, sigma_next2 = batch["sigma"], batch["sigma_mid"], batch["sigma_next2"]
    noise_key, dropout_key = jax.random.split(key)
    x = x0 + broadcast_to_batch(sigma, x0) * jax.random.normal(noise_key, x0.shape, x0.dtype)
    teacher = make_denoiser(self.backbone, teacher_params, self.precond, label)
    x_mid = ddim_step(x, teacher(x, sigma), sigma, sigma_mid)
    x_next2 = ddim_step(x_mid, teacher(x_mid, sigma_mid), sigma_mid, sigma_next2)
    target = jax.lax.stop_gradient(distillation_target(x, x_next2, sigma, sigma_next2))
    student = make_denoiser(self.backbone, params, self.precond, label, train=self.dropout,
                            rng=dropout_key if self.dropout else None)
    error = jnp.mean(jnp.square(student(x, sigma) - target).reshape(x0.shape[0], -1), axis=-1)
    return jnp.mean(loss_weight(sigma, self.weighting) * error)


def grid_points(grid: Any, num: int, seed: int, step: int) -> dict[str, np.ndarray]:
  """``{"sigma", "sigma_mid", "sigma_next2"}`` [num] float32 for a round on the teacher's grid [2N + 1]: each row's
  student step ``i`` uniform in ``0..N-1`` (a function of ``(seed, step)``): ``grid[2i], grid[2i + 1], grid[2i + 2]``.
  """
  grid = np.asarray(grid, np.float32)
  i = np.random.default_rng([seed, step]).integers(0, (len(grid) - 1) // 2, size=num)
  return {"sigma": grid[2 * i], "sigma_mid": grid[2 * i + 1], "sigma_next2": grid[2 * i + 2]}


@dataclasses.dataclass(frozen=True)
class RoundTask:
  """``RoundObjective`` on a dataset for ``loop.fit``: batch ``s`` is ``data.batches(dataset, batch_size, seed)``'s
  ``s``-th with ``grid_points(grid, batch_size, seed, s)``; the student starts from ``initial`` (the round's teacher)
  and ``frozen`` is that teacher."""
  objective: RoundObjective
  grid: tuple[float, ...]
  initial: Any
  dataset: Any
  batch_size: int
  seed: int
  use_labels: bool

  @property
  def frozen(self) -> Any:
    return self.initial

  def init(self, key: jax.Array) -> Any:
    del key
    return jax.tree.map(jnp.copy, self.initial)

  def loss(self, params: Any, frozen: Any, batch: dict, key: jax.Array) -> jax.Array:
    return self.objective(params, frozen, batch, key)

  def batches(self, start_step: int):
    rows = data_lib.batches(self.dataset, self.batch_size, seed=self.seed, start_step=start_step)
    for step, batch in enumerate(rows, start=start_step):
      yield {"x": batch["x"], **({"label": batch["label"]} if self.use_labels else {}),
             **grid_points(self.grid, self.batch_size, self.seed, step)}


@dataclasses.dataclass(frozen=True)
class _Objective:
  """A task that is only a loss: what ``loop.make_step`` reads."""
  objective: RoundObjective

  def loss(self, params: Any, frozen: Any, batch: dict, key: jax.Array) -> jax.Array:
    return self.objective(params, frozen, batch, key)


@functools.lru_cache(maxsize=4)
def step_program(objective: RoundObjective, config: loop.LoopConfig, mesh: jax.sharding.Mesh):
  """The jitted training step of every round (and every later distillation in this process) with ``objective``: the
  grid is in the batch, so the program is the same for all rounds and compiled once."""
  return loop.compile_programs(_Objective(objective), config, mesh)[1]

def mismatch(backbone: Any, precond: Any, student_params: Any, teacher_params: Any, grid: Any, x0: jax.Array, *,
             seed: int = 0, label: jax.Array | None = None, weighting: str = "truncated_snr") -> float:
  """The round's loss without dropout on fixed data, grid points (``grid_points(grid, len(x0), seed, 0)``) and noise:
  how far one student DDIM step is from two teacher steps (what a round lowers)."""
  objective = RoundObjective(backbone, precond, weighting, dropout=False)
  batch = {"x": x0, **grid_points(grid, x0.shape[0], seed, 0), **({"label": label} if label is not None else {})}
  return float(_jitted(objective)(student_params, teacher_params, batch, jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _jitted(objective: RoundObjective):
  return jax.jit(objective)   # one compiled program per objective (and shapes), reused by every call


# --- the method ------------------------------------------------------------------------------------------------------

def training_data(teacher: Any) -> tuple[Any, bool]:
  """The teacher's training set (``teacher.metadata["dataset"]``, train split) and whether to feed labels.

  Raises:
    ValueError: a teacher whose metadata names no dataset (a model in memory): PD trains on data.
  """
  name = teacher.metadata.get("dataset")
  if not name:
    raise ValueError(f"progressive distillation trains on the teacher's training data, but {teacher} names no "
                     "dataset in its metadata; export it with train.export_teacher (which records data.name) or "
                     "load an exported teacher")
  options = config_utils.tuples_from_lists(teacher.metadata.get("data_options") or {})
  dataset = data_lib.get_dataset(name, "train", **options)
  return dataset, bool(teacher.num_classes)


@METHODS.register("pd")
class PD(Method):
  """Progressive distillation of ``harness.teacher``; serves the cells ``(euler, N)`` for each student step count
  ``N`` of ``settings.rounds``. ``fit`` runs (or reloads) every round down to the cell's ``N``; the artefact's payload
  is ``(backbone, student_params, precond, sigmas)`` and its ``train_seconds`` the whole distillation down to that
  student."""

  name = "pd"

  def __init__(self, settings: PDSettings = PDSettings(), *, hooks: tuple[loop.StepHook, ...] = ()):
    self.settings = settings
    self.hooks = tuple(hooks)   # passed to every round's loop.fit (``hook(step, state, metrics)``)
    self._finished: dict[tuple[str, int], tuple[Any, dict]] = {}   # (workdir, round) -> (student params, record)

  def serves(self, cell: Cell) -> bool:
    return cell.solver_name == SOLVER and cell.nfe in self.settings.student_steps

  def check_teacher(self, teacher: Any) -> None:
    """What the settings need of ``teacher``, checked before any work (the ``pd`` mode runs it before it claims the
    workdir).

    Raises:
      ValueError: the teacher names no training dataset; ``batch_size`` exceeds that dataset; ``dropout`` is set but
        the teacher's backbone has no dropout (``backbone_kwargs.dropout`` missing or 0: the MLP and the DiT).
    """
    dataset, _ = training_data(teacher)
    if self.settings.batch_size > len(dataset):
      raise ValueError(f"pd.batch_size={self.settings.batch_size} exceeds the {len(dataset)} examples of the "
                       f"teacher's training set {teacher.metadata.get('dataset')!r}")
    rate = (teacher.metadata.get("backbone_kwargs") or {}).get("dropout") or 0.0
    if self.settings.dropout and not rate:
      raise ValueError(f"pd.dropout=True but the teacher's backbone {teacher.metadata.get('backbone')!r} has no "
                       "dropout (its rate is 0 or it has none); leave pd.dropout off")

  def start_grid(self, harness: Harness) -> np.ndarray:
    """The first teacher's [start_steps + 1] sigmas: the harness's base schedule; every later grid is a subsample."""
    precond = harness.teacher.precond
    grid = harness.config.base_sigmas(self.settings.start_steps, precond.sigma_min, precond.sigma_max)
    return grid.astype(np.float32)

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    settings, teacher = self.settings, harness.teacher
    if not self.serves(cell):
      raise ValueError(f"pd serves DDIM ({SOLVER!r}) cells at the students' step counts {settings.student_steps}, "
                       f"not {cell.tag}")
    dataset, use_labels = training_data(teacher)
    grid = self.start_grid(harness)
    params, seconds, history = teacher.params, 0.0, {}
    rounds, mesh = settings.rounds, parallel.make_mesh()
    objective = RoundObjective(teacher.backbone, teacher.precond, settings.weighting, settings.dropout)
    for k, (teacher_steps, student_steps) in enumerate(rounds, start=1):
      if teacher_steps <= cell.nfe:
        break
      finished = self._finished.get((str(harness.workdir), k))
      if finished is None:   # not yet fitted by this object (a finished run on disk reloads without training)
        finished = self._round(harness, k, params, grid, objective, dataset, use_labels, mesh)
        self._finished[(str(harness.workdir), k)] = finished
      params, record = finished
      seconds += record["train_seconds"]
      history[f"round{k}"] = record
    sigmas = grid[::settings.start_steps // cell.nfe]
    return Artefact(self.name, cell, payload=(teacher.backbone, params, teacher.precond, sigmas), train_seconds=seconds,
                    curves={"rounds": history, "schedule": {"sigmas": [float(s) for s in sigmas]},
                            "teacher_train_seconds": teacher.metadata.get("wall_time_s")})

  def _round(self, harness: Harness, k: int, params: Any, grid: np.ndarray, objective: RoundObjective, dataset: Any,
             use_labels: bool, mesh: jax.sharding.Mesh) -> tuple[Any, dict]:
    """Round ``k`` from the teacher ``params``: ``(student params, record)``, the student exported if asked."""
    settings, teacher = self.settings, harness.teacher
    teacher_steps, student_steps = settings.rounds[k - 1]
    round_grid = tuple(float(s) for s in grid[::settings.start_steps // teacher_steps])
    task = RoundTask(objective, round_grid, params, dataset, settings.batch_size, seed=harness.train_seed + k,
                     use_labels=use_labels)
    init_program, _ = loop.compile_programs(task, settings, mesh)
    identity = {"teacher": teacher.identity, "round": k, "teacher_steps": teacher_steps,
                "start_steps": settings.start_steps, "grid": [float(s) for s in grid],
                "weighting": settings.weighting, "dropout": settings.dropout,
                "data": {"name": dataset.name, "options": teacher.metadata.get("data_options") or {}}}
    result = loop.fit(task, settings, harness.workdir / "pd" / f"round{k}_{teacher_steps}to{student_steps}",
                      seed=harness.train_seed + k, identity=identity, hooks=self.hooks, mesh=mesh,
                      programs=(init_program, step_program(objective, settings.loop_settings(), mesh)),
                      desc=f"PD round {k}/{len(settings.rounds)} ({teacher_steps} -> {student_steps} steps)")
    params = jax.device_get(result.state.params if result.state.ema_params is None else result.state.ema_params)
    steps, losses = result.losses
    record = {"teacher_steps": teacher_steps, "student_steps": student_steps, "step": steps, "loss": losses,
              "train_seconds": result.train_seconds}
    if settings.export_students:
      export_student(harness.workdir / "pd" / "students" / f"steps{student_steps}", teacher, params,
                     steps=student_steps, sigmas=grid[::settings.start_steps // student_steps],
                     distillation={"round": k, "settings": config_utils.to_plain(settings), **record,
                                   "final_loss": losses[-1] if losses else None})
    return params, record

  def sampler(self, artefact: Artefact) -> Sampler:
    backbone, params, precond, sigmas = artefact.payload
    solver = get_solver(SOLVER)
    return jax.jit(lambda x_T, label: mteo.student_sample(solver, backbone, params, precond, None, x_T, sigmas, label))


# --- students as teachers --------------------------------------------------------------------------------------------

# What a student's metadata keeps of its parent's: what rebuilds the network and names its data (not the parent's
# training record: steps, loss, wall time, config).
_NETWORK_KEYS = ("format", "backbone", "backbone_kwargs", "data_shape", "num_classes", "precond", "dataset",
                 "data_options", "num_params")


def export_student(path: str | os.PathLike, parent: Any, params: Any, *, steps: int, sigmas: Any,
                   distillation: dict | None = None) -> Path:
  """Writes a student as a teacher-format model (``Teacher.load`` reads it): the parent's network keys and
  ``distilled``: ``{"method": "pd", "format", "parent_identity", "parent_source", "steps" (its DDIM steps),
  "sampler", "sigmas", "distillation"}`` (``distillation``: the round, settings, losses and train seconds). Replaces
  only an earlier export."""
  from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import)
  metadata = {key: parent.metadata[key] for key in _NETWORK_KEYS if key in parent.metadata}
  metadata["distilled"] = {"method": "pd", "format": STUDENT_FORMAT, "parent_identity": parent.identity,
                           "parent_source": parent.source, "steps": int(steps), "sampler": SOLVER,
                           "sigmas": [float(s) for s in np.asarray(sigmas)], "distillation": distillation or {}}
  checkpoints.save_pytree(path, jax.device_get(params), metadata, overwrite=True)
  return Path(path)


def load_student(path: str | os.PathLike, *, parent: Any = None, steps: int | None = None):
  """``(teacher, sigmas)``: the student at ``path`` as a ``Teacher`` and its DDIM grid [steps + 1].

  Raises:
    FileNotFoundError: no such directory (or no such parent teacher). ValueError: a directory that is not a PD student
    (a plain teacher, a table, ...), or a student of another parent teacher (``parent``: a ``Teacher`` or a teacher
    spec, ``pretrained:<name>`` or a directory) or step count than asked for. TypeError: ``steps`` not an integer.
  """
  from mteo_jax import checkpoints  # noqa: PLC0415
  from mteo_jax.teachers import Teacher  # noqa: PLC0415
  if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer))):
    raise TypeError(f"steps must be an integer (the student's DDIM steps), got {steps!r}")
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"no PD student at {path}")
  if parent is not None and not isinstance(parent, Teacher):
    parent = Teacher.load(parent)   # a teacher spec: pretrained:<name> or an exported teacher directory
  try:
    info = checkpoints.load_metadata(path).get("distilled")
  except files.UnreadableFileError:   # a student whose files cannot be read: the message says to delete it
    raise
  except (OSError, ValueError) as error:
    raise ValueError(f"{path} is not a PD student (expected {STUDENT_FORMAT}): {error}") from None
  if not isinstance(info, dict) or info.get("format") != STUDENT_FORMAT:
    raise ValueError(f"{path} is not a PD student: its metadata has no 'distilled' record of format "
                     f"{STUDENT_FORMAT} (a plain teacher loads with Teacher.load)")
  if parent is not None and info["parent_identity"] != parent.identity:
    raise ValueError(f"{path} was distilled from teacher {info['parent_identity'][:12]} ({info['parent_source']}), "
                     f"not from {parent}")
  if steps is not None and info["steps"] != steps:
    raise ValueError(f"{path} is the {info['steps']}-step student, not the {steps}-step one")
  return Teacher.load(path), np.asarray(info["sigmas"], np.float32)
