"""One evaluation harness for every few-step method on one teacher (DESIGN §5b, §6).

The harness owns what all methods share, so that their numbers are comparable:

* noise: training and evaluation noise from disjoint seeds (``noise_seeds``), with a conditional teacher's labels;
* references: diffrax solves of the teacher, cached in ``WORKDIR/references``; the training noise is solved once, at
  the union of every cell's sigmas (``train_data``), the evaluation noise at its end point;
* the evaluator: RMSE and PSNR to the reference from the same noise; the Fréchet distance in the shipped feature
  nets' space (images); log-likelihood and sliced Wasserstein against the exact mixture (GMM);
* rows: the teacher row (many-step Heun), the reference row, and one row per (method, solver, NFE), written to
  ``results.json``; pictures of the same held-out noise through every method.

A method is an object with ``fit(harness, cell) -> Artefact`` and ``sampler(artefact) -> (x_T, label) -> x_0``
(``methods.Method``); ``Harness.run`` fits and scores each method on each cell:

    harness = Harness(Teacher.load("pretrained:digits"), workdir, HarnessConfig())
    cells = harness.cells(("euler", "ipndm"), nfes=(3,))
    rows = harness.run([methods.get_method("base"), methods.get_method("mteo")], cells)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from mteo_jax import config_utils, files, metrics, mteo, parallel
from mteo_jax.progress import JobProgress
from mteo_jax import data as data_lib
from mteo_jax.schedules import SCHEDULES, get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher, label_seed, resolve_teacher

if TYPE_CHECKING:
  from mteo_jax.reference import Reference

Sampler = Callable[[np.ndarray, "np.ndarray | None"], jax.Array]
# The names of ``reference.REFERENCE_SOLVERS``, here so that a config is checked without importing diffrax (a test
# keeps the two equal).
REFERENCE_SOLVER_NAMES = ("dopri5", "dopri8", "tsit5")
MAX_RHO = 1000.0
TEACHER_ROW_FILE = "teacher_row.json"   # the cached teacher row of a workdir (Harness.teacher_row)


def noise_seeds(seed: int) -> tuple[int, int]:
  """(train, evaluation) noise seeds: disjoint streams, even and odd, for every experiment seed."""
  train_seed, eval_seed = 2 * seed, 2 * seed + 1
  assert train_seed != eval_seed and train_seed % 2 == 0 and eval_seed % 2 == 1
  return train_seed, eval_seed


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  """The diffrax solve of the teacher's probability-flow ODE (``reference.reference_trajectories``).

  Attributes:
    solver: the diffrax solver, ``tsit5``, ``dopri5`` or ``dopri8``.
    rtol, atol: the relative and absolute tolerances of its adaptive step size, per sample.
    batch_size: samples per jitted solve (the last chunk is padded, so it compiles once).
  """
  solver: str = "tsit5"
  rtol: float = 1e-5
  atol: float = 1e-5
  batch_size: int = 512

  def __post_init__(self):
    if self.solver not in REFERENCE_SOLVER_NAMES:
      raise KeyError(f"unknown reference solver {self.solver!r}; expected one of {list(REFERENCE_SOLVER_NAMES)}")
    for name in ("rtol", "atol"):
      if not getattr(self, name) > 0:
        raise ValueError(f"reference.{name} must be > 0, got {getattr(self, name)}")
    if self.batch_size < 1:
      raise ValueError(f"reference.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class HarnessConfig:
  """What the harness needs besides the teacher.

  Attributes:
    seed: the experiment seed; the noise seeds are ``noise_seeds(seed)``.
    num_train: training noises (and reference trajectories) shared by every method.
    num_eval: held-out noises every method is scored on.
    eval_batch_size: samples per jitted sampling call during evaluation.
    teacher_steps: Heun steps of the teacher row (``2 * steps - 1`` NFE); 0 = no teacher row (the reference row, the
      teacher solved adaptively, stands for the teacher at many steps).
    schedule, rho: the base sigma schedule of each cell (``rho`` for ``edm`` only).
    grid_size: samples per row of the comparison picture.
    reference: the diffrax solve.
    progress: progress bars for the reference solves (and the FID features).
    fid_weights: the standard FID Inception weights (``fid.WEIGHTS_FILE`` or its converted ``.npz``); "" = the
      environment variable ``MTEO_FID_WEIGHTS`` if set, else no FID. With them, an image teacher's rows get ``fid``.
    fid_stats: FID reference statistics, an ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's or EDM's layout); "" =
      those of the held-out real images, cached in ``WORKDIR/fid_reference_stats.npz``.
  """
  seed: int = 0
  num_train: int = 1024
  num_eval: int = 1000
  eval_batch_size: int = 500
  teacher_steps: int = 50
  schedule: str = "edm"
  rho: float = 7.0
  grid_size: int = 10
  reference: ReferenceConfig = ReferenceConfig()
  progress: bool = True
  fid_weights: str = ""
  fid_stats: str = ""

  def base_sigmas(self, num_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """The base schedule of ``num_steps`` steps: [num_steps + 1] from ``sigma_max`` to ``sigma_min``."""
    options = {"rho": self.rho} if self.schedule == "edm" else {}
    return np.asarray(get_schedule(self.schedule, num_steps, sigma_min, sigma_max, **options))

  def __post_init__(self):
    for name in ("num_train", "num_eval", "eval_batch_size", "grid_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.teacher_steps < 0:
      raise ValueError(f"teacher_steps must be >= 0 (0: no teacher row), got {self.teacher_steps}")
    if self.schedule == "explicit":
      raise ValueError("schedule='explicit' needs a grid per NFE; use edm, time_uniform or logsnr_uniform")
    SCHEDULES.get(self.schedule)   # KeyError listing the valid names
    if self.schedule == "edm" and not 0 < self.rho <= MAX_RHO:
      # Beyond a few hundred, sigma^(1/rho) rounds to one in float32 and the grid collapses.
      raise ValueError(f"rho must be finite, > 0 and <= {MAX_RHO:g} (EDM uses 7), got {self.rho}")
    if self.fid_weights or self.fid_stats:   # a named file that is missing is refused here, before any work
      from mteo_jax import fid as fid_lib  # noqa: PLC0415
      if fid_lib.resolve_weights_path(self.fid_weights) is None:   # FileNotFoundError: which file, and where
        raise ValueError(f"fid_stats={self.fid_stats!r} is set but no FID weights are: set fid_weights or "
                         f"${fid_lib.WEIGHTS_ENV} to {fid_lib.WEIGHTS_FILE}")
      if self.fid_stats and not os.path.isfile(self.fid_stats):
        raise FileNotFoundError(f"fid_stats={self.fid_stats} does not exist (an .npz with mu [2048] and sigma "
                                "[2048, 2048]; empty = the held-out real images' statistics)")


@dataclasses.dataclass(frozen=True)
class HarnessJob:
  """The keys every job section on the harness holds (``mteo``, ``compare``): the teacher, the cells and the
  harness's settings under their own names.

  Attributes:
    teacher: an exported teacher directory (a training run's ``WORKDIR/teacher``) or ``pretrained:<name>``.
    solvers, nfes: the cells: every solver (a name of ``solvers.SOLVERS``, e.g. ``euler``, ``dpmpp_2m``) at every
      NFE (network evaluations per sample).
    schedule, rho: the base sigma schedule of each cell, ``edm``, ``time_uniform`` or ``logsnr_uniform``, from the
      teacher's ``sigma_max`` to its ``sigma_min`` (``rho``: the EDM schedule's exponent).
    num_train, num_eval, eval_batch_size, teacher_steps, grid_size, reference, fid_weights, fid_stats: see
      ``HarnessConfig``.
  """
  teacher: str = ""
  solvers: tuple[str, ...] = ("ipndm", "dpmpp_2m")
  nfes: tuple[int, ...] = (3,)
  schedule: str = "edm"
  rho: float = 7.0
  num_train: int = 1024
  num_eval: int = 1000
  eval_batch_size: int = 500
  teacher_steps: int = 50
  grid_size: int = 10
  reference: ReferenceConfig = ReferenceConfig()
  fid_weights: str = ""
  fid_stats: str = ""

  def check_harness(self, where: str) -> None:
    """The teacher exists and the harness settings and cells are valid; errors name ``where``.

    Raises:
      ValueError: no teacher, a bad harness setting, or a bad cell (none, repeated, or an unreachable NFE).
      FileNotFoundError: a teacher that does not exist (``resolve_teacher`` lists the shipped ones), or FID weights
        or statistics named (by the config or ``$MTEO_FID_WEIGHTS``) that do not exist.
      KeyError: an unknown solver or schedule.
    """
    if not self.teacher:
      raise ValueError(f"{where}.teacher is required: an exported teacher directory or pretrained:<name>")
    resolve_teacher(self.teacher)
    try:
      self.harness_config(seed=0)   # num_train, num_eval, eval_batch_size, teacher_steps, grid_size, schedule, rho
    except ValueError as error:
      raise ValueError(f"{where}.{error}") from None
    from mteo_jax import fid as fid_lib  # noqa: PLC0415
    fid_lib.resolve_weights_path(self.fid_weights)   # $MTEO_FID_WEIGHTS too: a missing file is refused before any work
    # Every solver is registered (KeyError listing them) and reaches every NFE (ValueError naming the nearest).
    if not self.solvers or not self.nfes:
      raise ValueError(f"{where}.solvers and {where}.nfes must be non-empty, got {tuple(self.solvers)} and "
                       f"{tuple(self.nfes)}")
    for name in ("solvers", "nfes"):
      values = tuple(getattr(self, name))
      if len(set(values)) != len(values):
        raise ValueError(f"{where}.{name} lists an entry twice: {values} (each cell is scored once)")
    for solver_name in self.solvers:
      solver = get_solver(solver_name)
      for nfe in self.nfes:
        solver.num_steps_for_nfe(nfe)

  def harness_config(self, seed: int) -> HarnessConfig:
    """The ``HarnessConfig`` of these keys (``progress`` from the section too). Raises what ``HarnessConfig`` raises."""
    names = [f.name for f in dataclasses.fields(HarnessConfig) if f.name != "seed"]
    return HarnessConfig(seed=seed, **{name: getattr(self, name) for name in names})


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (solver, NFE) a method is asked to serve, with the harness's base schedule for it.

  Attributes:
    solver_name: the registry name; solver: the solver object.
    nfe: network evaluations per sample; sigmas: [N + 1] float32, the base schedule (``solver.num_steps_for_nfe``).
  """
  solver_name: str
  nfe: int
  solver: Any
  sigmas: np.ndarray

  @property
  def tag(self) -> str:
    return f"{self.solver_name}_nfe{self.nfe}"


def job_stages(methods: Sequence[Any], solvers: Sequence[str], nfes: Sequence[int], *,
               teacher_row: bool = True) -> list[str]:
  """The kinds of a harness job's stages, in order, for its progress lines (``progress.JobProgress``): the set-up
  (held-out reference, metrics), the teacher row (unless ``teacher_row=False``: ``teacher_steps=0``), then each
  method on each cell it serves (cells as ``Harness.cells`` makes them: NFE-major). Raises KeyError for an unknown
  solver."""
  kinds = ["set-up", "teacher row"] if teacher_row else ["set-up"]
  for nfe in nfes:
    for name in solvers:
      cell = Cell(name, nfe, get_solver(name), np.zeros((0,), np.float32))
      kinds += [method.name for method in methods if getattr(method, "serves", lambda _: True)(cell)]
  return kinds


@dataclasses.dataclass
class Artefact:
  """What a method's ``fit`` returns.

  Attributes:
    method: the method's name. cell: the cell it was fitted for.
    payload: what was learned (an MTEO table, a schedule, parameters; None for the plain solver).
    train_seconds: wall time of the learning, restarts included (0 for training-free methods).
    curves: learning curves for ``results.json`` (e.g. ``{"loss_curve": {"step": [...], "loss": [...]}}``).
    path: where the artefact was saved, if it was.
  """
  method: str
  cell: Cell
  payload: Any = None
  train_seconds: float = 0.0
  curves: dict = dataclasses.field(default_factory=dict)
  path: str | None = None


def batched(fn: Callable[..., jax.Array], batch_size: int, *arrays,
            mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """``fn`` over chunks of the leading axis of ``arrays`` (None entries passed through), data-parallel over ``mesh``.

  Each chunk is split over the mesh's ``"data"`` axis, so a jitted ``fn`` runs on every device at once (it follows
  its inputs' sharding). Chunks are padded (repeating the last row) to one size, a multiple of the device count, so
  that ``fn`` compiles once; the padding is dropped from the result.

  Args:
    fn: ``fn(*chunks) -> [rows, ...]``.
    batch_size: rows per call (rounded up to a multiple of the device count).
    mesh: default ``parallel.local_mesh()``: this process's devices. Every process of a multi-host run computes the
      whole result on its own devices (deterministic, no exchange between hosts).
  """
  mesh = parallel.local_mesh() if mesh is None else mesh
  num = arrays[0].shape[0]
  size = min(batch_size, num)
  size = -(-size // mesh.size) * mesh.size
  sharding = parallel.data_sharding(mesh)
  outputs = []
  for start in range(0, num, size):
    chunk = [None if a is None else np.asarray(a[start:start + size]) for a in arrays]
    pad = size - chunk[0].shape[0]
    if pad:
      chunk = [None if c is None else np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
    if mesh.size > 1:
      chunk = [None if c is None else jax.device_put(c, sharding) for c in chunk]
    outputs.append(np.asarray(fn(*chunk))[:size - pad])
  return np.concatenate(outputs)


def timed_samples(fn: Callable[..., jax.Array], batch_size: int, *arrays,
                  warm_up: Callable[[], Any] | None = None) -> tuple[np.ndarray, float]:
  """``(samples, seconds per 1000 samples)``: compiled first (by ``warm_up()`` where given, e.g. one denoiser call of
  a sampler stepped on the host; else by sampling the first chunk), then the whole pass is timed."""
  if warm_up is not None:
    jax.block_until_ready(warm_up())
  else:
    batched(fn, batch_size, *[None if a is None else a[:batch_size] for a in arrays])
  start = time.perf_counter()
  samples = batched(fn, batch_size, *arrays)
  return samples, 1000.0 * (time.perf_counter() - start) / arrays[0].shape[0]


class Evaluator:
  """Scores samples from held-out noise against the reference: RMSE, PSNR and, where possible, a distribution metric
  (FD in a shipped feature net's space; FID with the standard weights, ``fid``: a ``fid.FIDMetric``)."""

  def __init__(self, reference_final: np.ndarray, real: np.ndarray | None, feature_net=None, mixture=None, fid=None):
    self.reference_final = reference_final
    self.real = real
    self.feature_net = feature_net
    self.mixture = mixture
    self.fid = fid
    self.real_stats = None
    if feature_net is not None and real is not None:
      self.real_stats = metrics.feature_stats(feature_net, real)  # once, not per evaluated method

  def __call__(self, samples: np.ndarray) -> dict[str, Any]:
    psnr = float(metrics.psnr(samples, self.reference_final))
    row = {"rmse": float(metrics.rmse(samples, self.reference_final)),
           "psnr": psnr if np.isfinite(psnr) else None,  # the reference against itself: strict JSON has no inf
           "n_eval": int(samples.shape[0])}
    if self.real_stats is not None:
      row["fd"] = float(metrics.frechet_distance(*metrics.feature_stats(self.feature_net, samples), *self.real_stats))
      row["fd_name"] = metrics.frechet_metric_name(self.feature_net)
    if self.fid is not None:
      row["fid"] = float(self.fid(samples))
      row["fid_reference"] = self.fid.reference
    if self.mixture is not None:
      row["sliced_wasserstein"] = float(metrics.sliced_wasserstein(samples, self.real, seed=0))
      row["log_likelihood"] = float(metrics.mixture_log_likelihood(samples, self.mixture))
    return row


def _feature_network(dataset_name: str | None):
  from mteo_jax import features  # noqa: PLC0415
  name = {"digits": "digits", "fashion_mnist": "fmnist"}.get(dataset_name or "")
  if name is None:
    return None
  try:
    return features.load_feature_network(name)
  except FileNotFoundError as e:
    logging.warning("no feature network for %s (%s): the Fréchet distance is skipped", dataset_name, e)
    return None


def _fid_metric(config: HarnessConfig, teacher: Teacher, real: np.ndarray | None, workdir: Path):
  """The FID metric of the harness (``fid.FIDMetric``), or None: no weights set, not an image teacher, or no
  reference statistics (neither ``fid_stats`` nor held-out real images)."""
  from mteo_jax import fid as fid_lib  # noqa: PLC0415
  weights = fid_lib.resolve_weights_path(config.fid_weights)
  if weights is None:
    return None
  if len(teacher.data_shape) != 3 or teacher.data_shape[-1] not in (1, 3):
    logging.warning("FID weights are set but the teacher's data %s are not images [H, W, 1 | 3]: no FID",
                    tuple(teacher.data_shape))
    return None
  if not config.fid_stats and real is None:
    logging.warning("FID weights are set but there are no reference statistics (fid_stats) and no held-out real "
                    "images: no FID")
    return None
  return fid_lib.FIDMetric.from_settings(weights, config.fid_stats, real=real, cache_dir=workdir,
                                         progress=config.progress and parallel.is_writer())


def _real_data(teacher: Teacher, num: int):
  """Held-out real data (the test split) of the teacher's dataset, and the exact mixture for a GMM teacher."""
  name = teacher.metadata.get("dataset")
  if name is None:
    return None, None
  options = config_utils.tuples_from_lists(teacher.metadata.get("data_options") or {})
  try:
    dataset = data_lib.get_dataset(name, "test", **options)
  except (KeyError, FileNotFoundError, ValueError) as e:
    logging.warning("held-out data of %s unavailable (%s): distribution metrics are skipped", name, e)
    return None, None
  real = dataset.get_batch(np.arange(min(num, len(dataset))))["x"]
  return real, getattr(dataset, "mixture", None)


class PhaseTimer:
  """Wall-clock seconds per phase of a job (``results.json["timings"]``): where the time of a run goes.

  ``with timer.phase("training"): ...`` charges the time inside to that phase. Phases nest: time in an inner phase is
  charged to the inner one only (the reference solved during a method's first fit counts as ``references``, not
  ``training``), unless the outer phase absorbs what runs inside it (``absorb=True``: the teacher row's sampling is
  the teacher row, not evaluation). Time in no phase is ``other`` (loading, noise, metrics set-up, bookkeeping).
  """

  def __init__(self):
    self.started = time.perf_counter()
    self.seconds: dict[str, float] = {}
    self._stack: list[list[Any]] = []   # [name, charged since, absorbs]

  def _charge(self, now: float) -> None:
    if self._stack:
      name, since, _ = self._stack[-1]
      self.seconds[name] = self.seconds.get(name, 0.0) + now - since
      self._stack[-1][1] = now

  @contextlib.contextmanager
  def phase(self, name: str, absorb: bool = False):
    if self._stack and self._stack[-1][2]:   # inside an absorbing phase: charged to it
      yield
      return
    self._charge(time.perf_counter())
    self._stack.append([name, time.perf_counter(), absorb])
    try:
      yield
    finally:
      self._charge(time.perf_counter())
      self._stack.pop()
      if self._stack:
        self._stack[-1][1] = time.perf_counter()

  def summary(self) -> dict[str, Any]:
    """``{"phases": {name: seconds, ..., "other": seconds}, "total_seconds": seconds}`` since the timer started."""
    total = time.perf_counter() - self.started
    phases = {name: round(value, 3) for name, value in self.seconds.items()}
    phases["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
    return {"phases": phases, "total_seconds": round(total, 3)}


class Harness:
  """The shared evaluation set-up on one teacher (see the module docstring).

  Attributes:
    teacher, workdir, config: as given.
    train_seed, eval_seed: ``noise_seeds(config.seed)``.
    x_T_train, x_T_eval: [num_train | num_eval, *data_shape] float32 noise at ``sigma_max``.
    label_train, label_eval: [num] int labels for a conditional teacher, else None.
    eval_reference: the reference of ``x_T_eval`` (its ``final`` is what samples are scored against);
      eval_reference_key: its ``reference.reference_key``.
    evaluate: the ``Evaluator``.
    rows: the rows scored so far; pictures: ``{row name: [grid_size, ...] samples}`` of the first NFE.
    timer: the ``PhaseTimer`` of this job, started here; ``write_results`` stores its summary as ``timings``.
  """

  def __init__(self, teacher: Teacher, workdir: str | os.PathLike, config: HarnessConfig = HarnessConfig(), *,
               stages: Sequence[str] | None = None):
    self.teacher, self.workdir, self.config = teacher, Path(workdir), config
    self.timer = PhaseTimer()
    self.progress = JobProgress(enabled=parallel.is_writer())
    if stages is not None:
      self.progress.expect(list(stages))
    from mteo_jax.reference import ReferenceCache, reference_noise  # noqa: PLC0415 (diffrax is slow to import)
    self.train_seed, self.eval_seed = noise_seeds(config.seed)
    sigma_max = teacher.precond.sigma_max
    self.x_T_train = np.asarray(reference_noise(self.train_seed, config.num_train, teacher.data_shape, sigma_max))
    self.x_T_eval = np.asarray(reference_noise(self.eval_seed, config.num_eval, teacher.data_shape, sigma_max))
    self.label_train = teacher.labels(self.train_seed, config.num_train)
    self.label_eval = teacher.labels(self.eval_seed, config.num_eval)
    self.cache = ReferenceCache(self.workdir / "references")
    self.rows: list[dict] = []
    self.pictures: dict[str, np.ndarray] = {}
    self.picture_nfe: int | None = None   # the NFE of the comparison pictures: the first cell's of the first run
    self._cells: list[Cell] = []
    self._train_reference: tuple[np.ndarray, Reference] | None = None
    self._table_samplers: dict[tuple[str, bytes], Callable[..., jax.Array]] = {}
    eval_sigmas = np.array([sigma_max, teacher.precond.sigma_min], np.float32)
    with self.progress.stage(f"set-up: the held-out reference ({config.num_eval} noises) and the metrics",
                             kind="set-up"):
      self.eval_reference_key = self.reference_key(self.x_T_eval, self.label_eval, self.eval_seed, eval_sigmas)
      self.eval_reference = self.reference(self.x_T_eval, self.label_eval, self.eval_seed, eval_sigmas)
      self.real, mixture = _real_data(teacher, max(config.num_eval, 1000))
      feature_net = _feature_network(teacher.metadata.get("dataset")) if len(teacher.data_shape) == 3 else None
      with self.timer.phase("evaluation"):   # the real data's feature statistics, once
        self.evaluate = Evaluator(self.eval_reference.final, self.real, feature_net, mixture,
                                  fid=_fid_metric(config, teacher, self.real, self.workdir))
    self.pictures["reference"] = self.eval_reference.final[:config.grid_size]

  # --- cells and references ------------------------------------------------------------------------------------------

  def cells(self, solvers: Sequence[str], nfes: Sequence[int]) -> list[Cell]:
    """One cell per (NFE, solver), in that order, on the base schedule; all of them share one training reference."""
    precond, config = self.teacher.precond, self.config
    cells = []
    for nfe in nfes:
      for name in solvers:
        solver = get_solver(name)
        sigmas = config.base_sigmas(solver.num_steps_for_nfe(nfe), precond.sigma_min, precond.sigma_max)
        cells.append(Cell(name, nfe, solver, sigmas))
    self._cells.extend(cells)
    self._train_reference = None  # solved again, from the cache when it holds the union already
    return cells

  def reference_key(self, x_T: np.ndarray, labels: np.ndarray | None, noise_seed: int, sigmas: Any) -> dict:
    """``reference.reference_key`` of the teacher's reference from ``x_T`` saved at ``sigmas``."""
    from mteo_jax.reference import reference_key  # noqa: PLC0415
    teacher, ref = self.teacher, self.config.reference
    return reference_key(teacher.identity, teacher.precond, noise_seed, x_T.shape[0], teacher.data_shape, sigmas,
                         ref.solver, ref.rtol, ref.atol, x_T=x_T, labels=labels,
                         label_seed=None if labels is None else label_seed(noise_seed))

  def reference(self, x_T: np.ndarray, labels: np.ndarray | None, noise_seed: int, sigmas: Any) -> Reference:
    """The teacher's reference from ``x_T`` saved at ``sigmas``, from the cache or solved and cached."""
    from mteo_jax.reference import reference_trajectories  # noqa: PLC0415
    teacher, ref = self.teacher, self.config.reference
    key = self.reference_key(x_T, labels, noise_seed, sigmas)
    with self.timer.phase("references"):
      return self.cache.get_or_compute(key, lambda: reference_trajectories(
          teacher.denoiser, jnp.asarray(x_T), sigmas, solver=ref.solver, rtol=ref.rtol, atol=ref.atol,
          batch_size=min(ref.batch_size, x_T.shape[0]), labels=None if labels is None else jnp.asarray(labels),
          progress=self.config.progress and parallel.is_writer()))

  def train_data(self, cell: Cell) -> dict[str, np.ndarray]:
    """``{"x_T": [num_train, ...], "ref": [num_train, N + 1, ...], "label"?: [num_train]}``: the teacher's states
    from the training noise at the cell's sigmas. One solve serves every cell made by ``cells`` (the union grid)."""
    from mteo_jax.reference import union_sigmas  # noqa: PLC0415
    if self._train_reference is None:
      grid, _ = union_sigmas([c.sigmas for c in self._cells] or [cell.sigmas])
      self._train_reference = (grid, self.reference(self.x_T_train, self.label_train, self.train_seed, grid))
    grid, ref = self._train_reference
    wanted = np.asarray(cell.sigmas, grid.dtype)
    index = [int(np.flatnonzero(grid == s)[0]) if np.any(grid == s) else -1 for s in wanted]
    if min(index) < 0:  # a cell made after the union was solved
      grid, _ = union_sigmas([c.sigmas for c in self._cells] + [cell.sigmas])
      self._train_reference = (grid, self.reference(self.x_T_train, self.label_train, self.train_seed, grid))
      return self.train_data(cell)
    data = {"x_T": self.x_T_train, "ref": np.swapaxes(ref.states[index], 0, 1)}
    if self.label_train is not None:
      data["label"] = self.label_train
    return data

  def held_out_rmse(self, sample: Sampler, num: int = 256) -> float:
    """RMSE to the reference on the first ``num`` held-out noises: a cheap monitor during training. The noises are
    sampled in the evaluation's chunks (``eval_batch_size``; a last chunk is filled with the next held-out noises,
    not scored), so that a sampler shared with the method's row (``table_sampler``) compiles once for both."""
    num = min(num, self.config.num_eval)
    chunk = min(self.config.eval_batch_size, self.config.num_eval)
    total = min(-(-num // chunk) * chunk, self.config.num_eval)
    labels = None if self.label_eval is None else self.label_eval[:total]
    samples = batched(sample, chunk, self.x_T_eval[:total], labels)
    return float(metrics.rmse(samples[:num], self.eval_reference.final[:num]))

  def table_sampler(self, cell: Cell) -> Callable[..., jax.Array]:
    """``sample(table, x_T, label) -> [B, ...]``: the cell's solver on its grid with the frozen teacher and a table of
    time embeddings ``{layer: [NFE, D]}`` (``mteo.student_sample``), jitted once per solver and grid. The plain
    solver's row runs it with the teacher's own embeddings (``mteo.init_table``: the same network function), MTEO's
    monitor and row with the learned table: one compiled program serves them all (a UNet unrolled over the NFE takes
    seconds to tens of seconds to compile on a CPU)."""
    key = (cell.solver_name, np.asarray(cell.sigmas, np.float32).tobytes())
    if key not in self._table_samplers:
      teacher, solver, sigmas = self.teacher, cell.solver, np.asarray(cell.sigmas)
      self._table_samplers[key] = jax.jit(lambda table, x_T, label: mteo.student_sample(
          solver, teacher.backbone, teacher.params, teacher.precond, table, x_T, sigmas, label))
    return self._table_samplers[key]

  def run_dir(self, method: str, cell: Cell) -> Path:
    """Where a method keeps the checkpoints and metrics of its run on a cell."""
    return self.workdir / method / cell.tag

  # --- rows ----------------------------------------------------------------------------------------------------------

  def score(self, method: str, solver_name: str, nfe: int, sample: Sampler, *, train_seconds: float = 0.0,
            extra: dict | None = None, warm_up: Callable[[], Any] | None = None) -> tuple[dict, np.ndarray]:
    """Samples the held-out noise with ``sample(x_T, label)``, scores it and appends the row (``warm_up``: see
    ``timed_samples``)."""
    with self.timer.phase("evaluation"):
      samples, seconds_per_1k = timed_samples(sample, self.config.eval_batch_size, self.x_T_eval, self.label_eval,
                                              warm_up=warm_up)
      row = {"method": method, "solver": solver_name, "nfe": nfe, **self.evaluate(samples),
             "train_seconds": train_seconds, "sample_seconds_per_1k": seconds_per_1k, **(extra or {})}
    logging.info("%-8s %-9s NFE %d: RMSE %.4f  PSNR %.2f%s", method, solver_name, nfe, row["rmse"],
                 row["psnr"] or np.inf, f"  {row['fd_name']} {row['fd']:.3f}" if "fd" in row else "")
    self.rows.append(row)
    return row, samples

  def teacher_row(self) -> dict | None:
    """``_teacher_row`` in the ``teacher_row`` phase of the timer (its sampling included); None, and no row, where
    ``teacher_steps`` is 0."""
    steps = self.config.teacher_steps
    if not steps:
      return None
    with self.progress.stage(f"teacher row: Heun, {get_solver('heun').nfe(steps)} NFE on {self.config.num_eval} "
                             "held-out noises", kind="teacher row"), self.timer.phase("teacher_row", absorb=True):
      return self._teacher_row()

  def _teacher_row(self) -> dict:
    """The teacher with many Heun steps on the EDM (rho = 7) schedule: what few-step methods approximate.

    The row is kept in ``WORKDIR/teacher_row.json`` with what it depends on (the held-out noise and teacher through
    the reference's key, the Heun steps, the real data and feature network of the metrics); a rerun with the same
    key reads it instead of sampling again (on Fashion-MNIST, 1000 samples of ~100 evaluations take half an hour on
    two CPU cores), and any other key samples again and replaces it.

    Raises:
      files.UnreadableFileError: a ``teacher_row.json`` that cannot be read (the message says to delete it).
    """
    heun, precond, steps = get_solver("heun"), self.teacher.precond, self.config.teacher_steps
    key = config_utils.to_plain({
        "eval_reference": self.eval_reference_key,
        "teacher_steps": steps, "num_real": 0 if self.real is None else int(len(self.real)),
        "real_sha256": None if self.real is None else hashlib.sha256(np.ascontiguousarray(self.real)).hexdigest(),
        "feature_network": self.teacher.metadata.get("dataset") if len(self.teacher.data_shape) == 3 else None,
        **({"fid": self.evaluate.fid.identity} if self.evaluate.fid is not None else {})})
    path = self.workdir / TEACHER_ROW_FILE
    if path.exists():
      stored = files.read_json(path, "delete it to sample the teacher row again")
      if stored.get("key") == key:
        if not isinstance(stored.get("row"), dict) or not isinstance(stored["row"].get("rmse"), (int, float)):
          raise files.UnreadableFileError(f"{path} cannot be read (its key matches but it holds no row with an RMSE); "
                                          "delete it to sample the teacher row again")
        row = stored["row"]
        logging.info("teacher row read from %s (RMSE %.4f)", path, row["rmse"])
        self.rows.append(row)
        return row
    sigmas = get_schedule("edm", steps, precond.sigma_min, precond.sigma_max, rho=7.0)
    # One compiled denoiser call per step: a whole unrolled program of ~100 evaluations takes XLA minutes to compile.
    call = jax.jit(lambda x, sigma, label: self.teacher.denoiser(x, sigma, label=label))
    sample = lambda x_T, label: heun.sample(lambda x, sigma: call(x, sigma, label), jnp.asarray(x_T), sigmas)  # noqa
    # Compiling needs one denoiser call on a chunk, not a whole chunk of ~100 evaluations: warm up on the first and
    # last sigma (one Heun step, the same call, shapes and shardings as the pass).
    ends = sigmas[np.array([0, len(sigmas) - 1])]
    first = self.config.eval_batch_size
    warm_up = lambda: batched(  # noqa: E731
        lambda x_T, label: heun.sample(lambda x, sigma: call(x, sigma, label), jnp.asarray(x_T), ends), first,
        self.x_T_eval[:first], None if self.label_eval is None else self.label_eval[:first])
    row = self.score("teacher", "heun", heun.nfe(steps), sample, warm_up=warm_up)[0]
    self.workdir.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "row": row})
    return row

  def reference_row(self) -> dict | None:
    """The reference itself against the real data (only where a distribution metric exists)."""
    if self.evaluate.real_stats is None and self.evaluate.fid is None:
      return None
    row = {"method": "reference", "solver": self.config.reference.solver,
           "nfe": int(np.mean(self.eval_reference.nfe)), **self.evaluate(self.eval_reference.final),
           "train_seconds": 0.0, "sample_seconds_per_1k": None}
    self.rows.append(row)
    return row

  def run(self, methods: Sequence[Any], cells: Sequence[Cell]) -> list[dict]:
    """Fits every method on every cell it serves (``method.serves(cell)``, default all) and scores it (cells in order;
    methods in order within a cell). Samples of the first NFE go to the comparison picture as ``"<solver>"`` (the
    method ``base``) or ``"<solver> + <METHOD>"``."""
    first_nfe = cells[0].nfe if cells else None
    if self.picture_nfe is None:
      self.picture_nfe = first_nfe
    rows = []
    for cell in cells:
      for method in methods:
        if not getattr(method, "serves", lambda _: True)(cell):
          continue   # e.g. a PD student exists only for DDIM at its own step counts
        label = "the plain solver" if method.name == "base" else method.name.upper()
        with self.progress.stage(f"{label} on {cell.solver_name} NFE {cell.nfe}", kind=method.name):
          start = time.perf_counter()
          with self.timer.phase("training"):
            artefact = method.fit(self, cell)
          seconds = artefact.train_seconds if artefact.train_seconds else 0.0
          if method.name != "base":
            logging.info("%s on %s: fitted (%.1f s of training; this call %.1f s)", method.name, cell.tag, seconds,
                         time.perf_counter() - start)
          row, samples = self.score(method.name, cell.solver_name, cell.nfe, method.sampler(artefact),
                                    train_seconds=seconds, extra=artefact.curves)
        rows.append(row)
        if cell.nfe == first_nfe:
          name = cell.solver_name if method.name == "base" else f"{cell.solver_name} + {method.name.upper()}"
          self.pictures[name] = samples[:self.config.grid_size]
    return rows

  # --- results -------------------------------------------------------------------------------------------------------

  def write_results(self, extra: dict | None = None, *, picture_nfe: int | None = None) -> dict:
    """``results.json`` (rows, teacher, seeds, ``extra``), then the pictures; a picture that fails is recorded in
    ``results["picture_errors"]`` and never costs the results."""
    teacher = self.teacher
    results = {"teacher": {"path": teacher.source, "identity": teacher.identity,
                           **{k: teacher.metadata.get(k) for k in ("backbone", "dataset", "steps", "final_loss")}},
               **(extra or {}), "seed": self.config.seed,
               "noise_seeds": {"train": self.train_seed, "eval": self.eval_seed}, "rows": self.rows}
    path = self.workdir / "results.json"
    results["timings"] = self.timer.summary()   # up to the results; the pictures' time is added below
    write_json(path, results)
    with self.timer.phase("pictures"):
      errors = draw_pictures(self.workdir, self.pictures, self.rows,
                             self.picture_nfe if picture_nfe is None else picture_nfe)
    if errors:
      results["picture_errors"] = errors
    results["timings"] = self.timer.summary()
    write_json(path, results)
    timings = results["timings"]
    logging.info("wall time %.0f s: %s", timings["total_seconds"], ", ".join(
        f"{name} {seconds:.0f} s ({100 * seconds / max(timings['total_seconds'], 1e-9):.0f} %)"
        for name, seconds in timings["phases"].items()))
    return results


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_json(path: Path, value: Any) -> None:
  """Writes ``value`` to ``path`` atomically (a temporary file, then a rename); on a multi-host run only process 0
  writes."""
  if not parallel.is_writer():
    return
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=2, default=_json_default))
  os.replace(tmp, path)


def draw_pictures(workdir: Path, grid_rows: dict[str, np.ndarray], rows: list[dict],
                  nfe: int | None) -> dict[str, str]:
  """Draws the job's pictures, each on its own: a picture that fails is logged, left out and returned as
  ``{file name: error}``, and the others are still drawn (the results are on disk before this runs).

  Images [N, H, W, C]: one comparison grid, ``samples.png``. Points of any other shape: one picture per row of
  ``grid_rows``, ``samples_<row>.png``, all in one frame fitted on the reference (a PCA projection for D > 2, a
  histogram for D = 1; ``viz.save_samples_picture``). Then ``rmse_bars.png``: each solver's RMSE at ``nfe`` per
  method.
  """
  errors: dict[str, str] = {}
  if not parallel.is_writer():   # a multi-host run: process 0 draws
    return errors
  from mteo_jax import viz  # noqa: PLC0415 (matplotlib is slow to import)

  def attempt(name: str, draw: Callable[[], Any]) -> Any:
    try:
      return draw()
    except Exception as error:  # noqa: BLE001  (a picture must never cost the computed results)
      logging.warning("picture %s not drawn: %s: %s", name, type(error).__name__, error)
      errors[name] = f"{type(error).__name__}: {error}"
      return None

  reference = grid_rows["reference"]
  label = f"NFE {nfe}" if nfe is not None else "few steps"
  kind = attempt("samples", lambda: viz.picture_kind(np.shape(reference)))
  if kind == "images":
    attempt("samples.png", lambda: viz.save_comparison_grid(
        grid_rows, workdir / "samples.png", title=f"held-out noise, {label}: reference vs base solver vs methods"))
  elif kind is not None:
    # One frame for every panel; should fitting it fail, each panel fits its own.
    view = attempt("samples (shared frame)", lambda: viz.point_view(reference, *grid_rows.values()))
    for name, points in grid_rows.items():
      file_name = f"samples_{name.replace(' + ', '_').replace(' ', '_')}.png"
      attempt(file_name, lambda name=name, points=points, file_name=file_name: viz.save_samples_picture(
          points, workdir / file_name, reference=None if name == "reference" else reference, view=view,
          title=f"{name}, {label}" if name != "reference" else name))
  groups: dict[str, dict[str, float]] = {}
  for r in rows:
    if r["nfe"] == nfe and r["method"] not in ("teacher", "reference"):
      groups.setdefault(r["solver"], {})["base solver" if r["method"] == "base" else f"+ {r['method'].upper()}"] = \
          r["rmse"]
  if groups:
    attempt("rmse_bars.png", lambda: viz.save_grouped_bar_plot(
        groups, workdir / "rmse_bars.png", ylabel="RMSE to reference", title=f"held-out noise, {label}"))
  return errors


__all__ = ["noise_seeds", "ReferenceConfig", "HarnessConfig", "Cell", "Artefact", "Evaluator", "PhaseTimer",
           "Harness", "timed_samples", "draw_pictures"]
