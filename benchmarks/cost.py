"""Wall time to learn each few-step method on one teacher, and its ratio to the teacher's own training, in one run.

Everything is timed in one process on this machine: the teacher's training, the reference solve the distilling
methods learn from, and each method at its own default settings for the comparison (``configs/<file>.py:compare``:
GITS's search, LD3, INDIS, MTEO; ``configs/<file>.py:pd``: progressive distillation), each on the harness
(``mteo_jax.harness``) on every solver of ``--solvers`` at ``--nfe``, in a fresh work directory (nothing resumed or
read from a cache).

What is measured and what is extrapolated (the JSON says which, per entry):

* **Training loops** (LD3, INDIS, MTEO, PD and the teacher) all run through ``loop.fit``. For this run ``loop.fit`` is
  wrapped with a hook that waits for the first and the ``--measure-steps``-th step and then stops the run; every
  evaluation the loop makes is timed. From that: ``setup_seconds`` (the method's work before its loop: its data,
  initial table or network), ``compile_seconds`` (the time to the end of the first step, less one steady step:
  checkpointer, initialisation and compilation), ``step_seconds`` (the mean steady step, evaluations left out: the
  loop's logging and checkpoints at their own rate are in it) and ``eval_seconds`` / ``eval_compile_seconds`` (an
  evaluation, and the first one's extra compile time). The full run is ``setup + compile + (steps - 1) x step +
  evaluations x eval (+ eval compile)``, where ``steps`` and the evaluation count are those of the method's settings;
  PD's ``steps`` are all its rounds' (round 1 is measured; every round runs the same compiled step,
  ``pd.step_program``, on the same batch size). A learner with no more steps than ``--measure-steps`` runs in full and
  its wall time is measured, not extrapolated. Not counted when a run is stopped: the work after its loop (saving a
  table or a schedule, PD's later rounds' set-up and student exports, the teacher's export and final picture).
* **GITS** runs in full: ``search_seconds`` (jump costs, the DP, the candidate paths' warm-up solves) as it records
  them, and its warm-up reference on the fine grid (``reference_seconds``) apart.
* **References**: the training noises' reference (``--num-train`` trajectories at the union of the cells' grids), the
  one solve LD3, INDIS and MTEO learn from, timed apart; ``seconds_with_references`` adds it to theirs (GITS: its own
  warm-up reference, solved by its first cell and read from the cache by the others, counted once for each, as if
  each ran alone). PD and the teacher need none.
* **Teacher**: the training config of the shipped teacher (its ``metadata.json``, ``config``: for digits the
  ``configs/digits.py`` default variant with ``train.steps=4000 train.warmup_steps=200 train.sample_every=1000``),
  trained from scratch for ``--measure-steps`` steps and extrapolated to its step count (its sample pictures are its
  evaluations). The wall time recorded in its metadata (another machine and day) is reported beside it.

Ratios are to the teacher's time measured in this run: ``ratio_to_teacher = seconds / teacher seconds``.

    python benchmarks/cost.py            # digits: GITS, LD3, INDIS, MTEO x 2 solvers, PD (40 min, 2 busy cores)
    python benchmarks/cost.py --quick    # smoke run: gmm teacher, GITS, MTEO and PD, tiny sizes, 3 steps a loop
    python benchmarks/cost.py --methods mteo,ld3 --solvers ipndm --measure-steps 1000   # MTEO and LD3 in full
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import matplotlib
import ml_collections

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from mteo_jax import comparison, config_utils, loop, modes, train  # noqa: E402
from mteo_jax.harness import Cell, Harness  # noqa: E402
from mteo_jax.methods import PD  # noqa: E402
from mteo_jax.solvers import SOLVERS, get_solver  # noqa: E402
from mteo_jax.teachers import Teacher  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))   # common.py beside this script
import common  # noqa: E402

NAME = "cost"
METHODS = ("gits", "ld3", "indis", "mteo", "pd")
LEARN_FROM_REFERENCES = ("ld3", "indis", "mteo")   # the methods that learn from the training noises' reference
DEFAULT_CONFIG = common.REPO / "configs" / "digits.py"
QUICK_CONFIG = common.REPO / "configs" / "gmm.py"
# --quick: every method at tiny sizes (the settings the JSON records are the ones that ran).
QUICK_OVERRIDES = {"compare": {"reference": {"rtol": 1e-3, "atol": 1e-3}},
                   "gits": {"num_warmup": 16, "fine_grid_size": 11, "coeffs": (1.0,), "costs": ("first_step",)},
                   "ld3": {"num_train": 32}}
QUICK_TEACHER_TRAIN = {"num_samples": 16, "sample_steps": 2}   # its sample pictures
QUICK_METHODS = ("gits", "mteo", "pd")   # a search, a loop stopped with evaluations, a loop over rounds
QUICK_NUM_TRAIN, QUICK_NUM_EVAL, QUICK_MEASURE_STEPS = 64, 32, 3


# --- timing the training loop ----------------------------------------------------------------------------------------

class StopMeasuring(Exception):
  """Raised by the timing hook once a loop's measured steps are done (caught by this benchmark)."""


@dataclasses.dataclass
class LoopTiming:
  """One ``loop.fit`` call as the timing hook saw it (times from ``time.perf_counter``).

  Attributes:
    desc: the loop's label. steps: its configured steps. measure: the steps to time before stopping it.
    eval_every: its evaluation period (0 = none). start: when ``loop.fit`` was called. first_step, first_end: the
    first step of this call and when it was done; last_step, last_end: the last timed step and when it was done.
    evals: the wall time of each evaluation, in order. window_evals: the seconds of the evaluations between
    ``first_end`` and ``last_end``. end: when ``loop.fit`` returned (None when it was stopped).
  """
  desc: str
  steps: int
  measure: int
  eval_every: int
  start: float
  first_step: int | None = None
  first_end: float = 0.0
  last_step: int = 0
  last_end: float = 0.0
  evals: list[float] = dataclasses.field(default_factory=list)
  window_evals: float = 0.0
  end: float | None = None

  @property
  def finished(self) -> bool:
    return self.end is not None

  @property
  def step_seconds(self) -> float:
    """The mean steady step (after the first), evaluations left out."""
    return (self.last_end - self.first_end - self.window_evals) / max(self.last_step - self.first_step, 1)

  @property
  def first_seconds(self) -> float:
    """From the ``loop.fit`` call to the end of the first step."""
    return self.first_end - self.start

  @property
  def eval_seconds(self) -> tuple[float, float]:
    """``(steady evaluation, first evaluation's extra)``; zeros without evaluations."""
    if not self.evals:
      return 0.0, 0.0
    steady = statistics.median(self.evals[1:]) if len(self.evals) > 1 else self.evals[0]
    return steady, max(self.evals[0] - steady, 0.0)

  def num_evals(self, steps: int) -> int:
    """Evaluations ``loop.fit`` makes in ``steps`` steps: every ``eval_every`` and at the end."""
    return 0 if not self.eval_every else steps // self.eval_every + int(steps % self.eval_every != 0)


@contextlib.contextmanager
def measured_loops(measure_steps: int):
  """Within: every ``loop.fit`` call gets a hook that waits for its first step and its ``measure_steps``-th, then
  stops it with ``StopMeasuring`` (a loop with no more steps runs to its end); its evaluations are timed, and where
  the full run evaluates but the measured steps did not twice, the hook evaluates the state it stopped at (the first
  call with compilation, the second without). Yields the list of ``LoopTiming``, one per call, in order."""
  timings: list[LoopTiming] = []
  original = loop.fit

  def fit(task, config, run_dir, *, eval_fn=None, eval_every=0, hooks=(), **kwargs):
    timing = LoopTiming(kwargs.get("desc", "train"), config.steps, min(measure_steps, config.steps),
                        eval_every if eval_fn is not None else 0, time.perf_counter())
    timings.append(timing)

    def timed_eval(step, state):
      start = time.perf_counter()
      values = eval_fn(step, state)
      timing.evals.append(time.perf_counter() - start)
      return values

    def hook(step, state, metrics):
      if timing.first_step is None:
        jax.block_until_ready(metrics)
        timing.first_step, timing.first_end = step, time.perf_counter()
      if step - timing.first_step + 1 == timing.measure:
        jax.block_until_ready(metrics)
        timing.last_step, timing.last_end = step, time.perf_counter()
        timing.window_evals = sum(timing.evals)
        if step < config.steps:
          while timing.eval_every and len(timing.evals) < 2:
            timed_eval(step, state)
          raise StopMeasuring(timing.desc)

    result = original(task, config, run_dir, eval_fn=None if eval_fn is None else timed_eval, eval_every=eval_every,
                      hooks=(*hooks, hook), **kwargs)
    timing.end = time.perf_counter()
    return result

  loop.fit = fit
  try:
    yield timings
  finally:
    loop.fit = original


def timed_learner(learn, measure_steps: int, *, rounds: int = 1) -> dict:
  """Runs ``learn()`` (one method's fit, or the teacher's training) under ``measured_loops`` and returns its entry:
  measured when every loop ran to its end, else extrapolated as the module docstring says (``rounds`` loops of the
  first loop's steps each, compiled once: PD)."""
  start = time.perf_counter()
  stopped = False
  with measured_loops(measure_steps) as timings:
    try:
      value = learn()
    except StopMeasuring:
      stopped, value = True, None
  wall = time.perf_counter() - start
  if not timings:
    raise RuntimeError("the learner ran no training loop (loop.fit)")
  first = timings[0]
  steady, eval_compile = first.eval_seconds
  steps = first.steps * rounds
  num_evals = first.num_evals(first.steps) * rounds
  setup = first.start - start
  compile_seconds = max(first.first_seconds - first.step_seconds, 0.0)
  extrapolated = setup + first.first_seconds + (steps - 1) * first.step_seconds + (
      num_evals * steady + eval_compile if num_evals else 0.0)
  entry = {"kind": "loop", "seconds": extrapolated if stopped else wall, "extrapolated": stopped,
           "steps": steps, "measured_steps": first.last_step - first.first_step + 1, "setup_seconds": setup,
           "compile_seconds": compile_seconds, "step_seconds": first.step_seconds, "num_evals": num_evals,
           "eval_seconds": steady, "eval_compile_seconds": eval_compile, "measured_wall_seconds": wall,
           "loops": len(timings)}
  if rounds > 1:
    entry.update({"rounds": rounds, "steps_per_round": first.steps})
  if not stopped:
    entry["extrapolation_check"] = extrapolated   # what the formula gives from the first loop's timing
  return entry | ({"value": value} if value is not None else {})


# --- the run ---------------------------------------------------------------------------------------------------------

def load_config_module(path: Path):
  """A config file (``configs/<name>.py``) loaded by path, as ``--config=`` does."""
  spec = importlib.util.spec_from_file_location(f"_cost_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _update(config: ml_collections.ConfigDict, overrides: dict, sections: set[str]) -> None:
  """``overrides`` ({section: {key: value}}, a dict value updates that key's own section) on the listed sections."""
  for section, values in overrides.items():
    if section not in sections:
      continue
    for key, value in values.items():
      if isinstance(value, dict):
        getattr(config, section)[key].update(value)
      else:
        getattr(config, section)[key] = value


def build_configs(args: argparse.Namespace) -> tuple[comparison.CompareConfig, comparison.PDConfig]:
  """The typed ``compare`` and ``pd`` configs of ``--config`` with the cells and sizes of this run (``ConfigError``
  naming the key where they do not fit)."""
  module = load_config_module(Path(args.config))
  compare, pd = module.get_config("compare"), module.get_config("pd")
  methods = [m for m in args.methods if m != "pd"]
  if args.quick:
    _update(compare, QUICK_OVERRIDES, {"compare", *methods})
  compare.compare.update({"num_train": args.num_train, "num_eval": args.num_eval, "progress": not args.no_progress,
                          "solvers": tuple(args.solvers), "nfes": (args.nfe,), "methods": tuple(methods) or ("base",)})
  for section in ("mteo", "ld3", "indis"):
    if section in methods:
      compare[section].progress = not args.no_progress
  pd.pd.progress = not args.no_progress
  return modes.parse(compare)[1], modes.parse(pd)[1]


def teacher_config(teacher: Teacher, quick: bool = False) -> train.TeacherConfig:
  """The config the teacher was trained with (its ``metadata.json``; ``quick``: smaller sample pictures)."""
  if "config" not in teacher.metadata:
    raise ValueError(f"{teacher.source} has no training config in its metadata.json; its training cannot be timed")
  config = dict(teacher.metadata["config"])
  config["train"] = {**config["train"], "progress": False, **(QUICK_TEACHER_TRAIN if quick else {})}
  return train.TeacherConfig.from_config(config)


def run(args: argparse.Namespace) -> dict:
  setup = {**common.machine(), "quick": args.quick}
  compare, pd_config = build_configs(args)
  job = compare.compare
  work = common.work_dir(args, NAME)
  harness_dir = work / "harness"
  shutil.rmtree(harness_dir, ignore_errors=True)   # nothing resumed, nothing read from a cache
  start_all = time.perf_counter()
  teacher = Teacher.load(job.teacher)
  common.log(f"teacher {job.teacher}: setting up the harness ({job.num_eval} evaluation noises) ...")
  start = time.perf_counter()
  harness = Harness(teacher, harness_dir, job.harness_config(compare.seed))
  harness_seconds = time.perf_counter() - start
  cells = harness.cells(job.solvers, job.nfes)
  results: dict[str, Any] = {"methods": {}}

  if set(args.methods) & set(LEARN_FROM_REFERENCES):
    common.log(f"reference of the {job.num_train} training noises ...")
    start = time.perf_counter()
    harness.train_data(cells[0])
    reference_seconds = time.perf_counter() - start
  else:
    reference_seconds = None
  results["references"] = {"train_seconds": reference_seconds, "num_train": job.num_train,
                           "grid": "the union of the cells' grids", "harness_setup_seconds": harness_seconds,
                           "num_eval": job.num_eval, "reference": dataclasses.asdict(job.reference)}

  built = {method.name: method for method in comparison.build_methods(compare)}
  for name in args.methods:
    if name == "pd":
      continue
    for cell in cells:
      common.log(f"{name} on {cell.tag} ...")
      results["methods"].setdefault(name, {})[cell.solver_name] = learn_method(
          built[name], harness, cell, compare, reference_seconds, args.measure_steps)
      common.log(f"{name} on {cell.tag}: {describe(results['methods'][name][cell.solver_name])}")
  if "pd" in args.methods:
    settings = pd_config.pd
    cell = Cell("euler", settings.end_steps, get_solver("euler"), harness.config.base_sigmas(
        settings.end_steps, teacher.precond.sigma_min, teacher.precond.sigma_max))
    common.log(f"pd ({len(settings.rounds)} rounds of {settings.steps} steps) ...")
    entry = timed_learner(lambda: PD(settings).fit(harness, cell), args.measure_steps, rounds=len(settings.rounds))
    entry.pop("value", None)
    entry.update({"settings": config_utils.to_plain(settings), "students": list(settings.student_steps),
                  "seconds_with_references": entry["seconds"]})
    results["methods"]["pd"] = {"euler": entry}
    common.log(f"pd: {describe(entry)}")

  common.log(f"teacher training ({args.measure_steps} steps) ...")
  tconfig = teacher_config(teacher, args.quick)
  shutil.rmtree(work / "teacher_training", ignore_errors=True)
  entry = timed_learner(lambda: train.train(tconfig, work / "teacher_training"), args.measure_steps)
  entry.pop("value", None)
  entry.update({"recorded_wall_time_s": teacher.metadata.get("wall_time_s"),
                "recorded_steps": teacher.metadata.get("steps"), "config": config_utils.to_plain(tconfig.train),
                "data": config_utils.to_plain(tconfig.data), "model": config_utils.to_plain(tconfig.model)})
  results["teacher"] = entry
  common.log(f"teacher: {describe(entry)}")
  shutil.rmtree(work / "teacher_training", ignore_errors=True)

  share_gits_reference(results["methods"])
  for by_solver in results["methods"].values():
    for entry in by_solver.values():
      entry["ratio_to_teacher"] = entry["seconds"] / results["teacher"]["seconds"]
      entry["ratio_with_references"] = entry["seconds_with_references"] / results["teacher"]["seconds"]
  setup.update({"load_average_after": common.load_average(), "wall_seconds": time.perf_counter() - start_all,
                "config": str(Path(args.config).relative_to(common.REPO)) if Path(args.config).is_relative_to(
                    common.REPO) else str(args.config),
                "teacher": job.teacher, "teacher_identity": teacher.identity, "solvers": list(job.solvers),
                "nfe": args.nfe, "methods": list(args.methods), "measure_steps": args.measure_steps,
                "num_train": job.num_train, "num_eval": job.num_eval, "seed": compare.seed,
                "timing": "wall seconds in one process; training loops timed for measure_steps steps and extrapolated "
                          "to their settings' steps (see each entry's 'extrapolated'), GITS and the references in "
                          "full; ratios are to the teacher's training time measured in this run"})
  common.write_json(args.out_dir, NAME, setup=setup, results=results)
  save_plot(results, Path(args.out_dir) / f"{NAME}.png",
            f"{job.teacher}, NFE {args.nfe} ({setup['device']}, load {setup['load_average']}); "
            "hatched: extrapolated from measured steps")
  return {"setup": setup, "results": results}


def learn_method(method, harness: Harness, cell: Cell, config: comparison.CompareConfig,
                 reference_seconds: float | None, measure_steps: int) -> dict:
  """One method's entry on one cell: GITS's search in full, a training loop timed and (maybe) extrapolated."""
  settings = config_utils.to_plain(getattr(config, method.name))
  if method.name == "gits":
    start = time.perf_counter()
    artefact = method.fit(harness, cell)
    wall = time.perf_counter() - start
    record = common.read_json(artefact.path)
    return {"kind": "search", "seconds": float(record["search_seconds"]), "extrapolated": False,
            "reference_seconds": float(record["reference_seconds"]), "measured_wall_seconds": wall,
            "seconds_with_references": float(record["search_seconds"]) + float(record["reference_seconds"]),
            "num_warmup": record["identity"]["num_warmup"], "candidates": len(record["candidates"]),
            "settings": settings}
  entry = timed_learner(lambda: method.fit(harness, cell), measure_steps)
  artefact = entry.pop("value", None)
  if artefact is not None:
    entry["harness_train_seconds"] = artefact.train_seconds   # what results.json would report as train_seconds
  entry.update({"settings": settings, "seconds_with_references": entry["seconds"] + (reference_seconds or 0.0)})
  return entry


def share_gits_reference(methods: dict) -> None:
  """GITS's warm-up reference (on its fine grid) is solved by the first cell's search and read from the harness's
  cache by the others: each cell's ``seconds_with_references`` counts the solve once, as if it ran alone."""
  cells = methods.get("gits", {})
  if not cells:
    return
  solve = max(entry["reference_seconds"] for entry in cells.values())
  for entry in cells.values():
    entry["reference_from_cache"] = entry["reference_seconds"] < 0.5 * solve
    entry["seconds_with_references"] = entry["seconds"] + solve


def describe(entry: dict) -> str:
  how = (f"extrapolated from {entry['measured_steps']} of {entry['steps']} steps: {entry['step_seconds']:.3f} s a "
         f"step, compile {entry['compile_seconds']:.1f} s" if entry["extrapolated"] else "measured")
  return f"{entry['seconds']:.1f} s ({how})"


def save_plot(results: dict, path: Path, title: str) -> None:
  """Two panels, log axes: seconds to learn, and the ratio to the teacher's training; one bar per (method, solver)
  and the teacher's; hatched bars are extrapolated; a black tick marks the time with the reference solves."""
  bars = [(f"{method}\n{solver}", entry) for method, by_solver in results["methods"].items()
          for solver, entry in by_solver.items()]
  teacher = results["teacher"]
  fig, axes = plt.subplots(1, 2, figsize=(max(7.0, 0.9 * (len(bars) + 1) * 2), 4.0))
  for ax, key, label in ((axes[0], "seconds", "seconds to learn"), (axes[1], "ratio_to_teacher",
                                                                     "learning time / teacher's training time")):
    entries = bars + ([("teacher\ntraining", {**teacher, "ratio_to_teacher": 1.0})] if key == "seconds" else [])
    heights = [entry[key] for _, entry in entries]
    methods = list(results["methods"])
    colours = [f"C{methods.index(name.split(chr(10))[0]) % 10}" if name.split("\n")[0] in methods else "0.4"
               for name, _ in entries]
    drawn = ax.bar(range(len(entries)), heights, color=colours, edgecolor="black", linewidth=0.5)
    for patch, (_, entry) in zip(drawn, entries):
      if entry.get("extrapolated"):
        patch.set_hatch("//")
    ax.bar_label(drawn, labels=[f"{h:.3g}" for h in heights], fontsize=7)
    with_key = {"seconds": "seconds_with_references", "ratio_to_teacher": "ratio_with_references"}[key]
    with_references = [entry.get(with_key) for _, entry in entries]
    points = [(i, v) for i, v in enumerate(with_references) if v is not None and v > heights[i] * 1.001]
    if points:
      ax.plot(*zip(*points), "k_", markersize=14, markeredgewidth=2, label="with the references it learns from")
      ax.legend(fontsize=7)
    ax.set_xticks(range(len(entries)), [name for name, _ in entries], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(label)
  axes[1].axhline(1.0, color="black", linewidth=0.8, linestyle="--")
  fig.suptitle(title, fontsize=9)
  common.save_figure(fig, path)


# --- the command line ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick=f"smoke run: {QUICK_CONFIG.relative_to(common.REPO)} (the shipped gmm "
                                        f"teacher) unless --config is given, {', '.join(QUICK_METHODS)} unless "
                                        f"--methods is, the first solver, tiny sizes, {QUICK_MEASURE_STEPS} steps a "
                                        "loop")
  parser.add_argument("--config", default=None,
                      help=f"the config file whose :compare and :pd variants give the teacher and the methods' "
                           f"settings (default: {DEFAULT_CONFIG.relative_to(common.REPO)})")
  parser.add_argument("--methods", type=common.comma_list(), default=None,
                      help=f"some of {','.join(METHODS)} (default: all; --quick: {','.join(QUICK_METHODS)})")
  parser.add_argument("--solvers", type=common.comma_list(), default=None,
                      help="the cells' solvers (default: the compare variant's, iPNDM and DPM-Solver++(2M))")
  parser.add_argument("--nfe", type=int, default=3)
  parser.add_argument("--measure-steps", type=int, default=None,
                      help="steps timed of each training loop before it is stopped and extrapolated (>= 2; a loop "
                           "with no more steps runs in full; default 30)")
  parser.add_argument("--num-train", type=int, default=None,
                      help="training noises (the reference solved for LD3, INDIS and MTEO; default: the config's)")
  parser.add_argument("--num-eval", type=int, default=None,
                      help="held-out noises of the harness (default 256: MTEO's held-out monitor reads 256)")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = args.config or str(QUICK_CONFIG)
    args.measure_steps = args.measure_steps or QUICK_MEASURE_STEPS
    args.num_train = args.num_train or QUICK_NUM_TRAIN
    args.num_eval = args.num_eval or QUICK_NUM_EVAL
    args.methods = args.methods or list(QUICK_METHODS)
  args.methods = args.methods or list(METHODS)
  args.num_eval = args.num_eval or 256
  args.config = args.config or str(DEFAULT_CONFIG)
  args.measure_steps = args.measure_steps or 30
  check_args(parser, args)
  return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Every option checked before any work."""
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown or not args.methods:
    parser.error(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
  if args.measure_steps < 2:
    parser.error(f"--measure-steps must be >= 2 (the first step compiles), got {args.measure_steps}")
  for name in ("nfe", "num_eval"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  path = Path(args.config)
  if not path.is_file():
    parser.error(f"--config: {path} is not a file")
  module = load_config_module(path)
  args.solvers = args.solvers or list(module.get_config("compare").compare.solvers)
  if args.quick:
    args.solvers = args.solvers[:1]
  args.num_train = args.num_train or module.get_config("compare").compare.num_train
  for solver_name in args.solvers:
    if solver_name not in SOLVERS:
      parser.error(f"--solvers: unknown solver {solver_name!r}; expected some of {SOLVERS.names()}")
    try:
      get_solver(solver_name).num_steps_for_nfe(args.nfe)
    except ValueError as error:
      parser.error(f"--nfe: {error}")
  try:
    build_configs(args)
  except modes.ConfigError as error:
    parser.error(f"these options do not fit {path.name}'s methods: {error}")


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
