"""The timing benchmarks (benchmarks/cost.py, throughput.py, references.py): each --quick form end to end into a
temporary folder with the JSON keys README's generator reads, the options checked before any work, and the pieces
that turn measurements into numbers (the loop timing hook and its extrapolation, equal accuracy, phase shares) on
cases with known answers. The timings themselves are measurements, not asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import loop

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def _refused(module, argv, capsys, message):
  with pytest.raises(SystemExit) as error:
    module.parse_args(argv)
  assert error.value.code == 2
  assert message in capsys.readouterr().err


def _written(out: Path, name: str) -> dict:
  assert (out / f"{name}.png").stat().st_size > 1000
  payload = json.loads((out / f"{name}.json").read_text())
  assert payload["setup"]["quick"] is True
  assert {"load_average", "load_average_after", "cpu_count", "device", "jax", "wall_seconds"} <= set(payload["setup"])
  return payload


# --- throughput.py ---------------------------------------------------------------------------------------------------

def test_throughput_quick(tmp_path):
  out = tmp_path / "out"
  _load("throughput").main(["--quick", "--out-dir", str(out), "--no-progress"])
  payload = _written(out, "throughput")
  assert payload["setup"]["teachers"] == ["pretrained:gmm"] and payload["setup"]["batch_size"] == 16
  cells = payload["results"]["gmm"]
  assert set(cells) == {"ipndm"} and set(cells["ipndm"]) == {"3"}
  cell = cells["ipndm"]["3"]
  assert cell["num_steps"] == 3 and cell["batch_size"] == 16
  for variant in ("plain", "table", "indis"):
    entry = cell[variant]
    assert entry["samples_per_s"] > 0 and len(entry["all_ms"]) == 3 and entry["compile_seconds"] > 0
    assert entry["time_ratio"] == pytest.approx(entry["median_ms"] / cell["plain"]["median_ms"])
    assert entry["throughput_ratio"] == pytest.approx(1 / entry["time_ratio"])
  assert cell["plain"]["time_ratio"] == 1.0
  assert 0 < cell["phi"]["share_of_indis"] and cell["phi"]["num_params"] > 0


def test_throughput_options_are_checked(capsys):
  throughput = _load("throughput")
  args = throughput.parse_args(["--solvers", "euler", "--nfes", "3,8"])
  assert args.teachers == ["pretrained:digits", "pretrained:gmm"] and args.nfes == [3, 8] and not args.quick
  assert throughput.parse_args(["--quick", "--teachers", "pretrained:digits"]).teachers == ["pretrained:digits"]
  _refused(throughput, ["--solvers", "rk4"], capsys, "unknown solver 'rk4'")
  _refused(throughput, ["--solvers", "heun", "--nfes", "4"], capsys, "--nfes")
  _refused(throughput, ["--teachers", "pretrained:nope"], capsys, "no shipped teacher 'nope'")
  _refused(throughput, ["--batch-size", "0"], capsys, "--batch-size must be >= 1")
  _refused(throughput, ["--work-dir", "/tmp/x"], capsys, "keeps no runs or caches")


# --- cost.py ---------------------------------------------------------------------------------------------------------

def _tiny_task():
  arrays = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
  return loop.ArrayTask({"w": jnp.zeros((2,))}, lambda w, frozen, batch: jnp.mean((w["w"] - batch["x"]) ** 2),
                        arrays, batch_size=4, seed=0)


def test_cost_timing_hook_stops_a_loop_and_extrapolates_it(tmp_path):
  cost, original = _load("cost"), loop.fit
  config = loop.LoopConfig(steps=8, batch_size=4, log_every=2, checkpoint_every=100, progress=False)
  evaluated = []

  def learn(run_dir):
    return loop.fit(_tiny_task(), config, tmp_path / run_dir, seed=0, identity={}, eval_every=5,
                    eval_fn=lambda step, state: evaluated.append(step) or {"value": 1.0})

  with cost.measured_loops(3) as timings, pytest.raises(cost.StopMeasuring):
    learn("stopped")
  (timing,) = timings
  assert (timing.first_step, timing.last_step, timing.steps, timing.measure) == (1, 3, 8, 3)
  assert not timing.finished and evaluated == [3, 3]   # the full run evaluates: timed twice where it stopped
  assert timing.num_evals(8) == 2 and timing.step_seconds > 0 and timing.first_seconds > 0
  assert loop.fit is original   # the wrapper is gone afterwards
  entry = cost.timed_learner(lambda: learn("extrapolated"), 3)
  assert entry["extrapolated"] and entry["steps"] == 8 and entry["measured_steps"] == 3 and entry["num_evals"] == 2
  assert entry["seconds"] == pytest.approx(entry["setup_seconds"] + entry["compile_seconds"] + 8 * entry[
      "step_seconds"] + 2 * entry["eval_seconds"] + entry["eval_compile_seconds"])
  evaluated.clear()
  full = cost.timed_learner(lambda: learn("full"), 20)   # no more steps than measured: the whole run is timed
  assert not full["extrapolated"] and full["measured_steps"] == 8 and evaluated == [5, 8]
  assert full["seconds"] == full["measured_wall_seconds"] and full["extrapolation_check"] > 0
  assert isinstance(full["value"], loop.Result)


def test_cost_quick(tmp_path):
  out = tmp_path / "out"
  _load("cost").main(["--quick", "--out-dir", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"])
  payload = _written(out, "cost")
  setup, results = payload["setup"], payload["results"]
  assert setup["teacher"] == "pretrained:gmm" and setup["solvers"] == ["ipndm"] and setup["measure_steps"] == 3
  teacher = results["teacher"]
  assert teacher["extrapolated"] and teacher["steps"] == teacher["recorded_steps"] == 20000
  assert teacher["measured_steps"] == 3 and teacher["seconds"] > teacher["compile_seconds"] > 0
  assert results["references"]["train_seconds"] > 0 and results["references"]["num_train"] == 64
  assert set(results["methods"]) == {"gits", "mteo", "pd"}
  for method, by_solver in results["methods"].items():
    (entry,) = by_solver.values()
    assert entry["seconds"] > 0 and entry["ratio_to_teacher"] == pytest.approx(entry["seconds"] / teacher["seconds"])
    assert entry["seconds_with_references"] >= entry["seconds"]
    assert entry["extrapolated"] == (method != "gits"), method
  gits = results["methods"]["gits"]["ipndm"]
  assert gits["kind"] == "search" and gits["reference_seconds"] > 0 and gits["num_warmup"] == 16
  mteo = results["methods"]["mteo"]["ipndm"]
  assert mteo["steps"] == 300 and mteo["num_evals"] == 3 and mteo["settings"]["batch_size"] == 32
  pd = results["methods"]["pd"]["euler"]
  assert pd["rounds"] == 6 and pd["steps"] == 6 * pd["steps_per_round"] and pd["students"][-1] == 1


def test_cost_options_are_checked(capsys):
  cost = _load("cost")
  args = cost.parse_args(["--solvers", "ipndm"])
  assert args.config.endswith("configs/digits.py") and args.measure_steps == 30 and args.num_train == 1024
  assert args.num_eval == 256 and args.methods == list(cost.METHODS)
  _refused(cost, ["--methods", "mteo,rk"], capsys, "--methods: unknown ['rk']")
  _refused(cost, ["--measure-steps", "1"], capsys, "--measure-steps must be >= 2")
  _refused(cost, ["--solvers", "rk4"], capsys, "unknown solver 'rk4'")
  _refused(cost, ["--config", "configs/nope.py"], capsys, "is not a file")
  _refused(cost, ["--num-train", "80"], capsys, "ld3.num_train=100 exceeds compare.num_train=80")


# --- references.py ---------------------------------------------------------------------------------------------------

def test_references_quick(tmp_path):
  out = tmp_path / "out"
  _load("references").main(["--quick", "--out-dir", str(out), "--work-dir", str(tmp_path / "work"), "--no-progress"])
  payload = _written(out, "references")
  accuracy, job = payload["results"]["accuracy"], payload["results"]["main_job"]
  assert accuracy["solver"] == "tsit5" and accuracy["default_rtol"] == "1e-05"
  assert set(accuracy["adaptive"]) == {"0.001"} and set(accuracy["heun"]) == {"4", "8", "16", "32", "64"}
  adaptive = accuracy["adaptive"]["0.001"]
  assert adaptive["rmse"] > 0 and adaptive["mean_nfe"] > 10 and adaptive["seconds_per_sample"] > 0
  heun = [accuracy["heun"][n]["rmse"] for n in ("4", "8", "16", "32", "64")]
  assert all(b < a for a, b in zip(heun, heun[1:])), heun   # Heun converges to the tight reference
  equal = accuracy["equal_accuracy"]["0.001"]
  assert equal["heun_nfe"] == pytest.approx(2 * equal["heun_steps"] - 1)
  assert equal["nfe_ratio"] == pytest.approx(equal["heun_nfe"] / adaptive["mean_nfe"])
  assert job["source"].startswith("ran in-process: configs/gmm.py:mteo") and job["rows"] >= 3
  assert {"references", "training", "evaluation"} <= set(job["phases"])
  assert sum(job["shares"].values()) == pytest.approx(1 - job["unaccounted_seconds"] / job["total_seconds"])


def test_references_phase_shares_read_whatever_phases_there_are(tmp_path, capsys):
  references = _load("references")
  results = {"rows": [{}], "timings": {"phases": {"references": 30.0, "warp": 10.0, "training": 50.0},
                                       "total_seconds": 100.0}}
  shares = references.phase_shares(results)
  assert shares["shares"] == {"references": 0.3, "warp": 0.1, "training": 0.5}
  assert shares["unaccounted_seconds"] == pytest.approx(10.0)
  with pytest.raises(KeyError, match="no timings"):
    references.phase_shares({"rows": []})
  path = tmp_path / "results.json"
  path.write_text(json.dumps(results))
  args = references.parse_args(["--main-results", str(path)])
  assert references.main_job(args)["phases"] == results["timings"]["phases"]
  path.write_text(json.dumps({"rows": []}))
  assert "no timings" in references.main_job(args)["timings_missing"]
  _refused(references, ["--main-results", str(tmp_path / "nope.json")], capsys, "is not a file")
  _refused(references, ["--tight-tolerance", "1e-3"], capsys, "must be > 0 and below every --tolerances")
  _refused(references, ["--heun-steps", "8"], capsys, "at least two distinct step counts")
  _refused(references, ["--main-config", "configs/digits.py:nope"], capsys, "unknown variant 'nope'")
  _refused(references, ["--main-config", "configs/digits.py:compare"], capsys, "the main job is mode 'mteo'")


def test_equal_accuracy_on_a_second_order_solver():
  """Heun's error c / N^2 and time proportional to N: the N matching a target error is exact on the log-log line,
  inside the measured range and beyond it (flagged)."""
  references = _load("references")
  heun = {str(n): {"steps": n, "nfe": 2 * n - 1, "rmse": 1.0 / n ** 2, "seconds_per_sample": 0.01 * n}
          for n in (8, 16, 32)}
  adaptive = {"1e-05": {"rmse": 1.0 / 20 ** 2, "mean_nfe": 13.0, "seconds_per_sample": 0.1},
              "1e-06": {"rmse": 1.0 / 64 ** 2, "mean_nfe": 20.0, "seconds_per_sample": 0.2}}
  out = references.equal_accuracy(adaptive, heun)
  inside, beyond = out["1e-05"], out["1e-06"]
  assert inside["bracketed"] and inside["heun_steps"] == pytest.approx(20.0)
  assert inside["heun_nfe"] == pytest.approx(39.0) and inside["nfe_ratio"] == pytest.approx(3.0)
  assert inside["time_ratio"] == pytest.approx(2.0)
  assert inside["smallest_measured"]["steps"] == 32 and inside["smallest_measured"]["time_ratio"] == pytest.approx(3.2)
  assert not beyond["bracketed"] and beyond["heun_steps"] == pytest.approx(64.0)
  assert beyond["smallest_measured"] is None


# --- main_job.py -----------------------------------------------------------------------------------------------------

def test_main_job_quick_runs_the_command_line_and_keeps_runs_it_does_not_repeat(tmp_path, capsys):
  """--quick: the gmm main job at tiny sizes through the real command line on an empty work directory; the entry
  holds the wall time (start-up included, so above the job's own), the job's phases and rows; --fresh drops an
  earlier JSON's entries, and without it a run of the other name keeps them (and the speed-up is computed); README's
  section renders from it; bad options are refused before any work."""
  main_job = _load("main_job")
  out, work = tmp_path / "out", tmp_path / "work"
  out.mkdir()
  (out / "main_job.json").write_text(json.dumps({"setup": {"quick": True}, "results": {"runs": {"full": {}}}}))
  main_job.main(["--quick", "--runs", "main", "--fresh", "--out-dir", str(out), "--work-dir", str(work),
                 "--no-progress"])
  payload = _written(out, "main_job")
  assert set(payload["results"]["runs"]) == {"main"}   # --fresh: the earlier "full" entry is gone
  entry = payload["results"]["runs"]["main"]
  assert entry["command"].startswith("python -m mteo_jax.main --config=configs/gmm.py:mteo ")
  assert entry["wall_seconds"] > entry["job_seconds"] > 0 and entry["start_up_seconds"] > 0
  assert {"references", "training", "evaluation"} <= set(entry["phases"])
  assert [(r["method"], r["solver"], r["nfe"]) for r in entry["rows"]][-2:] == [("base", "euler", 3),
                                                                                ("mteo", "euler", 3)]
  assert (work / "main_job-quick" / "main" / "results.json").exists() and "speed_up" not in payload["results"]
  main_job.main(["--quick", "--runs", "full", "--out-dir", str(out), "--work-dir", str(work), "--no-progress"])
  payload = _written(out, "main_job")
  assert payload["results"]["runs"]["main"] == entry and payload["setup"]["kept"] == ["main"]
  full = payload["results"]["runs"]["full"]
  assert payload["results"]["speed_up"] == pytest.approx(full["wall_seconds"] / entry["wall_seconds"])
  assert "--config.mteo.nfes=(3,)" in full["command"] and "configs/gmm.py:mteo_full" in full["command"]
  sys.path.insert(0, str(BENCHMARKS))
  import readme_results  # noqa: PLC0415
  assert "Not measured yet: `python benchmarks/main_job.py`" in "\n".join(readme_results.main_job_section(work))
  payload["setup"]["quick"] = False   # the renderer refuses quick runs; render this one as if it were full
  (out / "main_job.json").write_text(json.dumps(payload))
  section = "\n".join(readme_results.main_job_section(out))
  assert "| `main` | `python -m mteo_jax.main --config=configs/gmm.py:mteo " in section
  assert f"{payload['results']['speed_up']:.1f}x less than the same job at the full sizes" in section
  _refused(main_job, ["--runs", "main,nope"], capsys, "unknown run(s) ['nope']")
