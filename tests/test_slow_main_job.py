"""README's main job, in full (``-m slow``: about 4 minutes on 2 CPU cores; not in the default suite).

    python -m pytest -m slow tests/test_slow_main_job.py

It runs ``configs/digits.py:mteo`` on the shipped digits teacher exactly as README's first command does and checks
the claim README makes of it: on held-out noise, MTEO at NFE 3 cuts every solver's RMSE at least 1.9x (README:
1.96-2.48x) and lowers FD-digits, with the base rows equal to README's to 3 digits (they involve no training). Its wall
time is a benchmark's (``benchmarks/main_job.py``), not a test's.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

README_BASE_RMSE = {"dpmpp_2m": 0.2597, "ipndm": 0.3179}


@pytest.mark.slow
def test_readme_main_job_on_the_shipped_digits_teacher(tmp_path):
  # README's command as a user runs it: XLA's default (optimising) pipeline, no time limit below an hour.
  proc = subprocess.run([sys.executable, "-m", "mteo_jax.main", "--config=configs/digits.py:mteo",
                         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=3600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads((tmp_path / "results.json").read_text())["rows"]
  for solver, base_rmse in README_BASE_RMSE.items():
    base = next(r for r in rows if (r["method"], r["solver"], r["nfe"]) == ("base", solver, 3))
    tuned = next(r for r in rows if (r["method"], r["solver"], r["nfe"]) == ("mteo", solver, 3))
    assert base["rmse"] == pytest.approx(base_rmse, abs=1e-3), (solver, base["rmse"])
    assert tuned["rmse"] * 1.9 < base["rmse"], (solver, base["rmse"], tuned["rmse"])
    assert tuned["fd"] < base["fd"], (solver, base["fd"], tuned["fd"])
  assert (tmp_path / "samples.png").exists() and (tmp_path / "rmse_bars.png").exists()
