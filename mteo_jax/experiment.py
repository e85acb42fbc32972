"""The main job (config ``mode="mteo"``): on a frozen teacher, for each (solver, NFE) pair, distil an MTEO table from
diffrax reference trajectories and score it against the plain solver on held-out noise.

    references (cached) -> MTEO training at the student's sigmas -> evaluation on held-out noise
    -> DIR/results.json, DIR/samples.png (reference vs base vs MTEO, same noise), DIR/rmse_bars.png, DIR/tables/...

Train and evaluation noise come from different seeds (``noise_seeds``), checked before anything runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mteo_jax import config_utils, fitting, metrics, mteo, viz
from mteo_jax import data as data_lib
from mteo_jax.hashing import hash_json
from mteo_jax.nets import make_denoiser
from mteo_jax.reference import (REFERENCE_SOLVERS, ReferenceCache, reference_key, reference_noise,
                                reference_trajectories, teacher_identity, union_sigmas)
from mteo_jax.schedules import SCHEDULES, get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.train import load_teacher

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
  solver: str = "tsit5"
  rtol: float = 1e-5
  atol: float = 1e-5
  batch_size: int = 512

  def __post_init__(self):
    REFERENCE_SOLVERS.get(self.solver)   # KeyError listing the valid names
    for name in ("rtol", "atol"):
      if not getattr(self, name) > 0:
        raise ValueError(f"mteo.reference.{name} must be > 0, got {getattr(self, name)}")
    if self.batch_size < 1:
      raise ValueError(f"mteo.reference.batch_size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class MTEOJobConfig:
  """The ``mteo`` section of an experiment config (see ``configs/digits.py:mteo``)."""
  teacher: str                                      # a path, or "pretrained:<name>" for a shipped teacher
  solvers: tuple[str, ...] = ("euler", "dpmpp_2m", "unipc", "ipndm")
  nfes: tuple[int, ...] = (3,)
  schedule: str = "edm"
  rho: float = 7.0                                  # EDM schedule only
  granularity: str = "layer"
  distance: str = "l2"
  intermediate_weight: float = 0.1
  huber_c: float = 0.03
  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 1e-2
  warmup_steps: int = 20
  grad_clip: float = 1.0
  lr_schedule: str = "cosine"
  num_train: int = 1024
  num_eval: int = 1000
  eval_batch_size: int = 500
  eval_every: int = 100
  checkpoint_every: int = 200
  teacher_steps: int = 50                           # Heun steps of the "teacher" row (2 * steps - 1 NFE)
  grid_size: int = 10
  reference: ReferenceConfig = ReferenceConfig()
  progress: bool = True

  def __post_init__(self):
    """Every setting is checked here, before any reference solve or training: a typo costs seconds, not minutes."""
    for name in ("steps", "batch_size", "num_train", "num_eval", "eval_batch_size", "teacher_steps", "grid_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"mteo.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("warmup_steps", "eval_every", "checkpoint_every", "grad_clip", "intermediate_weight", "huber_c"):
      if getattr(self, name) < 0:
        raise ValueError(f"mteo.{name} must be >= 0, got {getattr(self, name)}")
    if not self.learning_rate > 0:
      raise ValueError(f"mteo.learning_rate must be > 0, got {self.learning_rate}")
    if self.lr_schedule not in fitting.LR_SCHEDULES:
      raise ValueError(f"unknown mteo.lr_schedule {self.lr_schedule!r}; expected one of {list(fitting.LR_SCHEDULES)}")
    if self.granularity not in mteo.GRANULARITIES:
      raise ValueError(f"unknown mteo.granularity {self.granularity!r}; expected one of {list(mteo.GRANULARITIES)}")
    mteo.LossConfig(self.distance, self.intermediate_weight, self.huber_c)   # the distance name
    if self.schedule == "explicit":
      raise ValueError("mteo.schedule='explicit' needs a list per NFE; use edm, time_uniform or logsnr_uniform")
    SCHEDULES.get(self.schedule)
    if self.schedule == "edm" and not self.rho > 0:
      raise ValueError(f"mteo.rho must be > 0, got {self.rho}")
    if not self.solvers or not self.nfes:
      raise ValueError(f"mteo.solvers and mteo.nfes must be non-empty, got {self.solvers} and {self.nfes}")
    for solver_name in self.solvers:
      solver = get_solver(solver_name)   # KeyError listing the registered solvers
      for nfe in self.nfes:
        solver.num_steps_for_nfe(nfe)    # ValueError naming the nearest reachable NFE


def noise_seeds(seed: int) -> tuple[int, int]:
  """(train, evaluation) noise seeds: disjoint streams, even and odd, for every experiment seed."""
  train_seed, eval_seed = 2 * seed, 2 * seed + 1
  assert train_seed != eval_seed and train_seed % 2 == 0 and eval_seed % 2 == 1
  return train_seed, eval_seed


def label_seed(noise_seed: int) -> int:
  """The seed of a conditional teacher's labels for the noise of ``noise_seed`` (part of the reference key)."""
  return noise_seed + 10_000


def resolve_teacher(spec: str) -> Path:
  """``pretrained:<name>`` -> the shipped teacher ``mteo_jax/pretrained/teacher_<name>``; anything else is a path."""
  if spec.startswith("pretrained:"):
    name = spec.split(":", 1)[1]
    path = PRETRAINED_DIR / f"teacher_{name}"
    if not path.exists():
      shipped = sorted(p.name.removeprefix("teacher_") for p in PRETRAINED_DIR.glob("teacher_*"))
      raise FileNotFoundError(f"no shipped teacher {name!r}; shipped teachers: {shipped}")
    return path
  path = Path(spec)
  if not path.exists():
    raise FileNotFoundError(f"teacher {spec!r} does not exist: give an exported teacher directory (a training run's "
                            "WORKDIR/teacher) or pretrained:<name>")
  return path


class Teacher:
  """A loaded teacher with its identity and its real data for the Fréchet distance."""

  def __init__(self, path: Path):
    self.backbone, self.params, self.precond, self.metadata = load_teacher(path)
    self.identity = hash_json({"net": teacher_identity(self.params, self.backbone),
                               "precond": dataclasses.asdict(self.precond)})
    self.data_shape = self.backbone.data_shape

  def labels(self, noise_seed: int, num: int) -> np.ndarray | None:
    """Class labels drawn beside the noise of ``noise_seed`` (from ``label_seed(noise_seed)``)."""
    if not self.backbone.num_classes:
      return None
    return np.asarray(jax.random.randint(jax.random.key(label_seed(noise_seed)), (num,), 0, self.backbone.num_classes))

  @functools.cached_property
  def denoiser(self):
    """``D(x, sigma, temb=None, *, label=None)``: one object per teacher, so compiled reference solves are reused."""
    return make_denoiser(self.backbone, self.params, self.precond)


def _batched(fn: Callable[..., jax.Array], batch_size: int, *arrays) -> np.ndarray:
  """``fn`` over chunks of the leading axis (the last chunk padded so that ``fn`` compiles once)."""
  num = arrays[0].shape[0]
  outputs = []
  for start in range(0, num, batch_size):
    chunk = [None if a is None else a[start:start + batch_size] for a in arrays]
    pad = batch_size - chunk[0].shape[0] if num > batch_size else 0
    if pad:
      chunk = [None if c is None else np.concatenate([c, np.repeat(c[-1:], pad, axis=0)]) for c in chunk]
    outputs.append(np.asarray(fn(*chunk))[:batch_size - pad])
  return np.concatenate(outputs)


def timed_samples(fn: Callable[..., jax.Array], batch_size: int, *arrays) -> tuple[np.ndarray, float]:
  """``(samples, seconds per 1000 samples)``: compiled on the first chunk, then the whole pass is timed."""
  _batched(fn, batch_size, *[None if a is None else a[:batch_size] for a in arrays])
  start = time.perf_counter()
  samples = _batched(fn, batch_size, *arrays)
  return samples, 1000.0 * (time.perf_counter() - start) / arrays[0].shape[0]


class Evaluator:
  """Scores samples from held-out noise against the reference: RMSE, PSNR and, where possible, a distribution metric."""

  def __init__(self, reference_final: np.ndarray, real: np.ndarray | None, feature_net=None, mixture=None):
    self.reference_final = reference_final
    self.real = real
    self.feature_net = feature_net
    self.mixture = mixture
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
    if self.mixture is not None:
      row["sliced_wasserstein"] = float(metrics.sliced_wasserstein(samples, self.real, seed=0))
      row["log_likelihood"] = float(metrics.mixture_log_likelihood(samples, self.mixture))
    return row


def _feature_network(dataset_name: str):
  from mteo_jax import features  # noqa: PLC0415
  name = {"digits": "digits", "fashion_mnist": "fmnist"}.get(dataset_name)
  if name is None:
    return None
  try:
    return features.load_feature_network(name)
  except FileNotFoundError as e:
    logging.warning("no feature network for %s (%s): the Fréchet distance is skipped", dataset_name, e)
    return None


def _real_data(teacher: Teacher, num: int):
  """Held-out real data (the test split) of the teacher's dataset, and the exact mixture for a GMM teacher."""
  name = teacher.metadata.get("dataset")
  options = config_utils.tuples_from_lists(teacher.metadata.get("data_options") or {})
  try:
    dataset = data_lib.get_dataset(name, "test", **options)
  except (KeyError, FileNotFoundError, ValueError) as e:
    logging.warning("held-out data of %s unavailable (%s): distribution metrics are skipped", name, e)
    return None, None
  indices = np.arange(min(num, len(dataset)))
  real = dataset.get_batch(indices)["x"]
  return real, getattr(dataset, "mixture", None)


def run_mteo(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """The main job; returns the results dict it writes to ``workdir/results.json``."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  job = config_utils.from_dict(MTEOJobConfig, config_utils.to_plain(config.mteo), where="mteo")
  seed = int(config.seed)
  train_seed, eval_seed = noise_seeds(seed)
  teacher = Teacher(resolve_teacher(job.teacher))
  precond = teacher.precond
  x_T_train = np.asarray(reference_noise(train_seed, job.num_train, teacher.data_shape, precond.sigma_max))
  x_T_eval = np.asarray(reference_noise(eval_seed, job.num_eval, teacher.data_shape, precond.sigma_max))
  label_train, label_eval = teacher.labels(train_seed, job.num_train), teacher.labels(eval_seed, job.num_eval)
  cache = ReferenceCache(workdir / "references")

  def reference(x_T, labels, noise_seed, sigmas):
    ref = job.reference
    key = reference_key(teacher.identity, precond, noise_seed, x_T.shape[0], teacher.data_shape, sigmas, ref.solver,
                        ref.rtol, ref.atol, x_T=x_T, labels=labels,
                        label_seed=None if labels is None else label_seed(noise_seed))
    return cache.get_or_compute(key, lambda: reference_trajectories(
        teacher.denoiser, jnp.asarray(x_T), sigmas, solver=ref.solver, rtol=ref.rtol, atol=ref.atol,
        batch_size=min(ref.batch_size, x_T.shape[0]), labels=None if labels is None else jnp.asarray(labels),
        progress=job.progress))

  eval_ref = reference(x_T_eval, label_eval, eval_seed, np.array([precond.sigma_max, precond.sigma_min], np.float32))
  real, mixture = _real_data(teacher, max(job.num_eval, 1000))
  feature_net = _feature_network(teacher.metadata.get("dataset", "")) if len(teacher.data_shape) == 3 else None
  evaluate = Evaluator(eval_ref.final, real, feature_net, mixture)

  def sampler(solver, sigmas):
    """A jitted ``(table, x_T, label) -> x_0`` for this solver and schedule (table None: the plain solver)."""
    if solver.nfe(len(sigmas) - 1) > 12:
      # Long trajectories (the teacher row): one compiled denoiser call per step; a whole unrolled program of ~100
      # network evaluations takes XLA minutes to compile for no gain.
      call = jax.jit(lambda x, sigma, label: teacher.denoiser(x, sigma, label=label))
      return lambda table, x_T, label: solver.sample(lambda x, sigma: call(x, sigma, label), jnp.asarray(x_T), sigmas)
    return jax.jit(lambda table, x_T, label: mteo.student_sample(
        solver, teacher.backbone, teacher.params, precond, table, x_T, sigmas, label))

  def score(method, solver_name, nfe, solver, sigmas, table, train_seconds, extra=None):
    run = sampler(solver, sigmas)
    fn = lambda x, y: run(table, x, y)  # noqa: E731
    samples, seconds_per_1k = timed_samples(fn, job.eval_batch_size, x_T_eval, label_eval)
    row = {"method": method, "solver": solver_name, "nfe": nfe, **evaluate(samples), "train_seconds": train_seconds,
           "sample_seconds_per_1k": seconds_per_1k, **(extra or {})}
    logging.info("%-8s %-9s NFE %d: RMSE %.4f  PSNR %.2f%s", method, solver_name, nfe, row["rmse"],
                 row["psnr"] or np.inf, f"  {row['fd_name']} {row['fd']:.3f}" if "fd" in row else "")
    return row, samples

  rows, grid_rows = [], {"reference": eval_ref.final[:job.grid_size]}
  heun = get_solver("heun")
  teacher_sigmas = get_schedule("edm", job.teacher_steps, precond.sigma_min, precond.sigma_max, rho=7.0)
  row, _ = score("teacher", "heun", heun.nfe(job.teacher_steps), heun, teacher_sigmas, None, 0.0)
  rows.append(row)
  if real is not None and feature_net is not None:
    rows.append({"method": "reference", "solver": job.reference.solver, "nfe": int(np.mean(eval_ref.nfe)),
                 **evaluate(eval_ref.final), "train_seconds": 0.0, "sample_seconds_per_1k": None})
  loss_config = mteo.LossConfig(job.distance, job.intermediate_weight, job.huber_c)
  schedule_options = {"rho": job.rho} if job.schedule == "edm" else {}
  runs = [(nfe, solver_name, get_solver(solver_name)) for nfe in job.nfes for solver_name in job.solvers]
  grids = [np.asarray(get_schedule(job.schedule, solver.num_steps_for_nfe(nfe), precond.sigma_min, precond.sigma_max,
                                   **schedule_options)) for nfe, _, solver in runs]
  # One reference solve of the training noise, saved at every student's sigmas (all NFEs and solvers at once).
  train_sigmas, train_index = union_sigmas(grids)
  train_ref = reference(x_T_train, label_train, train_seed, train_sigmas)
  num_monitor = min(256, job.num_eval)   # held-out samples scored during training
  for (nfe, solver_name, solver), sigmas, index in zip(runs, grids, train_index):
    tag = f"{solver_name}_nfe{nfe}"
    base_row, base_samples = score("base", solver_name, nfe, solver, sigmas, None, 0.0)
    rows.append(base_row)
    train_data = {"x_T": x_T_train, "ref": np.swapaxes(train_ref.states[index], 0, 1)}
    if label_train is not None:
      train_data["label"] = label_train
    table = mteo.init_table(teacher.backbone, teacher.params, precond, solver.eval_sigmas(sigmas), job.granularity)
    held_out = sampler(solver, sigmas)

    def held_out_rmse(table, held_out=held_out):
      samples = held_out(table, x_T_eval[:num_monitor], None if label_eval is None else label_eval[:num_monitor])
      return metrics.rmse(np.asarray(samples), eval_ref.final[:num_monitor])

    run_metadata = {"teacher": teacher.identity, "solver": solver_name, "nfe": nfe, "job": config_utils.to_plain(job),
                    "seed": seed}
    start = time.perf_counter()
    table, history = fitting.fit(
        mteo.make_loss_fn(solver, teacher.backbone, precond, sigmas, loss_config), table, teacher.params,
        train_data, fitting.make_optimizer(job.learning_rate, job.steps, job.warmup_steps, job.grad_clip,
                                           job.lr_schedule),
        steps=job.steps, batch_size=min(job.batch_size, job.num_train), seed=train_seed, eval_fn=held_out_rmse,
        eval_every=job.eval_every, checkpoint_dir=str((workdir / "checkpoints" / tag).absolute()),
        checkpoint_every=job.checkpoint_every, metadata=run_metadata, progress=job.progress,
        desc=f"MTEO {solver_name} NFE {nfe}")
    train_seconds = time.perf_counter() - start
    meta = mteo.table_metadata(teacher.identity, solver_name, {}, job.schedule, sigmas, table,
                               teacher.backbone.layer_names, loss_config, {"steps": job.steps, "seed": seed})
    mteo.save_table(str((workdir / "tables" / tag).absolute()), table, meta, overwrite=True)
    mteo_row, mteo_samples = score("mteo", solver_name, nfe, solver, sigmas, table, train_seconds,
                                   {"loss_curve": {"step": history["step"], "loss": history["loss"]},
                                    "held_out_curve": {"step": history["eval_step"], "rmse": history["eval"]}})
    rows.append(mteo_row)
    if nfe == job.nfes[0]:
      grid_rows[f"{solver_name}"] = base_samples[:job.grid_size]
      grid_rows[f"{solver_name} + MTEO"] = mteo_samples[:job.grid_size]
  results = {"teacher": {"path": job.teacher, "identity": teacher.identity,
                         **{k: teacher.metadata.get(k) for k in ("backbone", "dataset", "steps", "final_loss")}},
             "config": config_utils.to_plain(config), "seed": seed,
             "noise_seeds": {"train": train_seed, "eval": eval_seed}, "rows": rows}
  (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
  picture_errors = _pictures(workdir, grid_rows, rows, job)
  if picture_errors:  # recorded beside the results, which are kept whole
    results["picture_errors"] = picture_errors
    (workdir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
  return results


def mteo_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The CLI's ``mode="mteo"``."""
  run_mteo(config, workdir)


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _pictures(workdir: Path, grid_rows: dict[str, np.ndarray], rows: list[dict], job: MTEOJobConfig) -> dict[str, str]:
  """Draws the job's pictures, each on its own: a picture that fails is logged, left out and returned as
  ``{file name: error}``, and the others are still drawn (the results are on disk before this runs).

  Images [N, H, W, C]: one comparison grid, ``samples.png``. Points of any other shape: one picture per row of
  ``grid_rows``, ``samples_<row>.png``, all in one frame fitted on the reference (a PCA projection for D > 2, a
  histogram for D = 1; ``viz.save_samples_picture``). Then ``rmse_bars.png``.
  """
  errors: dict[str, str] = {}

  def attempt(name: str, draw: Callable[[], Any]) -> Any:
    try:
      return draw()
    except Exception as error:  # noqa: BLE001  (a picture must never cost the computed results)
      logging.warning("picture %s not drawn: %s: %s", name, type(error).__name__, error)
      errors[name] = f"{type(error).__name__}: {error}"
      return None

  nfe = job.nfes[0]
  reference = grid_rows["reference"]
  kind = attempt("samples", lambda: viz.picture_kind(np.shape(reference)))
  if kind == "images":
    attempt("samples.png", lambda: viz.save_comparison_grid(
        grid_rows, workdir / "samples.png", title=f"held-out noise, NFE {nfe}: reference vs base solver vs MTEO"))
  elif kind is not None:
    # One frame for every panel; should fitting it fail, each panel fits its own.
    view = attempt("samples (shared frame)", lambda: viz.point_view(reference, *grid_rows.values()))
    for name, points in grid_rows.items():
      file_name = f"samples_{name.replace(' + ', '_').replace(' ', '_')}.png"
      attempt(file_name, lambda name=name, points=points, file_name=file_name: viz.save_samples_picture(
          points, workdir / file_name, reference=None if name == "reference" else reference, view=view,
          title=f"{name}, NFE {nfe}" if name != "reference" else name))
  groups: dict[str, dict[str, float]] = {}
  for r in rows:
    if r["nfe"] == nfe and r["method"] in ("base", "mteo"):
      groups.setdefault(r["solver"], {})["base solver" if r["method"] == "base" else "+ MTEO"] = r["rmse"]
  attempt("rmse_bars.png", lambda: viz.save_grouped_bar_plot(groups, workdir / "rmse_bars.png",
                                                             ylabel="RMSE to reference",
                                                             title=f"held-out noise, NFE {nfe}"))
  return errors
