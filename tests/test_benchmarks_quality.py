"""The quality and error-vs-NFE benchmarks (``benchmarks/quality.py``, ``benchmarks/error_vs_nfe.py``): their
``--quick`` forms end to end on the shipped gmm teacher, resuming from their work dir, and their options."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
  sys.path.insert(0, str(BENCHMARKS))   # the scripts import ``common`` (and ``quality``) from their folder
  if name in sys.modules:   # error_vs_nfe imports quality: one module object for both
    return sys.modules[name]
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quality():
  return _load("quality")


@pytest.fixture(scope="module")
def error_vs_nfe():
  return _load("error_vs_nfe")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
  """One work root for both scripts: they share its reference cache, as the full runs do."""
  return tmp_path_factory.mktemp("benchmarks")


def _cells(report: dict) -> set[tuple[str, str, int]]:
  return {(row["method"], row["solver"], row["nfe"]) for row in report["results"]["rows"]}


@pytest.fixture(scope="module")
def quality_quick(quality, work):
  """quality.py --quick (iPNDM only) into the shared work root, timed; then the same command again."""
  argv = ["--quick", "--solvers", "ipndm", "--no-progress", "--work-dir", str(work / "runs")]
  start = time.perf_counter()
  first = quality.main(argv + ["--out-dir", str(work / "out")])
  first_seconds = time.perf_counter() - start
  start = time.perf_counter()
  rerun = quality.main(argv + ["--out-dir", str(work / "out2")])
  return first, first_seconds, rerun, time.perf_counter() - start


def _key(row: dict) -> tuple[str, str, int]:
  return row["method"], row["solver"], row["nfe"]


def test_quality_quick_runs_and_a_rerun_resumes(quality, quality_quick, work):
  first, first_seconds, rerun, rerun_seconds = quality_quick
  report = json.loads((work / "out" / "quality.json").read_text())
  assert report == json.loads(json.dumps(first))
  assert (work / "out" / "quality.png").stat().st_size > 1000
  setup, results = report["setup"], report["results"]
  assert setup["quick"] and setup["teacher"] == "pretrained:gmm" and setup["methods"] == ["base", "mteo", "pd"]
  assert setup["budget"] == json.loads(json.dumps(dataclasses.asdict(quality.BUDGETS["quick"])))
  assert setup["jobs"]["pd"]["config"]["pd"]["start_steps"] == 8 and setup["jobs"]["pd"]["config"]["pd"][
      "steps"] == setup["budget"]["steps"] == setup["jobs"]["compare"]["config"]["mteo"]["steps"]
  assert setup["nfes"] == [3, 4] and setup["learned_nfes"] == [3] and sorted(setup["jobs"]) == [
      "compare", "compare_free", "pd"]
  # every asked cell has its row: base with iPNDM at NFE 3 and 4, MTEO at NFE 3; DDIM and PD's 4-step student
  assert _cells(report) == {("base", "ipndm", 3), ("base", "ipndm", 4), ("mteo", "ipndm", 3), ("base", "euler", 4),
                            ("pd", "euler", 4)}
  for row in results["rows"]:
    assert row["rmse"] > 0 and row["n_eval"] == setup["budget"]["num_eval"]
    assert (row["learn_seconds"] > 0) == (row["method"] != "base"), row
  assert results["teacher_row"]["method"] == "teacher" and set(results["best"]) == {"ipndm", "euler"}
  # both jobs scored the same noise against the same reference: one cache, and PD's job reused the teacher row
  shared = work / "runs" / "shared_references"
  assert len(list(shared.glob("reference-*.npz"))) >= 2
  assert (work / "runs" / "quality-quick" / "pd" / "references").resolve() == shared.resolve()
  # the rerun reloads every finished run and the cached references: the same numbers, faster
  assert rerun_seconds < first_seconds
  assert {_key(r): (r["rmse"], r["learn_seconds"]) for r in rerun["results"]["rows"]} == \
      {_key(r): (r["rmse"], r["learn_seconds"]) for r in results["rows"]}


def test_error_vs_nfe_quick_reports_the_matching_nfe(error_vs_nfe, quality_quick, work):
  out = work / "out_nfe"
  report = error_vs_nfe.main(["--quick", "--solvers", "ipndm", "--no-progress", "--out-dir", str(out),
                              "--work-dir", str(work / "runs")])
  assert json.loads((out / "error_vs_nfe.json").read_text()) == json.loads(json.dumps(report))
  assert (out / "error_vs_nfe.png").stat().st_size > 1000
  assert _cells(report) == {("base", "ipndm", 3), ("base", "ipndm", 4), ("base", "ipndm", 5), ("mteo", "ipndm", 3)}
  # the plain rows, stepped around one jitted denoiser, are the comparison job's base rows (jitted whole) to rounding;
  # MTEO at NFE 3 (same budget, noise and reference) is quality.py's row; the teacher row was quality.py's
  quality_rows = {_key(row): row for row in quality_quick[0]["results"]["rows"]}
  shared = [row for row in report["results"]["rows"] if _key(row) in quality_rows]
  assert len(shared) == 3
  for row in shared:
    assert row["rmse"] == pytest.approx(quality_rows[_key(row)]["rmse"], rel=1e-4), row
  teacher = json.loads((work / "runs" / "error_vs_nfe-quick" / "plain" / "results.json").read_text())["rows"][0]
  assert teacher["method"] == "teacher" and teacher["rmse"] == quality_quick[0]["results"]["teacher_row"]["rmse"]
  match, rmse = report["results"]["matching"]["mteo"], report["results"]["rmse"]
  target, plain = rmse["mteo"]["ipndm"]["3"], rmse["base"]["ipndm"]
  expected = next((int(n) for n in sorted(plain, key=int) if plain[n] <= target), None)
  assert match["nfe"] == 3 and match["best"] == {"solver": "ipndm", "rmse": target}
  entry = match["per_solver"]["ipndm"]
  assert entry["target_rmse"] == target and entry["first_nfe"] == entry["first_nfe_vs_best"] == expected
  assert entry["text"] == (f"NFE {expected}" if expected else "not within the NFEs measured (3-5)")


def test_the_matching_nfe_of_made_up_rows(error_vs_nfe):
  plain = {"a": {3: 0.5, 4: 0.3, 5: 0.2}, "b": {3: 0.4, 5: 0.35}}
  learned = {"a": {3: 0.3}, "b": {3: 0.2}}
  match = error_vs_nfe.matching(plain, learned, 3, (3, 4, 5))
  assert match["best"] == {"solver": "b", "rmse": 0.2}
  assert match["per_solver"]["a"]["first_nfe"] == 4 and match["per_solver"]["a"]["first_nfe_vs_best"] == 5
  assert match["per_solver"]["b"]["first_nfe"] is None
  assert match["per_solver"]["b"]["text"] == "not within the NFEs measured (3-5)"


@pytest.mark.parametrize("argv, message", [
    (["--methods", "base,dpm"], "--methods: unknown ['dpm']; valid: base, gits, ld3, indis, mteo, mteo_on_best, pd"),
    (["--solvers", "rk4"], "--solvers: unknown ['rk4']; valid: deis, dpmpp_2m"),
    (["--nfes", "0,3"], "--nfes: every NFE must be an integer >= 1"),
    (["--nfes", "3,x"], "--nfes: expected comma-separated integers"),
    (["--learned-nfes", "3,0"], "--learned-nfes: every NFE must be an integer >= 1"),
    (["--solvers", "heun", "--nfes", "3,5", "--learned-nfes", "4"], "heun cannot run at NFE 4"),
])
def test_quality_options_are_checked(quality, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    quality.parse_args(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--solvers", "euler,rk4"], "--solvers: unknown ['rk4']; valid: deis, dpmpp_2m, dpmpp_3m, euler, heun"),
    (["--learned", "mteo,pd"], "--learned: unknown ['pd']; valid: mteo, ld3, gits, indis, mteo_on_best"),
    (["--nfes", "-1"], "--nfes: every NFE must be an integer >= 1"),
    (["--learned-nfes", "0"], "--learned-nfes: every NFE must be an integer >= 1"),
    (["--solvers", "heun", "--nfes", "4,6"], "--nfes: no solver of ['heun'] reaches any of [4, 6]"),
])
def test_error_vs_nfe_options_are_checked(error_vs_nfe, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_info:
    error_vs_nfe.parse_args(argv)
  assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_defaults_cover_the_issue(quality, error_vs_nfe):
  """The full forms: every method but mteo_on_best (it does not fit the 30 minutes), two solvers, the training-free
  methods at NFE 3/4/5/8 and the trained ones at NFE 3, PD 16 -> 8 -> 4; every solver at NFE 3..12 with MTEO at NFE
  3."""
  args = quality.parse_args([])
  assert set(args.methods) == set(quality.METHODS) - {"mteo_on_best"} and args.solvers == ("ipndm", "dpmpp_2m")
  assert args.nfes == (3, 4, 5, 8) and args.learned_nfes == (3,) and quality.pd_steps(args.nfes) == (16, 4)
  assert quality.jobs(args.methods, args.nfes, args.learned_nfes) == [
      ("compare", ("base", "gits", "ld3", "indis", "mteo"), (3,)), ("compare_free", ("base", "gits"), (4, 5, 8))]
  assert quality.jobs(quality.METHODS, args.nfes, (3, 4, 5, 8))[1:] == []   # the whole grid: one comparison job
  config = quality.pd_config(quality.BUDGETS["full"], args.nfes, progress=False)
  assert tuple(config.compare.nfes) == (4, 8) and config.pd.steps == quality.BUDGETS["full"].steps
  args = error_vs_nfe.parse_args([])
  assert set(args.solvers) == set(error_vs_nfe.SOLVERS.names()) and args.nfes == tuple(range(3, 13))
  assert args.learned == ("mteo",) and args.learned_nfes == (3,)
  assert error_vs_nfe.reachable("heun", args.nfes) == (3, 5, 7, 9, 11)
