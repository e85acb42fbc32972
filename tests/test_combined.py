"""MTEO combined with GITS, LD3 and INDIS (``methods.combined``) and the comparison mode (``mteo_jax.comparison``).

One tiny comparison on the shipped GMM teacher runs every method through ``modes.run``; the tests read its results,
run directories and artefacts. Quality is measured in README's runs; here: every learner's loss falls, MTEO in
sequence trains on its schedule method's own grid, ``mteo_on_best`` takes the schedule its selection ranks first and
reuses that run, artefacts reload only for their own teacher, solver and NFE, and bad configs fail before any work.
"""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from mteo_jax import comparison, main, modes
from mteo_jax.methods import METHODS, ScheduledMTEO, load_combined

METHODS_RUN = ("base", "gits", "ld3", "indis", "mteo", "mteo_on_gits", "mteo_on_ld3", "mteo_on_indis", "mteo_on_best",
               "mteo_joint_ld3", "mteo_joint_indis")


def tiny_config(**compare):
  config = modes.base_config("compare")
  config.compare.update({"teacher": "pretrained:gmm", "methods": METHODS_RUN, "solvers": ("ipndm",), "nfes": (3,),
                         "num_train": 64, "num_eval": 64, "eval_batch_size": 64, "teacher_steps": 3,
                         "grid_size": 16, "progress": False, "num_select": 32, **compare})
  config.mteo.update({"steps": 12, "batch_size": 16, "warmup_steps": 2, "log_every": 4, "checkpoint_every": 12,
                      "eval_every": 0, "progress": False})
  config.ld3.update({"steps": 12, "num_train": 40, "batch_size": 8, "eval_every": 6, "log_every": 4,
                     "checkpoint_every": 12, "progress": False})
  config.indis.update({"steps": 12, "batch_size": 16, "hidden": 16, "warmup_steps": 2, "log_every": 4,
                       "checkpoint_every": 12, "progress": False})
  config.gits.update({"fine_grid_size": 13, "num_warmup": 32})
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compare")
  results = main.run(tiny_config(), workdir)   # what the CLI runs once its flags are read
  return workdir, results, {row["method"]: row for row in results["rows"]}


def test_every_method_is_scored_and_every_learner_learns(run):
  workdir, results, rows = run
  assert set(METHODS_RUN) | {"teacher"} <= set(rows)
  for name in METHODS_RUN:
    assert np.isfinite(rows[name]["rmse"]) and rows[name]["solver"] == "ipndm" and rows[name]["nfe"] == 3
  for name in ("ld3", "indis", "mteo", "mteo_on_gits", "mteo_on_ld3", "mteo_on_indis", "mteo_joint_ld3",
               "mteo_joint_indis"):
    losses = rows[name]["loss_curve"]["loss"]
    assert np.mean(losses[-2:]) < losses[0], (name, losses)
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  assert (workdir / "schedules.png").stat().st_size > 0 and "picture_errors" not in results


def test_a_sequence_trains_the_table_on_its_schedule_methods_grid(run):
  """MTEO on GITS or LD3 trains on exactly the schedule that method found (its run reports it), learning time counts
  both; MTEO on INDIS keeps INDIS's per-sample spread; the joint runs learn a grid of their own."""
  workdir, _, rows = run
  for name in ("gits", "ld3"):
    combined = rows[f"mteo_on_{name}"]
    assert combined["schedule"]["sigmas"] == rows[name]["schedule"]["sigmas"]
    assert combined["schedule_from"] == name
    assert combined["train_seconds"] == pytest.approx(combined["table_seconds"] + rows[name]["train_seconds"])
    metadata = json.loads((workdir / "tables" / f"mteo_on_{name}_ipndm_nfe3" / "metadata.json").read_text())
    assert metadata["sigmas"] == pytest.approx(rows[name]["schedule"]["sigmas"])
  assert rows["mteo_on_indis"]["schedule"] == rows["indis"]["schedule"]
  for name in ("mteo_joint_ld3", "mteo_joint_indis"):
    sigmas = np.asarray(rows[name]["schedule"]["sigmas"])
    assert sigmas[0] == rows["base"]["schedule"]["sigmas"][0] and np.all(np.diff(sigmas) < 0)
    assert not np.allclose(sigmas, rows["base"]["schedule"]["sigmas"])   # the joint schedule moved
  quantiles = rows["mteo_joint_indis"]["schedule"]["quantiles"]
  assert np.all(np.asarray(quantiles["95"]) >= np.asarray(quantiles["5"]))


def test_mteo_on_best_takes_the_schedule_its_selection_ranks_first_and_reuses_that_run(run):
  workdir, _, rows = run
  best = rows["mteo_on_best"]
  selection = best["selection_rmse"]
  assert set(selection) == {"gits", "ld3", "indis"}
  chosen = min(selection, key=selection.get)
  assert best["schedule_from"] == chosen
  assert best["rmse"] == rows[f"mteo_on_{chosen}"]["rmse"]
  assert not (workdir / "mteo_on_best").exists()   # the chosen sequence's run, not a second training


def test_a_rerun_resumes_every_run_and_adding_a_method_is_harmless(run):
  """Another run of the experiment (other methods) trains nothing that is finished, gives the same rows and keeps the
  earlier rows in results.json; a changed learning setting is refused at once, naming it."""
  workdir, _, rows = run
  metrics = {name: (workdir / name / "ipndm_nfe3" / "metrics.jsonl").read_text()
             for name in ("ld3", "indis", "mteo", "mteo_joint_ld3")}
  again = modes.run(tiny_config(methods=("base", "ld3", "mteo_joint_ld3", "mteo", "mteo_on_best")), workdir)
  for row in again["rows"]:
    if row["method"] in ("ld3", "mteo_joint_ld3", "mteo"):
      assert row["rmse"] == rows[row["method"]]["rmse"] and row["train_seconds"] == rows[row["method"]]["train_seconds"]
  for name, text in metrics.items():
    assert (workdir / name / "ipndm_nfe3" / "metrics.jsonl").read_text() == text
  # results.json keeps the first run's rows beside the second's: one row per (method, solver, NFE).
  saved = json.loads((workdir / "results.json").read_text())["rows"]
  keys = [(row["method"], row["solver"], row["nfe"]) for row in saved]
  assert len(keys) == len(set(keys)) and set(METHODS_RUN) <= {row["method"] for row in saved}
  config = tiny_config()
  config.ld3.steps = 13
  with pytest.raises(modes.ConfigError, match="ld3.steps"):
    modes.run(config, workdir)


def test_artefacts_reload_for_their_own_run_only(run):
  workdir, _, _ = run
  teacher = types.SimpleNamespace(identity=json.loads((workdir / "results.json").read_text())["teacher"]["identity"])
  for name in ("mteo_on_indis", "mteo_joint_ld3", "mteo_joint_indis"):
    path = workdir / "schedules" / f"{name}_ipndm_nfe3"
    arrays, metadata = load_combined(path, teacher, method=name, solver_name="ipndm", nfe=3)
    assert metadata["method"] == name and "table" in arrays["trainable"]
    assert all(leaf.shape[0] == 3 for leaf in arrays["trainable"]["table"].values())   # one row per evaluation
    with pytest.raises(ValueError, match="belongs to another run: nfe"):
      load_combined(path, teacher, method=name, solver_name="ipndm", nfe=4)
    with pytest.raises(ValueError, match="belongs to another run: solver"):
      load_combined(path, teacher, method=name, solver_name="dpmpp_2m", nfe=3)
  jax.tree.map(np.testing.assert_array_equal, *(
      load_combined(workdir / "schedules" / "mteo_on_indis_ipndm_nfe3", teacher, method="mteo_on_indis",
                    solver_name="ipndm", nfe=3)[0]["phi"],
      load_combined(workdir / "schedules" / "indis_ipndm_nfe3", teacher, method="indis", solver_name="ipndm",
                    nfe=3)[0]))


@pytest.mark.parametrize("change, message", [
    ({"compare.methods": ("base", "dpm")}, "unknown method 'dpm'"),
    ({"compare.methods": ("base", "base")}, "lists a method twice"),
    ({"compare.methods": ("base", "gits", "mteo", "indis")}, r"ld3\.steps.*no method"),
    ({"compare.methods": ("base", "mteo_on_ld3", "gits")}, r"indis\.hidden.*no method"),
    ({"ld3.num_train": 100}, "ld3.num_train=100 exceeds compare.num_train=64"),
    ({"indis.batch_size": 128}, "indis.batch_size=128 exceeds"),
    ({"gits.fine_grid_size": 3}, "gits.fine_grid_size=3 allows at most 2 steps"),
    ({"compare.teacher": "pretrained:nope"}, "nope"),
    ({"compare.nfes": (3, 0)}, "(?i)nfe"),
    ({"compare.rho": float("inf")}, "rho must be finite"),
    ({"compare.rho": 1e30}, "rho must be finite, > 0 and <= 1000"),
    ({"gits.rho": float("nan")}, "gits.rho must be finite"),
])
def test_bad_configs_fail_before_any_work(tmp_path, change, message):
  config = tiny_config()
  for key, value in change.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(modes.ConfigError, match=message):
    modes.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_narrowing_the_methods_of_a_variant_keeps_its_sizes_of_the_unread_sections():
  """Given the keys set on the command line (``main`` passes them), a section that the variant sized but no listed
  method reads is kept as it is (the experiment's identity does not change); a command-line key in such a section is
  still an error, and without the keys any change from the defaults is."""
  config = tiny_config(methods=("base", "gits"))   # the variant sized mteo, ld3 and indis
  with pytest.raises(modes.ConfigError, match=r"the mteo section is changed \(mteo\.batch_size.*no method"):
    modes.parse(config)
  _, typed = modes.parse(config, {"compare.methods"})
  assert typed.ld3.steps == 12 and typed.compare.methods == ("base", "gits")
  with pytest.raises(modes.ConfigError, match=r"the ld3 section is changed \(ld3\.steps\) but no method"):
    modes.parse(config, {"compare.methods", "ld3.steps", "gits.num_warmup"})
  modes.parse(tiny_config(), {"ld3.steps"})   # read by a listed method


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "results.txt"
  path.write_text("kept")
  with pytest.raises(modes.ConfigError, match="is not a directory"):
    modes.run(tiny_config(), path)
  assert path.read_text() == "kept"


def test_the_orders_and_schedules_are_checked():
  with pytest.raises(ValueError, match="no joint form"):
    ScheduledMTEO("gits", "joint")
  with pytest.raises(ValueError, match="unknown order"):
    ScheduledMTEO("ld3", "parallel")
  with pytest.raises(ValueError, match="unknown schedule"):
    ScheduledMTEO("amed")
  assert {"mteo_on_gits", "mteo_on_ld3", "mteo_on_indis", "mteo_on_best", "mteo_joint_ld3",
          "mteo_joint_indis"} <= set(METHODS.names())
  assert set(comparison.SECTIONS) <= set(METHODS.names())
