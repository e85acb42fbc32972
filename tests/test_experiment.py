"""The main job end to end on tiny teachers trained here: references, MTEO training, held-out evaluation, outputs."""

import json
import os
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mteo_jax import experiment, mteo, train
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
  config.mteo.update({"teacher": os.fspath(teacher), "solvers": ("euler", "dpmpp_2m"), "steps": 40,
                      "batch_size": 32, "num_train": 128, "num_eval": 64, "eval_batch_size": 32, "eval_every": 20,
                      "checkpoint_every": 20, "teacher_steps": 4, "grid_size": 8, "learning_rate": 2e-2,
                      "progress": False, **overrides})
  config.mteo.reference = ml_collections.ConfigDict({"solver": "tsit5", "rtol": 1e-3, "atol": 1e-3,
                                                     "batch_size": 64})
  return config


def test_main_job_on_an_image_teacher(digits_teacher, tmp_path):
  results = experiment.run_mteo(_job_config("digits", digits_teacher), tmp_path)
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  assert {"teacher", "config", "seed"} <= set(on_disk)
  methods = [(r["method"], r["solver"], r["nfe"]) for r in on_disk["rows"]]
  assert ("teacher", "heun", 7) in methods
  for solver in ("euler", "dpmpp_2m"):
    base = next(r for r in on_disk["rows"] if r["method"] == "base" and r["solver"] == solver)
    tuned = next(r for r in on_disk["rows"] if r["method"] == "mteo" and r["solver"] == solver)
    assert REQUIRED <= set(base) and REQUIRED <= set(tuned)
    assert base["n_eval"] == tuned["n_eval"] == 64
    assert tuned["fd_name"] == "FD-digits" and np.isfinite(tuned["fd"])
    assert tuned["train_seconds"] > 0 and base["train_seconds"] == 0
    assert tuned["rmse"] < base["rmse"], (solver, base["rmse"], tuned["rmse"])  # held-out noise
    assert tuned["held_out_curve"]["rmse"][-1] < tuned["held_out_curve"]["rmse"][0] * 1.0001
  assert Image.open(tmp_path / "samples.png").size[0] > 100
  assert Image.open(tmp_path / "rmse_bars.png").size[0] > 100
  # The saved table belongs to this teacher, solver and NFE only.
  table, meta = mteo.load_table(str(tmp_path / "tables" / "euler_nfe3"), teacher_hash=results["teacher"]["identity"],
                                solver_name="euler", nfe=3)
  assert meta["granularity"] == "layer" and mteo.table_nfe(table) == 3
  with pytest.raises(ValueError, match="solver: table has 'euler', expected 'heun'"):
    mteo.load_table(str(tmp_path / "tables" / "euler_nfe3"), teacher_hash=results["teacher"]["identity"],
                    solver_name="heun", nfe=3)
  # A second run reuses the cached references and the finished checkpoints: same table, nothing retrained.
  again = experiment.run_mteo(_job_config("digits", digits_teacher), tmp_path)
  assert [r["rmse"] for r in again["rows"] if r["method"] == "mteo"] == \
      [r["rmse"] for r in results["rows"] if r["method"] == "mteo"]


def test_main_job_refuses_a_missing_teacher(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    experiment.run_mteo(_job_config("gmm", tmp_path / "nowhere"), tmp_path)
  with pytest.raises(FileNotFoundError, match="no shipped teacher 'nope'"):
    experiment.resolve_teacher("pretrained:nope")
  assert experiment.resolve_teacher("pretrained:digits").exists()


def test_shipped_gmm_teacher_main_job(tmp_path):
  """The GMM path: scatter pictures, sliced Wasserstein and the exact mixture log-likelihood."""
  results = experiment.run_mteo(_job_config("gmm", "pretrained:gmm", grid_size=64, steps=30), tmp_path)
  tuned = next(r for r in results["rows"] if r["method"] == "mteo" and r["solver"] == "euler")
  assert {"sliced_wasserstein", "log_likelihood"} <= set(tuned) and "fd" not in tuned
  assert (tmp_path / "samples_euler_MTEO.png").exists() and (tmp_path / "samples_reference.png").exists()


def test_sampling_time_benchmark_runs(tmp_path):
  """A smoke run of benchmarks/mteo_sampling_time.py (the ratio itself is a measurement, not asserted here)."""
  import importlib.util  # noqa: PLC0415
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                      "mteo_sampling_time.py")
  spec = importlib.util.spec_from_file_location("mteo_sampling_time", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  payload = module.main(["--quick", "--out-dir", os.fspath(tmp_path)])
  on_disk = json.loads((tmp_path / "mteo_sampling_time.json").read_text())
  assert set(on_disk["results"]) == {"euler", "dpmpp_2m"} == set(payload["results"])
  assert all(r["ratio"] > 0 for r in on_disk["results"].values())
  assert (tmp_path / "mteo_sampling_time.png").exists()


# --- pictures for every data shape, and a picture that fails loses nothing ------------------------------------------

# The mixture: 16-D, 12 components, the whole data.options dict overridden (configs/gmm.py's tiny teacher).
MIXTURE_16D = "{'mixture': 'random', 'num_components': 12, 'dim': 16, 'num_samples': 2048, 'seed': 0}"


def _tiny_mteo(**overrides) -> str:
  """A whole ``--config.mteo`` dict of tiny settings (configs/gmm.py:mteo sets only a few keys, and a flag can only
  override keys the variant has); the teacher is then set by ``--config.mteo.teacher``, as in the issue."""
  job = {"teacher": "pretrained:gmm", "solvers": ("euler", "dpmpp_2m"), "nfes": (3,), "steps": 20, "batch_size": 32,
         "num_train": 64, "num_eval": 64, "eval_batch_size": 32, "eval_every": 10, "checkpoint_every": 20,
         "teacher_steps": 4, "grid_size": 64, "learning_rate": 2e-2, "progress": False,
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


def test_main_job_on_a_16d_mixture_through_the_cli(gmm16_teacher, tmp_path):
  """The issue's scenario at tiny size: results, and a PCA picture per row instead of a plotting error."""
  # Teacher training drew its 16-D samples too (a projection, not skipped).
  assert _is_image(gmm16_teacher / "samples" / "step_0000040.png")
  run_cli("--config=configs/gmm.py:mteo", f"--workdir={tmp_path}", _tiny_mteo(),
          f"--config.mteo.teacher={gmm16_teacher / 'teacher'}")
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["teacher"]["dataset"] == "gmm" and "picture_errors" not in results
  rows = {(r["method"], r["solver"], r["nfe"]): r for r in results["rows"]}
  assert {("teacher", "heun", 7), ("base", "euler", 3), ("mteo", "euler", 3), ("base", "dpmpp_2m", 3),
          ("mteo", "dpmpp_2m", 3)} <= set(rows)
  for solver in ("euler", "dpmpp_2m"):
    base, tuned = rows[("base", solver, 3)], rows[("mteo", solver, 3)]
    assert REQUIRED <= set(tuned) and base["n_eval"] == tuned["n_eval"] == 64
    assert np.isfinite(tuned["log_likelihood"]) and np.isfinite(tuned["sliced_wasserstein"])
    assert tuned["rmse"] < base["rmse"], (solver, base["rmse"], tuned["rmse"])
    assert (tmp_path / "tables" / f"{solver}_nfe3").is_dir()
  for name in ("reference", "euler", "euler_MTEO", "dpmpp_2m", "dpmpp_2m_MTEO"):
    assert _is_image(tmp_path / f"samples_{name}.png"), name
  assert _is_image(tmp_path / "rmse_bars.png")


# The CLI with one picture broken: viz.save_samples_picture monkeypatched in the job's own process (a subprocess, as
# run_cli, for XLA's cheap compile flags).
_BROKEN_PICTURE_MAIN = """
from absl import app
from mteo_jax import main, viz
drawn = viz.save_samples_picture
def fail_one(samples, path, **kwargs):
  if path.name == "samples_euler_MTEO.png":
    raise RuntimeError("the plotting library broke")
  return drawn(samples, path, **kwargs)
viz.save_samples_picture = fail_one
app.run(main.main)
"""


def test_a_picture_that_fails_loses_nothing(gmm16_teacher, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  proc = subprocess.run([sys.executable, "-c", _BROKEN_PICTURE_MAIN, "--config=configs/gmm.py:mteo",
                         f"--workdir={tmp_path}", _tiny_mteo(solvers=("euler",), steps=10),
                         f"--config.mteo.teacher={gmm16_teacher / 'teacher'}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]   # the job finishes
  assert "picture samples_euler_MTEO.png not drawn: RuntimeError: the plotting library broke" in proc.stderr
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["picture_errors"] == {"samples_euler_MTEO.png": "RuntimeError: the plotting library broke"}
  assert [(r["method"], r["solver"]) for r in results["rows"]] == [("teacher", "heun"), ("base", "euler"),
                                                                  ("mteo", "euler")]
  assert all(np.isfinite(r["rmse"]) for r in results["rows"])
  assert (tmp_path / "tables" / "euler_nfe3").is_dir()
  assert not (tmp_path / "samples_euler_MTEO.png").exists()
  for name in ("samples_reference.png", "samples_euler.png", "rmse_bars.png"):
    assert _is_image(tmp_path / name), name


@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (16,), (4, 5), (8, 8, 1), (8, 8, 3), (8, 8, 2), (8, 8, 4)])
def test_main_job_pictures_for_every_data_shape(tmp_path, shape):
  rng = np.random.default_rng(0)
  grid_rows = {name: rng.uniform(-1, 1, size=(12,) + shape).astype(np.float32)
               for name in ("reference", "euler", "euler + MTEO")}
  rows = [{"method": "base", "solver": "euler", "nfe": 3, "rmse": 0.3},
          {"method": "mteo", "solver": "euler", "nfe": 3, "rmse": 0.1}]
  job = experiment.MTEOJobConfig(teacher="unused")
  assert experiment._pictures(tmp_path, grid_rows, rows, job) == {}
  names = ["samples.png"] if len(shape) == 3 else ["samples_reference.png", "samples_euler.png",
                                                    "samples_euler_MTEO.png"]
  for name in names + ["rmse_bars.png"]:
    assert _is_image(tmp_path / name), name
  # Every picture is drawn on its own: with the bars broken (no rows), the samples are still there.
  for name in names:
    (tmp_path / name).unlink()
  errors = experiment._pictures(tmp_path, grid_rows, [], job)
  assert list(errors) == ["rmse_bars.png"] and "ValueError" in errors["rmse_bars.png"]
  assert all(_is_image(tmp_path / name) for name in names)


@pytest.mark.parametrize("overrides, error, match", [
    ({"solvers": ("heun",), "nfes": (4,)}, ValueError, r"'heun' cannot make exactly 4 network evaluations; nearest "
                                                       r"reachable NFE: 3 \(N=2\) or 5 \(N=3\)"),
    ({"lr_schedule": "cosin"}, ValueError, r"unknown mteo.lr_schedule 'cosin'; expected one of \['constant', 'cosine'\]"),
    ({"solvers": ("dpm_2m",)}, KeyError, r"unknown solver 'dpm_2m'; expected one of"),
    ({"distance": "l3"}, KeyError, r"unknown MTEO loss 'l3'"),
    ({"granularity": "block"}, ValueError, r"unknown mteo.granularity 'block'"),
    ({"schedule": "karras"}, KeyError, r"unknown schedule 'karras'"),
    ({"grid_size": 0}, ValueError, r"mteo.grid_size must be >= 1"),
    ({"learning_rate": 0.0}, ValueError, r"mteo.learning_rate must be > 0"),
    ({"reference": {"solver": "rk4"}}, KeyError, r"unknown reference solver 'rk4'"),
])
def test_bad_settings_fail_before_any_work(tmp_path, overrides, error, match):
  """Every setting is checked when the job's config is read: nothing is solved, trained or written first."""
  config = load_config_file("digits").get_config("mteo")
  reference = overrides.pop("reference", None)
  config.mteo.update(overrides)
  if reference is not None:
    config.mteo.reference = ml_collections.ConfigDict(reference)
  start = time.perf_counter()
  with pytest.raises(error, match=match):
    experiment.run_mteo(config, tmp_path)
  assert time.perf_counter() - start < 5.0
  assert not (tmp_path / "references").exists() and not (tmp_path / "results.json").exists()
