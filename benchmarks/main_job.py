"""The main job's wall time as a newcomer lives it: README's first command, run from a fresh work directory.

What it measures: each named run is the real command line (``python -m mteo_jax.main --config=... --workdir=...``,
a child process: Python's start-up and imports included) on an empty work directory, so that every reference,
the teacher row and every training happen as on a first run. Recorded per run: the process's wall seconds, the
harness's phases from its ``results.json`` (``timings``: references, teacher row, training, evaluation, pictures,
other; written by ``harness.PhaseTimer``), the rows (method, solver, NFE, RMSE, FD) and the load average before
and after. Runs (``RUNS``):

- ``main``: README's first command, ``configs/digits.py:mteo``.
- ``full``: ``configs/digits.py:mteo_full`` at NFE 3 only: the same job at full sizes (four solvers, 1024
  training trajectories, 1000 held-out noises, references at rtol = atol = 1e-5, 300 Adam steps per table), which
  were the main job's sizes until it was made to fit in five minutes on 2 CPU cores: the comparison for that cut.

A run that is not asked for keeps its entry from an existing JSON (each entry records its own commit, load and
time), so that ``--runs main`` after a change does not repeat the 20-minute ``full`` run; ``--fresh`` drops them.

    python benchmarks/main_job.py                # both runs: ~25 min on 2 CPU cores
    python benchmarks/main_job.py --runs main    # README's first command only (~5 min)
    python benchmarks/main_job.py --quick        # smoke run: the gmm main job at tiny sizes (~30 s)

Writes ``<out-dir>/main_job.json`` and ``<out-dir>/main_job.png`` (each run's wall time split by phase).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAME = "main_job"
# name -> (config, overrides): the command line of each run, as a user types it (plus --workdir).
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "main": ("configs/digits.py:mteo", ()),
    "full": ("configs/digits.py:mteo_full", ("--config.mteo.nfes=(3,)",)),
}
QUICK_OVERRIDES = ("--config.mteo.solvers=('euler',)", "--config.mteo.steps=4", "--config.mteo.batch_size=16",
                   "--config.mteo.num_train=32", "--config.mteo.num_eval=32", "--config.mteo.eval_batch_size=32",
                   "--config.mteo.teacher_steps=3", "--config.mteo.grid_size=4", "--config.mteo.eval_every=2",
                   "--config.mteo.checkpoint_every=2", "--config.mteo.log_every=2",
                   "--config.mteo.reference.rtol=1e-3", "--config.mteo.reference.atol=1e-3")
QUICK_RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "main": ("configs/gmm.py:mteo", QUICK_OVERRIDES),
    "full": ("configs/gmm.py:mteo_full", (*QUICK_OVERRIDES, "--config.mteo.nfes=(3,)")),
}
STAGE_LINE = re.compile(r"\[\d+/\d+\] ")   # the job's stage lines (progress.JobProgress), echoed as it runs


def command(config: str, overrides: tuple[str, ...], workdir: Path) -> list[str]:
  return [sys.executable, "-m", "mteo_jax.main", f"--config={config}", *overrides, f"--workdir={workdir}"]


def run_one(name: str, spec: tuple[str, tuple[str, ...]], work: Path, progress: bool) -> dict:
  """Runs one command line on an empty work directory; returns its entry (raises RuntimeError if it fails)."""
  config, overrides = spec
  workdir = work / name
  shutil.rmtree(workdir, ignore_errors=True)   # a first run: nothing cached
  argv = command(config, overrides, workdir)
  shown = shlex.join(["python", *argv[1:-1], f"--workdir=runs/{name}"])
  common.log(f"{name}: {shown}")
  load_before, commit = common.load_average(), common.git_commit()
  log_path = work / f"{name}.log"
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, cwd=common.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
      log.write(line)
      stage = STAGE_LINE.search(line)
      if progress and stage:
        common.log(f"{name}: {line[stage.start():].strip()}")
    proc.wait()
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    raise RuntimeError(f"{name} exited {proc.returncode}; its output is in {log_path}:\n"
                       + log_path.read_text()[-3000:])
  results = json.loads((workdir / "results.json").read_text())
  timings = results["timings"]
  total = float(timings["total_seconds"])
  entry = {"command": shown, "commit": commit, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "wall_seconds": wall, "load_average": load_before, "load_average_after": common.load_average(),
           "job_seconds": total, "start_up_seconds": wall - total,
           "phases": {k: float(v) for k, v in timings["phases"].items()},
           "config": results.get("config"),
           "rows": [{k: row.get(k) for k in ("method", "solver", "nfe", "rmse", "psnr", "fd", "fd_name",
                                               "train_seconds")} for row in results["rows"]]}
  common.log(f"{name}: {wall:.0f} s wall (the job {total:.0f} s: "
             + ", ".join(f"{k} {v:.0f} s" for k, v in entry["phases"].items()) + ")")
  return entry


def save_plot(runs: dict[str, dict], path: Path, title: str) -> None:
  """One horizontal bar per run: its wall time split into the harness's phases and the start-up (imports)."""
  names = list(runs)
  phases = list(dict.fromkeys(p for entry in runs.values() for p in entry["phases"]))
  fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.6 * len(names)))
  left = [0.0] * len(names)
  for i, phase in enumerate([*phases, "start-up"]):
    widths = [max(runs[n]["start_up_seconds"], 0.0) if phase == "start-up" else runs[n]["phases"].get(phase, 0.0)
              for n in names]
    ax.barh(range(len(names)), widths, left=left, color=f"C{i % 10}", label=phase.replace("_", " "))
    left = [a + b for a, b in zip(left, widths)]
  for i, name in enumerate(names):
    ax.text(left[i], i, f" {runs[name]['wall_seconds']:.0f} s", va="center", fontsize=8)
  ax.set_yticks(range(len(names)), [f"{n}\n{runs[n]['command'].split('--config=')[1].split()[0]}" for n in names],
                fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel("wall seconds")
  ax.set_xlim(0, max(left) * 1.15)
  ax.legend(fontsize=7, ncol=len(phases) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
  ax.set_title(title, fontsize=9)
  common.save_figure(fig, path)


def run(args: argparse.Namespace) -> dict:
  specs = QUICK_RUNS if args.quick else RUNS
  out = Path(args.out_dir)
  previous: dict[str, Any] = {}
  path = out / f"{NAME}.json"
  if path.exists() and not args.fresh:
    stored = json.loads(path.read_text())
    if bool(stored.get("setup", {}).get("quick")) == args.quick:
      previous = stored.get("results", {}).get("runs", {})
  setup = {**common.machine(), "quick": args.quick}
  work = common.work_dir(args, NAME)
  start = time.perf_counter()
  runs = {name: entry for name, entry in previous.items() if name in specs and name not in args.runs}
  for name in args.runs:
    runs[name] = run_one(name, specs[name], work, not args.no_progress)
  runs = {name: runs[name] for name in specs if name in runs}   # in RUNS order
  setup.update({"load_average_after": common.load_average(), "wall_seconds": time.perf_counter() - start,
                "ran": args.runs, "kept": sorted(set(runs) - set(args.runs)),
                "timing": "wall seconds of the command line as a child process on an empty work directory "
                          "(start-up and imports included); phases from its results.json"})
  results = {"runs": runs}
  if "main" in runs and "full" in runs:
    results["speed_up"] = runs["full"]["wall_seconds"] / runs["main"]["wall_seconds"]
  common.write_json(out, NAME, setup=setup, results=results)
  save_plot(runs, out / f"{NAME}.png", f"README's main job from a fresh work directory ({setup['cpu_count']} CPU "
                                        f"cores, {setup['device_kind']})")
  return {"setup": setup, "results": results}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = common.parser(__doc__, quick="smoke run: the gmm main job at tiny sizes, for each run name")
  parser.add_argument("--runs", type=common.comma_list(), default=None,
                      help=f"which runs, comma-separated (default: all of {list(RUNS)})")
  parser.add_argument("--fresh", action="store_true", help="drop the entries of an existing JSON that are not rerun")
  args = parser.parse_args(argv)
  if args.runs is None:
    args.runs = list(RUNS)
  unknown = sorted(set(args.runs) - set(RUNS))
  if unknown or not args.runs:
    parser.error(f"--runs: unknown run(s) {unknown}; expected some of {list(RUNS)}")
  args.runs = [name for name in RUNS if name in args.runs]
  return args


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
