"""Error vs NFE of every registered solver on the digits teacher, plain at NFE 3..12 and with MTEO at NFE 3.

What it measures: on the shipped digits teacher (``pretrained:digits``) and the held-out noise of ``quality.py``
(seed 1, 500 samples), every solver of ``mteo_jax.solvers.SOLVERS`` samples on the EDM (rho 7) schedule at NFE 3..12
(Heun only at odd NFE: its last step is one evaluation), and each sample is compared with the diffrax reference from
the same noise: RMSE to the reference, per-sample root mean square over pixels averaged over samples. Then MTEO (a
learned time-embedding table) at NFE 3 with every solver, at ``quality.py``'s budget (256 training trajectories, 100
Adam steps of 32), so its iPNDM and DPM-Solver++(2M) rows are ``quality.py``'s. For each solver the JSON reports the
first NFE at which the plain solver matches (RMSE <=) MTEO at NFE 3 with the same solver, and the best MTEO NFE-3 figure
over all solvers, or that no measured NFE does.

How: the plain rows are scored on the harness (``harness.Harness``: the comparison job's noise, reference, teacher row
and metrics) with the solver stepped on the host around one jitted denoiser call, which compiles once for every solver
and NFE; a jitted N-step sampler inlines N UNets and costs minutes per (solver, NFE) to compile on CPU, and the numbers
agree to rounding (the test checks it). The learned rows come from the comparison job (``mode="compare"``,
``configs/digits.py:compare`` narrowed by this script, ``mteo_jax.modes.run``), in a second work dir. Both share
``quality.py``'s reference cache and, when it ran first, its teacher row. A learned schedule is an option
(``--learned mteo,ld3``: LD3, the cheapest, at NFE 3 with every solver, about 15 more minutes; ``quality.py`` has LD3
with iPNDM and DPM-Solver++(2M)), as are MTEO's NFE 4 and 5 (``--learned-nfes 3,4,5``, about 30 more minutes): each
(method, solver, NFE) compiles the UNet's gradient unrolled over the NFE, minutes of CPU, so the default keeps to
MTEO at NFE 3 to fit 30 minutes on 2 CPU cores.

Run (from the repository root):
    python benchmarks/error_vs_nfe.py            # full: digits, 7 solvers, NFE 3..12, MTEO at NFE 3; ~30 min
    python benchmarks/error_vs_nfe.py --quick    # smoke run: pretrained:gmm, ipndm/dpmpp_2m, NFE 3..5, MTEO at 3
Options: --solvers (registered names), --nfes (the plain NFEs, e.g. 3,4,5,6), --learned (some of mteo,ld3,gits,indis,
mteo_on_best, or none), --learned-nfes (default 3; the matching is against the smallest), --out-dir, --work-dir,
--no-progress. A rerun with the same setup resumes from the work dir (the plain rows are sampled again: no compile,
a few minutes). Writes ``<out-dir>/error_vs_nfe.json`` and ``<out-dir>/error_vs_nfe.png`` (log-y RMSE vs NFE, solid
lines plain, markers for the learned methods, one colour per solver).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import quality  # noqa: E402

from mteo_jax import config_utils  # noqa: E402
from mteo_jax import harness as harness_lib  # noqa: E402
from mteo_jax.solvers import SOLVERS, get_solver  # noqa: E402
from mteo_jax.teachers import Teacher  # noqa: E402

NAME = "error_vs_nfe"
NFES = tuple(range(3, 13))
LEARNED = ("mteo",)
LEARNABLE = ("mteo", "ld3", "gits", "indis", "mteo_on_best")
LEARNED_NFES = (3,)
QUICK_SOLVERS, QUICK_NFES, QUICK_LEARNED = ("ipndm", "dpmpp_2m"), (3, 4, 5), ("mteo",)
MARKERS = {"mteo": "*", "ld3": "D", "gits": "s", "indis": "^", "mteo_on_best": "P"}


def reachable(solver: str, nfes: tuple[int, ...]) -> tuple[int, ...]:
  """The NFEs of ``nfes`` that ``solver`` reaches (Heun: odd ones only)."""
  out = []
  for nfe in nfes:
    try:
      get_solver(solver).num_steps_for_nfe(nfe)
    except ValueError:
      continue
    out.append(nfe)
  return tuple(out)


def eager_sampler(denoiser, solver, sigmas):
  """``(x_T, label) -> x_0``: the solver stepped on the host around ``denoiser`` (one jitted denoiser call, as the
  harness's teacher row samples). The denoiser compiles once per batch shape for every solver and NFE, where a jitted
  N-step sampler (``methods.BaseSolver``) inlines N UNets and takes minutes per (solver, NFE) to compile on CPU; the
  numbers agree to rounding (``tests/test_benchmarks_quality.py``)."""
  grid = jnp.asarray(sigmas)
  return lambda x_T, label: solver.sample(lambda x, sigma: denoiser(x, sigma, label), jnp.asarray(x_T), grid)


def plain_rows(budget: quality.Budget, solvers: tuple[str, ...], nfes: tuple[int, ...], workdir: Path,
               references: Path, progress: bool, teacher_row_from: list[Path]) -> tuple[list[dict], dict]:
  """The plain rows on the harness (``harness.Harness``, the comparison job's noise, reference, teacher row and
  metrics; ``results.json`` in ``workdir``): every solver at every NFE it reaches on the EDM-rho base schedule.
  Returns the rows and the harness's settings."""
  config = harness_lib.HarnessConfig(seed=0, num_train=budget.num_train, num_eval=budget.num_eval,
                                     eval_batch_size=budget.eval_batch_size, teacher_steps=budget.teacher_steps,
                                     progress=progress)
  quality.link_references(workdir, references)
  quality.copy_teacher_row(workdir, teacher_row_from)
  teacher = Teacher.load(f"pretrained:{budget.teacher}")
  harness = harness_lib.Harness(teacher, workdir, config)
  harness.teacher_row()
  harness.reference_row()
  precond = teacher.precond
  denoiser = jax.jit(lambda x, sigma, label: teacher.denoiser(x, sigma, label=label))   # one compile for all rows
  for solver_name in solvers:
    solver = get_solver(solver_name)
    for nfe in reachable(solver_name, nfes):
      sigmas = config.base_sigmas(solver.num_steps_for_nfe(nfe), precond.sigma_min, precond.sigma_max)
      harness.score("base", solver_name, nfe, eager_sampler(denoiser, solver, sigmas))
  results = harness.write_results({"harness": config_utils.to_plain(config)})
  return results["rows"], config_utils.to_plain(config)


def matching(plain: dict[str, dict[int, float]], learned: dict[str, dict[int, float]], nfe: int,
             measured: tuple[int, ...]) -> dict:
  """For one learned method: the best of its rows at ``nfe`` and, per plain solver, the first NFE at which the plain
  solver's RMSE is <= the learned method's at ``nfe`` with the same solver, and <= the best one (None: not within
  the NFEs measured)."""
  targets = {solver: rows[nfe] for solver, rows in learned.items() if nfe in rows}
  best_solver = min(targets, key=targets.get) if targets else None
  best = targets.get(best_solver)

  def first(rows: dict[int, float], target: float | None) -> int | None:
    if target is None:
      return None
    return next((n for n in sorted(rows) if rows[n] <= target), None)

  def say(found: int | None) -> str:
    return f"NFE {found}" if found is not None else f"not within the NFEs measured ({min(measured)}-{max(measured)})"

  per_solver = {}
  for solver, rows in plain.items():
    same, overall = first(rows, targets.get(solver)), first(rows, best)
    per_solver[solver] = {"target_rmse": targets.get(solver), "first_nfe": same, "first_nfe_vs_best": overall,
                          "text": say(same) if solver in targets else "no learned row with this solver",
                          "text_vs_best": say(overall)}
  return {"nfe": nfe, "best": None if best_solver is None else {"solver": best_solver, "rmse": best},
          "per_solver": per_solver}


def run(args: argparse.Namespace) -> dict:
  start_time = time.perf_counter()
  budget = quality.BUDGETS["quick" if args.quick else "full"]
  progress = not args.no_progress
  work = common.work_dir(args, NAME)
  references = quality.shared_references(work)
  setup = {"benchmark": NAME, "quick": bool(args.quick), **common.machine(),
           "teacher": f"pretrained:{budget.teacher}", "solvers": list(args.solvers), "nfes": list(args.nfes),
           "learned": list(args.learned), "learned_nfes": list(args.learned_nfes),
           "budget": {key: value for key, value in dataclasses.asdict(budget).items()
                      if key in ("teacher", "num_train", "num_eval", "eval_batch_size", "teacher_steps", "steps",
                                 "ld3_num_train", "num_select")
                      or (key.startswith("gits_") and "gits" in args.learned)},
           "schedule": {"name": "edm", "rho": 7.0},
           "noise": quality.noise_setup(budget),
           "metric": "RMSE to the diffrax reference from the same noise (per-sample root mean square over pixels, "
                     "averaged over samples)", "jobs": {}}
  plain_dir = work / "plain"
  common.log(f"plain: {list(args.solvers)} x NFE {list(args.nfes)}")
  # quality.py's comparison job has the teacher row of the same teacher and held-out noise, when it ran first
  quality_dir = work.parent / (quality.NAME + ("-quick" if args.quick else "")) / "compare"
  plain, harness_config = plain_rows(budget, args.solvers, args.nfes, plain_dir, references, progress,
                                     teacher_row_from=[quality_dir])
  setup["jobs"]["plain"] = {"workdir": str(plain_dir), "harness": harness_config,
                            "sampler": "solver stepped on the host around one jitted denoiser call"}
  rows = quality.wanted_rows(plain, {("base", s, n) for s in args.solvers for n in args.nfes})
  if args.learned:
    learned_dir = work / "learned"
    solvers = tuple(s for s in args.solvers if reachable(s, args.learned_nfes) == tuple(args.learned_nfes))
    skipped = sorted(set(args.solvers) - set(solvers))
    if skipped:
      setup["learned_skipped_solvers"] = {s: f"does not reach every NFE of {list(args.learned_nfes)}" for s in skipped}
    if solvers:
      config = quality.compare_config(budget, tuple(args.learned), solvers, tuple(args.learned_nfes), progress)
      common.log(f"learned: {list(args.learned)} x {list(solvers)} x NFE {list(args.learned_nfes)}")
      results = quality.run_job(config, learned_dir, references, teacher_row_from=[plain_dir])
      setup["jobs"]["learned"] = {"workdir": str(learned_dir), "config": config_utils.to_plain(config)}
      rows += quality.wanted_rows(results["rows"], {(m, s, n) for m in args.learned for s in solvers
                                                    for n in args.learned_nfes})
  table = {method: {} for method in ("base",) + tuple(args.learned)}
  for row in rows:
    table[row["method"]].setdefault(row["solver"], {})[row["nfe"]] = row["rmse"]
  target_nfe = min(args.learned_nfes)
  results = {"rows": rows,
             "rmse": {method: {solver: {str(n): v for n, v in sorted(by.items())} for solver, by in solvers.items()}
                      for method, solvers in table.items()},
             "matching": {method: matching(table["base"], table[method], target_nfe, tuple(args.nfes))
                          for method in args.learned},
             "wall_seconds": time.perf_counter() - start_time, "load_average_after": common.load_average()}
  common.write_json(args.out_dir, NAME, setup=setup, results=results)
  plot({"setup": setup, "results": results}, Path(args.out_dir) / f"{NAME}.png")
  return {"setup": setup, "results": results}


def plot(report: dict, path: Path) -> None:
  """Log-y RMSE vs NFE: a solid line per plain solver, markers for the learned methods in the solver's colour."""
  rmse, setup = report["results"]["rmse"], report["setup"]
  fig, ax = plt.subplots(figsize=(8, 5.5))
  colours = {solver: plt.get_cmap("tab10")(i % 10) for i, solver in enumerate(setup["solvers"])}
  for solver, by_nfe in rmse["base"].items():
    nfes = sorted(int(n) for n in by_nfe)
    ax.plot(nfes, [by_nfe[str(n)] for n in nfes], "-", marker="o", ms=3, color=colours[solver], label=solver)
  for method in setup["learned"]:
    for solver, by_nfe in rmse.get(method, {}).items():
      nfes = sorted(int(n) for n in by_nfe)
      ax.plot(nfes, [by_nfe[str(n)] for n in nfes], linestyle="none", marker=MARKERS.get(method, "x"), ms=10,
              markeredgecolor="k", markeredgewidth=0.5, color=colours[solver], label=f"{solver} + {method.upper()}")
  ax.set_yscale("log")
  ax.set_xticks(sorted({int(n) for by in rmse["base"].values() for n in by}))
  ax.set_xlabel("NFE (network evaluations)")
  ax.set_ylabel("RMSE to diffrax reference")
  budget = setup["budget"]
  ax.set_title(f"{setup['teacher']}, EDM rho=7, {budget['num_eval']} held-out samples; learned: "
               f"{budget['num_train']} training trajectories, {budget['steps']} Adam steps", fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(report: dict) -> str:
  """Markdown: RMSE per solver (rows) and NFE (columns), the learned rows, then the matching NFEs."""
  results, setup = report["results"], report["setup"]
  nfes = sorted({row["nfe"] for row in results["rows"]})
  lines = ["| solver | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
  for method, by_solver in results["rmse"].items():
    for solver, by_nfe in by_solver.items():
      label = solver if method == "base" else f"{solver} + {method}"
      lines.append(f"| {label} | " + " | ".join(f"{by_nfe[str(n)]:.4f}" if str(n) in by_nfe else ""
                                               for n in nfes) + " |")
  for method, match in results["matching"].items():
    best = match["best"]
    if best:
      lines.append(f"\n{method} at NFE {match['nfe']}: best {best['rmse']:.4f} ({best['solver']})")
    for solver, entry in match["per_solver"].items():
      lines.append(f"  plain {solver} matches {method}@{match['nfe']} same solver: {entry['text']}; the best: "
                   f"{entry['text_vs_best']}")
  del setup
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick="smoke run: pretrained:gmm, ipndm/dpmpp_2m, NFE 3..5, MTEO at NFE 3")
  parser.add_argument("--solvers", type=quality.names, default=None,
                      help=f"comma-separated solvers (default: all; --quick: {','.join(QUICK_SOLVERS)}); valid: "
                           f"{','.join(SOLVERS.names())}")
  parser.add_argument("--nfes", default=None,
                      help="comma-separated plain NFEs >= 1 (default: 3..12; --quick: 3,4,5; Heun runs the odd ones)")
  parser.add_argument("--learned", type=quality.names, default=None,
                      help=f"comma-separated learned methods, or 'none' (default: {','.join(LEARNED)}; --quick: "
                           f"{','.join(QUICK_LEARNED)}); valid: {','.join(LEARNABLE)}")
  parser.add_argument("--learned-nfes", default=None,
                      help="comma-separated NFEs of the learned methods (default: 3); the matching is against the "
                           "smallest")
  args = parser.parse_args(argv)
  args.solvers = args.solvers if args.solvers is not None else (QUICK_SOLVERS if args.quick else SOLVERS.names())
  quality.check_names(parser, "--solvers", tuple(args.solvers), tuple(SOLVERS.names()))
  args.solvers = tuple(args.solvers)
  args.nfes = quality.check_nfes(parser, args.nfes, QUICK_NFES if args.quick else NFES)
  if args.learned == ("none",):
    args.learned = ()
  else:
    args.learned = args.learned if args.learned is not None else (QUICK_LEARNED if args.quick else LEARNED)
    quality.check_names(parser, "--learned", args.learned, LEARNABLE)
  args.learned_nfes = quality.check_nfes(parser, args.learned_nfes, LEARNED_NFES, "--learned-nfes")
  if not any(reachable(solver, args.nfes) for solver in args.solvers):
    parser.error(f"--nfes: no solver of {list(args.solvers)} reaches any of {list(args.nfes)}")
  if args.learned and not any(reachable(s, args.learned_nfes) == args.learned_nfes for s in args.solvers):
    parser.error(f"--learned-nfes: no solver of {list(args.solvers)} reaches all of {list(args.learned_nfes)}")
  return args


def main(argv: list[str] | None = None) -> dict:
  report = run(parse_args(argv))
  print(format_table(report))
  return report


if __name__ == "__main__":
  from absl import logging   # the jobs' progress lines (fits, scores, timings) on stderr
  logging.set_verbosity(logging.INFO)
  main(sys.argv[1:])
