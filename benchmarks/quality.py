"""Quality of every few-step method x solver x NFE on the digits teacher: held-out noise, one reduced, equal budget.

What it measures: on the shipped digits teacher (``pretrained:digits``, the 8x8 UNet), the library's methods run
through the comparison job (``mode="compare"``: ``configs/digits.py:compare`` with this benchmark's overrides, run by
``mteo_jax.modes.run``), exactly as a user runs them: the plain solver on EDM-rho (``base``), GITS, LD3, INDIS, MTEO
(and, with ``--methods``, MTEO on the best schedule, ``mteo_on_best``), with iPNDM and DPM-Solver++(2M); then
progressive distillation (``mode="pd"``: ``configs/digits.py:pd``) 16 -> 8 -> 4 DDIM steps, whose students serve DDIM
(``euler``) at 8 and 4 steps, beside plain DDIM. Every row is scored on the same held-out noise (seed 1) against the
same diffrax reference (one cache shared by every job): RMSE and PSNR to the reference, and the Fréchet distance in
the shipped digits feature net's space (FD-digits) to the 297 held-out digits.

Cells: the training-free methods (``base``, GITS's search) at NFE 3, 4, 5 and 8 (``--nfes``), the trained ones (LD3,
INDIS, MTEO, ``mteo_on_best``) at NFE 3 (``--learned-nfes``), PD at the power-of-two NFEs of ``--nfes``. On 2 CPU
cores compiling a UNet unrolled N times (and its gradient) costs minutes per (method, solver, NFE), so the whole grid,
every trained method at every NFE, takes about 1.5-2 h; ``--learned-nfes 3,4,5,8`` runs it, and a rerun resumes.

The learning budget is the benchmark's definition (``BUDGETS``; the JSON's ``setup.budget`` and each job's full
config repeat it), equal across the trained methods: the same 256 training trajectories (LD3 with its 20 % validation
split), 100 Adam steps of batch 32 for LD3, INDIS, MTEO, the table of ``mteo_on_best`` and each PD round (PD's batch
is training digits), every other setting at the method's default; GITS's search (no training) on the first 64 of
those trajectories, its other settings at their defaults. The main jobs (README's tables) learn 2-20x longer.

Run (from the repository root):
    python benchmarks/quality.py            # full: digits, ~30 min on 2 CPU cores
    python benchmarks/quality.py --quick    # smoke run: pretrained:gmm, base/mteo/pd, NFE 3 and 4, a tiny budget
Options: --methods (some of base,gits,ld3,indis,mteo,mteo_on_best,pd), --solvers (registered names), --nfes,
--learned-nfes (comma-separated, >= 1), --out-dir (default benchmarks/results), --work-dir (default OUT_DIR/work),
--no-progress. A rerun with the same setup resumes from the work dir (finished runs are reloaded with their learning
time; the references and the teacher row are read from their caches). Writes ``<out-dir>/quality.json`` (the setup,
one row per method/solver/NFE) and ``<out-dir>/quality.png`` (RMSE and FD vs NFE, one panel per solver, one line per
method).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mteo_jax import comparison, config_utils, modes  # noqa: E402
from mteo_jax.harness import noise_seeds  # noqa: E402
from mteo_jax.solvers import SOLVERS, get_solver  # noqa: E402

NAME = "quality"
METHODS = ("base", "gits", "ld3", "indis", "mteo", "mteo_on_best", "pd")   # every method of the library
DEFAULT_METHODS = ("base", "gits", "ld3", "indis", "mteo", "pd")
TRAINING_FREE = ("base", "gits")   # run at every NFE of --nfes; the others (PD aside) at --learned-nfes
SOLVER_NAMES = ("ipndm", "dpmpp_2m")
NFES, LEARNED_NFES = (3, 4, 5, 8), (3,)
QUICK_METHODS, QUICK_NFES = ("base", "mteo", "pd"), (3, 4)
PD_SOLVER = "euler"   # PD's students sample with DDIM at their own step counts
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the benchmark learns with: its definition, written to the JSON (``setup.budget``).

  Attributes:
    teacher: the config file (``configs/<teacher>.py``) whose ``compare`` and ``pd`` variants the jobs start from.
    num_train: training trajectories (and reference solves) shared by every method.
    num_eval: held-out noises every row is scored on; eval_batch_size: samples per sampling call.
    teacher_steps: Heun steps of the teacher row.
    steps, batch_size: Adam steps and batch of every trained method (LD3, INDIS, MTEO, the table of ``mteo_on_best``,
      each PD round): the same trajectory-steps for all.
    ld3_num_train: LD3's trajectories (20 % of them for validation; its default is 100).
    gits_num_warmup, gits_fine_grid_size, gits_coeffs, gits_costs: GITS's search (its warm-up trajectories are the
      first training ones).
    num_select: training noises ``mteo_on_best`` ranks the schedules on.
  """
  teacher: str
  num_train: int
  num_eval: int
  eval_batch_size: int
  teacher_steps: int
  steps: int
  batch_size: int
  ld3_num_train: int
  gits_num_warmup: int
  gits_fine_grid_size: int
  gits_coeffs: tuple[float, ...]
  gits_costs: tuple[str, ...]
  num_select: int


BUDGETS = {
    # eval_batch_size: the harness samples the first batch twice (compile, then the timed pass), so a quarter of
    # num_eval keeps that extra pass small.
    "full": Budget(teacher="digits", num_train=256, num_eval=500, eval_batch_size=125, teacher_steps=50, steps=100,
                   batch_size=32, ld3_num_train=256, gits_num_warmup=64, gits_fine_grid_size=61,
                   gits_coeffs=(1.0, 1.1, 1.15, 1.3), gits_costs=("first_step", "history"), num_select=256),
    "quick": Budget(teacher="gmm", num_train=64, num_eval=64, eval_batch_size=64, teacher_steps=8, steps=4,
                    batch_size=16, ld3_num_train=20, gits_num_warmup=16, gits_fine_grid_size=11, gits_coeffs=(1.0,),
                    gits_costs=("first_step",), num_select=32),
}


# --- configs ---------------------------------------------------------------------------------------------------------

def load_config(teacher: str, variant: str):
  """``configs/<teacher>.py``'s ``get_config(variant)``, loaded by path as ``--config=configs/<teacher>.py:<variant>``
  does."""
  path = REPO / "configs" / f"{teacher}.py"
  spec = importlib.util.spec_from_file_location(f"_benchmark_config_{teacher}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def apply_budget(config, budget: Budget, methods: tuple[str, ...], progress: bool) -> None:
  """Sets the budget on the sections the listed methods read (a section no listed method reads keeps its defaults, as
  the compare mode requires), and the progress bars."""
  job = config.compare
  job.update({"num_train": budget.num_train, "num_eval": budget.num_eval, "eval_batch_size": budget.eval_batch_size,
              "teacher_steps": budget.teacher_steps, "num_select": budget.num_select, "progress": progress})
  sections = {section for name in methods for section in comparison.SECTIONS[name]}
  trained = {"steps": budget.steps, "batch_size": budget.batch_size, "progress": progress}
  if "mteo" in sections:
    config.mteo.update(trained)
  if "ld3" in sections:
    config.ld3.update({**trained, "num_train": budget.ld3_num_train})
  if "indis" in sections:
    config.indis.update(trained)
  if "gits" in sections:
    config.gits.update({"num_warmup": budget.gits_num_warmup, "fine_grid_size": budget.gits_fine_grid_size,
                        "coeffs": tuple(budget.gits_coeffs), "costs": tuple(budget.gits_costs)})
  if "pd" in sections:
    config.pd.update(trained)


def pd_steps(nfes: tuple[int, ...]) -> tuple[int, int] | None:
  """``(start_steps, end_steps)`` of a distillation whose students cover the asked NFEs that are powers of two (a
  student halves its teacher's steps): from twice the largest to the smallest; None when no NFE is a power of two."""
  served = [n for n in nfes if n >= 1 and n & (n - 1) == 0]
  return (2 * max(served), min(served)) if served else None


def compare_config(budget: Budget, methods: tuple[str, ...], solvers: tuple[str, ...], nfes: tuple[int, ...],
                   progress: bool):
  """The comparison job: ``configs/<teacher>.py:compare`` narrowed to ``methods`` x ``solvers`` x ``nfes``."""
  config = load_config(budget.teacher, "compare")
  config.compare.update({"methods": tuple(methods), "solvers": tuple(solvers), "nfes": tuple(nfes)})
  apply_budget(config, budget, methods, progress)
  return config


def pd_config(budget: Budget, nfes: tuple[int, ...], progress: bool):
  """The PD job: ``configs/<teacher>.py:pd``, DDIM (``base``) and the students at the asked power-of-two NFEs."""
  start, end = pd_steps(nfes)
  students = {start >> k for k in range(1, start.bit_length()) if start >> k >= end}
  served = tuple(n for n in nfes if n in students)
  config = load_config(budget.teacher, "pd")
  config.compare.update({"methods": ("base", "pd"), "solvers": (PD_SOLVER,), "nfes": served})
  config.pd.update({"start_steps": start, "end_steps": end})
  apply_budget(config, budget, ("base", "pd"), progress)
  return config


# --- jobs ------------------------------------------------------------------------------------------------------------

def shared_references(work: Path) -> Path:
  """The reference cache every job of this benchmark and ``error_vs_nfe.py`` shares (content-keyed, so sharing is
  safe): ``<work root>/shared_references``, next to the benchmarks' own work dirs."""
  path = work.parent / "shared_references"
  path.mkdir(parents=True, exist_ok=True)
  return path


def link_references(workdir: Path, references: Path) -> None:
  """``workdir/references`` -> the shared cache (a workdir's ``references`` is the harness's cache, which
  ``modes.claim_workdir`` treats as shared, never as results)."""
  workdir.mkdir(parents=True, exist_ok=True)
  link = workdir / "references"
  if not link.exists() and not link.is_symlink():
    link.symlink_to(os.path.relpath(references, workdir), target_is_directory=True)


def copy_teacher_row(workdir: Path, sources: list[Path]) -> None:
  """Copies the teacher row of the first of ``sources`` (work dirs of jobs on the same teacher and held-out noise)
  that has one into ``workdir``, unless it has its own. The harness reads it only when its key (the held-out
  reference, Heun steps and metric data) matches, else samples the teacher again and replaces it: a copy never
  changes a number, it only saves the teacher's many-step Heun pass over the held-out noise."""
  if (workdir / "teacher_row.json").exists():
    return
  for source in sources:
    if (source / "teacher_row.json").exists():
      shutil.copyfile(source / "teacher_row.json", workdir / "teacher_row.json")
      return


def run_job(config, workdir: Path, references: Path, *, teacher_row_from: list[Path] = ()) -> dict:
  """Runs ``config`` in ``workdir`` through the modes API (parse and check, claim the workdir, run), with the shared
  reference cache linked in and the teacher row of another job on the same noise copied in (``copy_teacher_row``).
  Returns the job's ``results.json``."""
  spec, typed = modes.prepare(config)
  link_references(workdir, references)
  modes.claim_workdir(workdir, spec.identity(typed), overwrite=False)
  copy_teacher_row(workdir, list(teacher_row_from))
  start = time.perf_counter()
  results = modes.run_prepared(spec, typed, workdir)
  common.log(f"{workdir.name}: {time.perf_counter() - start:.0f} s")
  return results


ROW_KEYS = ("method", "solver", "nfe", "rmse", "psnr", "fd", "fd_name", "log_likelihood", "sliced_wasserstein",
            "n_eval", "sample_seconds_per_1k")


def lean_row(row: dict) -> dict:
  """A ``results.json`` row with the keys the README reads: the metrics, ``learn_seconds`` (search or training
  time, ``mteo_on_best``'s including its schedule's, PD's all rounds down to its student), the schedule, and which
  schedule ``mteo_on_best`` chose."""
  out = {key: row.get(key) for key in ROW_KEYS}
  out["learn_seconds"] = row.get("train_seconds", 0.0)
  if isinstance(row.get("schedule"), dict) and "sigmas" in row["schedule"]:
    out["sigmas"] = row["schedule"]["sigmas"]
  if "selection_rmse" in row:
    out["schedule_from"] = min(row["selection_rmse"], key=row["selection_rmse"].get)
    out["selection_rmse"] = row["selection_rmse"]
  return out


def wanted_rows(rows: list[dict], cells: set[tuple[str, str, int]]) -> list[dict]:
  """The rows of the asked (method, solver, NFE) cells (a work dir's ``results.json`` may hold more)."""
  return [lean_row(row) for row in rows if (row["method"], row["solver"], row["nfe"]) in cells]


# --- the benchmark ---------------------------------------------------------------------------------------------------

def noise_setup(budget: Budget) -> dict:
  """The noise every job draws (experiment seed 0: ``harness.noise_seeds``), for the JSON."""
  train_seed, eval_seed = noise_seeds(0)
  return {"train_seed": train_seed, "eval_seed": eval_seed, "num_train": budget.num_train,
          "num_eval": budget.num_eval, "x_T": "sigma_max * N(0, I)", "held_out": True}


def jobs(methods: tuple[str, ...], nfes: tuple[int, ...],
         learned_nfes: tuple[int, ...]) -> list[tuple[str, tuple, tuple]]:
  """``[(work dir name, methods, NFEs)]`` of the comparison jobs: every asked method but PD at ``learned_nfes``, and
  the training-free ones at the other NFEs of ``nfes``. Two work dirs: a job's config sets only the sections its
  methods read, and those sections are part of the experiment a work dir holds."""
  out = []
  compared = tuple(m for m in methods if m != "pd")
  if compared:
    out.append(("compare", compared, tuple(learned_nfes)))
  free, rest = tuple(m for m in compared if m in TRAINING_FREE), tuple(n for n in nfes if n not in learned_nfes)
  if free and rest:
    out.append(("compare_free", free, rest))
  return out


def run(args: argparse.Namespace) -> dict:
  start_time = time.perf_counter()
  budget = BUDGETS["quick" if args.quick else "full"]
  progress = not args.no_progress
  work = common.work_dir(args, NAME)
  references = shared_references(work)
  setup = {"benchmark": NAME, "quick": bool(args.quick), **common.machine(),
           "teacher": f"pretrained:{budget.teacher}", "methods": list(args.methods), "solvers": list(args.solvers),
           "nfes": list(args.nfes), "learned_nfes": list(args.learned_nfes), "training_free": list(TRAINING_FREE),
           "budget": dataclasses.asdict(budget), "work_dir": str(work),
           "noise": noise_setup(budget),
           "metric": "RMSE/PSNR to the diffrax reference from the same noise; FD in the shipped feature net's space "
                     "(fd_name) to the held-out test split", "jobs": {}}
  rows, extra, done = [], {"timings": {}}, []
  for name, methods, nfes in jobs(args.methods, args.nfes, args.learned_nfes):
    config = compare_config(budget, methods, tuple(args.solvers), nfes, progress)
    common.log(f"{name}: {list(methods)} x {list(args.solvers)} x NFE {list(nfes)}")
    results = run_job(config, work / name, references, teacher_row_from=done)
    done.append(work / name)
    setup["jobs"][name] = {"workdir": str(work / name), "config": config_utils.to_plain(config)}
    rows += wanted_rows(results["rows"], {(m, s, n) for m in methods for s in args.solvers for n in nfes})
    extra["timings"][name] = results.get("timings")
    for method in ("teacher", "reference"):
      extra.setdefault(f"{method}_row", next((lean_row(r) for r in results["rows"] if r["method"] == method), None))
  if "pd" in args.methods:
    if pd_steps(tuple(args.nfes)) is None:
      setup["jobs"]["pd"] = {"skipped": f"PD's students have power-of-two step counts; none in NFE {list(args.nfes)}"}
    else:
      config = pd_config(budget, tuple(args.nfes), progress)
      common.log(f"pd: {config.pd.start_steps} -> {config.pd.end_steps} DDIM steps, NFE {list(config.compare.nfes)}")
      results = run_job(config, work / "pd", references, teacher_row_from=done)
      setup["jobs"]["pd"] = {"workdir": str(work / "pd"), "config": config_utils.to_plain(config)}
      rows += wanted_rows(results["rows"], {(m, PD_SOLVER, n) for m in ("base", "pd") for n in config.compare.nfes})
      extra["timings"]["pd"] = results.get("timings")
      extra.setdefault("teacher_row", next((lean_row(r) for r in results["rows"] if r["method"] == "teacher"), None))
  fd_names = sorted({row["fd_name"] for row in rows if row.get("fd_name")})
  setup["fd_name"] = fd_names[0] if fd_names else None
  results = {"rows": rows, **extra, "best": best_per_cell(rows), "wall_seconds": time.perf_counter() - start_time,
             "load_average_after": common.load_average()}
  common.write_json(args.out_dir, NAME, setup=setup, results=results)
  plot({"setup": setup, "results": results}, Path(args.out_dir) / f"{NAME}.png")
  return {"setup": setup, "results": results}


def best_per_cell(rows: list[dict]) -> dict[str, dict[str, str]]:
  """``{solver: {nfe: method}}``: the lowest-RMSE method of each cell."""
  best: dict[str, dict[str, dict]] = {}
  for row in rows:
    cell = best.setdefault(row["solver"], {})
    if str(row["nfe"]) not in cell or row["rmse"] < cell[str(row["nfe"])]["rmse"]:
      cell[str(row["nfe"])] = row
  return {solver: {nfe: row["method"] for nfe, row in cells.items()} for solver, cells in best.items()}


def plot(report: dict, path: Path) -> None:
  """RMSE (log) and, where measured, FD against NFE: one panel per solver, one line per method."""
  rows = report["results"]["rows"]
  solvers = list(dict.fromkeys(row["solver"] for row in rows))
  has_fd = any(row.get("fd") is not None for row in rows)
  metrics = [("rmse", "RMSE to reference")] + ([("fd", report["setup"]["fd_name"] or "FD")] if has_fd else [])
  fig, axes = plt.subplots(len(metrics), max(len(solvers), 1), figsize=(4.6 * max(len(solvers), 1),
                                                                        3.6 * len(metrics)), squeeze=False)
  colours = {name: f"C{i}" for i, name in enumerate(METHODS)}
  for col, solver in enumerate(solvers):
    for row_index, (key, label) in enumerate(metrics):
      ax = axes[row_index][col]
      for method in dict.fromkeys(r["method"] for r in rows if r["solver"] == solver):
        points = sorted((r["nfe"], r[key]) for r in rows
                        if r["solver"] == solver and r["method"] == method and r.get(key) is not None)
        if points:
          ax.plot(*zip(*points), marker="o", ms=4, color=colours.get(method), label=method)
      reference = report["results"].get("reference_row") or {}
      if key == "fd" and reference.get("fd") is not None:   # the reference's own FD: the floor of a few-step sampler
        ax.axhline(reference["fd"], color="0.5", ls="--", lw=1, label="reference (diffrax)")
      ax.set_yscale("log")
      ax.set_xlabel("NFE")
      ax.set_ylabel(label)
      ax.set_xticks(sorted({r["nfe"] for r in rows if r["solver"] == solver}))
      ax.grid(True, which="both", alpha=0.3)
      ax.set_title(f"{solver} ({'DDIM' if solver == PD_SOLVER else 'EDM-rho base grid'})", fontsize=9)
      ax.legend(fontsize=7)
  setup = report["setup"]
  budget = setup["budget"]
  fig.suptitle(f"{setup['teacher']}: {budget['num_eval']} held-out samples; {budget['num_train']} training "
               f"trajectories, {budget['steps']} Adam steps of {budget['batch_size']} per trained method "
               f"(PD: per round)", fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def format_table(report: dict) -> str:
  """Markdown: one line per method and solver, RMSE / FD (or RMSE alone) per NFE, and the learning seconds."""
  rows = report["results"]["rows"]
  nfes = sorted({row["nfe"] for row in rows})
  lines = ["| method | solver | " + " | ".join(f"NFE {n}" for n in nfes) + " | learn s |",
           "|---|---|" + "---|" * (len(nfes) + 1)]
  for method, solver in dict.fromkeys((row["method"], row["solver"]) for row in rows):
    by_nfe = {row["nfe"]: row for row in rows if row["method"] == method and row["solver"] == solver}
    cells = [("" if n not in by_nfe else f"{by_nfe[n]['rmse']:.4f}"
              + (f" / {by_nfe[n]['fd']:.1f}" if by_nfe[n].get("fd") is not None else "")) for n in nfes]
    learn = "/".join(f"{by_nfe[n]['learn_seconds']:.0f}" for n in nfes if n in by_nfe)
    lines.append(f"| {method} | {solver} | " + " | ".join(cells) + f" | {learn} |")
  return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------------------

def names(text: str) -> tuple[str, ...]:
  return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def check_names(parser: argparse.ArgumentParser, option: str, given: tuple[str, ...], valid: tuple[str, ...]) -> None:
  unknown = [name for name in given if name not in valid]
  if unknown or not given:
    parser.error(f"{option}: unknown {unknown or 'empty list'}; valid: {', '.join(valid)}")


def check_nfes(parser: argparse.ArgumentParser, text: str | None, default: tuple[int, ...],
               option: str = "--nfes") -> tuple[int, ...]:
  """The NFEs of ``option`` (comma-separated integers >= 1), or the default."""
  if text is None:
    return default
  try:
    nfes = tuple(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
  except ValueError:
    parser.error(f"{option}: expected comma-separated integers >= 1, got {text!r}")
  if not nfes or min(nfes) < 1:
    parser.error(f"{option}: every NFE must be an integer >= 1, got {text!r}")
  return nfes


def check_reachable(parser: argparse.ArgumentParser, solvers: tuple[str, ...], nfes: tuple[int, ...]) -> None:
  """Every solver reaches every NFE (Heun only odd ones)."""
  for solver in solvers:
    for nfe in nfes:
      try:
        get_solver(solver).num_steps_for_nfe(nfe)
      except ValueError as error:
        parser.error(f"{solver} cannot run at NFE {nfe} ({error}); Heun reaches odd NFEs only")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick="smoke run: pretrained:gmm, base/mteo/pd, NFE 3 and 4, a tiny budget")
  parser.add_argument("--methods", type=names, default=None,
                      help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; --quick: "
                           f"{','.join(QUICK_METHODS)}); valid: {','.join(METHODS)}")
  parser.add_argument("--solvers", type=names, default=SOLVER_NAMES,
                      help=f"comma-separated solvers (default: {','.join(SOLVER_NAMES)}); valid: "
                           f"{','.join(SOLVERS.names())}")
  parser.add_argument("--nfes", default=None,
                      help=f"comma-separated NFEs >= 1 of the training-free methods and PD (default: "
                           f"{','.join(map(str, NFES))}; --quick: {','.join(map(str, QUICK_NFES))})")
  parser.add_argument("--learned-nfes", default=None,
                      help=f"comma-separated NFEs >= 1 of every method but PD (default: "
                           f"{','.join(map(str, LEARNED_NFES))}; 3,4,5,8 for the whole grid)")
  args = parser.parse_args(argv)
  args.methods = args.methods if args.methods is not None else (QUICK_METHODS if args.quick else DEFAULT_METHODS)
  check_names(parser, "--methods", args.methods, METHODS)
  check_names(parser, "--solvers", args.solvers, tuple(SOLVERS.names()))
  args.nfes = check_nfes(parser, args.nfes, QUICK_NFES if args.quick else NFES, "--nfes")
  args.learned_nfes = check_nfes(parser, args.learned_nfes, LEARNED_NFES, "--learned-nfes")
  check_reachable(parser, args.solvers, tuple(dict.fromkeys(args.learned_nfes + args.nfes)))
  return args


def main(argv: list[str] | None = None) -> dict:
  report = run(parse_args(argv))
  print(format_table(report))
  return report


if __name__ == "__main__":
  from absl import logging   # the jobs' progress lines (fits, scores, timings) on stderr
  logging.set_verbosity(logging.INFO)
  main(sys.argv[1:])
