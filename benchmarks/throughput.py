"""Sampling throughput (samples/s) per solver and NFE: plain, with an MTEO table, with a per-sample schedule; one run.

For each teacher, solver and NFE, four jitted functions of the same noise and batch, each as the harness jits it:

* ``plain``: the solver on the shared EDM grid (rho = 7) with the teacher's own time embeddings
  (``mteo.student_sample`` with no table; ``methods/plain.py``);
* ``table``: the same with an MTEO table (``mteo.init_table`` at the solver's evaluation sigmas, granularity
  ``layer``, passed in as an argument as ``MTEO.sampler`` does): the table replaces the time-embedding MLP at every
  network evaluation, so it should cost no more than ``plain``;
* ``indis``: INDIS's per-sample schedule (``methods/indis.make_instance_sampler``): phi(x_T) once per sample (an MLP
  over the flattened noise), a grid per sample [B, N + 1], a time shift and an output scale per sample and
  evaluation; phi's parameters passed in as ``INDIS.sampler`` does;
* ``phi``: phi alone (``predictor.apply``), to tell the network's share of INDIS's overhead from the per-sample path's.

All are compiled first (the compile time of each is recorded), then called in interleaved repeats (plain, table,
indis, phi, plain, ...) so that drifts of a shared machine hit all alike; the medians are reported, as samples per
second and as time ratios to ``plain`` in the same run. Timing does not depend on the values of the table or of phi:
the table is the teacher's own embeddings and phi a fresh ``predictor.init`` (its head starts at zero, so its grid is
the EDM one, but the sampler still runs the per-sample path: the grid, shift and scale are traced arrays).

    python benchmarks/throughput.py            # digits and gmm, 4 solvers, NFE 3/5/8, batch 128 (36 min, 2 busy cores)
    python benchmarks/throughput.py --quick    # smoke run: gmm, ipndm, NFE 3, batch 16, 3 repeats
    python benchmarks/throughput.py --teachers pretrained:digits --solvers ipndm --nfes 3,5 --repeats 20
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from mteo_jax import mteo  # noqa: E402
from mteo_jax.harness import Cell  # noqa: E402
from mteo_jax.methods import indis  # noqa: E402
from mteo_jax.reference import reference_noise  # noqa: E402
from mteo_jax.schedules import get_schedule  # noqa: E402
from mteo_jax.solvers import SOLVERS, get_solver  # noqa: E402
from mteo_jax.teachers import Teacher, resolve_teacher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # common.py beside this script
import common  # noqa: E402

NAME = "throughput"
VARIANTS = ("plain", "table", "indis")   # sampled variants; "phi" (phi alone) is timed beside them
DEFAULT_TEACHERS = ("pretrained:digits", "pretrained:gmm")
QUICK_TEACHER = "pretrained:gmm"


def _seconds(fn, *args) -> float:
  """Wall time of one call of the jitted ``fn`` until its outputs are ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def time_cell(teacher, solver_name: str, nfe: int, x_T, label, *, repeats: int, phi_seed: int) -> dict:
  """Times one (teacher, solver, NFE) cell.

  Args:
    teacher: the frozen ``Teacher``. solver_name: a registered solver. nfe: network evaluations per sample.
    x_T: [B, *data_shape] float32, the noise at sigma_max. label: [B] int for a conditional teacher, else None.
    repeats: timed calls of each function, interleaved. phi_seed: the key of phi's fresh parameters.
  Returns:
    ``{"num_steps", "batch_size", "plain" | "table" | "indis": {"median_ms", "samples_per_s", "time_ratio",
    "throughput_ratio", "compile_seconds", "all_ms"}, "phi": {"median_ms", "share_of_indis", "compile_seconds",
    "all_ms", "num_params"}}``; the ratios are to ``plain`` (time: > 1 is slower; throughput: < 1 is slower).
  """
  precond = teacher.precond
  solver = get_solver(solver_name)
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(nfe), precond.sigma_min, precond.sigma_max, rho=7.0)
  cell = Cell(solver_name, nfe, solver, sigmas)
  sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])
  backbone, params = teacher.backbone, teacher.params
  table = mteo.init_table(backbone, params, precond, solver.eval_sigmas(cell.sigmas))
  settings = indis.INDISSettings()
  predictor = indis.build_predictor(settings, cell, teacher.num_classes, sigma_max)
  phi_params = predictor.init(jax.random.key(phi_seed), x_T[:1], None if label is None else label[:1])["params"]
  per_sample = indis.make_instance_sampler(predictor, solver, backbone, precond, sigma_min, sigma_max,
                                           settings.min_fraction)
  # As the harness jits them: the teacher's parameters closed over, what a method learned passed in.
  calls = {
      "plain": (jax.jit(lambda x, y: mteo.student_sample(solver, backbone, params, precond, None, x, cell.sigmas, y)),
                (x_T, label)),
      "table": (jax.jit(lambda t, x, y: mteo.student_sample(solver, backbone, params, precond, t, x, cell.sigmas, y)),
                (table, x_T, label)),
      "indis": (jax.jit(lambda phi, x, y: per_sample(phi, params, x, y)), (phi_params, x_T, label)),
      "phi": (jax.jit(lambda phi, x, y: predictor.apply({"params": phi}, x, y)), (phi_params, x_T, label)),
  }
  compile_seconds = {name: _seconds(fn, *args) for name, (fn, args) in calls.items()}   # compile and run once
  times = {name: [] for name in calls}
  for _ in range(repeats):   # interleaved
    for name, (fn, args) in calls.items():
      times[name].append(1e3 * _seconds(fn, *args))
  median = {name: statistics.median(values) for name, values in times.items()}
  batch = int(x_T.shape[0])
  out = {"num_steps": len(cell.sigmas) - 1, "batch_size": batch}
  for name in VARIANTS:
    out[name] = {"median_ms": median[name], "samples_per_s": 1e3 * batch / median[name],
                 "time_ratio": median[name] / median["plain"], "throughput_ratio": median["plain"] / median[name],
                 "compile_seconds": compile_seconds[name], "all_ms": times[name]}
  out["phi"] = {"median_ms": median["phi"], "share_of_indis": median["phi"] / median["indis"],
                "compile_seconds": compile_seconds["phi"], "all_ms": times["phi"],
                "num_params": sum(int(leaf.size) for leaf in jax.tree.leaves(phi_params))}
  return out


def save_plot(results: dict, path: Path, title: str) -> None:
  """Two panels per teacher (one above the other): samples/s of plain, table and INDIS per (solver, NFE) on a log
  axis, and their time ratios to plain with a dashed line at 1."""
  teachers = list(results)
  groups = max(sum(len(nfes) for nfes in cells.values()) for cells in results.values())
  fig, axes = plt.subplots(2 * len(teachers), 1, figsize=(0.6 * groups + 2.0, 5.5 * len(teachers)), squeeze=False)
  for index, teacher in enumerate(teachers):
    cells = [(solver, nfe, r) for solver, by_nfe in results[teacher].items() for nfe, r in by_nfe.items()]
    labels = [f"{solver}\nNFE {nfe}" for solver, nfe, _ in cells]
    top, bottom = axes[2 * index][0], axes[2 * index + 1][0]
    for row_ax, key, variants in ((top, "samples_per_s", VARIANTS), (bottom, "time_ratio", VARIANTS[1:])):
      width = 0.8 / len(variants)
      for k, variant in enumerate(variants):
        positions = [g + (k - (len(variants) - 1) / 2) * width for g in range(len(cells))]
        heights = [r[variant][key] for _, _, r in cells]
        bars = row_ax.bar(positions, heights, width, label=variant, color=f"C{VARIANTS.index(variant)}")
        if key == "time_ratio":
          row_ax.bar_label(bars, fmt="%.2f", fontsize=6)
      row_ax.set_xticks(range(len(cells)), labels, fontsize=7)
      row_ax.legend(fontsize=7)
    top.set_yscale("log")
    top.set_ylabel("samples / s (median)")
    top.set_title(teacher, fontsize=9)
    bottom.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    bottom.set_ylabel("time / plain solver's time")
    bottom.set_ylim(0, max(1.15, 1.15 * max(r[v]["time_ratio"] for _, _, r in cells for v in VARIANTS[1:])))
  fig.suptitle(title, fontsize=9)
  common.save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
  setup = {**common.machine(), "quick": args.quick}   # the load average before the run
  cells = [(solver, nfe) for solver in args.solvers for nfe in args.nfes]
  total, done = len(args.teachers) * len(cells), 0
  results, identities = {}, {}
  start = time.perf_counter()
  for spec in args.teachers:
    teacher = Teacher.load(spec)
    name = spec.removeprefix("pretrained:")
    identities[name] = teacher.identity
    x_T = reference_noise(args.seed, args.batch_size, teacher.data_shape, teacher.precond.sigma_max)
    labels = teacher.labels(args.seed, args.batch_size)
    label = None if labels is None else jnp.asarray(labels)
    results[name] = {}
    for solver_name, nfe in cells:
      r = time_cell(teacher, solver_name, nfe, x_T, label, repeats=args.repeats, phi_seed=args.phi_seed)
      results[name].setdefault(solver_name, {})[str(nfe)] = r
      done += 1
      if not args.no_progress:
        common.log(f"[{done}/{total}] {name} {solver_name} NFE {nfe}: plain {r['plain']['samples_per_s']:.0f}/s, "
                   f"table x{r['table']['time_ratio']:.3f}, INDIS x{r['indis']['time_ratio']:.3f} (phi "
                   f"{100 * r['phi']['share_of_indis']:.1f} %) of plain's time")
  settings = indis.INDISSettings()
  setup.update({
      "load_average_after": common.load_average(), "wall_seconds": time.perf_counter() - start,
      "teachers": args.teachers, "teacher_identity": identities, "solvers": args.solvers, "nfes": args.nfes,
      "batch_size": args.batch_size, "repeats": args.repeats, "noise_seed": args.seed,
      "schedule": "EDM, rho = 7, from the teacher's sigma_max to sigma_min",
      "timing": "median of interleaved calls (plain, table, indis, phi) of the jitted functions after one compiling "
                "call each; jax.block_until_ready; ratios are to plain in the same run",
      "table": "mteo.init_table at the solver's evaluation sigmas (granularity layer), passed in as an argument",
      "phi_params": f"fresh predictor.init(jax.random.key({args.phi_seed})), untrained: timing does not depend on "
                    "the parameters' values",
      "indis_settings": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}})
  common.write_json(args.out_dir, NAME, setup=setup, results=results)
  save_plot(results, Path(args.out_dir) / f"{NAME}.png",
            f"sampling throughput, batch {args.batch_size}, median of {args.repeats} ({setup['device']}, load "
            f"{setup['load_average']})")
  return {"setup": setup, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick="smoke run: pretrained:gmm (unless --teachers is given), the first "
                                        "solver, the first NFE, batch 16, 3 repeats")
  parser.add_argument("--teachers", type=common.comma_list(str), default=None,
                      help=f"comma-separated exported teacher directories or pretrained:<name> (default: "
                           f"{','.join(DEFAULT_TEACHERS)})")
  parser.add_argument("--solvers", type=common.comma_list(str), default=["ipndm", "dpmpp_2m", "euler", "unipc"])
  parser.add_argument("--nfes", type=common.comma_list(int), default=[3, 5, 8])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls of each function, interleaved")
  parser.add_argument("--seed", type=int, default=1, help="the noise seed (reference_noise)")
  parser.add_argument("--phi-seed", type=int, default=0, help="the key of phi's fresh parameters")
  args = parser.parse_args(argv)
  if args.work_dir is not None:
    parser.error("--work-dir: this benchmark keeps no runs or caches")
  if args.quick:
    args.teachers = args.teachers[:1] if args.teachers else [QUICK_TEACHER]
    args.solvers, args.nfes, args.batch_size, args.repeats = args.solvers[:1], args.nfes[:1], 16, 3
  args.teachers = args.teachers or list(DEFAULT_TEACHERS)
  check_args(parser, args)
  return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Every option checked before any work: teachers exist, solvers are registered and reach every NFE, sizes >= 1."""
  for name in ("batch_size", "repeats"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if not args.teachers or not args.solvers or not args.nfes:
    parser.error("--teachers, --solvers and --nfes must each name at least one")
  for spec in args.teachers:
    try:
      resolve_teacher(spec)
    except FileNotFoundError as error:
      parser.error(f"--teachers: {error}")
  for solver_name in args.solvers:
    if solver_name not in SOLVERS.names():
      parser.error(f"--solvers: unknown solver {solver_name!r}; expected some of {SOLVERS.names()}")
    for nfe in args.nfes:
      try:
        get_solver(solver_name).num_steps_for_nfe(nfe)
      except ValueError as error:
        parser.error(f"--nfes: {error}")


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
