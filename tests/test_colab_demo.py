"""launch/colab_demo.ipynb: saved without outputs, its install, settings and workdir cells do what their markdown
says, and the whole notebook runs headless in its quick setting (nbclient, a kernel on this interpreter, no network):
it shows the sample grid and the error table, and MTEO beats the plain solver on the held-out noise."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "launch" / "colab_demo.ipynb"
KERNEL_NAME = "mteo-colab-demo-test"
TIMEOUT_S = 900   # per cell; the quick setting's longest cell took 133 s on 2 CPU cores shared with other jobs


def load_notebook() -> nbformat.NotebookNode:
  return nbformat.read(NOTEBOOK, as_version=4)


def tagged_source(tag: str) -> str:
  """The source of the one code cell tagged ``tag``."""
  found = [c.source for c in load_notebook().cells if tag in c.get("metadata", {}).get("tags", [])]
  assert len(found) == 1, f"{len(found)} cells tagged {tag!r}"
  return found[0]


def test_the_notebook_is_valid_and_saved_without_outputs():
  nb = load_notebook()
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.cells[0].cell_type == "markdown" and "Colab" in nb.cells[0].source
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  assert nb.cells[-1].cell_type == "markdown"
  assert "python -m mteo_jax.main --config=configs/digits.py:mteo --workdir=" in nb.cells[-1].source


def test_the_install_cell_skips_installs_or_says_what_to_set(monkeypatch):
  """Installed: nothing happens. Not installed and no MTEO_JAX_SOURCE: an error naming it (no invented URL). With
  it: ``pip install`` of exactly that requirement."""
  source = tagged_source("install")
  calls = []
  monkeypatch.setattr(subprocess, "check_call", lambda args, **kw: calls.append(args))
  monkeypatch.delenv("MTEO_JAX_SOURCE", raising=False)
  exec(source, {})
  assert calls == []

  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "mteo_jax" else real_find_spec(name, *a))
  with pytest.raises(RuntimeError, match=r"MTEO_JAX_SOURCE is empty.*git clone <your repository URL>"):
    exec(source, {})
  assert calls == []
  monkeypatch.setenv("MTEO_JAX_SOURCE", "/content/mteo_jax")
  with pytest.raises(RuntimeError, match="still not importable"):   # find_spec still says no: restart the runtime
    exec(source, {})
  assert calls == [[sys.executable, "-m", "pip", "install", "-q", "/content/mteo_jax"]]


def test_the_full_setting_is_the_main_jobs_and_quick_is_chosen_by_the_variable(monkeypatch):
  """MTEO_DEMO_QUICK=0 gives configs/digits.py:mteo_full's mteo section at NFE 3 but for the solvers shown (the main
  job at its full sizes; README's first command is cut to fit 2 CPU cores), and LD3's defaults;
  "1" the quick setting; anything else is refused; unset, the backend decides (quick on this CPU)."""
  # configs/digits.py by path, as ``--config=configs/digits.py`` loads it.
  spec = importlib.util.spec_from_file_location("_config_digits", NOTEBOOK.parents[1] / "configs" / "digits.py")
  digits = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(digits)
  from mteo_jax import config_utils, experiment, methods  # noqa: PLC0415
  main_job = dataclasses.replace(
      config_utils.from_dict(experiment.MTEOExperimentConfig, digits.get_config("mteo_full")).mteo, nfes=(3,))
  source = tagged_source("parameters")

  def settings(value: str | None) -> dict:
    if value is None:
      monkeypatch.delenv("MTEO_DEMO_QUICK", raising=False)
    else:
      monkeypatch.setenv("MTEO_DEMO_QUICK", value)
    namespace = {"os": os}
    exec(source, namespace)
    return namespace

  full = settings("0")
  assert not full["QUICK"] and full["JOB"] == dataclasses.replace(main_job, solvers=("dpmpp_2m", "ipndm"))
  assert full["LD3_SETTINGS"] == methods.LD3Settings()
  quick = settings("1")
  assert quick["QUICK"] and quick["JOB"].num_train < main_job.num_train and quick["JOB"].steps < main_job.steps
  assert settings(None)["QUICK"]   # the tests run on a CPU
  with pytest.raises(ValueError, match='MTEO_DEMO_QUICK must be "1"'):
    settings("yes")


def test_the_workdir_cell_never_reuses_a_directory(monkeypatch, tmp_path):
  source = tagged_source("workdir")
  monkeypatch.setenv("MTEO_DEMO_WORKDIR", str(tmp_path / "new"))
  namespace = {"os": os}
  exec(source, namespace)
  assert namespace["WORKDIR"] == tmp_path / "new" and namespace["WORKDIR"].is_dir()
  (tmp_path / "new" / "results.json").write_text("{}")
  with pytest.raises(FileExistsError, match="not an empty directory"):
    exec(source, {"os": os})
  monkeypatch.delenv("MTEO_DEMO_WORKDIR")
  exec(source, namespace)
  assert namespace["WORKDIR"].is_dir() and not any(namespace["WORKDIR"].iterdir())   # a fresh temporary directory
  namespace["WORKDIR"].rmdir()


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
  return [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]


def test_the_notebook_runs_headless_in_its_quick_setting(monkeypatch, tmp_path):
  """The whole notebook in a kernel on this interpreter (its own kernelspec, so a fresh venv with ``.[test]`` is
  enough), quick setting, cwd a temporary directory, pip barred from the network: no cell errs, the sample grid and
  the table are shown, and MTEO's held-out RMSE (results.json) is below the plain solver's."""
  from ipykernel.kernelspec import install  # noqa: PLC0415
  from jupyter_client.kernelspec import KernelSpecManager  # noqa: PLC0415
  from jupyter_client.manager import KernelManager  # noqa: PLC0415
  from nbclient import NotebookClient  # noqa: PLC0415

  install(user=False, prefix=str(tmp_path / "kernel"), kernel_name=KERNEL_NAME)
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernel" / "share" / "jupyter" / "kernels")])
  assert specs.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
  workdir, cwd = tmp_path / "demo_workdir", tmp_path / "cwd"
  cwd.mkdir()
  # The kernel inherits this environment (tests/conftest.py's XLA_FLAGS included).
  monkeypatch.setenv("MTEO_DEMO_QUICK", "1")
  monkeypatch.setenv("MTEO_DEMO_WORKDIR", str(workdir))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PIP_NO_INDEX", "1")   # should the install cell ever reach pip, it cannot download
  monkeypatch.delenv("MTEO_JAX_SOURCE", raising=False)

  nb = load_notebook()
  client = NotebookClient(nb, km=KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs),
                          timeout=TIMEOUT_S, startup_timeout=120, resources={"metadata": {"path": str(cwd)}})
  client.execute()   # raises CellExecutionError, with the cell and its traceback, if a cell errs

  produced = outputs(nb)
  assert not [o for o in produced if o.output_type == "error"]
  text = "\n".join(o.get("text", "") for o in produced if o.output_type == "stream")
  assert "mteo_jax is already installed" in text and f"workdir: {workdir}" in text
  assert any("image/png" in o.get("data", {}) for o in produced), "no image in the outputs"
  tables = [o["data"]["text/markdown"] for o in produced if "text/markdown" in o.get("data", {})]
  assert len(tables) == 1, tables
  number = r"\d+\.\d{4}"
  for method in ("base", "mteo"):   # the quick setting leaves LD3 out (RUN_LD3)
    assert re.search(rf"^\| {method} \| dpmpp_2m \| 3 \| {number} \|", tables[0], re.M), (method, tables[0])

  results = json.loads((workdir / "results.json").read_text())
  rmse = {r["method"]: r["rmse"] for r in results["rows"] if r["solver"] == "dpmpp_2m"}
  assert results["demo"] == {"quick": True, "backend": "cpu"}
  print(f"quick setting, held-out RMSE (dpmpp_2m, NFE 3): {rmse}")
  assert set(rmse) == {"base", "mteo"} and rmse["mteo"] < rmse["base"], rmse
  assert all(f"| {method} | dpmpp_2m | 3 | {value:.4f} |" in tables[0] for method, value in rmse.items())
  assert (workdir / "samples.png").exists() and not list(cwd.iterdir())   # nothing written to the cwd
