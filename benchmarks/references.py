"""References: diffrax's adaptive solve vs fixed-step Heun at equal accuracy, and where the main job's time goes.

(a) **Adaptive vs fixed steps.** From held-out noise, the teacher's probability-flow ODE is solved by the harness's
reference solver (``mteo_jax.reference``: diffrax Tsit5 in log-sigma, per-sample step control) at each of
``--tolerances`` (rtol = atol), and by Heun (EDM's sampler, the teacher row's) with N steps on the EDM grid (rho = 7,
``2N - 1`` evaluations) for each N of ``--heun-steps``. Each is scored against a tight reference from the same noise
(Tsit5 at rtol = atol = ``--tight-tolerance``, float32: the teacher's own precision; on digits the 1e-8 and 1e-7
solves differ by an RMSE of 4e-7, far below the errors compared here): RMSE (``metrics.rmse``), mean NFE per sample,
and wall seconds per sample. Every solve is compiled first (Tsit5: one chunk of ``--batch-size`` at the same
tolerance; Heun: its jitted denoiser call, one per step as the harness's teacher row runs it), then timed over all
``--samples`` in chunks of ``--batch-size``. "At equal accuracy": for each tolerance, the Heun N whose RMSE equals
Tsit5's, interpolated log-log between the measured N that bracket it (extrapolated from the last two where none
does, and said so), its NFE and seconds per sample (log-log in N), and the ratios Heun / Tsit5; also the smallest
measured N at least as accurate, with its measured ratios. The headline is the harness's default tolerance
(``harness.ReferenceConfig``).

(b) **The main job's wall time by phase.** The main job (``--main-config``, default ``configs/digits.py:mteo``,
README's first command) runs in-process through ``mteo_jax.modes.run`` in a fresh work directory, or its
``results.json`` is read (``--main-results``). Its ``timings`` (``{"phases": {name: seconds}, "total_seconds": s}``,
written by the harness's ``PhaseTimer``) are reported as seconds and shares of ``total_seconds``, for whatever phases
it names (references, teacher row, training, evaluation, pictures, other, ...).

    python benchmarks/references.py            # digits: 64 samples, Tsit5 at 1e-3..1e-6, Heun 8..512 steps, then the
                                               # main job (~30 min on 2 CPU cores, ~12 of them the main job)
    python benchmarks/references.py --quick    # smoke run: gmm, 32 samples, tolerance 1e-3, a tiny main job (~30 s)
    python benchmarks/references.py --main-results runs/digits_mteo/results.json   # (b) from an existing run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from mteo_jax import harness, metrics, modes  # noqa: E402
from mteo_jax.reference import REFERENCE_SOLVERS, reference_noise, reference_trajectories  # noqa: E402
from mteo_jax.schedules import get_schedule  # noqa: E402
from mteo_jax.solvers import get_solver  # noqa: E402
from mteo_jax.teachers import Teacher, resolve_teacher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # common.py beside this script
import common  # noqa: E402

NAME = "references"
DEFAULT_RTOL = harness.ReferenceConfig().rtol   # the harness's default reference tolerance (rtol = atol)
DEFAULT_MAIN = "configs/digits.py:mteo"
QUICK_MAIN = "configs/gmm.py:mteo"
# --quick: a tiny main job (every other key as the variant sets it).
QUICK_MAIN_OVERRIDES = {"solvers": ("euler",), "steps": 4, "batch_size": 16, "num_train": 32, "num_eval": 32,
                        "eval_batch_size": 32, "teacher_steps": 3, "grid_size": 4, "eval_every": 2,
                        "checkpoint_every": 2, "log_every": 2, "reference": {"rtol": 1e-3, "atol": 1e-3}}


def _key(value: float) -> str:
  return f"{value:g}"


# --- (a) adaptive vs fixed steps -------------------------------------------------------------------------------------

def adaptive_solve(teacher: Teacher, x_T: np.ndarray, label: np.ndarray | None, tol: float, *, solver: str,
                   batch_size: int, warm_up: bool = True) -> tuple[np.ndarray, dict]:
  """``(final states [S, ...], entry)``: the reference solve at rtol = atol = ``tol``, compiled on one chunk first
  (``warm_up``), then timed over all samples."""
  sigma = teacher.precond
  save = np.array([sigma.sigma_max, sigma.sigma_min], np.float32)

  def solve(x, y):
    return reference_trajectories(teacher.denoiser, jnp.asarray(x), save, solver=solver, rtol=tol, atol=tol,
                                  batch_size=batch_size, labels=None if y is None else jnp.asarray(y),
                                  progress=False)

  compile_seconds = None
  if warm_up:
    start = time.perf_counter()
    solve(x_T[:batch_size], None if label is None else label[:batch_size])
    compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  reference = solve(x_T, label)
  seconds = time.perf_counter() - start
  return reference.final, {"rtol": tol, "atol": tol, "mean_nfe": float(np.mean(reference.nfe)),
                           "max_nfe": int(np.max(reference.nfe)), "seconds_per_sample": seconds / len(x_T),
                           "seconds": seconds, "warm_up_seconds": compile_seconds}


def heun_solve(teacher: Teacher, x_T: np.ndarray, label: np.ndarray | None, num_steps: int, *,
               batch_size: int) -> tuple[np.ndarray, dict]:
  """``(final states, entry)``: Heun with ``num_steps`` steps on the EDM grid (rho = 7), one jitted denoiser call per
  evaluation (as ``Harness.teacher_row``), over all samples in chunks."""
  precond, heun = teacher.precond, get_solver("heun")
  sigmas = get_schedule("edm", num_steps, precond.sigma_min, precond.sigma_max, rho=7.0)
  call = _denoiser_call(teacher)

  def sample(x, y):
    return heun.sample(lambda z, s: call(z, s, y), x, sigmas)

  start = time.perf_counter()
  finals = harness.batched(sample, batch_size, x_T, label)
  seconds = time.perf_counter() - start
  return finals, {"steps": num_steps, "nfe": heun.nfe(num_steps), "seconds_per_sample": seconds / len(x_T),
                  "seconds": seconds}


_CALLS: dict[int, Any] = {}


def _denoiser_call(teacher: Teacher):
  """One jitted denoiser call per teacher (compiled once per batch shape)."""
  if id(teacher) not in _CALLS:
    _CALLS[id(teacher)] = jax.jit(lambda x, sigma, label: teacher.denoiser(x, sigma, label=label))
  return _CALLS[id(teacher)]


def loglog_at(xs: list[float], ys: list[float], y: float) -> tuple[float, bool]:
  """The x at which the piecewise log-log line through ``(xs, ys)`` (ys decreasing in xs) reaches ``y``, and whether
  two measured points bracket it (else it is extrapolated from the nearest two)."""
  lx, ly, target = np.log(xs), np.log(ys), math.log(y)
  for i in range(len(xs) - 1):
    if (ly[i] - target) * (ly[i + 1] - target) <= 0 and ly[i] != ly[i + 1]:
      return float(np.exp(lx[i] + (target - ly[i]) * (lx[i + 1] - lx[i]) / (ly[i + 1] - ly[i]))), True
  i = 0 if target > ly[0] else len(xs) - 2
  slope = (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])
  return float(np.exp(lx[i] + (target - ly[i]) / slope)), False


def loglog_value(xs: list[float], ys: list[float], x: float) -> float:
  """``ys`` at ``x`` on the piecewise log-log line through ``(xs, ys)`` (extrapolated at the ends)."""
  lx, ly = np.log(xs), np.log(ys)
  i = int(np.clip(np.searchsorted(lx, math.log(x)) - 1, 0, len(xs) - 2))
  return float(np.exp(ly[i] + (math.log(x) - lx[i]) * (ly[i + 1] - ly[i]) / (lx[i + 1] - lx[i])))


def equal_accuracy(adaptive: dict, heun: dict) -> dict:
  """Per tolerance: the Heun steps whose RMSE matches the adaptive solve's, and the NFE and time ratios Heun /
  adaptive (interpolated, and at the smallest measured N at least as accurate)."""
  steps = sorted(heun.values(), key=lambda h: h["steps"])
  ns = [h["steps"] for h in steps]
  out = {}
  for key, a in adaptive.items():
    n, bracketed = loglog_at(ns, [h["rmse"] for h in steps], a["rmse"])
    seconds = loglog_value(ns, [h["seconds_per_sample"] for h in steps], n)
    entry = {"target_rmse": a["rmse"], "heun_steps": n, "heun_nfe": 2 * n - 1, "heun_seconds_per_sample": seconds,
             "nfe_ratio": (2 * n - 1) / a["mean_nfe"], "time_ratio": seconds / a["seconds_per_sample"],
             "bracketed": bracketed, "smallest_measured": None}
    match = next((h for h in steps if h["rmse"] <= a["rmse"]), None)
    if match is not None:
      entry["smallest_measured"] = {"steps": match["steps"], "rmse": match["rmse"], "nfe": match["nfe"],
                                    "nfe_ratio": match["nfe"] / a["mean_nfe"],
                                    "time_ratio": match["seconds_per_sample"] / a["seconds_per_sample"]}
    out[key] = entry
  return out


def accuracy(args: argparse.Namespace) -> dict:
  teacher = Teacher.load(args.teacher)
  x_T = np.asarray(reference_noise(args.seed, args.samples, teacher.data_shape, teacher.precond.sigma_max))
  label = teacher.labels(args.seed, args.samples)
  solver = harness.ReferenceConfig().solver
  common.log(f"tight reference: {solver} at {args.tight_tolerance:g}, {args.samples} samples ...")
  tight, tight_entry = adaptive_solve(teacher, x_T, label, args.tight_tolerance, solver=solver,
                                      batch_size=args.batch_size, warm_up=False)
  tight_entry["note"] = "one call, compilation included"
  adaptive = {}
  for tol in args.tolerances:
    final, entry = adaptive_solve(teacher, x_T, label, tol, solver=solver, batch_size=args.batch_size)
    entry["rmse"] = float(metrics.rmse(final, tight))
    adaptive[_key(tol)] = entry
    common.log(f"{solver} at {tol:g}: RMSE {entry['rmse']:.3g}, {entry['mean_nfe']:.0f} NFE, "
               f"{1e3 * entry['seconds_per_sample']:.1f} ms a sample")
  # Compile the denoiser call and the solver's eager steps first: Heun's fewest steps on one chunk.
  heun_solve(teacher, x_T[:args.batch_size], None if label is None else label[:args.batch_size],
             args.heun_steps[0], batch_size=args.batch_size)
  heun = {}
  for n in args.heun_steps:
    final, entry = heun_solve(teacher, x_T, label, n, batch_size=args.batch_size)
    entry["rmse"] = float(metrics.rmse(final, tight))
    heun[str(n)] = entry
    common.log(f"heun {n} steps: RMSE {entry['rmse']:.3g}, {entry['nfe']} NFE, "
               f"{1e3 * entry['seconds_per_sample']:.1f} ms a sample")
  return {"teacher": args.teacher, "teacher_identity": teacher.identity, "solver": solver,
          "reference": tight_entry, "adaptive": adaptive, "heun": heun,
          "equal_accuracy": equal_accuracy(adaptive, heun), "default_rtol": _key(DEFAULT_RTOL)}


# --- (b) the main job's phases ---------------------------------------------------------------------------------------

def load_main_config(spec: str):
  """``configs/<name>.py:<variant>`` -> that variant's ConfigDict (the file loaded by path, as ``--config=`` does)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(f"_references_main_{Path(path).stem}", common.REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant or None)


def main_job_config(args: argparse.Namespace):
  config = load_main_config(args.main_config)
  if config.mode != "mteo":
    raise ValueError(f"--main-config {args.main_config} is mode {config.mode!r}; the main job is mode 'mteo'")
  if args.quick:
    for key, value in QUICK_MAIN_OVERRIDES.items():
      if isinstance(value, dict):
        config.mteo[key].update(value)
      else:
        config.mteo[key] = value
  config.mteo.progress = not args.no_progress
  return config


def phase_shares(results: dict) -> dict:
  """``{"total_seconds", "phases": {name: seconds}, "shares": {name: share of total}, "unaccounted_seconds"}`` from a
  main job's ``results.json``; phases are read as they are named there."""
  timings = results.get("timings")
  if not isinstance(timings, dict) or not isinstance(timings.get("phases"), dict) or not timings.get("total_seconds"):
    raise KeyError("results.json has no timings ({'phases': {name: seconds}, 'total_seconds': s}): it was written "
                   "by a version of the harness without the PhaseTimer; run the main job again")
  total = float(timings["total_seconds"])
  phases = {name: float(seconds) for name, seconds in timings["phases"].items()}
  return {"total_seconds": total, "phases": phases, "shares": {name: s / total for name, s in phases.items()},
          "unaccounted_seconds": total - sum(phases.values())}


def main_job(args: argparse.Namespace) -> dict:
  if args.main_results:
    path = Path(args.main_results)
    common.log(f"main job: reading {path}")
    out = {"source": str(path), "wall_seconds": None}
  else:
    config = main_job_config(args)
    workdir = common.work_dir(args, NAME) / "main_job"
    shutil.rmtree(workdir, ignore_errors=True)   # a fresh run: a resumed one would skip its references
    common.log(f"main job {args.main_config} in {workdir} ...")
    start = time.perf_counter()
    modes.run(config, workdir)
    out = {"source": f"ran in-process: {args.main_config}" + (" (quick sizes)" if args.quick else ""),
           "wall_seconds": time.perf_counter() - start, "workdir": str(workdir)}
    path = workdir / "results.json"
  results = json.loads(path.read_text())
  out.update({"config": results.get("config"), "teacher": results.get("teacher"),
              "rows": len(results.get("rows", []))})
  try:
    out.update(phase_shares(results))
  except KeyError as error:
    common.log(f"main job: {error.args[0]}")
    out["timings_missing"] = error.args[0]
  return out


# --- the figure ------------------------------------------------------------------------------------------------------

def save_plot(results: dict, path: Path, title: str) -> None:
  """RMSE to the tight reference against NFE and against seconds per sample (log-log; adaptive points labelled with
  their tolerance, the default one's error dashed), and the main job's phases as shares of its wall time."""
  acc, job = results["accuracy"], results["main_job"]
  fig, axes = plt.subplots(1, 3, figsize=(15.0, 4.2))
  adaptive = list(acc["adaptive"].items())
  heun = sorted(acc["heun"].values(), key=lambda h: h["steps"])
  for ax, x_key, label in ((axes[0], ("mean_nfe", "nfe"), "NFE per sample"),
                           (axes[1], ("seconds_per_sample", "seconds_per_sample"), "wall seconds per sample")):
    ax.plot([h[x_key[1]] for h in heun], [h["rmse"] for h in heun], "o-", color="C0", label="Heun, EDM grid")
    ax.plot([a[x_key[0]] for _, a in adaptive], [a["rmse"] for _, a in adaptive], "s-", color="C1",
            label=f"{acc['solver']} (adaptive)")
    for tol, a in adaptive:
      ax.annotate(f"tol {tol}", (a[x_key[0]], a["rmse"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if acc["default_rtol"] in acc["adaptive"]:
      ax.axhline(acc["adaptive"][acc["default_rtol"]]["rmse"], color="0.5", linestyle="--", linewidth=0.8,
                 label=f"harness default tol {acc['default_rtol']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("RMSE to the tight reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  ax = axes[2]
  if "shares" in job:
    names = list(job["shares"])
    ax.barh(range(len(names)), [100 * job["shares"][n] for n in names], color=[f"C{i % 10}" for i in range(len(names))])
    ax.set_yticks(range(len(names)), names)
    for i, name in enumerate(names):
      ax.text(100 * job["shares"][name], i, f" {job['phases'][name]:.0f} s", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"% of the main job's {job['total_seconds']:.0f} s")
  else:
    ax.text(0.5, 0.5, "no timings in the main job's results.json", ha="center", va="center", fontsize=8)
    ax.set_axis_off()
  ax.set_title("main job: wall time by phase", fontsize=9)
  fig.suptitle(title, fontsize=9)
  common.save_figure(fig, path)


# --- the command line ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
  setup = {**common.machine(), "quick": args.quick}
  start = time.perf_counter()
  results = {"accuracy": accuracy(args)}
  results["main_job"] = main_job(args)
  setup.update({"load_average_after": common.load_average(), "wall_seconds": time.perf_counter() - start,
                "teacher": args.teacher, "samples": args.samples, "batch_size": args.batch_size,
                "noise_seed": args.seed, "tolerances": args.tolerances, "tight_tolerance": args.tight_tolerance,
                "heun_steps": args.heun_steps, "main_config": None if args.main_results else args.main_config,
                "main_results": args.main_results, "dtype": "float32",
                "timing": "wall seconds in one process after compilation (Tsit5: a chunk at the same tolerance "
                          "first; Heun: its jitted denoiser call first), per sample = a pass over all samples / "
                          "samples"})
  common.write_json(args.out_dir, NAME, setup=setup, results=results)
  save_plot(results, Path(args.out_dir) / f"{NAME}.png",
            f"{args.teacher}, {args.samples} samples, batch {args.batch_size} ({setup['device']}, load "
            f"{setup['load_average']})")
  return {"setup": setup, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick="smoke run: the shipped gmm teacher, 32 samples, tolerance 1e-3 against "
                                        "1e-5, Heun 4..64 steps, a tiny main job on configs/gmm.py:mteo")
  parser.add_argument("--teacher", default=None, help="exported teacher directory or pretrained:<name> (default: "
                                                       "pretrained:digits)")
  parser.add_argument("--samples", type=int, default=None, help="held-out noises (default 64)")
  parser.add_argument("--batch-size", type=int, default=None, help="samples per compiled call (default 32)")
  parser.add_argument("--seed", type=int, default=1, help="the noise seed (reference_noise)")
  parser.add_argument("--tolerances", type=common.comma_list(float), default=None,
                      help="rtol = atol of the adaptive solves (default 1e-3,1e-4,1e-5,1e-6)")
  parser.add_argument("--tight-tolerance", type=float, default=None, help="the tight reference's (default 1e-8)")
  parser.add_argument("--heun-steps", type=common.comma_list(int), default=None,
                      help="Heun step counts N (2N - 1 NFE; default 8,16,32,64,128,256,512)")
  parser.add_argument("--main-config", default=None,
                      help=f"the main job, FILE:VARIANT (default {DEFAULT_MAIN}; --quick: {QUICK_MAIN}, tiny)")
  parser.add_argument("--main-results", default=None, help="read this results.json instead of running the main job")
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = {"teacher": "pretrained:gmm" if quick else "pretrained:digits", "samples": 32 if quick else 64,
              "batch_size": 16 if quick else 32, "tolerances": [1e-3] if quick else [1e-3, 1e-4, 1e-5, 1e-6],
              "tight_tolerance": 1e-5 if quick else 1e-8,
              "heun_steps": [4, 8, 16, 32, 64] if quick else [8, 16, 32, 64, 128, 256, 512],
              "main_config": QUICK_MAIN if quick else DEFAULT_MAIN}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  check_args(parser, args)
  return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Every option checked before any work."""
  try:
    resolve_teacher(args.teacher)
  except FileNotFoundError as error:
    parser.error(f"--teacher: {error}")
  for name in ("samples", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if not args.tolerances or not all(0 < t < 1 for t in args.tolerances):
    parser.error(f"--tolerances must be numbers in (0, 1), got {args.tolerances}")
  if not 0 < args.tight_tolerance < min(args.tolerances):
    parser.error(f"--tight-tolerance ({args.tight_tolerance:g}) must be > 0 and below every --tolerances "
                 f"({min(args.tolerances):g})")
  if len(args.heun_steps) < 2 or min(args.heun_steps) < 1 or len(set(args.heun_steps)) != len(args.heun_steps):
    parser.error(f"--heun-steps needs at least two distinct step counts >= 1, got {args.heun_steps}")
  args.heun_steps = sorted(args.heun_steps)
  REFERENCE_SOLVERS.get(harness.ReferenceConfig().solver)
  if args.main_results:
    path = Path(args.main_results)
    if not path.is_file():
      parser.error(f"--main-results: {path} is not a file (a main job's WORKDIR/results.json)")
    return
  path, _, variant = args.main_config.partition(":")
  if not (common.REPO / path).is_file():
    parser.error(f"--main-config: {path} is not a config file of this repository (configs/<name>.py:<variant>)")
  try:
    modes.parse(main_job_config(args))
  except (ValueError, modes.ConfigError) as error:
    parser.error(f"--main-config: {error}")


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
