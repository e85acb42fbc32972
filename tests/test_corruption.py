"""A file that a rerun reads and cannot read (truncated, corrupted) stops it with one error that names the file and
says what to delete, and nothing is deleted or replaced unread; a refused resume names only the settings that differ,
``key: saved -> current``. (Through the real command line on a teacher workdir and on SIGINT:
tests/test_reliability.py.)"""

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import checkpoints, comparison, files, learned_schedules, loop, modes, mteo

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 6, 2
CONFIG = loop.LoopConfig(steps=STEPS, batch_size=16, lr=3e-2, checkpoint_every=EVERY, log_every=1, keep=2,
                         progress=False)
_RS = np.random.RandomState(0)
DATA = {"x": _RS.randn(64, 4).astype(np.float32), "y": _RS.randn(64).astype(np.float32)}


def objective(trainable, frozen, batch):
  return jnp.mean((batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]) ** 2)


def run_fit(run_dir, hooks=()):
  task = loop.ArrayTask({"w": jnp.zeros(4), "b": jnp.zeros(())}, objective, DATA, batch_size=16, seed=0)
  return loop.fit(task, CONFIG, run_dir, seed=0, identity={"run": "corruption"}, hooks=hooks, desc="corruption")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run (checkpoints at steps 4 and 6) and its final parameters."""
  run_dir = tmp_path_factory.mktemp("finished")
  return run_dir, jax.tree.map(np.asarray, run_fit(run_dir).state.params)


def tree(directory: Path) -> dict[str, bytes]:
  """Every file under ``directory`` with its content: what must stay as it was."""
  return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def truncate(path: Path, keep: int | None = None) -> None:
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2 if keep is None else keep])


# --- checkpoints -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damaged, reason", [
    ("state/d/*", r"ValueError: OUT_OF_RANGE: Error opening \"zarr\" driver"),   # the arrays
    ("state/manifest.ocdbt", r"ValueError: DATA_LOSS: "),                        # the index of the arrays
    ("state/_METADATA", r"JSONDecodeError: "),                                   # the tree's shapes and dtypes
    ("metadata/metadata", r"JSONDecodeError: ")])                                # the run's identity
def test_a_truncated_checkpoint_is_one_error_saying_which_step_to_delete(finished, tmp_path, damaged, reason):
  """Each file of a checkpoint that is read on resume, truncated: one UnreadableFileError naming the step's directory
  and the earlier step a resume restarts from (not tensorstore's pages of tracebacks), nothing deleted; once the
  step is deleted as it says, the rerun resumes from step 4 and ends where the uninterrupted run did."""
  source, expected = finished
  run_dir = tmp_path / "run"
  shutil.copytree(source, run_dir)
  directory = run_dir / "checkpoints"
  (path,) = (directory / "6").glob(damaged)
  truncate(path)
  before = tree(run_dir)
  with pytest.raises(files.UnreadableFileError) as error:
    run_fit(run_dir)
  message = str(error.value)
  assert re.fullmatch(rf"the checkpoint at step 6 in {re.escape(str(directory))} cannot be read \({reason}.*\); "
                      rf"delete {re.escape(str(directory / '6'))} to resume from the checkpoint at step 4", message), \
      message
  assert "\n" not in message and len(message) < 600
  assert tree(run_dir) == before   # nothing deleted or replaced
  shutil.rmtree(directory / "6")
  ran = []
  result = run_fit(run_dir, hooks=[lambda step, state, metrics: ran.append(step)])
  assert ran == [5, 6]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, result.state.params), expected)


def test_the_only_checkpoint_unreadable_says_the_run_starts_again(tmp_path):
  """With no earlier step, the message says that deleting the step trains the run again from step 0."""
  directory = tmp_path / "checkpoints"
  with checkpoints.Checkpointer(directory) as ckpt:
    ckpt.save(2, {"w": np.ones(3)}, {"step": 2}, force=True)
  truncate(directory / "2" / "metadata" / "metadata")
  with checkpoints.Checkpointer(directory) as ckpt, pytest.raises(files.UnreadableFileError) as error:
    ckpt.metadata()
  assert str(error.value).endswith(f"; delete {directory / '2'} to train the run again from step 0")


def test_metrics_jsonl_a_damaged_line_is_an_error_a_cut_last_line_is_dropped(finished, tmp_path):
  """A line of metrics.jsonl that is not a record is an error naming the file and the line, the file untouched; a
  last line cut short (a process killed while appending it, past the checkpoint) is dropped with a warning."""
  source, expected = finished
  run_dir = tmp_path / "run"
  shutil.copytree(source, run_dir)
  metrics = run_dir / "metrics.jsonl"
  good = metrics.read_text()
  lines = good.splitlines(keepends=True)
  metrics.write_text("".join(lines[:1] + ['{"step": 2, "loss\n'] + lines[2:]))
  damaged = metrics.read_text()
  with pytest.raises(files.UnreadableFileError,
                     match=rf"^{re.escape(str(metrics))} cannot be read \(line 2: JSONDecodeError: .*\); delete that "
                           r"line, or the file \(training resumes from the checkpoint, without the loss history "
                           r"before it\)$"):
    run_fit(run_dir)
  assert metrics.read_text() == damaged
  with pytest.raises(files.UnreadableFileError, match="line 2"):
    loop.read_metrics(run_dir)
  metrics.write_text(good + '{"step": 7, "lo')   # cut short while being written
  result = run_fit(run_dir)
  assert metrics.read_text() == good
  assert [r["step"] for r in result.history] == list(range(1, STEPS + 1))


# --- tables, artefacts, caches ---------------------------------------------------------------------------------------

TABLE = {"block0": jnp.arange(6.0).reshape(3, 2)}
SIGMAS = [80.0, 1.0, 0.5, 0.25]   # exact in float32, as the metadata stores them


def save_table(path):
  mteo.save_table(path, TABLE, mteo.table_metadata("teacher-hash", "euler", {}, "edm", SIGMAS, TABLE, ("block0",)),
                  overwrite=True)


def test_a_table_with_unreadable_metadata_is_neither_replaced_nor_read(tmp_path):
  """A rerun that saves its table over one whose metadata.json is truncated stops naming that file and the directory
  to delete (it is left as it was); ``load_table`` says the same for its metadata and for its arrays."""
  path = tmp_path / "tables" / "euler_nfe3"
  save_table(path)
  truncate(path / "metadata.json", keep=30)
  before = tree(path)
  with pytest.raises(files.UnreadableFileError) as error:
    save_table(path)
  assert re.fullmatch(rf"{re.escape(str(path / 'metadata.json'))} cannot be read \(JSONDecodeError: .*\); it is not "
                      rf"replaced unread: delete {re.escape(str(path))} \(the run's checkpoints remake it\)",
                      str(error.value)), str(error.value)
  assert tree(path) == before
  teacher = types.SimpleNamespace(identity="teacher-hash")
  with pytest.raises(files.UnreadableFileError, match=rf"delete {re.escape(str(path))} and rerun the job that wrote"):
    mteo.load_table(path, teacher, solver_name="euler", nfe=3)
  shutil.rmtree(path)
  save_table(path)
  for damaged in (path / "table").rglob("*"):   # the arrays' files: whichever is read first fails
    if damaged.is_file() and damaged.parent.name == "d" and damaged.parent.parent.name == "table":
      truncate(damaged, keep=10)
  with pytest.raises(files.UnreadableFileError) as error:
    mteo.load_table(path, teacher, solver_name="euler", nfe=3)
  assert re.fullmatch(rf"the MTEO table {re.escape(str(path / 'table'))} cannot be read \(.+\); delete "
                      rf"{re.escape(str(path))} and rerun the job that wrote it", str(error.value)), str(error.value)


def test_a_table_of_other_settings_names_only_what_differs(tmp_path):
  path = tmp_path / "table"
  save_table(path)
  teacher = types.SimpleNamespace(identity="teacher-hash")
  with pytest.raises(ValueError) as error:
    mteo.load_table(path, teacher, solver_name="euler", nfe=3, sigmas=[80.0, 2.0, 0.5, 0.25])
  assert str(error.value).endswith("(table -> expected): sigmas: [80.0, 1.0, 0.5, 0.25] -> [80.0, 2.0, 0.5, 0.25]")


def test_pytree_and_learned_schedule_artefacts_with_unreadable_files(tmp_path):
  """An exported teacher (``save_pytree``) or a learned schedule whose files are truncated: one error naming the file;
  an export over an unreadable one is refused, leaving it as it was."""
  path = tmp_path / "teacher"
  checkpoints.save_pytree(path, {"w": np.ones(3)}, {"backbone": "mlp"})
  truncate(path / "arrays.npz")
  with pytest.raises(files.UnreadableFileError, match=rf"^{re.escape(str(path / 'arrays.npz'))} cannot be read "
                                                      r"\(BadZipFile: .*\); delete it and rerun the job that wrote "
                                                      r"it$"):
    checkpoints.load_pytree(path)
  truncate(path / "tree.json")
  before = tree(path)
  with pytest.raises(files.UnreadableFileError, match=rf"^{re.escape(str(path / 'tree.json'))} cannot be read "
                                                      rf"\(JSONDecodeError: .*\); it is not replaced unread: delete "
                                                      rf"{re.escape(str(path))} to write it again$"):
    checkpoints.save_pytree(path, {"w": np.ones(3)}, overwrite=True)
  assert tree(path) == before
  schedule = tmp_path / "schedules" / "ld3_euler_nfe3"
  learned_schedules.save_artefact(schedule, {"logits": np.zeros(3)}, {"method": "ld3", "teacher": "t",
                                                                      "solver": "euler", "nfe": 3})
  truncate(schedule / "arrays.npz")
  with pytest.raises(files.UnreadableFileError, match=rf"^{re.escape(str(schedule / 'arrays.npz'))} cannot be read"):
    learned_schedules.load_artefact(schedule, method="ld3", teacher="t", solver_name="euler", nfe=3)
  with pytest.raises(ValueError, match=r"belongs to another run: nfe: 3 -> 4 \(saved -> expected\)$"):
    learned_schedules.load_artefact(schedule, method="ld3", teacher="t", solver_name="euler", nfe=4)


def test_an_unreadable_results_json_is_not_silently_dropped(tmp_path):
  """A comparison rerun merges the rows of results.json: an unreadable one is an error, not rows silently lost."""
  assert comparison.earlier_rows(tmp_path) == []
  (tmp_path / "results.json").write_text('{"rows": [{"method": "base", "solver": "eu')
  with pytest.raises(files.UnreadableFileError, match=rf"^{re.escape(str(tmp_path / 'results.json'))} cannot be read "
                                                      r"\(JSONDecodeError: .*\); delete it to rerun"):
    comparison.earlier_rows(tmp_path)
  (tmp_path / "results.json").write_text('{"rows": 3}')
  with pytest.raises(files.UnreadableFileError, match="no list of rows"):
    comparison.earlier_rows(tmp_path)


# --- the workdir's experiment.json and refused resumes ---------------------------------------------------------------

def identity_of(variant: str, **mteo_changes) -> dict:
  """The experiment identity of ``configs/gmm.py:<variant>`` with changes to its ``mteo`` section."""
  import importlib.util  # noqa: PLC0415
  spec = importlib.util.spec_from_file_location("_gmm_config", REPO / "configs" / "gmm.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  for key, value in mteo_changes.items():
    section = config.mteo
    *parents, leaf = key.split(".")
    for parent in parents:
      section = section[parent]
    section[leaf] = value
  mode, typed = modes.parse(config)
  return mode.identity(typed)


def claimed(workdir: Path, identity: dict) -> Path:
  modes.claim_workdir(workdir, identity)
  (workdir / "results.json").write_text("{}")
  return workdir


@pytest.mark.parametrize("changes, listed", [
    ({"lr": 0.02}, "mteo.lr: 0.01 -> 0.02"),
    ({"teacher": "pretrained:digits"}, "mteo.teacher: 'pretrained:gmm' -> 'pretrained:digits'"),
    ({"num_train": 512}, "mteo.num_train: 1024 -> 512"),
    ({"reference.rtol": 1e-4}, "mteo.reference.rtol: 1e-05 -> 0.0001"),
    ({"lr": 0.02, "granularity": "shared"}, "mteo.granularity: 'layer' -> 'shared'; mteo.lr: 0.01 -> 0.02")])
def test_a_refused_workdir_names_exactly_the_settings_that_differ(tmp_path, changes, listed):
  workdir = claimed(tmp_path / "work", identity_of("mteo"))
  with pytest.raises(modes.ConfigError) as error:
    modes.claim_workdir(workdir, identity_of("mteo", **changes))
  assert str(error.value) == (f"{workdir} holds another experiment ({listed}); use another workdir, rerun with the "
                              "settings it was made with, or pass --config.overwrite=True to delete its results and "
                              "start again")


@pytest.mark.parametrize("variant", ["pd", "compare"])
def test_a_workdir_of_another_mode_is_refused_naming_the_mode_only(tmp_path, variant):
  """A pd or compare workdir rerun as mteo: the mode, not a dump of every section of both."""
  workdir = claimed(tmp_path / "work", identity_of(variant))
  with pytest.raises(modes.ConfigError) as error:
    modes.claim_workdir(workdir, identity_of("mteo"))
  assert f"holds another experiment (mode: '{variant}' -> 'mteo', whose settings are not compared); " in \
      str(error.value)
  assert len(str(error.value)) < 300


def test_an_unreadable_experiment_json_is_refused_unless_overwrite(tmp_path):
  workdir = claimed(tmp_path / "work", identity_of("mteo"))
  (workdir / "experiment.json").write_text('{"mode": "mteo", "se')
  with pytest.raises(files.UnreadableFileError) as error:
    modes.claim_workdir(workdir, identity_of("mteo"))
  assert re.fullmatch(rf"{re.escape(str(workdir / 'experiment.json'))} cannot be read \(JSONDecodeError: .*\); it "
                      r"records which experiment the workdir holds: rerun with --config.overwrite=True to delete the "
                      r"workdir's results and start again, or use another workdir", str(error.value))
  assert sorted(p.name for p in workdir.iterdir()) == ["experiment.json", "results.json"]
  modes.claim_workdir(workdir, identity_of("mteo"), overwrite=True)   # as for another experiment: results deleted
  assert sorted(p.name for p in workdir.iterdir()) == ["experiment.json"]
  assert json.loads((workdir / "experiment.json").read_text()) == identity_of("mteo")


# --- what the command line prints ------------------------------------------------------------------------------------

# ``python -m mteo_jax.main`` with the job replaced by one statement (``workdir`` in scope): how main reports what
# the job's real functions raise, at the cost of an import.
_MAIN_RUNNING = """
import sys
from absl import app
from mteo_jax import main, modes
statement = sys.argv.pop(1)
modes.run_prepared = lambda spec, typed, workdir: exec(statement, {"workdir": workdir})
app.run(main.main)
"""


def main_running(statement: str, workdir: Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", _MAIN_RUNNING, statement, "--config=configs/gmm.py:mteo",
                         f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_command_line_prints_an_unreadable_table_and_a_refused_resume_as_one_line(tmp_path):
  """main turns an UnreadableFileError into one line and exit 1, and a refused resume (``ResumeMismatchError``) into
  one line and exit 2, without a traceback."""
  path = tmp_path / "tables" / "euler_nfe3"
  save_table(path)
  truncate(path / "metadata.json", keep=30)
  statement = ("import jax.numpy as jnp; from mteo_jax import mteo; t = {'block0': jnp.zeros((3, 2))}; "
               f"mteo.save_table({str(path)!r}, t, mteo.table_metadata('h', 'euler', {{}}, 'edm', {SIGMAS}, t, "
               "('block0',)), overwrite=True)")
  proc = main_running(statement, tmp_path / "work")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"error: {re.escape(str(path / 'metadata.json'))} cannot be read \(JSONDecodeError: .*\); it "
                      rf"is not replaced unread: delete {re.escape(str(path))} \(the run's checkpoints remake it\)",
                      last), last
  proc = main_running("from mteo_jax import loop; raise loop.ResumeMismatchError('run holds a checkpoint (step 4) "
                      "of a run with other settings: loop.lr: 0.01 -> 0.02.')", tmp_path / "work2")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == ("error: run holds a checkpoint (step 4) of a run with other "
                                                  "settings: loop.lr: 0.01 -> 0.02.")
