"""The main job end to end on tiny teachers (trained here or shipped): references, MTEO training, held-out evaluation,
outputs; resuming a workdir after a harmless change; one teacher identity; every setting checked before any work."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mteo_jax import checkpoints, experiment, harness, modes, mteo, teachers, train, viz
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher
from test_cli import FAST_COMPILE, REPO, load_config_file, run_cli

REQUIRED = {"method", "solver", "nfe", "rmse", "psnr", "train_seconds", "sample_seconds_per_1k", "n_eval"}


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits_teacher")
  run_cli("--config=configs/digits.py:tiny", f"--workdir={workdir}", "--config.train.steps=30",
          "--config.train.sample_every=0")
  return workdir / "teacher"


def _job_config(name, teacher, **overrides):
  config = load_config_file(name).get_config("mteo")
  config.mteo.update({"teacher": os.fspath(teacher), "solvers": ("dpmpp_2m",), "steps": 40,
                      "batch_size": 32, "num_train": 128, "num_eval": 64, "eval_batch_size": 32, "eval_every": 20,
                      "checkpoint_every": 20, "teacher_steps": 4, "grid_size": 8, "lr": 2e-2,
                      "progress": False, **overrides})
  config.mteo.reference = ml_collections.ConfigDict({"solver": "tsit5", "rtol": 1e-3, "atol": 1e-3,
                                                     "batch_size": 64})
  return config


def test_main_job_on_an_image_teacher(digits_teacher, tmp_path):
  """The image path (FD in the shipped digits classifier's features, a comparison grid) through ``run_mteo`` on a
  ConfigDict; one solver (the GMM job below runs euler)."""
  results = experiment.run_mteo(_job_config("digits", digits_teacher), tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  assert {"teacher", "config", "seed"} <= set(on_disk)
  methods = [(r["method"], r["solver"], r["nfe"]) for r in on_disk["rows"]]
  assert methods[0] == ("teacher", "heun", 7) and methods[1][:2] == ("reference", "tsit5")
  assert methods[2:] == [("base", "dpmpp_2m", 3), ("mteo", "dpmpp_2m", 3)]
  reference, base, tuned = on_disk["rows"][1:]
  assert reference["rmse"] == 0 and np.isfinite(reference["fd"])   # the reference against the real test digits
  assert REQUIRED <= set(base) and REQUIRED <= set(tuned)
  assert base["n_eval"] == tuned["n_eval"] == 64
  assert tuned["fd_name"] == "FD-digits" and np.isfinite(tuned["fd"])
  assert tuned["train_seconds"] > 0 and base["train_seconds"] == 0
  assert tuned["rmse"] < base["rmse"], (base["rmse"], tuned["rmse"])  # held-out noise
  assert tuned["held_out_curve"]["step"] == [20, 40]
  assert tuned["held_out_curve"]["rmse"][-1] < tuned["held_out_curve"]["rmse"][0] * 1.0001
  assert Image.open(tmp_path / "samples.png").size[0] > 100
  assert Image.open(tmp_path / "rmse_bars.png").size[0] > 100
  # The saved table belongs to this teacher, solver and NFE only.
  teacher = Teacher.load(digits_teacher)
  assert results["teacher"]["identity"] == teacher.identity
  table, meta = mteo.load_table(tmp_path / "tables" / "dpmpp_2m_nfe3", teacher, solver_name="dpmpp_2m", nfe=3)
  assert meta["granularity"] == "layer" and mteo.table_nfe(table) == 3
  with pytest.raises(ValueError, match="solver: 'dpmpp_2m' -> 'heun'"):
    mteo.load_table(tmp_path / "tables" / "dpmpp_2m_nfe3", teacher, solver_name="heun", nfe=3)
  # (Rerunning a workdir reuses its references and finished runs: test_a_harmless_change_resumes_without_retraining.)


# --- the shipped GMM teacher through modes.run: the job, its resumption, its identity --------------------------------

def _gmm_config(**overrides) -> ml_collections.ConfigDict:
  """A tiny main job on the shipped GMM teacher, from ``modes.base_config("mteo")`` (every key has its default)."""
  config = modes.base_config("mteo")
  config.mteo.update({"teacher": "pretrained:gmm", "solvers": ("euler",), "nfes": (3,), "steps": 20, "batch_size": 32,
                      "num_train": 64, "num_eval": 64, "eval_batch_size": 32, "eval_every": 10, "checkpoint_every": 10,
                      "teacher_steps": 5, "grid_size": 64, "lr": 2e-2, **overrides})
  config.mteo.reference.update({"rtol": 1e-3, "atol": 1e-3, "batch_size": 64})
  return config


def _rows(results) -> dict:
  return {(r["method"], r["solver"], r["nfe"]): r for r in results["rows"]}


@pytest.fixture(scope="module")
def gmm_job(tmp_path_factory):
  """``(workdir, results)`` of the tiny GMM job (progress bars on, as by default)."""
  workdir = tmp_path_factory.mktemp("gmm_job")
  return workdir, modes.run(_gmm_config(), workdir)


def test_shipped_gmm_teacher_main_job(gmm_job):
  """The GMM path: scatter pictures, sliced Wasserstein and the exact mixture log-likelihood."""
  workdir, results = gmm_job
  assert json.loads((workdir / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
  rows = _rows(results)
  assert list(rows) == [("teacher", "heun", 9), ("base", "euler", 3), ("mteo", "euler", 3)]
  base, tuned = rows[("base", "euler", 3)], rows[("mteo", "euler", 3)]
  assert {"sliced_wasserstein", "log_likelihood"} <= set(tuned) and "fd" not in tuned
  assert REQUIRED <= set(tuned) and base["n_eval"] == tuned["n_eval"] == 64
  assert tuned["loss_curve"]["step"] == [10, 20] and tuned["held_out_curve"]["step"] == [10, 20]
  assert tuned["train_seconds"] > 0 and base["train_seconds"] == 0
  assert "picture_errors" not in results
  for name in ("samples_reference.png", "samples_euler.png", "samples_euler_MTEO.png", "rmse_bars.png"):
    assert _is_image(workdir / name), name
  # Where the loop keeps the run, and where the table goes.
  assert (workdir / "mteo" / "euler_nfe3" / "metrics.jsonl").exists()
  assert (workdir / "tables" / "euler_nfe3" / "metadata.json").exists()
  assert json.loads((workdir / modes.EXPERIMENT_FILE).read_text()) == experiment.experiment_identity(
      modes.parse(_gmm_config())[1])


def test_a_harmless_change_resumes_without_retraining(gmm_job, tmp_path):
  """Rerun with the progress bars off and one more NFE: the finished cell is reused as it is, the new one is added; a
  change to what is learned is refused before any work."""
  workdir, first = gmm_job
  workdir = shutil.copytree(workdir, tmp_path / "job")
  run_dir = workdir / "mteo" / "euler_nfe3"
  with checkpoints.Checkpointer(run_dir / "checkpoints") as ckpt:
    saved_steps = ckpt.all_steps()
  metrics = (run_dir / "metrics.jsonl").read_text()
  again = modes.run(_gmm_config(progress=False, nfes=(3, 4)), workdir)
  before, after = _rows(first)[("mteo", "euler", 3)], _rows(again)[("mteo", "euler", 3)]
  assert after["loss_curve"] == before["loss_curve"] and after["held_out_curve"] == before["held_out_curve"]
  assert after["rmse"] == pytest.approx(before["rmse"], rel=1e-6)   # the same table on the same held-out noise
  with checkpoints.Checkpointer(run_dir / "checkpoints") as ckpt:
    assert ckpt.all_steps() == saved_steps == [10, 20]
  assert (run_dir / "metrics.jsonl").read_text() == metrics   # not a step was run
  assert {("base", "euler", 4), ("mteo", "euler", 4)} <= set(_rows(again))
  assert (workdir / "mteo" / "euler_nfe4" / "checkpoints").is_dir() and (workdir / "tables" / "euler_nfe4").is_dir()
  with pytest.raises(modes.ConfigError, match=r"holds another experiment \(mteo.lr: 0.02 -> 0.03\)"):
    modes.run(_gmm_config(lr=3e-2), workdir)
  assert (run_dir / "metrics.jsonl").read_text() == metrics
  # The training time of the reused cell is the one of its run (kept in its checkpoint), not a new measurement.
  assert after["train_seconds"] == before["train_seconds"] > 0


def readme_code(heading: str) -> str:
  """The first ```python block after the line ``heading`` of README.md."""
  text = (Path(REPO) / "README.md").read_text()
  assert text.count(f"\n{heading}\n") == 1, heading
  after = text.split(f"\n{heading}\n")[1]
  return after.split("```python\n", 1)[1].split("\n```", 1)[0]


def run_readme_sampling(workdir, solver: str = "ipndm") -> None:
  """README's "Sample with a trained table" as written, on ``workdir`` (README's digits job there, a GMM job here:
  only the workdir, the teacher and, where the job has another solver, the solver's name in its three places are
  substituted); its samples are finite and use the table."""
  code = readme_code("### Sample with a trained table")
  assert code.count('"runs/digits_mteo/') == 1 and code.count('"pretrained:digits"') == 1
  assert [code.count(part) for part in ('tables/ipndm_nfe3"', 'solver_name="ipndm"', 'get_solver("ipndm")')] == [1] * 3
  code = code.replace('"runs/digits_mteo/', f'"{workdir}/').replace('"pretrained:digits"', '"pretrained:gmm"')
  for part in ('tables/{}_nfe3"', 'solver_name="{}"', 'get_solver("{}")'):
    code = code.replace(part.format("ipndm"), part.format(solver))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)   # noqa: S102 (README's own code)
  x0 = np.asarray(scope["x0"])
  assert x0.shape == (16, 2) and np.isfinite(x0).all()
  teacher, meta = scope["teacher"], scope["meta"]
  plain = mteo.student_sample(get_solver(solver), teacher.backbone, teacher.params, teacher.precond, None,
                              scope["x_T"], meta["sigmas"])
  assert not np.allclose(x0, np.asarray(plain), atol=1e-5)   # the table changed the path


def test_readme_samples_with_a_trained_table(gmm_job):
  """README's snippet on the table that the main job trained and saved in its workdir."""
  workdir, _ = gmm_job
  run_readme_sampling(workdir, solver="euler")   # the GMM job's solver


def test_readme_sampling_snippet_on_a_saved_table(tmp_path):
  """README's snippet against the library's API without a job (the test above is slow): a perturbed table of the
  shipped GMM teacher saved where the main job saves its iPNDM NFE 3 table."""
  teacher = Teacher.load("pretrained:gmm")
  solver = get_solver("ipndm")
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(3), teacher.precond.sigma_min, teacher.precond.sigma_max,
                        rho=7.0)
  table = mteo.init_table(teacher.backbone, teacher.params, teacher.precond, solver.eval_sigmas(sigmas), "layer")
  table = jax.tree.map(lambda leaf: leaf * 1.5, table)
  meta = mteo.table_metadata(teacher.identity, "ipndm", {}, "edm", sigmas, table, teacher.backbone.layer_names)
  mteo.save_table(tmp_path / "tables" / "ipndm_nfe3", table, meta)
  run_readme_sampling(tmp_path)


def test_one_teacher_identity(gmm_job):
  """A shipped teacher, its parts loaded by hand, and the same network in memory have one identity, which keys the
  job's references and tables; a table loads for its own teacher object and is refused for any other."""
  workdir, results = gmm_job
  teacher = Teacher.load("pretrained:gmm")
  backbone, params, precond, metadata = train.load_teacher(teachers.resolve_teacher("pretrained:gmm"))
  assert teacher.identity == teachers.teacher_identity(backbone, params, precond) == results["teacher"]["identity"]
  in_memory = Teacher.from_model(backbone, params, precond)
  assert in_memory.identity == teacher.identity and teacher.metadata == metadata and in_memory.metadata == {}
  keys = [json.loads(p.read_text())["key"] for p in (workdir / "references").glob("*.json")]
  assert len(keys) == 2 and all(key["teacher"] == teacher.identity for key in keys)   # training and held-out noise
  path = workdir / "tables" / "euler_nfe3"
  sigmas = get_schedule("edm", 3, precond.sigma_min, precond.sigma_max, rho=7.0)
  for owner in (teacher, in_memory):
    table, meta = mteo.load_table(path, owner, solver_name="euler", nfe=3, sigmas=sigmas)
    assert meta["teacher"] == teacher.identity and mteo.table_nfe(table) == 3
  others = [Teacher.from_model(backbone, params, dataclasses.replace(precond, sigma_data=1.0)),       # other precond
            Teacher.from_model(backbone, jax.tree.map(lambda p: p * 1.001, params), precond)]        # other weights
  for other in others:
    assert other.identity != teacher.identity
    with pytest.raises(ValueError, match=f"teacher: '{teacher.identity}' -> '{other.identity}'"):
      mteo.load_table(path, other, solver_name="euler", nfe=3)
  with pytest.raises(TypeError, match="teacher must be a teachers.Teacher"):
    mteo.load_table(path, teacher.identity, solver_name="euler", nfe=3)
  with pytest.raises(FileNotFoundError, match="no shipped teacher 'nope'"):
    teachers.resolve_teacher("pretrained:nope")
  assert teachers.resolve_teacher("pretrained:digits").is_dir()


# --- pictures for every data shape, and a picture that fails loses nothing ------------------------------------------

# The mixture: 16-D, 12 components, the whole data.options dict overridden (configs/gmm.py's tiny teacher).
MIXTURE_16D = "{'mixture': 'random', 'num_components': 12, 'dim': 16, 'num_samples': 2048, 'seed': 0}"


def _tiny_mteo(**overrides) -> str:
  """A whole ``--config.mteo`` dict of tiny settings; the teacher is then set by ``--config.mteo.teacher``, as in the
  issue."""
  job = {"teacher": "pretrained:gmm", "solvers": ("euler", "dpmpp_2m"), "nfes": (3,), "steps": 20, "batch_size": 32,
         "num_train": 64, "num_eval": 64, "eval_batch_size": 32, "eval_every": 10, "checkpoint_every": 20,
         "teacher_steps": 4, "grid_size": 64, "lr": 2e-2, "progress": False,
         "reference": {"solver": "tsit5", "rtol": 1e-3, "atol": 1e-3, "batch_size": 64}, **overrides}
  return f"--config.mteo={job!r}"


def _is_image(path) -> bool:
  with Image.open(path) as image:
    image.verify()
    return image.format == "PNG" and min(image.size) > 50


@pytest.fixture(scope="module")
def gmm16_teacher(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("gmm16_teacher")
  run_cli("--config=configs/gmm.py:tiny", f"--workdir={workdir}", f"--config.data.options={MIXTURE_16D}",
          "--config.model.kwargs.data_dim=16", "--config.train.steps=40", "--config.train.sample_every=40",
          "--config.train.sample_steps=2")
  return workdir


# The CLI as ``python -m mteo_jax.main`` runs it (the overrides checked, then the job), with one picture broken:
# viz.save_samples_picture monkeypatched in the job's own process (a subprocess, as run_cli, for XLA's cheap compile
# flags).
_BROKEN_PICTURE_MAIN = """
import sys
from absl import app
from mteo_jax import main, viz
drawn = viz.save_samples_picture
def fail_one(samples, path, **kwargs):
  if path.name == "samples_euler_MTEO.png":
    raise RuntimeError("the plotting library broke")
  return drawn(samples, path, **kwargs)
viz.save_samples_picture = fail_one
assert main.check_overrides(sys.argv[1:]) is None
app.run(main.main)
"""


def test_main_job_on_a_16d_mixture_through_the_cli(gmm16_teacher, tmp_path):
  """The issue's scenario at tiny size: results, and a PCA picture per row instead of a plotting error. One picture
  is broken on purpose, and it loses nothing else: the job finishes, records the error and draws the others (one CLI
  job for both checks: they cost a job each)."""
  # Teacher training drew its 16-D samples too (a projection, not skipped).
  assert _is_image(gmm16_teacher / "samples" / "step_0000040.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  proc = subprocess.run([sys.executable, "-c", _BROKEN_PICTURE_MAIN, "--config=configs/gmm.py:mteo",
                         f"--workdir={tmp_path}", _tiny_mteo(), f"--config.mteo.teacher={gmm16_teacher / 'teacher'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]   # the job finishes
  assert "picture samples_euler_MTEO.png not drawn: RuntimeError: the plotting library broke" in proc.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["teacher"]["dataset"] == "gmm"
  assert results["picture_errors"] == {"samples_euler_MTEO.png": "RuntimeError: the plotting library broke"}
  rows = {(r["method"], r["solver"], r["nfe"]): r for r in results["rows"]}
  assert list(rows) == [("teacher", "heun", 7), ("base", "euler", 3), ("mteo", "euler", 3), ("base", "dpmpp_2m", 3),
                        ("mteo", "dpmpp_2m", 3)]
  for solver in ("euler", "dpmpp_2m"):
    base, tuned = rows[("base", solver, 3)], rows[("mteo", solver, 3)]
    assert REQUIRED <= set(tuned) and base["n_eval"] == tuned["n_eval"] == 64
    assert np.isfinite(tuned["log_likelihood"]) and np.isfinite(tuned["sliced_wasserstein"])
    assert tuned["rmse"] < base["rmse"], (solver, base["rmse"], tuned["rmse"])
    assert (tmp_path / "tables" / f"{solver}_nfe3").is_dir()
  assert not (tmp_path / "samples_euler_MTEO.png").exists()
  for name in ("reference", "euler", "dpmpp_2m", "dpmpp_2m_MTEO"):
    assert _is_image(tmp_path / f"samples_{name}.png"), name
  assert _is_image(tmp_path / "rmse_bars.png")


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (16,), (4, 5), (8, 8, 1), (8, 8, 3), (8, 8, 2), (8, 8, 4)])
def test_main_job_pictures_for_every_data_shape(tmp_path, monkeypatch, shape):
  rng = np.random.default_rng(0)
  grid_rows = {name: rng.uniform(-1, 1, size=(12,) + shape).astype(np.float32)
               for name in ("reference", "euler", "euler + MTEO")}
  rows = [{"method": "base", "solver": "euler", "nfe": 3, "rmse": 0.3},
          {"method": "mteo", "solver": "euler", "nfe": 3, "rmse": 0.1}]
  assert harness.draw_pictures(tmp_path, grid_rows, rows, 3) == {}
  names = ["samples.png"] if len(shape) == 3 else ["samples_reference.png", "samples_euler.png",
                                                    "samples_euler_MTEO.png"]
  for name in names + ["rmse_bars.png"]:
    assert _is_image(tmp_path / name), name
    (tmp_path / name).unlink()
  # No row at the picture's NFE: no bars, and that is no error.
  assert harness.draw_pictures(tmp_path, grid_rows, rows, 4) == {}
  assert not (tmp_path / "rmse_bars.png").exists() and all(_is_image(tmp_path / name) for name in names)
  # Every picture is drawn on its own: with the bars broken, the samples are still there.
  for name in names:
    (tmp_path / name).unlink()

  def broken(*args, **kwargs):
    raise ValueError("the bar plot broke")

  monkeypatch.setattr(viz, "save_grouped_bar_plot", broken)
  errors = harness.draw_pictures(tmp_path, grid_rows, rows, 3)
  assert errors == {"rmse_bars.png": "ValueError: the bar plot broke"}
  assert all(_is_image(tmp_path / name) for name in names) and not (tmp_path / "rmse_bars.png").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"solvers": ("heun",), "nfes": (4,)}, (r"'heun' cannot make exactly 4 network evaluations; nearest reachable "
                                            r"NFE: 3 \(N=2\) or 5 \(N=3\)")),
    ({"lr_decay": "cosin"}, r"unknown mteo.lr_decay 'cosin'; expected one of \['constant', 'cosine', 'linear'\]"),
    ({"solvers": ("dpm_2m",)}, r"unknown solver 'dpm_2m'; expected one of"),
    ({"distance": "l3"}, r"unknown MTEO loss 'l3'"),
    ({"granularity": "block"}, r"unknown mteo.granularity 'block'"),
    ({"schedule": "karras"}, r"unknown schedule 'karras'"),
    ({"grid_size": 0}, r"mteo.grid_size must be >= 1"),
    ({"lr": 0.0}, r"mteo.lr must be a positive finite number, got 0.0"),
    ({"lr_end_factor": 2.0}, r"mteo.lr_end_factor must be in \[0, 1\]"),
    ({"batch_size": 64, "num_train": 32}, r"mteo.batch_size=64 exceeds mteo.num_train=32"),
    ({"teacher": ""}, r"mteo.teacher is required"),
    ({"teacher": "/nowhere/teacher"}, r"teacher '/nowhere/teacher' does not exist"),
    ({"teacher": "pretrained:nope"}, r"no shipped teacher 'nope'; shipped teachers: \[.*'digits'.*'gmm'"),
    ({"learning_rate": 1e-2}, r"unknown key\(s\) \['config.mteo.learning_rate'\]; valid keys of config.mteo: .*'lr'"),
    ({"nfes": ()}, r"mteo.solvers and mteo.nfes must be non-empty"),
    ({"nfes": (5, 3, 3)}, r"mteo.nfes lists an entry twice: \(5, 3, 3\)"),
    ({"solvers": ("ipndm", "ipndm")}, r"mteo.solvers lists an entry twice"),
    ({"reference": {"solver": "rk4"}}, r"unknown reference solver 'rk4'"),
])
def test_bad_settings_fail_before_any_work(tmp_path, overrides, match):
  """Every setting is checked when the job's config is read (``modes.parse``): nothing is solved, trained or written,
  not even the workdir's claim."""
  config = _gmm_config()
  reference = overrides.pop("reference", None)
  config.mteo.update(overrides)
  if reference is not None:
    config.mteo.reference.update(reference)
  start = time.perf_counter()
  with pytest.raises(modes.ConfigError, match=match):
    modes.parse(config)
  with pytest.raises(modes.ConfigError, match=match):
    modes.run(config, tmp_path / "workdir")
  assert time.perf_counter() - start < 5.0
  assert not (tmp_path / "workdir").exists()


def test_a_rerun_reports_each_stage_as_k_of_n_with_an_eta(gmm_job, caplog):
  """The job's stages as "[k/n] what ...", then "[k/n] what: done in ...; job ... elapsed, ... left"; a rerun of the
  finished job goes through the same stages (from its caches) and ends with nothing left."""
  workdir, _ = gmm_job
  with caplog.at_level(logging.INFO):
    modes.run(_gmm_config(), workdir)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
  starts = [line for line in lines if line.endswith(" ...")]
  assert [line.split(" ", 1)[0] for line in starts] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"], lines
  assert starts[0].startswith("[1/4] set-up: the held-out reference (64 noises)")
  assert starts[1].startswith("[2/4] teacher row: Heun, 9 NFE on 64 held-out noises")
  assert starts[2] == "[3/4] the plain solver on euler NFE 3 ..." and starts[3] == "[4/4] MTEO on euler NFE 3 ..."
  ends = [line for line in lines if ": done in " in line]
  assert len(ends) == 4 and ends[-1].endswith("nothing left")
  # one cell: no stage still to come is of a kind that has run, so no estimate until the end
  assert all(line.endswith("the rest not estimated yet") for line in ends[:3]), ends
