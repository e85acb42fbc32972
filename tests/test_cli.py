"""The command line end to end on the tiny configs, the mode registry, and every config file's variants."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mteo_jax import checkpoints, main, train
from mteo_jax.nets import make_denoiser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"gmm": ("default", "tiny"), "digits": ("default", "cond", "tiny", "dit", "dit_tiny"), "fmnist": ("default", "gpu", "tiny"),
           "cifar10": ("default", "tiny")}
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DATA_SHAPES = {"gmm": (2,), "digits": (8, 8, 1), "fmnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def load_config_file(name: str):
  """``configs/<name>.py`` loaded by path, as ``--config=configs/<name>.py`` does (no package import needed)."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_cli(*args: str) -> subprocess.CompletedProcess:
  # One CPU device whatever the calling environment says, and XLA's cheap compile pipeline: these runs test the
  # plumbing, and compiling dominates their time.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  proc = subprocess.run([sys.executable, "-m", "mteo_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


@pytest.mark.parametrize("name, variant, overrides, steps", [
    ("gmm", "tiny", ("--config.train.steps=40", "--config.train.sample_every=20", "--config.train.sample_steps=2"), 40),
    ("digits", "tiny", (), 6),
    ("digits", "dit_tiny", (), 6),   # the DiT backbone through the same CLI
])
def test_tiny_config_trains_end_to_end(tmp_path, name, variant, overrides, steps):
  workdir = tmp_path / name
  proc = run_cli(f"--config=configs/{name}.py:{variant}", f"--workdir={workdir}", *overrides)
  assert f"step {steps}/{steps}" in proc.stderr  # progress lines are logged
  assert "checkpoint_manager.py" not in proc.stderr  # ... and orbax's INFO chatter is not

  assert checkpoints.Checkpointer(workdir / "checkpoints").latest_step() == steps
  records = train.read_metrics(workdir)
  assert records[-1]["step"] == steps and all(np.isfinite(r["loss"]) for r in records)
  pictures = sorted(p.name for p in (workdir / "samples").iterdir())
  assert pictures[-1] == f"step_{steps:07d}.png" and Image.open(workdir / "samples" / pictures[-1]).size[0] > 16
  if name == "gmm":
    assert pictures == ["step_0000020.png", "step_0000040.png"]  # the overrides took effect

  backbone, params, precond, metadata = train.load_teacher(workdir / "teacher")
  assert backbone.data_shape == DATA_SHAPES[name] and metadata["steps"] == steps
  x = jax.random.normal(jax.random.key(0), (3,) + DATA_SHAPES[name])
  x0_hat = jax.jit(lambda p, x: make_denoiser(backbone, p, precond)(x, jnp.array([0.1, 1.0, 10.0])))(params, x)
  assert x0_hat.shape == x.shape and np.all(np.isfinite(np.asarray(x0_hat)))


def test_unknown_mode_lists_the_valid_ones(tmp_path):
  config = load_config_file("gmm").get_config("tiny")
  config.mode = "distil"
  with pytest.raises(ValueError, match=r"unknown mode 'distil'; expected one of \['mteo', 'train'\]"):
    main.run(config, tmp_path)
  del config["mode"]
  with pytest.raises(ValueError, match="no 'mode'"):
    main.run(config, tmp_path)
  assert "train" in main.MODES and main.MODES.get("train") is train.train_mode


def test_a_registered_mode_is_dispatched(tmp_path):
  calls = []
  main.MODES.register("_probe")(lambda config, workdir: calls.append((config.seed, workdir)))
  try:
    config = load_config_file("gmm").get_config("tiny")
    config.mode = "_probe"
    main.run(config, tmp_path)
  finally:
    main.MODES._entries.pop("_probe")  # leave the registry as it was for other tests
  assert calls == [(0, os.fspath(tmp_path))]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_variants_build(name):
  module = load_config_file(name)
  assert "python -m mteo_jax.main --config=configs/" in module.__doc__
  for variant in CONFIGS[name]:
    config = train.TeacherConfig.from_config(module.get_config(None if variant == "default" else variant))
    assert config.precond.kind == "edm" and config.mode == "train"
    backbone = train.build_backbone(config.model, DATA_SHAPES[name])  # checks the output shape too
    assert backbone.num_classes == (10 if variant == "cond" else 0)
    if variant.endswith("tiny") or (name, variant) == ("cifar10", "default"):
      count = train.num_params(jax.eval_shape(backbone.init, jax.random.key(0)))
    if variant.endswith("tiny"):
      assert config.train.steps <= 300 and count < 100_000
    if (name, variant) == ("cifar10", "default"):
      assert 50e6 < count < 65e6, count  # DDPM++ CIFAR-10 size: EDM reports 56M; our UNet at its defaults has 61M
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("huge")


@pytest.mark.parametrize("name, variants", [("gmm", ("mteo", "mteo_full")),
                                            ("digits", ("mteo", "mteo_full", "mteo_dit")),
                                            ("fmnist", ("mteo", "mteo_full"))])
def test_mteo_variants_build(name, variants):
  from mteo_jax import config_utils, experiment  # noqa: PLC0415
  module = load_config_file(name)
  for variant in variants:
    config = module.get_config(variant)
    assert config.mode == "mteo" and "mteo" in main.MODES
    job = config_utils.from_dict(experiment.MTEOJobConfig, config_utils.to_plain(config.mteo), where="mteo")
    teacher = f"pretrained:{name}_dit" if variant == "mteo_dit" else f"pretrained:{name}"
    assert job.teacher == teacher and job.nfes == ((3, 4, 5) if variant == "mteo_full" else (3,))
    assert experiment.resolve_teacher(job.teacher).is_dir()   # shipped
