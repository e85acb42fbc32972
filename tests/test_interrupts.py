"""Interrupting ``loop.fit`` keeps every checkpoint whose save had started, and a save that could not finish (the
process killed mid-write) is reported when the directory is opened next; the rerun resumes from the latest complete
step and ends exactly where an uninterrupted run does. (``train.train`` on top of it: tests/test_train.py.)"""

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import checkpoints, loop

STEPS, EVERY, SLOW = 6, 2, 0.6
CONFIG = loop.LoopConfig(steps=STEPS, batch_size=16, lr=3e-2, checkpoint_every=EVERY, log_every=1, keep=2,
                         progress=False)
_RS = np.random.RandomState(0)
DATA = {"x": _RS.randn(64, 4).astype(np.float32), "y": _RS.randn(64).astype(np.float32)}
INIT = {"w": jnp.zeros(4), "b": jnp.zeros(())}


def objective(trainable, frozen, batch):
  return jnp.mean((batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]) ** 2)


class Task(loop.ArrayTask):
  """The linear regression above; reading the batch of ``fail_at`` (0-based: the batch of step ``fail_at + 1``)
  raises ``KeyboardInterrupt``, as a Ctrl-C between two steps would."""

  fail_at = None

  def batch(self, step):
    if step == self.fail_at:
      raise KeyboardInterrupt
    return super().batch(step)


def run_fit(run_dir, eval_fn=None, hooks=(), fail_at=None):
  task = Task(INIT, objective, DATA, batch_size=16, seed=0)
  task.fail_at = fail_at
  return loop.fit(task, CONFIG, run_dir, seed=0, identity={"run": "test"}, eval_fn=eval_fn,
                  eval_every=3 if eval_fn else 0, hooks=hooks, desc="interrupts")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return jax.tree.map(np.asarray, run_fit(tmp_path_factory.mktemp("uninterrupted")).state.params)


@pytest.fixture
def slow_finalize(monkeypatch):
  """Orbax finalises each save (renames ``<step>.orbax-checkpoint-tmp`` to ``<step>``) ``slow.delay`` seconds late, in
  its background thread; ``slow.landed`` lists the finalised steps."""
  from orbax.checkpoint._src.path import atomicity
  original = atomicity.AtomicRenameTemporaryPath.finalize
  slow = types.SimpleNamespace(delay=SLOW, landed=[])

  async def finalize(self):
    step = self.get_final().name.isdigit()  # not the items inside the step's directory
    if step:
      await asyncio.sleep(slow.delay)
    await original(self)
    if step:
      slow.landed.append(int(self.get_final().name))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  return slow


def contents(directory: Path) -> list[str]:
  return sorted(p.name for p in directory.iterdir())


def stop_at(step, error):
  """A step hook that raises ``error`` after ``step`` (the hook runs before that step's own checkpoint)."""
  def hook(s, state, metrics):
    if s == step:
      raise error
  return hook


def assert_resumes_at(run_dir, step, uninterrupted):
  """The rerun starts after ``step`` (the first step it runs is step + 1), ends with the uninterrupted result, and its
  history holds each step once (the records of the killed run past its checkpoint are dropped)."""
  ran = []
  result = run_fit(run_dir, hooks=[lambda s, state, metrics: ran.append(s)])
  assert ran == list(range(step + 1, STEPS + 1)), ran
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, result.state.params), uninterrupted)
  steps, losses = result.losses
  assert steps == list(range(1, STEPS + 1)) and np.all(np.isfinite(losses))
  assert [r["step"] for r in loop.read_metrics(run_dir) if "loss" in r] == steps


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), RuntimeError("eval failed")],
                         ids=["KeyboardInterrupt", "SystemExit", "RuntimeError"])
def test_fit_interrupted_after_a_checkpoint_keeps_it(tmp_path, slow_finalize, uninterrupted, error):
  def eval_fn(step, state):  # step 3: right after the save of step 2 was started
    raise error

  with pytest.raises(type(error)):
    run_fit(tmp_path, eval_fn=eval_fn)
  # The save of step 2 lands SLOW seconds after it started, long after the interrupt: fit waited for it.
  assert slow_finalize.landed == [2] and contents(tmp_path / "checkpoints") == ["2"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 2, uninterrupted)


def test_fit_interrupted_between_steps_keeps_the_last_checkpoint(tmp_path, slow_finalize, uninterrupted):
  with pytest.raises(KeyboardInterrupt):
    run_fit(tmp_path, fail_at=4)   # Ctrl-C while reading the batch of step 5, with the save of step 4 still pending
  assert slow_finalize.landed == [2, 4] and contents(tmp_path / "checkpoints") == ["2", "4"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 4, uninterrupted)


def test_fit_terminated_by_sigterm_keeps_the_pending_checkpoint(tmp_path, slow_finalize, uninterrupted):
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

  def terminate(step, state, metrics):
    if step != 3:   # right after the save of step 2 was started
      return
    # fit turns SIGTERM into SystemExit while it checkpoints; never send it to this process without that handler.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this

  with pytest.raises(SystemExit) as exit_info:
    run_fit(tmp_path, hooks=[terminate])
  assert exit_info.value.code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
  assert slow_finalize.landed == [2] and contents(tmp_path / "checkpoints") == ["2"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 2, uninterrupted)


@pytest.mark.parametrize("seconds, expected", [(0.0, [STEPS]), (1e-9, list(range(1, STEPS + 1)))],
                         ids=["by-steps-only", "every-step-by-time"])
def test_checkpoint_seconds_saves_by_time_and_changes_nothing_learned(tmp_path, uninterrupted, seconds, expected):
  """``checkpoint_seconds`` adds a checkpoint whenever that much training time passed since the last one (here: each
  step), 0 turns it off (here: only the final step, as checkpoint_every is beyond the run); either way the run learns
  the same parameters, and ``loop.progress`` reports the last step and the newest checkpoint."""
  config = dataclasses.replace(CONFIG, checkpoint_every=1000, checkpoint_seconds=seconds, keep=STEPS)
  result = loop.fit(Task(INIT, objective, DATA, batch_size=16, seed=0), config, tmp_path, seed=0,
                    identity={"run": "test"}, desc="by time")
  assert contents(tmp_path / "checkpoints") == sorted(str(step) for step in expected)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, result.state.params), uninterrupted)
  assert loop.progress() == loop.Progress("by time", tmp_path, STEPS, STEPS, STEPS)
  with pytest.raises(ValueError, match="train.checkpoint_seconds must be >= 0"):
    dataclasses.replace(CONFIG, checkpoint_seconds=-1.0)


def test_a_lost_save_is_reported_and_the_rerun_resumes_from_the_latest_complete_step(tmp_path, uninterrupted):
  with pytest.raises(KeyboardInterrupt):
    run_fit(tmp_path, hooks=[stop_at(5, KeyboardInterrupt())])   # after the saves of steps 2 and 4
  directory = tmp_path / "checkpoints"
  assert contents(directory) == ["2", "4"]
  os.rename(directory / "4", directory / "4.orbax-checkpoint-tmp")  # as if killed before orbax finalised step 4
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=rf"checkpoint step 4 in {re.escape(str(directory))} was interrupted while being written and "
                          r"is lost; the latest complete checkpoint is step 2, where a resumed run restarts \(removing "
                          r"the unfinished 4\.orbax-checkpoint-tmp\)"):
    assert_resumes_at(tmp_path, 2, uninterrupted)
  assert contents(directory) == ["4", "6"]  # keep=2, no leftovers


KILLED_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from mteo_jax.checkpoints import Checkpointer

    ckpt = Checkpointer(sys.argv[1], save_interval_steps=2)
    ckpt.save(2, {"w": np.full(3, 2.0)}, {"step": 2})
    ckpt.wait_until_finished()

    async def die(self):  # step 4's arrays are written, nothing of it finalised yet: SIGKILL now
      os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(4, {"w": np.full(3, 4.0)}, {"step": 4})
    ckpt.wait_until_finished()
""")


def test_a_process_killed_mid_save_is_reported_when_the_directory_is_opened(tmp_path):
  directory = tmp_path / "run"
  process = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(directory)], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
  assert contents(directory) == ["2", "4.orbax-checkpoint-tmp"]
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=rf"checkpoint step 4 in {re.escape(str(directory))} was interrupted while being written "
                          "and is lost; the latest complete checkpoint is step 2"):
    ckpt = checkpoints.Checkpointer(directory, save_interval_steps=2)
  with ckpt:
    assert contents(directory) == ["2"] and ckpt.latest_step() == 2 and ckpt.metadata() == {"step": 2}
    np.testing.assert_array_equal(ckpt.restore({"w": np.zeros(3)})["w"], np.full(3, 2.0))


@pytest.mark.parametrize("where", ["save", "wait_until_finished"])
def test_ctrl_c_while_a_save_starts_is_raised_once_the_save_has_started_and_it_lands(tmp_path, where):
  """SIGINT while ``Checkpointer.save`` waits for the previous save or starts its own in orbax (a background write
  among its steps) is held until the save has started; the interrupt then propagates and both saves land, with no
  lost-checkpoint report (before, the interrupt cut the start short and the clean-up removed the directory a
  background thread still wrote into, or orbax logged the interrupted wait's traceback)."""
  ckpt = checkpoints.Checkpointer(tmp_path, save_interval_steps=2)
  ckpt.save(2, {"w": np.full(3, 2.0)}, {"step": 2})
  original = getattr(ckpt._manager, where)

  def with_ctrl_c(*args, **kwargs):
    setattr(ckpt._manager, where, original)
    os.kill(os.getpid(), signal.SIGINT)   # delivered at once to a Python handler: here, inside orbax's call
    return original(*args, **kwargs)

  setattr(ckpt._manager, where, with_ctrl_c)
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoints.LostCheckpointWarning)
    with pytest.raises(KeyboardInterrupt):
      with ckpt:
        ckpt.save(4, {"w": np.full(3, 4.0)}, {"step": 4})
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handler is back
  assert contents(tmp_path) == ["2", "4"]
  with checkpoints.Checkpointer(tmp_path) as again:
    np.testing.assert_array_equal(again.restore({"w": np.zeros(3)})["w"], np.full(3, 4.0))
