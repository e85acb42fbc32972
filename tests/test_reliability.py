"""Reliability of the training loop through the real command line (issue item 6): a run killed with SIGKILL and started
again with the same command ends exactly where an uninterrupted run does (teacher and MTEO); an absurd learning rate
stops the run naming the step, with no checkpoint of it or after it; a workdir of another experiment is refused unless
``--config.overwrite=True``, and a directory this library did not write is never deleted; Ctrl-C during MTEO training
ends with one line whose command finishes the run as if uninterrupted; a truncated checkpoint stops the rerun with one
line naming the step to delete; the ``mteo`` mode runs and writes its artefacts. (The ``train`` mode's tiny configs run
in tests/test_cli.py; unreadable files of every kind: tests/test_corruption.py.) The MTEO SIGKILL test and the
SIGTERM-then-Ctrl-C one are marked slow: ``pytest -m slow tests/test_reliability.py``."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mteo_jax import loop, mteo, teachers, train

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
TEACHER_STEPS = 100
TEACHER = ("--config=configs/gmm.py:tiny", f"--config.train.steps={TEACHER_STEPS}",
           "--config.train.checkpoint_every=20", "--config.train.log_every=10", "--config.train.num_samples=0",
           "--config.train.progress=False")
MTEO_STEPS = 100
MTEO = ("--config=configs/gmm.py:mteo", f"--config.mteo.steps={MTEO_STEPS}", "--config.mteo.checkpoint_every=20",
        "--config.mteo.num_train=64", "--config.mteo.num_eval=64", "--config.mteo.batch_size=16",
        "--config.mteo.solvers=('euler',)", "--config.mteo.teacher_steps=5", "--config.mteo.eval_every=0",
        "--config.mteo.progress=False")
CELL = "euler_nfe3"


def command(workdir, args):
  return [sys.executable, "-m", "mteo_jax.main", *args, f"--workdir={workdir}"]


def cli(workdir, *args, timeout=300):
  """Runs the command line to the end; returns the CompletedProcess."""
  return subprocess.run(command(workdir, args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def cli_ok(workdir, *args):
  proc = cli(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def saved_steps(checkpoint_dir):
  """The complete checkpoints in a directory (orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it)."""
  if not checkpoint_dir.is_dir():
    return []
  return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def run_and_kill(workdir, args, checkpoint_dir, every, log):
  """Starts the command and SIGKILLs it as soon as a checkpoint past the first (``2 * every``) is on disk; returns the
  complete checkpoints at that moment."""
  with open(log, "w") as out:
    proc = subprocess.Popen(command(workdir, args), cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      while not any(s >= 2 * every for s in saved_steps(checkpoint_dir)):
        if proc.poll() is not None:
          pytest.fail(f"the run ended (exit {proc.returncode}) before a second checkpoint could be seen; give it "
                      f"more steps:\n{Path(log).read_text()[-3000:]}")
        assert time.monotonic() < deadline, "no second checkpoint within 300 s"
        time.sleep(0.1)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"not killed (exit {proc.returncode}): the run ended first"
  return saved_steps(checkpoint_dir)


def cell(row):
  return row["method"], row["solver"], row["nfe"]


def loss_records(path):
  return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in loop.read_metrics(path) if "loss" in r]


class Background:
  """A command line started now, its output going to a log file; ``result()`` waits for it and checks exit 0."""

  def __init__(self, workdir, args, log):
    self.workdir, self.log = workdir, log
    with open(log, "w") as out:
      self.proc = subprocess.Popen(command(workdir, args), cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)

  def result(self):
    self.proc.wait(timeout=600)
    assert self.proc.returncode == 0, Path(self.log).read_text()[-4000:]
    return self.workdir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The uninterrupted teacher and MTEO runs, started together in the background when first asked for (they overlap
  with the tests that kill and resume runs)."""
  root = tmp_path_factory.mktemp("uninterrupted")
  runs = {"teacher": Background(root / "teacher", TEACHER, root / "teacher.log"),
          "mteo": Background(root / "mteo", MTEO, root / "mteo.log")}
  yield runs
  for run in runs.values():
    if run.proc.poll() is None:
      run.proc.kill()
      run.proc.wait()


# --- SIGKILL and the same command again ------------------------------------------------------------------------------

def test_killed_teacher_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
  """A teacher run SIGKILLed after its second checkpoint and rerun exports the uninterrupted run's params and losses."""
  workdir = tmp_path / "work"
  at_kill = run_and_kill(workdir, TEACHER, workdir / "checkpoints", 20, tmp_path / "killed.log")
  assert at_kill and max(at_kill) < TEACHER_STEPS and not (workdir / "teacher").exists()
  proc = cli_ok(workdir, *TEACHER)
  assert f"resuming from the checkpoint at step {max(at_kill)}" in proc.stderr
  teacher_run = uninterrupted["teacher"].result()
  _, params, _, metadata = train.load_teacher(workdir / "teacher")
  _, expected, _, expected_metadata = train.load_teacher(teacher_run / "teacher")
  jax.tree.map(np.testing.assert_array_equal, params, expected)
  assert loss_records(workdir) == loss_records(teacher_run)
  assert metadata["final_loss"] == expected_metadata["final_loss"]


# --- NaN stop --------------------------------------------------------------------------------------------------------

def test_absurd_learning_rate_stops_naming_the_step(tmp_path):
  """lr=1e30 exits non-zero naming the first non-finite step, and no checkpoint of that step or later exists."""
  proc = cli(tmp_path / "work", *TEACHER, "--config.train.lr=1e30", "--config.train.checkpoint_every=1")
  assert proc.returncode != 0
  match = re.search(r"non-finite [^\n]* at step (\d+)", proc.stderr)
  assert match, proc.stderr[-3000:]
  bad = int(match.group(1))
  saved = saved_steps(tmp_path / "work" / "checkpoints")
  assert 1 <= bad < TEACHER_STEPS and all(s < bad for s in saved)
  assert f"nothing after step {max(saved, default=0)} was saved" in proc.stderr  # the message names the last one
  assert not (tmp_path / "work" / "teacher").exists()


# --- the workdir -----------------------------------------------------------------------------------------------------

def test_a_workdir_of_another_experiment_is_refused_unless_overwrite(uninterrupted, tmp_path):
  """Another seed in a used workdir exits 2 naming the key and the overwrite flag; with it, old results are replaced."""
  workdir = tmp_path / "work"
  shutil.copytree(uninterrupted["teacher"].result(), workdir)
  before = sorted(p.name for p in workdir.iterdir())
  proc = cli(workdir, *TEACHER, "--config.seed=1")
  assert proc.returncode == 2
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith("error: ") and "seed: 0 -> 1" in message and "--config.overwrite=True" in message
  assert sorted(p.name for p in workdir.iterdir()) == before  # nothing touched

  short = ("--config.seed=1", "--config.overwrite=True", "--config.train.steps=4", "--config.train.warmup_steps=1",
           "--config.train.log_every=2", "--config.train.checkpoint_every=2")
  cli_ok(workdir, *TEACHER, *short)
  assert json.loads((workdir / "experiment.json").read_text())["task"]["seed"] == 1
  assert saved_steps(workdir / "checkpoints") == [2, 4]
  assert [r["step"] for r in loop.read_metrics(workdir)] == [2, 4]
  assert train.load_teacher(workdir / "teacher")[3]["steps"] == 4


def test_a_foreign_directory_is_never_deleted(tmp_path):
  """A non-empty directory without experiment.json is refused (exit 2), overwrite or not, and nothing in it changes."""
  workdir = tmp_path / "work"
  (workdir / "notes").mkdir(parents=True)
  (workdir / "notes" / "thesis.txt").write_text("precious")
  (workdir / "data.csv").write_text("1,2\n")
  proc = cli(workdir, *TEACHER, "--config.overwrite=True")
  assert proc.returncode == 2
  assert "experiment.json" in proc.stderr.strip().splitlines()[-1]
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == ["data.csv", "notes", "notes/thesis.txt"]
  assert (workdir / "notes" / "thesis.txt").read_text() == "precious"


# --- MTEO: SIGKILL and the same command again, and the mode's artefacts --------------------------------------------

@pytest.mark.slow  # two more MTEO runs (~25 s of CPU): with it the file would exceed its ~90 s budget on 2 cores
def test_killed_mteo_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
  """An MTEO run SIGKILLed after its second checkpoint and rerun gives the uninterrupted run's rows and table."""
  reference_dir = uninterrupted["mteo"].result()
  workdir = tmp_path / "work"
  # The reference trajectories are a cache keyed by their content: seeding it spares the solve, not the training.
  shutil.copytree(reference_dir / "references", workdir / "references")
  run_dir = workdir / "mteo" / CELL
  at_kill = run_and_kill(workdir, MTEO, run_dir / "checkpoints", 20, tmp_path / "killed.log")
  assert at_kill and max(at_kill) < MTEO_STEPS and not (workdir / "results.json").exists()
  proc = cli_ok(workdir, *MTEO)
  assert f"resuming from the checkpoint at step {max(at_kill)}" in proc.stderr
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  expected = json.loads((reference_dir / "results.json").read_text())["rows"]
  assert [cell(r) for r in rows] == [cell(r) for r in expected]
  np.testing.assert_allclose([r["rmse"] for r in rows], [r["rmse"] for r in expected], rtol=0, atol=1e-6)
  teacher = teachers.Teacher.load("pretrained:gmm")
  table, _ = mteo.load_table(workdir / "tables" / CELL, teacher, solver_name="euler", nfe=3)
  expected_table, _ = mteo.load_table(reference_dir / "tables" / CELL, teacher, solver_name="euler", nfe=3)
  jax.tree.map(np.testing.assert_array_equal, table, expected_table)
  assert loss_records(run_dir) == loss_records(reference_dir / "mteo" / CELL)


def run_and_interrupt(workdir, argv, checkpoint_dir, at_step, signum, log):
  """Starts ``argv`` (a full command) and sends ``signum`` once a checkpoint at ``at_step`` or later is on disk;
  returns (exit code, the output)."""
  with open(log, "w") as out:
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      while not any(s >= at_step for s in saved_steps(checkpoint_dir)):
        assert proc.poll() is None, f"ended before step {at_step}:\n{Path(log).read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint at step {at_step} within 300 s"
        time.sleep(0.05)
      proc.send_signal(signum)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
  return proc.returncode, Path(log).read_text()


@pytest.mark.slow  # three MTEO processes (~1 min of CPU on an idle machine, 7 min on a loaded one)
def test_sigterm_then_ctrl_c_end_with_one_resume_line_and_the_printed_command_finishes_the_run(uninterrupted,
                                                                                                 tmp_path):
  """SIGTERM, then Ctrl-C (SIGINT) in the resumed run: each ends the MTEO run with no traceback and one line saying
  where it stopped, what is saved and the command that resumes (without ``overwrite``, which would start again);
  that printed command resumes each time and the finished run equals an uninterrupted one."""
  reference_dir = uninterrupted["mteo"].result()
  workdir = tmp_path / "work"
  shutil.copytree(reference_dir / "references", workdir / "references")   # a cache: spares the solve only
  run_dir = workdir / "mteo" / CELL
  argv = command(workdir, (*MTEO, "--config.overwrite=True"))
  for signum, at_step in ((signal.SIGTERM, 20), (signal.SIGINT, 60)):
    code, output = run_and_interrupt(workdir, argv, run_dir / "checkpoints", at_step, signum,
                                     tmp_path / f"{signum}.log")
    assert code == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    last = output.strip().splitlines()[-1]
    saved = max(saved_steps(run_dir / "checkpoints"))
    assert re.fullmatch(rf"interrupted \({signal.Signals(signum).name}\) in MTEO euler NFE 3 at step \d+ of "
                        rf"{MTEO_STEPS}: its checkpoint at step {saved} \(.*\) is saved, and what the job finished "
                        rf"before it is kept in .*\. Resume with: python -m mteo_jax\.main .*", last), last
    resume = shlex.split(last.split("Resume with: ")[1])
    assert "--config.overwrite=True" not in resume and resume[3:] == [a for a in argv[3:] if "overwrite" not in a]
    argv = [sys.executable, *resume[1:]]
  proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming from the checkpoint at step" in proc.stderr
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  expected = json.loads((reference_dir / "results.json").read_text())["rows"]
  np.testing.assert_allclose([r["rmse"] for r in rows], [r["rmse"] for r in expected], rtol=0, atol=1e-6)
  assert loss_records(run_dir) == loss_records(reference_dir / "mteo" / CELL)


def test_ctrl_c_during_mteo_training_ends_with_one_resume_line_and_the_printed_command_finishes_the_run(
    uninterrupted, tmp_path):
  """Ctrl-C (SIGINT) once MTEO training has started, through the real command line: exit 130, no traceback, one line
  with the command that resumes, and that command finishes the run to the uninterrupted run's rows and losses. (The
  slow test above sends SIGTERM and then SIGINT; this one runs in the default suite.)"""
  reference_dir = uninterrupted["mteo"].result()
  workdir = tmp_path / "work"
  shutil.copytree(reference_dir / "references", workdir / "references")   # a cache: spares the solve only
  run_dir = workdir / "mteo" / CELL
  # grid_size only sizes the pictures (a harmless key: the experiment is the same); fewer points draw faster.
  argv = command(workdir, (*MTEO, "--config.mteo.grid_size=16"))
  code, output = run_and_interrupt(workdir, argv, run_dir / "checkpoints", 20, signal.SIGINT, tmp_path / "int.log")
  assert code == 128 + signal.SIGINT, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  resume_lines = [line for line in output.splitlines() if "Resume with:" in line]
  assert len(resume_lines) == 1 and resume_lines[0] == output.strip().splitlines()[-1], output[-3000:]
  assert resume_lines[0].startswith("interrupted (SIGINT) in MTEO euler NFE 3 at step "), resume_lines[0]
  resume = shlex.split(resume_lines[0].split("Resume with: ")[1])
  assert resume[:3] == ["python", "-m", "mteo_jax.main"] and resume[3:] == argv[3:]
  proc = subprocess.run([sys.executable, *resume[1:]], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"resuming from the checkpoint at step [1-9]\d*", proc.stderr), proc.stderr[-3000:]
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  expected = json.loads((reference_dir / "results.json").read_text())["rows"]
  assert [cell(r) for r in rows] == [cell(r) for r in expected]
  np.testing.assert_allclose([r["rmse"] for r in rows], [r["rmse"] for r in expected], rtol=0, atol=1e-6)
  assert loss_records(run_dir) == loss_records(reference_dir / "mteo" / CELL)


def test_a_truncated_checkpoint_stops_the_rerun_with_one_line_naming_the_step_to_delete(uninterrupted, tmp_path):
  """A finished teacher run whose last checkpoint lost half of its array file: the rerun exits 1 with one line naming
  that step's directory and the step a resume restarts from, no traceback (tensorstore's included), nothing
  deleted."""
  workdir = tmp_path / "work"
  shutil.copytree(uninterrupted["teacher"].result(), workdir)
  directory = workdir / "checkpoints"
  *_, earlier, final = saved_steps(directory)   # keep=2
  assert final == TEACHER_STEPS
  (data,) = (directory / str(final) / "state" / "d").iterdir()
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  before = sorted((str(p), p.stat().st_size) for p in workdir.rglob("*"))
  proc = cli(workdir, *TEACHER)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: the checkpoint at step {TEACHER_STEPS} in {re.escape(str(directory))} cannot be read "
                      rf"\(ValueError: .+\); delete {re.escape(str(directory / str(TEACHER_STEPS)))} to resume from "
                      rf"the checkpoint at step {earlier}", last), last
  assert sorted((str(p), p.stat().st_size) for p in workdir.rglob("*")) == before


def test_mteo_mode_writes_its_artefacts(uninterrupted):
  """The mteo mode exits 0 and writes results.json, its pictures, the table, checkpoints and metrics."""
  workdir = uninterrupted["mteo"].result()
  results = json.loads((workdir / "results.json").read_text())
  assert [cell(r) for r in results["rows"]] == [("teacher", "heun", 9), ("base", "euler", 3), ("mteo", "euler", 3)]
  assert all(np.isfinite(r["rmse"]) for r in results["rows"])
  mteo_row = results["rows"][-1]
  assert mteo_row["rmse"] < results["rows"][1]["rmse"] and mteo_row["train_seconds"] > 0
  assert mteo_row["loss_curve"]["step"][-1] == MTEO_STEPS
  phases = results["timings"]["phases"]   # where the wall time went (harness.PhaseTimer)
  assert {"references", "teacher_row", "training", "evaluation", "pictures", "other"} == set(phases)
  assert phases["training"] > 0 and sum(phases.values()) == pytest.approx(results["timings"]["total_seconds"], abs=0.01)
  for name in ("samples_reference.png", "samples_euler.png", "samples_euler_MTEO.png", "rmse_bars.png",
               "experiment.json"):
    assert (workdir / name).stat().st_size > 0, name
  assert saved_steps(workdir / "mteo" / CELL / "checkpoints")[-1] == MTEO_STEPS
  table, metadata = mteo.load_table(workdir / "tables" / CELL, teachers.Teacher.load("pretrained:gmm"),
                                    solver_name="euler", nfe=3)
  assert metadata["nfe"] == 3 and all(np.all(np.isfinite(np.asarray(v))) for v in table.values())
