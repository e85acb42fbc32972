"""The training loop (``mteo_jax.loop``) on tiny problems: the learning-rate schedule, clipping and EMA, every
``LoopConfig`` option, metrics, exact resumption, the NaN stop, the resume identity and the batch-size check."""

import contextlib
import dataclasses
import io
import math
import os
import re
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mteo_jax import checkpoints, loop, parallel
from mteo_jax.methods import MTEOSettings

REPO = Path(__file__).resolve().parents[1]
_RS = np.random.RandomState(0)
X = _RS.randn(64, 4).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.7 + 0.01 * _RS.randn(64)).astype(np.float32)
INIT = {"w": jnp.zeros(4), "b": jnp.zeros(())}
IDENTITY = {"name": "linreg"}
BASE = dict(steps=8, batch_size=16, lr=0.05, log_every=1, checkpoint_every=4, keep=2, progress=False)


def mse(trainable, frozen, batch):
  del frozen
  return jnp.mean((batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]) ** 2)


def linreg_task(batch_size=16, objective=mse):
  return loop.ArrayTask(INIT, objective, {"x": X, "y": Y}, batch_size=batch_size, seed=0)


def config(**overrides):
  return loop.LoopConfig(**{**BASE, **overrides})


def fit(run_dir, cfg, task=None, **kwargs):
  task = task or linreg_task(cfg.batch_size)
  return loop.fit(task, cfg, run_dir, seed=0, identity=kwargs.pop("identity", IDENTITY), **kwargs)


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def train_records(history):
  """The loss records of a history without their timing (which differs between runs)."""
  return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in history if "loss" in r]


def adam_mu(opt_state):
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
  assert len(states) == 1
  return states[0].mu


def schedule_values(cfg, ts):
  schedule = loop.make_lr_schedule(cfg)
  return np.array([float(schedule(t)) for t in ts])


# --- learning rate, clipping, EMA ------------------------------------------------------------------------------------

def test_warmup_rises_linearly_then_holds():
  """During the warm-up the rate is lr * (t + 1) / W, then exactly lr (constant decay)."""
  cfg = config(steps=40, lr=0.3, warmup_steps=10)
  np.testing.assert_allclose(schedule_values(cfg, range(10)), 0.3 * np.arange(1, 11) / 10, rtol=1e-6)
  np.testing.assert_allclose(schedule_values(cfg, range(10, 41)), 0.3, rtol=1e-6)


def test_constant_without_warmup_is_lr_at_every_step():
  """lr_decay='constant' without warm-up gives lr from the first update to past the end."""
  np.testing.assert_array_equal(schedule_values(config(steps=20, lr=0.25), [0, 1, 7, 19, 20, 100]), 0.25)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("end", [0.0, 0.1])
def test_decay_ends_at_lr_times_end_factor_and_is_monotone(decay, end):
  """cosine and linear decays fall monotonically after the warm-up and reach lr * lr_end_factor at `steps` (0 for 0)."""
  cfg = config(steps=50, lr=0.2, warmup_steps=5, lr_decay=decay, lr_end_factor=end)
  values = schedule_values(cfg, range(4, 60))
  np.testing.assert_allclose(values[:2], 0.2, rtol=1e-6)  # the peak: the last warm-up update and the first after it
  assert np.all(np.diff(values) <= 1e-9) and values[2] < values[1]
  at_end = schedule_values(cfg, [50, 55])
  np.testing.assert_allclose(at_end, 0.2 * end, rtol=1e-6, atol=1e-9)  # and it stays there
  if end == 0.0:
    assert at_end[0] == 0.0


def test_decay_midpoints_in_closed_form():
  """Half way and a quarter of the way through the decay, cosine and linear take their closed-form values."""
  lr, end, w, s = 1.0, 0.2, 10, 110

  def expected(shape):
    return lr * (end + (1 - end) * shape)

  cosine, linear = (config(steps=s, lr=lr, warmup_steps=w, lr_decay=d, lr_end_factor=end) for d in ("cosine", "linear"))
  np.testing.assert_allclose(schedule_values(cosine, [60, 35]),
                             [expected(0.5), expected(0.5 * (1 + math.cos(math.pi / 4)))], rtol=1e-5)
  np.testing.assert_allclose(schedule_values(linear, [60, 35]), [expected(0.5), expected(0.75)], rtol=1e-5)


def test_grad_clip_bounds_adams_first_moment():
  """After one update with a huge gradient, Adam's first moment is (1 - b1) * the clipped gradient."""
  grads, params = {"w": jnp.array([3e6, 4e6, 0.0])}, {"w": jnp.zeros(3)}  # global norm 5e6
  for clip, norm in ((0.0, 5e6), (2.0, 2.0)):
    optimizer = loop.make_optimizer(config(grad_clip=clip))
    _, opt_state = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(float(optax.tree.norm(adam_mu(opt_state))), 0.1 * norm, rtol=1e-5)


def test_ema_decay_at_warms_up():
  """ema_decay_at is (1 + t) / (10 + t) early and the configured decay later."""
  np.testing.assert_allclose([float(loop.ema_decay_at(t, 0.99)) for t in (0, 10, 10 ** 6)], [0.1, 11 / 20, 0.99],
                             rtol=1e-6)


def test_without_ema_there_are_no_ema_params(tmp_path):
  """ema_decay=0 means state.ema_params is None."""
  assert fit(tmp_path, config(ema_decay=0.0)).state.ema_params is None


def test_ema_follows_the_params_with_ema_decay_at(tmp_path):
  """ema_decay > 0: the EMA is init, then decay_t * ema + (1 - decay_t) * params_t at each update t."""
  seen = []
  result = fit(tmp_path, config(ema_decay=0.9), hooks=[lambda step, state, m: seen.append(host(state.params))])
  ema = host(INIT)
  for t, params in enumerate(seen):
    d = float(loop.ema_decay_at(t, 0.9))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), host(result.state.ema_params), ema)
  assert not np.allclose(result.state.ema_params["w"], result.state.params["w"])


# --- every option changes behaviour; bad values are named ------------------------------------------------------------

def _lrs(result):
  return [r["lr"] for r in result.history if "loss" in r]


def _check_option(name, result, run_dir, batch_sizes, err):
  """The one observable the option ``name`` controls, given a run with it changed from BASE."""
  steps = [r["step"] for r in result.history if "loss" in r]
  saved = checkpoints.Checkpointer(run_dir / "checkpoints").all_steps()
  if name == "steps":
    assert int(result.state.step) == 12 and steps[-1] == 12 and saved[-1] == 12
  elif name == "batch_size":
    assert set(batch_sizes) == {8}
  elif name == "lr":
    assert _lrs(result) == pytest.approx([0.01] * 8)
  elif name == "warmup_steps":
    assert _lrs(result) == pytest.approx([0.05 * (t + 1) / 4 for t in range(4)] + [0.05] * 4)
  elif name == "lr_decay":
    assert np.all(np.diff(_lrs(result)) < 0)
  elif name == "lr_end_factor":  # linear from 0.05 to 0.025 over 8 updates: the 8th uses t = 7
    assert _lrs(result)[-1] == pytest.approx(0.05 * (0.5 + 0.5 * (1 - 7 / 8)))
  elif name == "grad_clip":
    assert float(optax.tree.norm(adam_mu(result.state.opt_state))) <= 1e-3 * (1 + 1e-5)
  elif name == "ema_decay":
    assert result.state.ema_params is not None
  elif name == "log_every":
    assert steps == [3, 6, 8]
  elif name == "checkpoint_every":
    assert saved == [6, 8]  # keep=2 of 2, 4, 6, 8
  elif name == "checkpoint_seconds":
    assert saved == [7, 8]  # a checkpoint after every step (keep=2), not only at 4 and 8
  elif name == "keep":
    assert saved == [8]
  elif name == "progress":
    assert "8/8" in err
  else:
    raise AssertionError(f"no check for {name}")


CHANGES = {"steps": 12, "batch_size": 8, "lr": 0.01, "warmup_steps": 4, "lr_decay": "linear", "lr_end_factor": 0.5,
           "grad_clip": 1e-3, "ema_decay": 0.9, "log_every": 3, "checkpoint_every": 2, "checkpoint_seconds": 1e-9,
           "keep": 1, "progress": True}


def test_changes_cover_every_loop_option():
  """The option test below changes every field of LoopConfig."""
  assert sorted(CHANGES) == sorted(f.name for f in dataclasses.fields(loop.LoopConfig))


def recording(sizes):
  """mse that records the batch size it is traced with."""

  def objective(trainable, frozen, batch):
    sizes.append(batch["x"].shape[0])
    return mse(trainable, frozen, batch)

  return objective


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """``base_run(lr_decay) -> (result, run_dir, batch sizes, stderr)`` of the BASE config, run once per module."""
  cache = {}

  def get(decay):
    if decay not in cache:
      sizes, err, run_dir = [], io.StringIO(), tmp_path_factory.mktemp(f"base_{decay}")
      with contextlib.redirect_stderr(err):
        result = fit(run_dir, config(lr_decay=decay), linreg_task(16, recording(sizes)))
      cache[decay] = (result, run_dir, sizes, err.getvalue())
    return cache[decay]

  return get


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_every_option_changes_behaviour(tmp_path, capsys, base_run, name):
  """Each LoopConfig option, changed from the base run, changes what it documents (the base run fails the check)."""
  decay = "linear" if name == "lr_end_factor" else "constant"  # the end factor acts on a decay
  cfg = config(**{"lr_decay": decay, name: CHANGES[name]})
  sizes = []
  capsys.readouterr()
  result = fit(tmp_path, cfg, linreg_task(cfg.batch_size, recording(sizes)))
  _check_option(name, result, tmp_path, sizes, capsys.readouterr().err)
  with pytest.raises(AssertionError):
    _check_option(name, *base_run(decay))


BAD_VALUES = [("steps", 0), ("batch_size", 0), ("log_every", 0), ("checkpoint_every", 0), ("keep", 0),
              ("warmup_steps", -1), ("lr", 0.0), ("lr", -1e-3), ("lr", float("inf")), ("lr", float("nan")),
              ("lr_decay", "exponential"), ("lr_end_factor", -0.1), ("lr_end_factor", 1.5), ("grad_clip", -1.0),
              ("ema_decay", 1.0), ("ema_decay", -0.5)]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_bad_values_name_the_key(key, value):
  """A value out of range raises ValueError naming train.<key> (<section>.<key> in subclasses, e.g. mteo.<key>)."""

  @dataclasses.dataclass(frozen=True)
  class Custom(loop.LoopConfig):
    section: ClassVar[str] = "custom"

  for cls, section in ((loop.LoopConfig, "train"), (MTEOSettings, "mteo"), (Custom, "custom")):
    with pytest.raises(ValueError, match=rf"\b{section}\.{key}\b"):
      cls(**{key: value})


def test_loop_settings_is_a_plain_loop_config():
  """loop_settings of a subclass keeps the loop's fields and drops the subclass's."""
  settings = MTEOSettings(steps=7, lr=0.3, granularity="shared").loop_settings()
  assert type(settings) is loop.LoopConfig and settings.steps == 7 and settings.lr == 0.3


# --- fit: loss, metrics, resumption ----------------------------------------------------------------------------------

def test_loss_decreases(tmp_path):
  """Adam on a linear regression brings the loss down by more than 10x in 60 steps."""
  result = fit(tmp_path, config(steps=60, lr=0.1, log_every=10, checkpoint_every=60))
  _, losses = result.losses
  assert len(losses) == 6 and losses[-1] < losses[0] / 10


def test_metrics_jsonl_has_a_record_per_log_step_and_per_eval(tmp_path):
  """metrics.jsonl holds a loss record every log_every steps (and at the end) and an eval record every eval_every."""
  calls = []

  def eval_fn(step, state):
    calls.append(step)
    return {"w0": float(state.params["w"][0]), "step": step}

  result = fit(tmp_path, config(steps=12, log_every=5, checkpoint_every=12), eval_fn=eval_fn, eval_every=4)
  records = loop.read_metrics(tmp_path)
  assert records == result.history
  assert [(r["step"], "eval" if "eval" in r else "loss") for r in records] == [
      (4, "eval"), (5, "loss"), (8, "eval"), (10, "loss"), (12, "loss"), (12, "eval")]
  assert calls == [4, 8, 12] and [r["eval"]["step"] for r in records if "eval" in r] == [4.0, 8.0, 12.0]
  assert {"loss", "grad_norm", "lr", "steps_per_s"} <= set(records[1])
  assert result.evals("w0")[0] == [4, 8, 12] and result.losses[0] == [5, 10, 12]


class Stop(Exception):
  pass


def test_an_interrupted_run_resumes_exactly(tmp_path):
  """A run stopped after its step-6 checkpoint and resumed equals an uninterrupted one; train_seconds accumulate."""
  cfg = config(steps=12, log_every=2, checkpoint_every=3, keep=5)
  task = linreg_task()
  programs = loop.compile_programs(task, cfg, parallel.make_mesh())
  whole = fit(tmp_path / "whole", cfg, task, programs=programs)

  def stop_at_7(step, state, metrics):
    time.sleep(0.1)  # so that the first part's train time is clearly not nothing
    if step == 7:
      raise Stop

  with pytest.raises(Stop):
    fit(tmp_path / "cut", cfg, task, programs=programs, hooks=[stop_at_7])
  cut = checkpoints.Checkpointer(tmp_path / "cut" / "checkpoints")
  assert cut.all_steps() == [3, 6]
  first_part = cut.metadata(6)["train_seconds"]
  assert first_part >= 0.6
  start, stepped = time.perf_counter(), []
  resumed = fit(tmp_path / "cut", cfg, task, programs=programs, hooks=[lambda step, *_: stepped.append(step)])
  wall = time.perf_counter() - start
  assert stepped == list(range(7, 13))  # from the checkpoint on, not from scratch
  assert_trees_equal(resumed.state.params, whole.state.params)
  assert_trees_equal(resumed.state.opt_state, whole.state.opt_state)
  assert train_records(resumed.history) == train_records(whole.history)
  assert [r["step"] for r in loop.read_metrics(tmp_path / "cut")] == [2, 4, 6, 8, 10, 12]  # no duplicates
  assert first_part < resumed.train_seconds <= first_part + wall


def test_a_finished_run_returns_without_stepping(tmp_path):
  """Calling fit again on a finished run returns the same params, history and train_seconds, without a step."""
  cfg = config()
  first = fit(tmp_path, cfg)
  calls = []
  again = fit(tmp_path, cfg, hooks=[lambda *args: calls.append(args[0])])
  assert calls == []
  assert_trees_equal(again.state.params, first.state.params)
  assert again.history == first.history
  assert again.train_seconds == checkpoints.Checkpointer(tmp_path / "checkpoints").metadata(8)["train_seconds"] > 0


def test_a_finished_run_returns_the_same_train_seconds(tmp_path):
  """The train_seconds a finished run returns when called again equal those its first call returned."""
  first = fit(tmp_path, config())
  assert fit(tmp_path, config()).train_seconds == first.train_seconds


# --- the NaN stop ----------------------------------------------------------------------------------------------------

class NanAtStep:
  """Linear regression whose loss is NaN from the (1-based) step ``bad`` on: the batch carries its step number."""

  frozen = None

  def __init__(self, bad):
    self.bad = bad
    self.inner = linreg_task()

  def init(self, key):
    return self.inner.init(key)

  def loss(self, trainable, frozen, batch, key):
    value = mse(trainable, frozen, batch)
    return jnp.where(batch["step"][0] >= self.bad, jnp.nan, value)

  def batches(self, start_step):
    for s, batch in enumerate(self.inner.batches(start_step), start=start_step + 1):
      yield {**batch, "step": np.full((16,), s, np.int32)}


@pytest.mark.parametrize("case", ["nan_loss", "absurd_lr"])
def test_non_finite_step_stops_the_run_naming_it(tmp_path, case):
  """NaN or overflow raises NonFiniteError naming the first bad step; checkpoints are older and restore finite."""
  # nan_loss: NaN from step 7, seen at the step-9 checkpoint; absurd_lr: params ~1e30 after step 1, loss inf at 2.
  if case == "nan_loss":
    task, cfg, bad, last = NanAtStep(7), config(steps=12, log_every=100, checkpoint_every=3, keep=5), 7, 6
  else:
    task, cfg, bad, last = linreg_task(), config(lr=1e30, checkpoint_every=1, keep=5), 2, 1
  with pytest.raises(loop.NonFiniteError, match=rf"non-finite .* at step {bad}\b") as error:
    fit(tmp_path, cfg, task)
  assert error.value.step == bad and error.value.last_checkpoint == last
  assert f"nothing after step {last} was saved" in str(error.value)
  checkpointer = checkpoints.Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.all_steps() and max(checkpointer.all_steps()) == last < bad
  target = jax.eval_shape(loop.make_init(task, cfg), jax.random.key(0))
  state = checkpointer.restore(target)
  assert int(state.step) == last
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(host(state.params)))


# --- resume identity -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, key", [
    ({"identity": {"name": "other"}}, "task.name"), ({"lr": 0.01}, "loop.lr"),
    ({"lr_decay": "linear"}, "loop.lr_decay"), ({"ema_decay": 0.5}, "loop.ema_decay"),
    ({"batch_size": 8}, "loop.batch_size"), ({"grad_clip": 1.0}, "loop.grad_clip"),
    ({"warmup_steps": 2}, "loop.warmup_steps"), ({"lr_end_factor": 0.5}, "loop.lr_end_factor")])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, key):
  """A checkpoint of another identity or other loop settings raises ResumeMismatchError naming the differing key."""
  cfg = config(steps=4, checkpoint_every=2)
  fit(tmp_path, cfg)
  settings = {k: v for k, v in change.items() if k != "identity"}
  with pytest.raises(loop.ResumeMismatchError) as refused:
    fit(tmp_path, dataclasses.replace(cfg, **settings), identity=change.get("identity", IDENTITY))
  # Only the keys that differ, each as ``key: saved -> current`` (no dump of the other settings); a decaying
  # schedule's identity holds ``steps``, which a constant one leaves out.
  listed = str(refused.value).split("other settings: ")[1].split(". Resume with")[0].split("; ")
  assert all(re.fullmatch(r"[\w.]+: [^;]+ -> [^;]+", part) for part in listed), listed
  assert [part.split(":")[0] for part in listed] == [key] + (["loop.steps"] if key == "loop.lr_decay" else []), listed


def test_logging_and_checkpoint_settings_may_change_and_constant_runs_may_grow(tmp_path):
  """Logging/checkpoint settings may change on resume and a constant-lr run may grow, equal to a run done at once."""
  fit(tmp_path / "grown", config(steps=4, checkpoint_every=2))
  stepped = []
  grown = fit(tmp_path / "grown", config(steps=8, log_every=3, checkpoint_every=1, keep=4, progress=True),
              hooks=[lambda step, *_: stepped.append(step)])
  assert stepped == [5, 6, 7, 8]
  whole = fit(tmp_path / "whole", config(steps=8))
  assert int(grown.state.step) == 8
  assert_trees_equal(grown.state.params, whole.state.params)
  assert checkpoints.Checkpointer(tmp_path / "grown" / "checkpoints").all_steps() == [5, 6, 7, 8]
  assert [r["step"] for r in grown.history] == [1, 2, 3, 4, 6, 8]


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_decaying_run_cannot_grow(tmp_path, decay):
  """With a decaying learning rate, steps is part of the identity: more steps is a mismatch naming loop.steps."""
  fit(tmp_path, config(steps=4, lr_decay=decay))
  with pytest.raises(loop.ResumeMismatchError, match=r"loop\.steps: 4 -> 6"):
    fit(tmp_path, config(steps=6, lr_decay=decay))


def test_a_checkpoint_beyond_steps_is_an_error(tmp_path):
  """Shrinking steps below the checkpoint of a constant-lr run is a ValueError naming both."""
  fit(tmp_path, config(steps=8))
  with pytest.raises(ValueError, match=r"at step 8, beyond steps=4"):
    fit(tmp_path, config(steps=4))


# --- batch size and devices ------------------------------------------------------------------------------------------

def test_check_batch_size_message_names_the_devices():
  """A batch that does not split over the mesh names the batch, the device count and a multiple to use."""
  loop.check_batch_size(16, parallel.make_mesh(jax.devices()))
  fake = types.SimpleNamespace(size=3)
  with pytest.raises(ValueError, match=r"^mteo: batch_size=16 is not divisible by the 3 devices; use a multiple of 3$"):
    loop.check_batch_size(16, fake, where="mteo")
  loop.check_batch_size(15, fake)


def test_fit_refuses_a_batch_that_does_not_split_over_two_devices(tmp_path):
  """On two (forced host) devices, fit refuses an odd batch before any step and trains with an even one."""
  script = textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {str(REPO / "tests")!r})
      import jax, numpy as np
      from test_loop import config, fit, linreg_task
      from mteo_jax import loop
      assert jax.device_count() == 2, jax.devices()
      try:
        fit({str(tmp_path / "odd")!r}, config(batch_size=15))
      except ValueError as error:
        print("REFUSED", error)
      result = fit({str(tmp_path / "even")!r}, config(batch_size=16))
      print("STEPS", int(result.state.step), result.history[-1]["num_devices"])
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "REFUSED train: batch_size=15 is not divisible by the 2 devices; use a multiple of 2" in proc.stdout
  assert "STEPS 8 2" in proc.stdout
  assert not (tmp_path / "odd" / "checkpoints").exists()
