"""The comparison job (config ``mode="compare"``): several few-step methods on one teacher, harness, noise and metric.

    references (cached) -> teacher row -> for each cell (solver, NFE), each method in ``compare.methods``: fit (or
    reload a finished run) and score on held-out noise -> DIR/results.json, samples.png, rmse_bars.png, schedules.png

Runs of one experiment in one workdir (say the ``schedules``, ``combined`` and ``compare`` variants) share their
finished parts, and ``results.json`` gathers the rows of all of them (a row measured again replaces the earlier one).

The methods are the registered ones (``methods.METHODS``): ``base`` (the plain solver on the EDM-rho schedule),
``gits``, ``ld3``, ``indis``, ``mteo`` and MTEO on a schedule (``mteo_on_<gits|ld3|indis|best>``,
``mteo_joint_<ld3|indis>``). Each reads its own config section (``mteo``, ``gits``, ``ld3``, ``indis``; MTEO on a
schedule reads ``mteo`` and the schedule's), all with their defaults in ``modes.base_config("compare")``; a section that
no listed method reads must keep its defaults (a changed key there would be ignored, so it is an error).
``schedules.png`` draws sigma against the step for every schedule at the first NFE: EDM-rho, GITS, LD3, the median
and spread of INDIS's per-sample schedules on the evaluation noise, and the jointly learned ones.

    python -m mteo_jax.main --config=configs/digits.py:compare --workdir=runs/digits_compare
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar, Collection

import ml_collections
import numpy as np
from absl import logging

from mteo_jax import config_utils, files, loop, parallel
from mteo_jax import harness as harness_module
from mteo_jax.harness import Harness, HarnessJob, job_stages
from mteo_jax.methods import (
  GITS,
  INDIS,
  LD3,
  METHODS,
  MTEO,
  BaseSolver,
  GITSSettings,
  INDISSettings,
  LD3Settings,
  Method,
  MTEOSettings,
  PD,
  PDSettings,
  ScheduledMTEO,
)
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher

# The comparison: the plain EDM-rho schedule, GITS, LD3, INDIS, MTEO and MTEO on the best schedule.
COMPARE_METHODS = ("base", "gits", "ld3", "indis", "mteo", "mteo_on_best")
# Which config sections each method reads.
SECTIONS = {"base": (), "gits": ("gits",), "ld3": ("ld3",), "indis": ("indis",), "mteo": ("mteo",),
            "mteo_on_gits": ("mteo", "gits"), "mteo_on_ld3": ("mteo", "ld3"), "mteo_on_indis": ("mteo", "indis"),
            "mteo_on_best": ("mteo", "gits", "ld3", "indis"), "mteo_joint_ld3": ("mteo", "ld3"),
            "mteo_joint_indis": ("mteo", "indis"), "pd": ("pd",)}
SETTINGS = {"mteo": MTEOSettings, "gits": GITSSettings, "ld3": LD3Settings, "indis": INDISSettings}


@dataclasses.dataclass(frozen=True)
class CompareJobConfig(HarnessJob):
  """The ``compare`` section: the teacher, the cells and the harness's settings (``harness.HarnessJob``), and:

  Attributes:
    methods: registered method names, scored in this order on every cell.
    progress: progress bars (``harness.HarnessConfig``).
    num_select: training noises ``mteo_on_best`` compares the schedules on.
  """
  methods: tuple[str, ...] = COMPARE_METHODS
  progress: bool = True
  num_select: int = 256

  def __post_init__(self):
    where = "compare"
    self.check_harness(where)
    if not self.methods:
      raise ValueError(f"{where}.methods must be non-empty; expected some of {sorted(SECTIONS)}")
    for name in self.methods:
      if name not in METHODS or name not in SECTIONS:
        raise ValueError(f"unknown method {name!r} in {where}.methods; expected some of {sorted(SECTIONS)}")
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f"{where}.methods lists a method twice: {self.methods}")
    if self.num_select < 1:
      raise ValueError(f"{where}.num_select must be >= 1, got {self.num_select}")

  @property
  def sections(self) -> set[str]:
    """The method sections the listed methods read."""
    return {section for name in self.methods for section in SECTIONS[name]}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """The whole config of the ``compare`` mode (``modes.base_config("compare")`` holds every key with its default)."""
  mode: str = "compare"
  seed: int = 0
  overwrite: bool = False
  distributed: str | bool = "false"   # True, False or auto: parallel.initialize_distributed
  cluster: parallel.ClusterConfig = dataclasses.field(default_factory=parallel.ClusterConfig)
  cpu_devices: int = 0   # CPU devices on a CPU-only run (parallel.use_cpu_devices); 0 = JAX's default
  compare: CompareJobConfig = dataclasses.field(default_factory=CompareJobConfig)
  mteo: MTEOSettings = MTEOSettings()
  gits: GITSSettings = GITSSettings()
  ld3: LD3Settings = LD3Settings()
  indis: INDISSettings = INDISSettings()

  method_sections: ClassVar[dict[str, type]] = SETTINGS   # the method sections this mode's config holds

  def __post_init__(self):
    job, used = self.compare, self.compare.sections
    missing = sorted(used - set(self.method_sections))
    if missing:
      needs = [name for name in job.methods if set(SECTIONS[name]) & set(missing)]
      raise ValueError(f"compare.methods lists {needs}, which mode {self.mode!r} does not run (its config has no "
                       f"{missing} section); run {'it' if len(needs) == 1 else 'them'} with mode 'pd' (a config "
                       "file's :pd variant, e.g. --config=configs/digits.py:pd)")
    for section in ("mteo", "indis"):
      if section in used and getattr(self, section).batch_size > job.num_train:
        raise ValueError(f"{section}.batch_size={getattr(self, section).batch_size} exceeds "
                         f"compare.num_train={job.num_train}")
    if "ld3" in used and self.ld3.num_train > job.num_train:
      raise ValueError(f"ld3.num_train={self.ld3.num_train} exceeds compare.num_train={job.num_train}")
    if "gits" in used:
      if self.gits.num_warmup > job.num_train:   # the warm-up noises are the first training noises
        raise ValueError(f"gits.num_warmup={self.gits.num_warmup} exceeds compare.num_train={job.num_train}")
      for solver_name in job.solvers:
        for nfe in job.nfes:
          steps = get_solver(solver_name).num_steps_for_nfe(nfe)
          if steps > self.gits.fine_grid_size - 1:
            raise ValueError(f"gits.fine_grid_size={self.gits.fine_grid_size} allows at most "
                             f"{self.gits.fine_grid_size - 1} steps; {solver_name} at NFE {nfe} needs {steps}")

  def check_unread(self, overridden: Collection[str] | None = None) -> None:
    """Raises ValueError where a method section that no listed method reads is set: with ``overridden`` (the dotted
    keys given on the command line, e.g. ``{"mteo.steps"}``), where one of them names such a section; without it,
    where such a section differs from its defaults. (A variant of a config file may size every section; narrowing
    ``compare.methods`` on its command line then leaves the unread sections as the variant set them, and the
    experiment's identity unchanged.)"""
    used = self.compare.sections
    for section, cls in self.method_sections.items():
      if section in used:
        continue
      if overridden is None:
        changed = config_utils.diff(config_utils.to_plain(cls()), config_utils.to_plain(getattr(self, section)))
      else:
        changed = sorted(key.split(".", 1)[1] for key in overridden
                         if key.split(".", 1)[0] == section and "." in key)
      if changed:
        raise ValueError(f"the {section} section is changed ({', '.join(f'{section}.{k}' for k in changed)}) but "
                         f"no method in compare.methods={list(self.compare.methods)} reads it; add a method that "
                         "does or leave it at its defaults")


# Progressive distillation's students sample with DDIM at their own step counts.
PD_METHODS, PD_SOLVERS, PD_NFES = ("base", "pd"), ("euler",), (8, 4, 2, 1)


@dataclasses.dataclass(frozen=True)
class PDJobConfig(CompareJobConfig):
  """The ``compare`` section of the ``pd`` mode: ``CompareJobConfig`` with PD's cells and methods by default."""
  methods: tuple[str, ...] = PD_METHODS
  solvers: tuple[str, ...] = PD_SOLVERS
  nfes: tuple[int, ...] = PD_NFES


@dataclasses.dataclass(frozen=True)
class PDConfig(CompareConfig):
  """The whole config of the ``pd`` mode: the comparison job with a ``pd`` section (``methods.PDSettings``) and PD's
  cells by default, ``base`` (DDIM with the teacher) and ``pd`` on ``euler`` at NFE 8, 4, 2 and 1
  (``modes.base_config("pd")`` holds every key). Other methods may be listed too: they serve every cell (MTEO on DDIM
  at the students' step counts, say), while ``pd`` serves the ``euler`` cells at its students' step counts.
  """
  mode: str = "pd"
  compare: PDJobConfig = dataclasses.field(default_factory=PDJobConfig)
  pd: PDSettings = PDSettings()

  method_sections: ClassVar[dict[str, type]] = {**SETTINGS, "pd": PDSettings}

  def __post_init__(self):
    super().__post_init__()
    job = self.compare
    if "pd" in job.methods:
      served = [nfe for nfe in job.nfes if nfe in self.pd.student_steps]
      if "euler" not in job.solvers or not served:
        raise ValueError(f"pd's students sample with DDIM ('euler') at {list(self.pd.student_steps)} steps (from "
                         f"pd.start_steps={self.pd.start_steps} to pd.end_steps={self.pd.end_steps}), but the cells "
                         f"are compare.solvers={list(job.solvers)} x compare.nfes={list(job.nfes)}: "
                         + ("add 'euler' and some of those NFEs" if "euler" not in job.solvers and not served else
                            "add 'euler'" if "euler" not in job.solvers else "add some of those NFEs"))


# Keys that may change between a run and its resumption: they steer what is evaluated, logged or shown, not what is
# learned (adding a method, a solver or an NFE adds rows; the finished runs are reused).
HARMLESS_KEYS = {
    "compare": ("methods", "solvers", "nfes", "num_eval", "eval_batch_size", "teacher_steps", "grid_size", "progress",
                "num_select", "fid_weights", "fid_stats"),
    "mteo": ("eval_every", "log_every", "checkpoint_every", "checkpoint_seconds", "keep", "progress", "save_tables"),
    "gits": ("batch_size",),
    "ld3": ("log_every", "checkpoint_every", "checkpoint_seconds", "keep", "progress", "save_schedules"),
    "indis": ("eval_every", "log_every", "checkpoint_every", "checkpoint_seconds", "keep", "progress", "save_params"),
    "pd": ("log_every", "checkpoint_every", "checkpoint_seconds", "keep", "progress", "export_students"),
}


def check_runnable(config: CompareConfig, teacher: Teacher | None = None) -> None:
  """The checks that need the devices or the teacher, run before the workdir is claimed (``modes.Mode.check``):
  each trained section's batch splits over the devices; PD's settings suit the teacher (``PD.check_teacher``).

  Raises:
    ValueError: naming the key and what is expected.
  """
  job, mesh = config.compare, parallel.make_mesh()
  for section in sorted(job.sections - {"gits"}):
    loop.check_batch_size(getattr(config, section).batch_size, mesh, where=section)
  if "pd" in job.sections:
    PD(config.pd).check_teacher(teacher if teacher is not None else Teacher.load(job.teacher))


def compare_identity(config: CompareConfig) -> dict:
  """What makes two ``compare`` runs in one workdir the same experiment (``modes.claim_workdir``)."""
  plain = config_utils.to_plain(config)
  identity = {"mode": config.mode, "seed": config.seed}
  for section in ("compare",) + tuple(config.method_sections):
    identity[section] = {k: v for k, v in plain[section].items() if k not in HARMLESS_KEYS[section]}
  return identity


def build_methods(config: CompareConfig) -> list[Method]:
  """The listed methods with their sections' settings; MTEO on a schedule shares the schedule methods' objects, so
  that each schedule is fitted once."""
  schedules = {"gits": GITS(config.gits), "ld3": LD3(config.ld3), "indis": INDIS(config.indis)}
  built = []
  for name in config.compare.methods:
    if name == "base":
      built.append(BaseSolver())
    elif name == "pd":
      built.append(PD(config.pd))
    elif name == "mteo":
      built.append(MTEO(config.mteo))
    elif name in schedules:
      built.append(schedules[name])
    else:
      order, schedule = ("sequence", name.removeprefix("mteo_on_")) if name.startswith("mteo_on_") else \
          ("joint", name.removeprefix("mteo_joint_"))
      built.append(ScheduledMTEO(schedule, order, mteo_settings=config.mteo, schedule_methods=schedules,
                                 num_select=config.compare.num_select))
  return built


def run_compare(config: CompareConfig | ml_collections.ConfigDict | dict, workdir: str | os.PathLike) -> dict:
  """The comparison job; returns the results dict it writes to ``workdir/results.json``."""
  if not isinstance(config, CompareConfig):
    config = config_utils.from_dict(CompareConfig, config, where="config")
  job, workdir = config.compare, Path(workdir)
  teacher = Teacher.load(job.teacher)
  check_runnable(config, teacher)   # again for callers of this function (modes.run checks before claiming the workdir)
  earlier = earlier_rows(workdir)   # an unreadable results.json stops the run before any work
  methods = build_methods(config)
  harness = Harness(teacher, workdir, job.harness_config(config.seed),
                    stages=job_stages(methods, job.solvers, job.nfes, teacher_row=job.teacher_steps > 0))
  cells = harness.cells(job.solvers, job.nfes)
  harness.teacher_row()
  harness.reference_row()
  harness.run(methods, cells)
  results = harness.write_results({"config": config_utils.to_plain(config)}, picture_nfe=job.nfes[0])
  if earlier:
    # The workdir holds one experiment (its identity is checked), so rows of earlier runs with other methods, solvers
    # or NFEs belong to it: results.json keeps them, and a row measured again replaces its earlier one.
    measured = {row_key(row) for row in results["rows"]}
    results["rows"] = results["rows"] + [row for row in earlier if row_key(row) not in measured]
    harness_module.write_json(workdir / "results.json", results)
  try:
    save_schedule_picture(results["rows"], workdir / "schedules.png", nfe=job.nfes[0])
  except Exception as error:  # noqa: BLE001 (a picture never costs the results)
    logging.exception("schedules.png failed")
    results.setdefault("picture_errors", {})["schedules.png"] = repr(error)
  log_summary(results["rows"])
  return results


def row_key(row: dict) -> tuple:
  return row["method"], row["solver"], row["nfe"]


def earlier_rows(workdir: Path) -> list[dict]:
  """The rows of the workdir's ``results.json`` from an earlier run of this experiment ([] if there is none).

  Raises:
    files.UnreadableFileError: a ``results.json`` that cannot be read: its rows are not silently dropped (this run
      rewrites the file); the message says to delete it.
  """
  path = workdir / "results.json"
  advice = ("delete it to rerun (the rows of the methods this run lists are measured again; those of other methods "
            "come back when their config is rerun)")
  try:
    results = files.read_json(path, advice)
  except FileNotFoundError:
    return []
  rows = results.get("rows")
  if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "solver", "nfe"} <= set(r) for r in rows):
    raise files.UnreadableFileError(f"{path} cannot be read (no list of rows with method, solver and nfe); {advice}")
  return list(rows)


def log_summary(rows: list[dict]) -> None:
  """One line per cell: each method's held-out RMSE, best first."""
  cells: dict[tuple[str, int], list[dict]] = {}
  for row in rows:
    if row["method"] not in ("teacher", "reference"):
      cells.setdefault((row["solver"], row["nfe"]), []).append(row)
  for (solver, nfe), cell_rows in cells.items():
    ranked = sorted(cell_rows, key=lambda r: r["rmse"])
    logging.info("%s NFE %d: %s", solver, nfe, ", ".join(f"{r['method']} {r['rmse']:.4f}" for r in ranked))


def schedule_rows(rows: list[dict], nfe: int) -> dict[str, list[tuple[str, dict]]]:
  """``{solver: [(method, schedule)]}`` of the rows at ``nfe`` that carry a schedule (MTEO in sequence reuses its
  schedule method's and is left out)."""
  out: dict[str, list[tuple[str, dict]]] = {}
  for row in rows:
    schedule = row.get("schedule")
    if row.get("nfe") != nfe or not isinstance(schedule, dict) or row["method"].startswith("mteo_on_"):
      continue
    out.setdefault(row["solver"], []).append((row["method"], schedule))
  return out


LABELS = {"base": "EDM-rho (base)", "gits": "GITS", "ld3": "LD3", "indis": "INDIS (median, 25-75 %, 5-95 %)",
          "mteo_joint_ld3": "MTEO + LD3 joint", "mteo_joint_indis": "MTEO + INDIS joint (median)"}


def save_schedule_picture(rows: list[dict], path: Path, *, nfe: int) -> Path | None:
  """sigma (log) against the grid index, one panel per solver at ``nfe``: every global schedule as a line, the
  per-sample ones as their median with 25-75 % and 5-95 % bands. None when no row has a schedule."""
  import matplotlib  # noqa: PLC0415 (only the picture needs it)
  import matplotlib.ticker  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  panels = schedule_rows(rows, nfe)
  if not panels:
    return None
  fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.0), squeeze=False)
  for ax, (solver, entries) in zip(axes[0], panels.items()):
    for index, (method, schedule) in enumerate(entries):
      sigmas = np.asarray(schedule["sigmas"])
      steps = np.arange(sigmas.shape[0])
      style = {"color": f"C{index}", "marker": "o", "ms": 4, "lw": 1.5,
               "ls": "--" if method.startswith("mteo_joint") else "-"}
      ax.plot(steps, sigmas, label=LABELS.get(method, method), **style)
      quantiles = schedule.get("quantiles")
      if quantiles:
        ax.fill_between(steps, quantiles["5"], quantiles["95"], color=f"C{index}", alpha=0.15, lw=0)
        ax.fill_between(steps, quantiles["25"], quantiles["75"], color=f"C{index}", alpha=0.3, lw=0)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("grid index i (sigma_0 = sigma_max)")
    ax.set_ylabel("sigma")
    ax.set_title(f"{solver}, NFE {nfe}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def config_for(teacher: str, variant: str, **job: Any) -> ml_collections.ConfigDict:
  """The ``compare`` config of a config file's variant on ``teacher``: ``gits``, ``ld3``, ``indis`` (that method
  beside the plain solver), ``schedules`` (the three at NFE 3, 4 and 5), ``combined`` (MTEO alone and on each
  schedule, in sequence and jointly) or ``compare`` (``COMPARE_METHODS``); or the ``pd`` mode's config (``pd``:
  DDIM and the PD students at 8, 4, 2 and 1 steps); ``job`` overrides keys of ``compare``."""
  from mteo_jax import modes  # noqa: PLC0415 (modes imports this module)
  if variant == "pd":
    config = modes.base_config("pd")
    config.compare.teacher = teacher
    config.compare.update(job)
    return config
  methods = {"gits": ("base", "gits"), "ld3": ("base", "ld3"), "indis": ("base", "indis"),
             "schedules": ("base", "gits", "ld3", "indis"),
             "combined": ("base", "mteo", "mteo_on_gits", "mteo_on_ld3", "mteo_on_indis", "mteo_joint_ld3",
                          "mteo_joint_indis"),
             "compare": COMPARE_METHODS}
  if variant not in methods:
    raise ValueError(f"unknown comparison variant {variant!r}; expected one of {list(methods)}")
  config = modes.base_config("compare")
  config.compare.teacher = teacher
  config.compare.methods = methods[variant]
  if variant == "schedules":
    config.compare.nfes = (3, 4, 5)
  config.compare.update(job)
  return config


COMPARE_VARIANTS = ("gits", "ld3", "indis", "schedules", "combined", "compare", "pd")
