"""Interrupting ``fitting.fit`` keeps every checkpoint whose save had started, and a save that could not finish (the
process killed mid-write) is reported when the directory is opened next; the rerun resumes from the latest complete
step and ends exactly where an uninterrupted run does. (``train.train``: tests/test_train.py.)"""

import asyncio
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import checkpoints, fitting

STEPS, EVERY, SLOW = 6, 2, 0.6
_RS = np.random.RandomState(0)
DATA = {"x": _RS.randn(64, 4).astype(np.float32), "y": _RS.randn(64).astype(np.float32)}
INIT = {"w": jnp.zeros(4), "b": jnp.zeros(())}


def loss_fn(trainable, params, batch):
  return jnp.mean((batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]) ** 2)


def run_fit(checkpoint_dir=None, eval_fn=None):
  return fitting.fit(loss_fn, INIT, {}, DATA, fitting.make_optimizer(3e-2, STEPS), steps=STEPS, batch_size=16, seed=0,
                     eval_fn=eval_fn, eval_every=EVERY if eval_fn else 0, progress=False,
                     checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                     checkpoint_every=EVERY if checkpoint_dir else 0, metadata={"run": "test"})


@pytest.fixture(scope="module")
def uninterrupted():
  return jax.tree.map(np.asarray, run_fit()[0])


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


def assert_resumes_at(directory, step, uninterrupted):
  """The rerun starts after ``step`` (its first logged step is step + 1) and ends with the uninterrupted result."""
  trained, history = run_fit(directory)
  assert history["step"][0] == step + 1, history["step"]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, trained), uninterrupted)


def interrupt_from_eval(error):
  def eval_fn(trainable):  # called right after the save of step 2 was started
    raise error
  return {"eval_fn": eval_fn}


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), RuntimeError("eval failed")],
                         ids=["KeyboardInterrupt", "SystemExit", "RuntimeError"])
def test_fit_interrupted_after_a_checkpoint_keeps_it(tmp_path, slow_finalize, uninterrupted, error):
  with pytest.raises(type(error)):
    run_fit(tmp_path, **interrupt_from_eval(error))
  # The save of step 2 lands SLOW seconds after it started, long after the interrupt: fit waited for it.
  assert slow_finalize.landed == [2] and contents(tmp_path) == ["2"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 2, uninterrupted)


def test_fit_interrupted_between_steps_keeps_the_last_checkpoint(tmp_path, monkeypatch, slow_finalize, uninterrupted):
  batch = fitting.trajectory_batch

  def interrupted_batch(train_data, batch_size, seed, step):
    if step == 4:  # Ctrl-C while reading the batch of step 5, with the save of step 4 still pending
      raise KeyboardInterrupt
    return batch(train_data, batch_size, seed, step)

  monkeypatch.setattr(fitting, "trajectory_batch", interrupted_batch)
  with pytest.raises(KeyboardInterrupt):
    run_fit(tmp_path)
  monkeypatch.setattr(fitting, "trajectory_batch", batch)
  assert slow_finalize.landed == [2, 4] and contents(tmp_path) == ["2", "4"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 4, uninterrupted)


def test_fit_terminated_by_sigterm_keeps_the_pending_checkpoint(tmp_path, slow_finalize, uninterrupted):
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

  def terminate(trainable):
    # fit turns SIGTERM into SystemExit while it checkpoints; never send it to this process without that handler.
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler interrupts this

  with pytest.raises(SystemExit) as exit_info:
    run_fit(tmp_path, eval_fn=terminate)
  assert exit_info.value.code == 128 + signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
  assert slow_finalize.landed == [2] and contents(tmp_path) == ["2"]
  slow_finalize.delay = 0
  assert_resumes_at(tmp_path, 2, uninterrupted)


def test_a_lost_save_is_reported_and_the_rerun_resumes_from_the_latest_complete_step(tmp_path, uninterrupted):
  def stop_at_4(trainable):  # called after the saves of steps 2 and 4
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt
    return 0.0

  calls = []
  with pytest.raises(KeyboardInterrupt):
    run_fit(tmp_path, eval_fn=stop_at_4)
  assert contents(tmp_path) == ["2", "4"]
  os.rename(tmp_path / "4", tmp_path / "4.orbax-checkpoint-tmp")  # as if killed before orbax finalised step 4
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=rf"checkpoint step 4 in {re.escape(str(tmp_path))} was interrupted while being written and "
                          r"is lost; the latest complete checkpoint is step 2, where a resumed run restarts \(removing "
                          r"the unfinished 4\.orbax-checkpoint-tmp\)"):
    assert_resumes_at(tmp_path, 2, uninterrupted)
  assert contents(tmp_path) == ["4", "6"]  # max_to_keep=2, no leftovers


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
