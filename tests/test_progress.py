"""Job progress in stages (``mteo_jax.progress``): "[k/n]" lines, the ETA from the finished stages of each kind, the
"still working" line after a silent stretch only; and the training loop's rate and ETA without its compiling step."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging

from mteo_jax import loop
from mteo_jax.progress import JobProgress


def _progress(**kwargs):
  lines = []
  return JobProgress(log=lines.append, **kwargs), lines


def test_stages_are_numbered_and_the_eta_counts_finished_stages_of_each_kind():
  progress, lines = _progress(silence_seconds=0)
  progress.expect(["fit", "fit", "score"])
  with progress.stage("first fit", kind="fit"):
    time.sleep(0.2)
  assert lines[0] == "[1/3] first fit ..."
  # one more fit (about 0.2 s) and a score, whose kind has not run: a lower bound
  assert lines[1].startswith("[1/3] first fit: done in 0 s; job 0 s elapsed, at least 0 s left"), lines
  with progress.stage("score", kind="score"):
    pass
  assert lines[-1].endswith("about 0 s left")   # every kind to come has run once
  assert progress.eta()[0] == pytest.approx(0.2, abs=0.1) and progress.eta()[1]
  with progress.stage("second fit", kind="fit"):
    pass
  assert lines[-2] == "[3/3] second fit ..." and lines[-1].endswith("nothing left")
  assert progress.planned == [] and progress.done == 3


def test_no_estimate_before_a_stage_of_a_kind_to_come_has_run():
  progress, lines = _progress(silence_seconds=0)
  progress.expect(["set-up", "fit"])
  with progress.stage("set-up"):
    pass
  assert lines[-1].endswith("the rest not estimated yet"), lines


def test_without_a_plan_stages_are_counted_as_they_come():
  progress, lines = _progress(silence_seconds=0)
  for name in ("a", "b"):
    with progress.stage(name):
      pass
  assert lines[0] == "[1] a ..." and lines[2] == "[2] b ..." and lines[-1].endswith("the rest not estimated")


def test_a_silent_stage_says_it_is_still_working_and_a_talking_one_does_not():
  progress, lines = _progress(silence_seconds=0.3)
  with progress.stage("compile", kind="x"):
    time.sleep(1.1)
  still = [line for line in lines if "still working" in line]
  assert 2 <= len(still) <= 4 and still[0].startswith("[1] compile: still working, 0 s in this stage"), lines
  lines.clear()
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.INFO)   # as the CLI sets it: INFO lines are printed
  try:
    with progress.stage("train", kind="x"):
      for _ in range(11):
        logging.info("a step")   # absl log lines are output: no heartbeat while they come
        time.sleep(0.1)
  finally:
    logging.set_verbosity(verbosity)
  assert not [line for line in lines if "still working" in line], lines


def test_an_interrupted_stage_stops_its_heartbeat_and_reports_nothing_done():
  progress, lines = _progress(silence_seconds=0.2)
  with pytest.raises(KeyboardInterrupt), progress.stage("fit"):
    raise KeyboardInterrupt
  time.sleep(0.5)
  assert lines == ["[1] fit ..."] and progress.done == 0


@pytest.mark.parametrize("kwargs, message", [({"total": -1}, "total must be >= 0"),
                                             ({"silence_seconds": -1.0}, "silence_seconds must be >= 0")])
def test_bad_settings_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    JobProgress(**kwargs)


def test_the_loop_rate_leaves_out_the_compiling_step(tmp_path):
  """A first step that takes 2 s (as compiling does) does not enter the logged rate (nor the bar's ETA): the first
  record's steps/s is that of the fast steps."""
  arrays = {"x": np.arange(16, dtype=np.float32).reshape(8, 2)}
  task = loop.ArrayTask({"w": jnp.zeros((2,))}, lambda w, frozen, batch: jnp.mean((w["w"] - batch["x"]) ** 2),
                        arrays, batch_size=4, seed=0)
  config = loop.LoopConfig(steps=6, batch_size=4, log_every=3, checkpoint_every=100, checkpoint_seconds=0,
                           progress=False)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  init, step = loop.compile_programs(task, config, mesh)
  calls = []

  def slow_first(*args):
    calls.append(1)
    if len(calls) == 1:
      time.sleep(2.0)
    return step(*args)

  result = loop.fit(task, config, tmp_path / "run", seed=0, identity={}, mesh=mesh, programs=(init, slow_first))
  records = [r for r in result.history if "loss" in r]
  assert [r["step"] for r in records] == [3, 6]
  assert records[0]["steps_per_s"] > 5.0, records   # 2 fast steps, not 3 steps in > 2 s
