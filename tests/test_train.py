"""Teacher training through the one loop (``loop.fit``): typed config, the loop's optimiser and EMA on the teacher's
settings, resumption and its identity, export/import of the teacher, pictures."""

import asyncio
import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from PIL import Image

from mteo_jax import checkpoints, config_utils, data, loop, modes, train, viz
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import make_denoiser


def load_config_file(name: str):
  """``configs/<name>.py`` loaded by path, as ``--config=configs/<name>.py`` does (no package import needed)."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}", Path(__file__).parents[1] / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


configs_gmm = load_config_file("gmm")


def tiny_config() -> train.TeacherConfig:
  """The tiny GMM config made class-conditional (mixture component = label), so that one compiled program covers the
  label path too; the CLI tests run the unconditional one."""
  config = configs_gmm.get_config("tiny")
  config.data.options.labels = True
  config.model.kwargs.num_classes = 8
  config.train.num_samples = 0
  return train.TeacherConfig.from_config(config)


def host(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
  """The tiny GMM teacher trained once, uninterrupted, with snapshots of the state at steps 1, 50 and 51."""
  workdir = tmp_path_factory.mktemp("gmm") / "run"
  snapshots, seen = {}, []

  def snapshot(step, state, metrics):
    seen.append(step)
    if step in (1, 50, 51):
      snapshots[step] = host({"params": state.params, "ema": state.ema_params})

  config = tiny_config()
  final = train.train(config, workdir, hooks=[snapshot])
  return {"config": config, "workdir": workdir, "final": host({"params": final.params, "ema": final.ema_params}),
          "step": int(final.step), "snapshots": snapshots, "seen": seen}


# --- configuration ----------------------------------------------------------------------------------------------------

def test_config_conversion_checks_keys_and_types():
  """TeacherConfig.from_config types every section, and is strict: unknown keys, sections of other modes, wrong types,
  bad values and a missing dataset name are errors naming the key; keys left out take their defaults."""
  config = configs_gmm.get_config("tiny")
  typed = train.TeacherConfig.from_config(config)
  assert isinstance(typed.precond, Preconditioning) and typed.precond.sigma_data == 0.5
  assert isinstance(typed.train, loop.LoopConfig) and typed.train.loop_settings().steps == config.train.steps
  assert typed.train.steps == config.train.steps and typed.model.kwargs["width"] == 32
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.seed = 1

  bad = configs_gmm.get_config("tiny")
  bad.train.stepz = 3
  with pytest.raises(ValueError, match=r"train\.stepz.*valid keys of config\.train: \[.*'steps'"):
    train.TeacherConfig.from_config(bad)
  bad = configs_gmm.get_config("tiny").to_dict()  # ConfigDicts check types themselves; plain dicts are checked here
  bad["train"]["steps"] = 2.5
  with pytest.raises(TypeError, match=r"train\.steps must be an integer"):
    train.TeacherConfig.from_config(bad)
  bad = configs_gmm.get_config("tiny")
  bad.train.lr_decay = "cosin"
  with pytest.raises(ValueError, match=r"lr_decay 'cosin'; expected one of \['constant', 'cosine', 'linear'\]"):
    train.TeacherConfig.from_config(bad)
  bad = configs_gmm.get_config("tiny")
  bad.train.sample_steps = 0
  with pytest.raises(ValueError, match=r"train\.sample_steps must be >= 1"):
    train.TeacherConfig.from_config(bad)
  bad = configs_gmm.get_config("tiny")
  del bad["data"]
  with pytest.raises(ValueError, match=r"data\.name is required"):
    train.TeacherConfig.from_config(bad)
  # A section of another mode is an error, naming the valid sections (the config of a mode is all it reads).
  other = configs_gmm.get_config("tiny")
  other.mteo = ml_collections.ConfigDict({"steps": 3})
  with pytest.raises(ValueError, match=r"config\.mteo.*valid keys of config: \['cluster', 'cpu_devices', 'data', "
                                      r"'distributed', 'mode'"):
    train.TeacherConfig.from_config(other)
  # Keys left out take the defaults of modes.base_config("train").
  partial = configs_gmm.get_config("tiny").to_dict()
  del partial["precond"], partial["train"]["lr_end_factor"]
  assert train.TeacherConfig.from_config(partial) == typed


def test_config_utils_roundtrip_and_diff():
  """to_plain is JSON-ready, diff names the dotted keys that differ, and from_dict names a missing required key."""
  plain = config_utils.to_plain(configs_gmm.get_config())
  assert json.loads(json.dumps(plain)) == plain
  assert config_utils.tuples_from_lists({"a": [1, [2, 3]], "b": "x"}) == {"a": (1, (2, 3)), "b": "x"}
  changed = json.loads(json.dumps(plain))
  changed["train"]["lr"] = 1.0
  changed["model"]["kwargs"]["width"] = 7
  assert config_utils.diff(plain, changed) == ["model.kwargs.width", "train.lr"]
  assert config_utils.diff(plain, changed, ignore={"train.lr"}) == ["model.kwargs.width"]

  @dataclasses.dataclass(frozen=True)
  class Needs:
    x: int
    y: int = 0

  with pytest.raises(ValueError, match=r"missing key\(s\) \['where\.x'\]"):
    config_utils.from_dict(Needs, {"y": 3}, where="where")
  assert config_utils.from_dict(Needs, {"x": 2}) == Needs(2, 0)


# --- optimiser and EMA ------------------------------------------------------------------------------------------------

def test_lr_schedule_warmup_and_decay():
  """The teacher's section is a LoopConfig: loop.make_lr_schedule warms it up linearly, then holds it (constant) or
  takes it along a half cosine to lr * lr_end_factor (0 by default) at `steps`."""
  constant = loop.make_lr_schedule(train.TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10,
                                                     lr_decay="constant"))
  cosine = loop.make_lr_schedule(train.TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10))
  assert train.TrainConfig().lr_decay == "cosine" and train.TrainConfig().lr_end_factor == 0.0  # teacher defaults
  np.testing.assert_allclose([float(constant(t)) for t in (0, 4, 9, 50, 99)], [0.1, 0.5, 1.0, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(float(cosine(9)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(55)), 0.5, rtol=1e-5)  # half way through the decay
  assert float(cosine(99)) < 1e-3
  floor = loop.make_lr_schedule(train.TrainConfig(steps=100, batch_size=1, lr=1.0, warmup_steps=10,
                                                  lr_end_factor=0.2))
  np.testing.assert_allclose([float(floor(55)), float(floor(100))], [0.6, 0.2], rtol=1e-5)
  no_warmup = loop.make_lr_schedule(loop.LoopConfig(steps=100, batch_size=1, lr=2.0))
  assert float(no_warmup(0)) == 2.0


def test_grad_clip_bounds_the_first_moment():
  """loop.make_optimizer clips the global gradient norm to grad_clip (0 = off) before Adam."""
  grads, params = {"w": jnp.full((4,), 100.0)}, {"w": jnp.zeros((4,))}  # global norm 200
  for clip, expected in ((0.0, 200.0), (1.0, 1.0)):
    optimizer = loop.make_optimizer(train.TrainConfig(steps=10, batch_size=1, lr=1e-3, grad_clip=clip))
    _, opt_state = jax.jit(lambda g, p: optimizer.update(g, optimizer.init(p), p))(grads, params)
    mu = [s.mu for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
    np.testing.assert_allclose(float(np.linalg.norm(mu["w"])), 0.1 * expected, rtol=1e-5)  # (1 - b1) * |g|


def test_ema_decay_warms_up_to_the_configured_value():
  """loop.ema_decay_at is (1 + t) / (10 + t) early and the teacher's ema_decay later."""
  np.testing.assert_allclose(float(loop.ema_decay_at(0, 0.999)), 0.1)
  np.testing.assert_allclose(float(loop.ema_decay_at(90, 0.999)), 91 / 100)
  np.testing.assert_allclose(float(loop.ema_decay_at(10 ** 6, 0.999)), 0.999)


def test_ema_differs_from_params_and_follows_them(gmm_run):
  """In a teacher run the EMA follows the loop's recurrence exactly, differs from the parameters and tracks them."""
  final, snaps = gmm_run["final"], gmm_run["snapshots"]
  # The exact recurrence ema_{t+1} = d_t ema_t + (1 - d_t) params_{t+1}, with t = 50 updates before step 51.
  decay = np.float32(loop.ema_decay_at(50, gmm_run["config"].train.ema_decay))
  assert decay == np.float32(51 / 60)
  expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, snaps[50]["ema"], snaps[51]["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), expected, snaps[51]["ema"])

  def distance(a, b):
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))))

  assert distance(final["ema"], final["params"]) > 0
  # The average tracks the trajectory: it is much closer to the final parameters than the start of the run is.
  assert distance(final["ema"], final["params"]) < 0.5 * distance(snaps[1]["params"], final["params"])


# --- training ---------------------------------------------------------------------------------------------------------

def train_records(workdir):
  """The metrics.jsonl records of a run without their timing (which differs between runs)."""
  return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in train.read_metrics(workdir)]


def test_loss_decreases_and_artefacts_exist(gmm_run):
  """A teacher run logs a record (mean loss of the interval, grad norm, lr) every log_every steps, its loss falls, it
  keeps the last `keep` checkpoints, and it draws no picture when num_samples=0."""
  records = train.read_metrics(gmm_run["workdir"])
  tc = gmm_run["config"].train
  steps = tc.steps
  assert [r["step"] for r in records] == list(range(20, steps + 1, 20))
  assert gmm_run["seen"] == list(range(1, steps + 1))  # the hook saw every step
  assert all(r["num_devices"] == jax.device_count() and r["steps_per_s"] > 0 for r in records)
  first, last = records[0]["loss"], np.mean([records[-1]["loss"], records[-2]["loss"]])
  assert last < 0.85 * first, (first, last)
  assert all(np.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in records)
  # The lr of a record is the loop's schedule at the record's last update (cosine down to lr_end_factor = 0).
  schedule = loop.make_lr_schedule(tc)
  np.testing.assert_allclose([r["lr"] for r in records], [float(schedule(r["step"] - 1)) for r in records], rtol=1e-6)
  assert checkpoints.Checkpointer(gmm_run["workdir"] / "checkpoints").all_steps() == [200, 300]  # keep=2
  assert gmm_run["step"] == steps
  assert not (gmm_run["workdir"] / "samples").exists()  # num_samples=0: no pictures


def test_killed_run_resumes_from_its_last_checkpoint(gmm_run, tmp_path):
  """A run killed after its step-100 checkpoint resumes from it and ends as the uninterrupted run (records, params,
  EMA); a finished run restarted does no step and exports the same teacher."""
  config, workdir = gmm_run["config"], tmp_path / "run"

  class Killed(Exception):
    pass

  def kill_at_150(step, state, metrics):
    if step == 150:
      raise Killed

  with pytest.raises(Killed):
    train.train(config, workdir, hooks=[kill_at_150])
  assert checkpoints.Checkpointer(workdir / "checkpoints").latest_step() == 100
  assert not (workdir / "teacher").exists()

  logged = [r["step"] for r in train.read_metrics(workdir)]
  assert logged[-1] == 140  # logged past the last checkpoint before the kill
  seen = []
  final = train.train(config, workdir, hooks=[lambda step, state, metrics: seen.append(step)])
  assert seen == list(range(101, config.train.steps + 1))  # the saved steps were not redone
  # The loss curve is the uninterrupted one: records past the checkpoint were dropped and redone identically.
  assert train_records(workdir) == train_records(gmm_run["workdir"])
  jax.tree.map(np.testing.assert_array_equal, host(final.params), gmm_run["final"]["params"])
  jax.tree.map(np.testing.assert_array_equal, host(final.ema_params), gmm_run["final"]["ema"])

  # A finished run restarted does no step and exports the same teacher again.
  seen.clear()
  train.train(config, workdir, hooks=[lambda step, state, metrics: seen.append(step)])
  assert seen == []
  _, params, _, _ = train.load_teacher(workdir / "teacher")
  jax.tree.map(np.testing.assert_array_equal, host(params), gmm_run["final"]["ema"])


def test_interrupt_after_a_checkpoint_keeps_it_for_the_resume(gmm_run, tmp_path, monkeypatch):
  """Ctrl-C in a hook just after the save of step 100 started, with that save still being written in the background:
  train waits for it before propagating, and the rerun resumes from step 100 and ends as the uninterrupted run."""
  from orbax.checkpoint._src.path import atomicity
  config, workdir = gmm_run["config"], tmp_path / "run"
  finalize, slow, landed = atomicity.AtomicRenameTemporaryPath.finalize, {"delay": 0.6}, []

  async def slow_finalize(self):  # orbax renames <step>.orbax-checkpoint-tmp to <step> `delay` seconds late
    if self.get_final().name.isdigit():
      await asyncio.sleep(slow["delay"])
      landed.append(self.get_final().name)
    await finalize(self)

  def interrupt(step, state, metrics):
    if step == 101:
      assert not (workdir / "checkpoints" / "100").exists()  # still being written in the background
      raise KeyboardInterrupt

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", slow_finalize)
  with pytest.raises(KeyboardInterrupt):
    train.train(config, workdir, hooks=[interrupt])
  names = os.listdir(workdir / "checkpoints")
  assert landed[-1] == "100" and "100" in names and not [n for n in names if "tmp" in n]
  assert not (workdir / "teacher").exists()

  slow["delay"] = 0
  seen = []
  final = train.train(config, workdir, hooks=[lambda step, state, metrics: seen.append(step)])
  assert seen == list(range(101, config.train.steps + 1))
  jax.tree.map(np.testing.assert_array_equal, host(final.params), gmm_run["final"]["params"])
  jax.tree.map(np.testing.assert_array_equal, host(final.ema_params), gmm_run["final"]["ema"])


def test_a_refused_resume_closes_the_checkpoints(gmm_run, tmp_path, monkeypatch):
  """The restore path is covered too: a resume refused for another config still closes the checkpoint manager."""
  closed = []
  close = checkpoints.Checkpointer.close
  monkeypatch.setattr(checkpoints.Checkpointer, "close", lambda self: (closed.append(self.directory), close(self)))
  changed = dataclasses.replace(gmm_run["config"], seed=1)
  with pytest.raises(loop.ResumeMismatchError, match="seed"):
    train.train(changed, gmm_run["workdir"])
  assert [str(d) for d in closed] == [str(gmm_run["workdir"] / "checkpoints")]


def test_resume_with_another_config_is_an_error(gmm_run):
  """A workdir holding a checkpoint of another teacher run (optimiser, seed or preconditioning) is refused with
  loop.ResumeMismatchError naming each differing key with its old and new value; nothing is trained or exported."""
  config, workdir = gmm_run["config"], gmm_run["workdir"]
  exported = os.path.getmtime(workdir / "teacher")
  for changed, message in (
      (dataclasses.replace(config, train=dataclasses.replace(config.train, lr=1e-2)), r"loop\.lr: 0\.003 -> 0\.01"),
      (dataclasses.replace(config, seed=1), r"task\.seed: 0 -> 1"),
      (dataclasses.replace(config, precond=dataclasses.replace(config.precond, sigma_data=0.6)),
       r"task\.precond\.sigma_data: 0\.5 -> 0\.6")):
    with pytest.raises(loop.ResumeMismatchError, match=rf"holds a checkpoint \(step 300\) .*: {message}\."):
      train.train(changed, workdir)
  assert os.path.getmtime(workdir / "teacher") == exported
  assert checkpoints.Checkpointer(workdir / "checkpoints").all_steps() == [200, 300]


@pytest.mark.parametrize("change", [{"log_every": 1}, {"checkpoint_every": 7}, {"keep": 5}, {"progress": False},
                                    {"sample_every": 5}, {"sample_steps": 3}, {"num_samples": 16}])
def test_resume_identity_ignores_logging_checkpoints_and_pictures(change):
  """The loop's run identity of a teacher run (what its checkpoint must match) and the train mode's experiment
  identity (what its workdir must match) leave out logging, checkpoint, progress and picture settings."""
  config = tiny_config()
  changed = dataclasses.replace(config, train=dataclasses.replace(config.train, **change))
  task = {"seed": config.seed, "data": config.data}
  assert loop.run_identity(changed.train, task) == loop.run_identity(config.train, task)
  identity = modes.MODES.get("train").identity
  assert identity(changed) == identity(config)


@pytest.mark.parametrize("change", [{"lr": 1e-2}, {"batch_size": 128}, {"warmup_steps": 5}, {"lr_decay": "linear"},
                                    {"lr_end_factor": 0.1}, {"grad_clip": 0.5}, {"ema_decay": 0.99},
                                    {"steps": 1000}])
def test_resume_identity_holds_every_optimisation_setting(change):
  """Every loop setting that changes the result is in the run identity, steps included under a decaying lr (more
  steps stretch the decay), and so is the task's identity."""
  config = tiny_config()
  assert config.train.lr_decay == "cosine"
  changed = dataclasses.replace(config.train, **change)
  task = {"seed": config.seed}
  (key,) = change
  assert config_utils.diff(loop.run_identity(config.train, task), loop.run_identity(changed, task)) == [f"loop.{key}"]
  assert config_utils.diff(loop.run_identity(config.train, task),
                           loop.run_identity(config.train, {"seed": 1})) == ["task.seed"]
  identity = modes.MODES.get("train").identity
  assert identity(dataclasses.replace(config, train=changed)) != identity(config)


def test_a_constant_lr_teacher_may_run_longer():
  """With a constant learning rate, steps is left out of the identities, so a finished run can be extended."""
  config = tiny_config()
  constant = dataclasses.replace(config, train=dataclasses.replace(config.train, lr_decay="constant"))
  longer = dataclasses.replace(constant, train=dataclasses.replace(constant.train, steps=1000))
  task = {"seed": config.seed}
  assert loop.run_identity(longer.train, task) == loop.run_identity(constant.train, task)
  assert "steps" not in loop.run_identity(constant.train, task)["loop"]
  identity = modes.MODES.get("train").identity
  assert identity(longer) == identity(constant) != identity(config)


def test_exported_teacher_rebuilds_the_denoiser(gmm_run, tmp_path):
  """load_teacher rebuilds the run's EMA denoiser from the export; the picture sampler follows the labels; exports
  whose parameters or metadata do not fit are refused."""
  backbone, params, precond, metadata = train.load_teacher(gmm_run["workdir"] / "teacher")
  assert precond == gmm_run["config"].precond
  assert metadata["steps"] == gmm_run["config"].train.steps and metadata["dataset"] == "gmm"
  assert np.isfinite(metadata["final_loss"]) and metadata["wall_time_s"] > 0
  assert metadata["num_params"] == train.num_params(params)
  x = np.random.RandomState(3).randn(5, 2).astype(np.float32)
  sigma, label = np.array([0.01, 0.1, 1.0, 10.0, 80.0], np.float32), np.arange(5, dtype=np.int32)
  denoise = jax.jit(lambda p: make_denoiser(backbone, p, precond, label)(x, sigma))
  np.testing.assert_array_equal(denoise(params), denoise(gmm_run["final"]["ema"]))

  # The picture sampler: more Heun steps give other (finer) samples; the labels select the mixture component.
  noise = np.random.RandomState(4).randn(64, 2).astype(np.float32)
  components = np.arange(64, dtype=np.int32) % 8
  coarse = train.make_sampler(backbone, precond, 1)(params, noise, components)
  fine = train.make_sampler(backbone, precond, 6)(params, noise, components)
  assert coarse.shape == fine.shape == (64, 2) and not np.allclose(coarse, fine, atol=1e-3)
  mixture = data.get_dataset("gmm", num_samples=8, mixture="ring8", labels=True).mixture
  nearest = np.argmin(np.linalg.norm(np.asarray(fine)[:, None] - np.asarray(mixture.means)[None], axis=-1), axis=1)
  assert np.mean(nearest == components) > 0.4  # chance is 1/8; a 300-step toy teacher gets about 2/3

  # Parameters that do not fit the metadata's backbone: a clear error.
  wrong = tmp_path / "wrong"
  narrower = json.loads(json.dumps(metadata))
  narrower["backbone_kwargs"]["width"] = 16
  checkpoints.save_pytree(wrong, params, narrower)
  with pytest.raises(ValueError, match="do not fit the backbone"):
    train.load_teacher(wrong)
  not_teacher = tmp_path / "not_teacher"
  checkpoints.save_pytree(not_teacher, params, {"note": "no backbone"})
  with pytest.raises(ValueError, match="not an exported teacher"):
    train.load_teacher(not_teacher)


def test_labels_reach_a_conditional_model(gmm_run, tmp_path):
  """A class-conditional teacher uses its labels, and a conditional model on unlabelled data (or another number of
  classes) is refused before training."""
  backbone, params, precond, _ = train.load_teacher(gmm_run["workdir"] / "teacher")
  assert backbone.num_classes == 8
  x = jnp.ones((2, 2))
  denoise = jax.jit(lambda label: make_denoiser(backbone, params, precond, label)(x, 1.0))
  assert not np.allclose(denoise(jnp.array([0, 0])), denoise(jnp.array([5, 5])))

  config = configs_gmm.get_config("tiny")
  config.model.kwargs.num_classes = 8  # a conditional model needs labelled data
  with pytest.raises(ValueError, match="class-conditional"):
    train.train(train.TeacherConfig.from_config(config), tmp_path / "unlabelled")
  config.data.options.labels = True
  config.model.kwargs.num_classes = 5
  with pytest.raises(ValueError, match="num_classes=5"):
    train.train(train.TeacherConfig.from_config(config), tmp_path / "five")


def test_model_must_fit_the_data(tmp_path):
  """A backbone whose input shape is not the data's is refused before any checkpoint is written."""
  config = configs_gmm.get_config("tiny")
  config.model.kwargs.data_dim = 3
  message = r"MLP\(data_dim=3\) takes samples of shape \(3,\), but the data shape is \(2,\)"
  with pytest.raises(ValueError, match=message):
    train.train(train.TeacherConfig.from_config(config), tmp_path / "w")
  assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


# --- pictures ---------------------------------------------------------------------------------------------------------

def test_image_grid_pixels(tmp_path):
  """image_grid maps [-1, 1] to 0..255 with white padding; save_image_grid upscales and checks the shape."""
  images = np.stack([np.full((2, 3, 1), -1.0), np.full((2, 3, 1), 1.0), np.zeros((2, 3, 1))])
  grid = viz.image_grid(images, ncol=2, padding=1)
  assert grid.shape == (2 * 3 + 1, 2 * 4 + 1, 1)
  assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 255 and grid[4, 1, 0] == 128 and grid[0, 0, 0] == 255
  path = viz.save_image_grid(images, tmp_path / "g" / "grid.png", ncol=2, scale=3)
  assert Image.open(path).size == (3 * 9, 3 * 7)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    viz.save_image_grid(np.zeros((2, 3, 3)), tmp_path / "bad.png")


def test_plots_write_files_and_check_input(tmp_path):
  """The scatter, comparison, bar and line plots write files, honour their options and check their inputs."""
  points = np.random.RandomState(0).randn(50, 2)
  assert os.path.getsize(viz.save_scatter(points, tmp_path / "s.png", reference=points, limit=3.0)) > 0
  with pytest.raises(ValueError, match=r"\[N, 2\]"):
    viz.save_scatter(np.zeros((5, 3)), tmp_path / "s3.png")
  rows = {"teacher": np.zeros((4, 8, 8, 1)), "euler": np.ones((4, 8, 8, 1))}
  small = Image.open(viz.save_comparison_grid(rows, tmp_path / "c.png", title="NFE 3")).size
  large = Image.open(viz.save_comparison_grid(rows, tmp_path / "c2.png", title="NFE 3", scale=2.0)).size
  assert large[0] > 1.5 * small[0] and large[1] > 1.5 * small[1]
  figure = viz.scatter_figure(points, limit=3.0)
  assert figure.axes[0].get_xlim() == (-3.0, 3.0) and len(figure.axes[0].collections) == 1
  assert len(viz.scatter_figure(points, reference=points).axes[0].collections) == 2
  with pytest.raises(ValueError, match="same shape"):
    viz.save_comparison_grid({"a": np.zeros((4, 8, 8, 1)), "b": np.zeros((3, 8, 8, 1))}, tmp_path / "c2.png")
  assert os.path.getsize(viz.save_bar_plot({"euler": 0.3, "mteo": 0.1}, tmp_path / "b.png",
                                           errors={"euler": 0.01, "mteo": 0.02})) > 0
  assert viz.bar_plot_figure({"a": 1.0}, log_y=True).axes[0].get_yscale() == "log"
  grouped = viz.grouped_bar_plot_figure({"euler": {"base": 0.3, "mteo": 0.1}, "heun": {"base": 0.2}})
  assert [t.get_text() for t in grouped.axes[0].get_legend().get_texts()] == ["base", "mteo"]
  assert len(grouped.axes[0].patches) == 3  # the missing (heun, mteo) bar is a gap
  with pytest.raises(ValueError, match="non-empty"):
    viz.grouped_bar_plot_figure({"euler": {}})
  with pytest.raises(ValueError, match="positive"):
    viz.save_bar_plot({"a": 0.0}, tmp_path / "b0.png", log_y=True)
  curves = {"euler": ([3, 5, 9], [0.3, 0.1, 0.03])}
  assert os.path.getsize(viz.save_line_plot(curves, tmp_path / "l.png", xlabel="NFE")) > 0
  figure = viz.line_plot_figure(curves, log_x=False)
  assert (figure.axes[0].get_xscale(), figure.axes[0].get_yscale()) == ("linear", "log")
  with pytest.raises(ValueError, match="log_y=False"):
    viz.save_line_plot({"x": ([1, 2], [0.0, 1.0])}, tmp_path / "l0.png")
  viz.plt.close("all")


def test_save_samples_picks_the_picture(tmp_path):
  """save_samples draws an image grid for images, a projection for points and a histogram for 1-D samples."""
  assert train.save_samples(np.zeros((4, 8, 8, 1)), tmp_path / "img.png") is not None
  assert Image.open(tmp_path / "img.png").size == (4 * (2 * 9 + 1),) * 2  # 2x2 grid, 4x upscaled for 8x8 data
  assert train.save_samples(np.zeros((10, 3)), tmp_path / "pts.png", reference=np.ones((5, 3))) is not None
  assert train.save_samples(np.zeros((10, 1)), tmp_path / "hist.png") == tmp_path / "hist.png"   # a histogram
