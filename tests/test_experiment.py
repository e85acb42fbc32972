"""The main job end to end on tiny teachers trained here: references, MTEO training, held-out evaluation, outputs."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from mteo_jax import experiment, mteo, train
from test_cli import load_config_file, run_cli

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
