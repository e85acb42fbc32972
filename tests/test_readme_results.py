"""README's results section is what ``benchmarks/readme_results.py`` renders from the committed JSON, and only that."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def generator():
  spec = importlib.util.spec_from_file_location("readme_results", REPO / "benchmarks" / "readme_results.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_readme_matches_the_committed_json(generator, capsys):
  """The check a stale README fails: README's results are exactly what the committed JSON renders to."""
  assert generator.main(["--check"]) == 0, capsys.readouterr().err


def test_a_changed_number_in_the_json_makes_the_readme_stale(generator, tmp_path, capsys):
  """The check can fail: one RMSE changed in a copy of the JSON changes the rendering, ``--check`` exits 1 naming
  the command that fixes it, and the rewrite puts the new number in the copy of README, between the markers only."""
  results = tmp_path / "results"
  shutil.copytree(REPO / "benchmarks" / "results", results, ignore=shutil.ignore_patterns("work", "*.png"))
  readme = tmp_path / "README.md"
  shutil.copy(REPO / "README.md", readme)
  path = results / "runs" / "digits_compare.json"
  data = json.loads(path.read_text())
  row = next(r for r in data["rows"] if r["method"] == "ld3" and r["solver"] == "ipndm" and r["nfe"] == 3)
  row["rmse"] = 0.98765
  path.write_text(json.dumps(data))
  args = ["--readme", str(readme), "--results-dir", str(results)]
  assert generator.main(args + ["--check"]) == 1
  assert "readme_results.py" in capsys.readouterr().err
  before = readme.read_text()
  assert generator.main(args) == 0 and generator.main(args + ["--check"]) == 0
  after = readme.read_text()
  assert "0.9877" in after and "0.9877" not in before
  start = before.index(generator.BEGIN)
  assert after[:start] == before[:start] and after.endswith(before[before.index(generator.END):])


def test_missing_and_quick_sources_and_missing_markers(generator, tmp_path):
  """A run without its JSON renders as one line naming the command that writes it; a --quick benchmark JSON is
  refused (a smoke run is not a result); a README without the markers is an error that shows them."""
  results = tmp_path / "results"
  (results / "runs").mkdir(parents=True)
  text = generator.render(results)
  assert "Not measured yet: `python -m mteo_jax.main --config=configs/digits.py:mteo" in text
  assert "| " not in text.split("### Shipped teachers")[0]      # no table without its JSON
  (results / "solver_error_vs_nfe.json").write_text(json.dumps({"setup": {"quick": True}, "results": {}}))
  with pytest.raises(ValueError, match="--quick run"):
    generator.render(results)
  with pytest.raises(ValueError, match="marker lines"):
    generator.splice("# README\n\nno markers\n", "text")
