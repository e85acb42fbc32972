"""The command line end to end on the tiny configs, the mode registry, every config file's variants (each holds
every key its mode reads, with its default), and the one-line errors for bad overrides."""

import dataclasses
import functools
import glob
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mteo_jax import checkpoints, comparison, main, modes, teachers, train
from mteo_jax.nets import make_denoiser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"gmm": ("default", "tiny"), "digits": ("default", "cond", "tiny", "dit", "dit_tiny"),
           "fmnist": ("default", "gpu", "tiny"), "cifar10": ("default", "tiny")}
CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                      if not os.path.basename(p).startswith("_"))
# A config error is reported before any work: Python, JAX and the library imported, the config read, then exit 2. Its
# CPU time is compared with that of importing the CLI alone, measured in the same run (a ratio, not a wall-clock
# target: CI's machines differ in speed); loading a teacher, solving references or compiling would cost many times
# more than the margin.
ERROR_IMPORT_FACTOR, ERROR_MARGIN_SECONDS = 1.5, 1.0
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
DATA_SHAPES = {"gmm": (2,), "digits": (8, 8, 1), "fmnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def load_config_file(name: str):
  """``configs/<name>.py`` loaded by path, as ``--config=configs/<name>.py`` does (no package import needed)."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}", os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_cli_unchecked(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float, str]:
  """``python -m mteo_jax.main ARGS`` in the repository, whatever its exit status: ``(proc, CPU seconds, "wall W s
  (cpu C s, load L on N cores)")``. The CPU time of the command is what it costs whatever else the machine runs (on
  an idle machine its wall time is about the same: the work before an error is single-threaded); the wall time and
  load are reported beside it."""
  # One CPU device whatever the calling environment says, and XLA's cheap compile pipeline: these runs test the
  # plumbing, and compiling dominates their time.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "mteo_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
  return proc, cpu, f"wall {wall:.1f} s (cpu {cpu:.1f} s, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"


@functools.lru_cache(maxsize=None)
def import_cpu_seconds() -> float:
  """CPU seconds of ``python -c "import mteo_jax.main"`` in the environment ``run_cli_unchecked`` gives its commands."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  subprocess.run([sys.executable, "-c", "import mteo_jax.main"], cwd=REPO, env=env, check=True, timeout=120)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def assert_reported_before_any_work(cpu: float, times: str) -> None:
  """A config error cost no more than importing the CLI (``ERROR_IMPORT_FACTOR`` times, plus the margin)."""
  baseline = import_cpu_seconds()
  limit = ERROR_IMPORT_FACTOR * baseline + ERROR_MARGIN_SECONDS
  assert cpu < limit, f"{times} to report a config error; importing the CLI alone took {baseline:.1f} s of CPU"


def run_cli(*args: str) -> subprocess.CompletedProcess:
  """``python -m mteo_jax.main ARGS``, which must succeed."""
  proc, _, _ = run_cli_unchecked(*args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def dotted_keys(tree, prefix: str = "") -> list[str]:
  """The dotted paths of every leaf of a nested dict/ConfigDict (an empty section counts as a leaf)."""
  keys = []
  for key, value in tree.items():
    if hasattr(value, "items") and len(value):
      keys.extend(dotted_keys(value, f"{prefix}{key}."))
    else:
      keys.append(f"{prefix}{key}")
  return keys


def has_key(config, dotted: str) -> bool:
  """Whether ``config`` holds the dotted key ``a.b.c`` (what ``--config.a.b.c=...`` needs)."""
  for key in dotted.split("."):
    if not hasattr(config, "keys") or key not in config:
      return False
    config = config[key]
  return True


def get_key(config, dotted: str):
  """The value at the dotted key ``a.b.c``."""
  for key in dotted.split("."):
    config = config[key]
  return config


@pytest.mark.parametrize("name, variant, overrides, steps", [
    ("gmm", "tiny", ("--config.train.steps=40", "--config.train.sample_every=20", "--config.train.sample_steps=2"), 40),
    ("digits", "tiny", (), 6),
    ("digits", "dit_tiny", (), 6),   # the DiT backbone through the same CLI
])
def test_tiny_config_trains_end_to_end(tmp_path, name, variant, overrides, steps):
  """A tiny train variant runs through the CLI: progress logged, checkpoints, metrics, pictures (overrides applied),
  and an exported teacher whose denoiser maps data to data; the workdir is claimed for this experiment."""
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
  claimed = json.loads((workdir / modes.EXPERIMENT_FILE).read_text())
  assert claimed["mode"] == "train" and claimed["task"]["data"]["name"] == name


def test_unknown_mode_lists_the_valid_ones(tmp_path):
  """An unknown or missing mode is a ConfigError listing the registered modes, raised before the workdir is touched;
  the registry holds Mode entries (typed config, run function, identity)."""
  config = load_config_file("gmm").get_config("tiny")
  config.mode = "distil"
  valid = r"expected one of \['compare', 'mteo', 'pd', 'train'\]"
  with pytest.raises(modes.ConfigError, match=r"unknown mode 'distil'; " + valid):
    main.run(config, tmp_path / "w")
  del config["mode"]
  with pytest.raises(modes.ConfigError, match=r"no 'mode'; " + valid):
    main.run(config, tmp_path / "w")
  assert not (tmp_path / "w").exists()
  assert main.MODES is modes.MODES and "train" in main.MODES and "mteo" in main.MODES
  spec = main.MODES.get("train")
  assert isinstance(spec, modes.Mode) and spec.name == "train"
  assert spec.config_class is train.TeacherConfig and spec.run is train.train


@dataclasses.dataclass(frozen=True)
class _ProbeConfig:
  """The whole config of the test's ``_probe`` mode."""
  mode: str = "_probe"
  seed: int = 0
  overwrite: bool = False
  level: int = 1


def test_a_registered_mode_is_dispatched(tmp_path):
  """A Mode registered in MODES gets its base config, its typed config parsed by main.run, the workdir claimed with
  its identity, and its run function called with (typed config, workdir)."""
  calls = []
  main.MODES.register("_probe")(modes.Mode("_probe", _ProbeConfig, lambda config, workdir: calls.append(
      (config, workdir)), lambda config: {"mode": "_probe", "level": config.level}))
  try:
    config = modes.base_config("_probe")
    assert config.to_dict() == {"mode": "_probe", "seed": 0, "overwrite": False, "level": 1}
    config.seed, config.level = 3, 2
    main.run(config, tmp_path)
    config.levle = 4
    with pytest.raises(modes.ConfigError, match=r"does not read the config key\(s\) \['levle'\]"):
      main.run(config, tmp_path)
  finally:
    main.MODES._entries.pop("_probe")  # leave the registry as it was for other tests
  assert calls == [(_ProbeConfig(seed=3, level=2), tmp_path)]
  assert json.loads((tmp_path / modes.EXPERIMENT_FILE).read_text()) == {"mode": "_probe", "level": 2}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_variants_build(name):
  """Every train variant parses, its backbone maps data of the dataset's shape to that shape, and the tiny and
  CIFAR-10 networks have the expected sizes; an unknown variant is an error."""
  module = load_config_file(name)
  assert "python -m mteo_jax.main --config=configs/" in module.__doc__
  for variant in CONFIGS[name]:
    spec, config = modes.parse(module.get_config(None if variant == "default" else variant))
    assert spec.name == "train" and isinstance(config, train.TeacherConfig)
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


MTEO_VARIANTS = {"gmm": ("mteo", "mteo_full"), "digits": ("mteo", "mteo_full", "mteo_dit"),
                 "fmnist": ("mteo", "mteo_full")}


@pytest.mark.parametrize("name", sorted(MTEO_VARIANTS))
def test_mteo_variants_build(name):
  """Every mteo variant parses to the mteo mode on a shipped teacher, with the cells it documents."""
  module = load_config_file(name)
  for variant in MTEO_VARIANTS[name]:
    spec, config = modes.parse(module.get_config(variant))
    assert spec.name == "mteo" and config.mode == "mteo"
    job = config.mteo
    teacher = f"pretrained:{name}_dit" if variant == "mteo_dit" else f"pretrained:{name}"
    assert job.teacher == teacher and job.nfes == ((3, 4, 5) if variant == "mteo_full" else (3,))
    assert teachers.resolve_teacher(job.teacher).is_dir()   # shipped


COMPARE_FILES = ("gmm", "digits", "fmnist")


@pytest.mark.parametrize("name", COMPARE_FILES)
def test_compare_variants_build(name):
  """Every comparison variant parses to the compare mode on the shipped teacher, iPNDM and DPM-Solver++(2M), with the
  methods and NFEs it documents; ``pd`` to the pd mode with DDIM at 8, 4, 2 and 1 steps."""
  module = load_config_file(name)
  for variant in comparison.COMPARE_VARIANTS:
    spec, config = modes.parse(module.get_config(variant))
    if variant == "pd":
      assert spec.name == "pd" and config.compare.teacher == f"pretrained:{name}"
      assert config.compare.solvers == ("euler",) and config.compare.nfes == (8, 4, 2, 1)
      assert config.compare.methods == ("base", "pd") and config.pd.start_steps == 64 and config.pd.end_steps == 1
      continue
    assert spec.name == "compare" and config.compare.teacher == f"pretrained:{name}"
    assert config.compare.solvers == ("ipndm", "dpmpp_2m")
    assert config.compare.nfes == ((3, 4, 5) if variant == "schedules" else (3,))
    methods = config.compare.methods
    assert methods[0] == "base" and (variant in methods or variant in ("schedules", "combined", "compare"))
  assert modes.parse(module.get_config("compare"))[1].compare.methods == comparison.COMPARE_METHODS


def test_the_variant_lists_cover_every_variant():
  """The lists above name every variant of every config file (so none escapes the build tests)."""
  assert sorted(CONFIGS) == CONFIG_FILES
  for name in CONFIG_FILES:
    compare = comparison.COMPARE_VARIANTS if name in COMPARE_FILES else ()
    assert sorted(load_config_file(name).VARIANTS) == sorted(CONFIGS[name] + MTEO_VARIANTS.get(name, ()) + compare), \
        name


# --- every default in the config, one-line errors -----------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIG_FILES)
def test_every_variant_holds_every_default_and_parses(name):
  """For every variant of configs/<name>.py: every key of modes.base_config(mode) is in the variant's config (so each
  documented --config.<key> override exists), a model section holds every option of its backbone, and modes.parse
  accepts the variant."""
  module = load_config_file(name)
  for variant in module.VARIANTS:
    config = module.get_config(variant)
    base = modes.base_config(config.mode)
    keys = dotted_keys(base)
    assert len(keys) > 10 and "seed" in keys and "overwrite" in keys
    missing = [k for k in keys if not has_key(config, k)]
    assert not missing, f"{name}:{variant} lacks {missing}"
    assert sorted(config.keys()) == sorted(base.keys()), f"{name}:{variant}"   # no section the mode does not read
    if "model" in config:
      options = modes.model_config(config.model.backbone).kwargs
      assert set(options) <= set(config.model.kwargs), f"{name}:{variant}: {set(options) - set(config.model.kwargs)}"
    spec, typed = modes.parse(config)
    assert spec.name == config.mode and typed.mode == config.mode
    # A list in a ConfigDict cannot be overridden on the command line (absl accepts tuples): every sequence a
    # variant holds is a tuple, nested sections' defaults included.
    lists = [k for k in dotted_keys(config) if isinstance(get_key(config, k), list)]
    assert not lists, f"{name}:{variant} holds lists at {lists}"


def test_an_mteo_override_of_an_existing_key_parses(monkeypatch):
  """--config=configs/digits.py:mteo --config.mteo.steps=500 names an existing key (check_overrides passes it) and
  the config with the override applied parses, with the override in the typed config."""
  argv = ["--config=configs/digits.py:mteo", "--workdir=/unused", "--config.mteo.steps=500"]
  monkeypatch.chdir(REPO)   # the config path is relative to the repository, as on the command line
  assert main.check_overrides(argv) is None
  config = load_config_file("digits").get_config("mteo")
  config.mteo.steps = 500
  spec, typed = modes.parse(config)
  assert spec.name == "mteo" and typed.mteo.steps == 500 and typed.mteo.teacher == "pretrained:digits"


def test_check_overrides_names_the_valid_keys(monkeypatch):
  """check_overrides names the first override of a key that does not exist, with the valid keys of its section, and
  passes overrides of existing keys (or a command line without overrides)."""
  monkeypatch.chdir(REPO)
  assert main.check_overrides(["--config=configs/gmm.py:tiny", "--config.train.steps=3"]) is None
  assert main.check_overrides(["--config=configs/gmm.py:tiny"]) is None
  problem = main.check_overrides(["--config=configs/gmm.py:tiny", "--config.model.kwargs.widht=3"])
  assert re.search(r"--config\.model\.kwargs\.widht: .*has no key 'widht'; valid keys of model\.kwargs: \[.*'width'",
                   problem), problem
  problem = main.check_overrides(["--config=configs/nope.py", "--config.seed=1"])
  assert "no config file 'configs/nope.py'" in problem
  # Without any override too (absl would otherwise fail later with a traceback about an _ErrorConfig).
  assert main.check_overrides(["--config=configs/nope.py:mteo", "--workdir=/unused"]) == (
      "no config file 'configs/nope.py' (e.g. --config=configs/digits.py:mteo)")


@pytest.mark.parametrize("args, message", [
    (("--config=configs/digits.py:mteo", "--config.train.steps=7"),
     r"^error: --config\.train\.steps: the config of configs/digits\.py:mteo \(mode 'mteo'\) has no key 'train'; "
     r"valid keys of the config: \['cluster', 'cpu_devices', 'distributed', 'mode', 'mteo', 'overwrite', "
     r"'seed'\]$"),
    (("--config=configs/gmm.py:tiny", "--config.train.stepz=3"),
     r"^error: --config\.train\.stepz: train of configs/gmm\.py:tiny \(mode 'train'\) has no key 'stepz'; "
     r"valid keys of train: \['batch_size', .*'steps', 'warmup_steps'\]$"),
])
def test_an_override_of_a_missing_key_exits_2_with_one_line(tmp_path, args, message):
  """An override naming a key that the variant's config lacks (a section of another mode, a misspelt key) exits 2
  at the cost of an import with exactly one line naming the valid keys, and touches no workdir."""
  workdir = tmp_path / "w"
  proc, cpu, times = run_cli_unchecked(*args, f"--workdir={workdir}", timeout=60)
  assert proc.returncode == 2, proc.stderr[-4000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr[-4000:]
  assert not workdir.exists()
  assert_reported_before_any_work(cpu, times)


def test_a_tuple_option_of_a_method_section_is_overridable_and_checked(tmp_path):
  """--config.gits.coeffs and --config.gits.costs (tuples in a nested dataclass default) take a value from the
  command line; a bad one exits 2 at the cost of an import with one line naming the key."""
  for override, message in (("--config.gits.coeffs=(1.15,-1.0)", "gits.coeffs must be a non-empty tuple"),
                            ("--config.gits.costs=('dev',)", "gits.costs must be a non-empty tuple"),
                            ("--config.gits.num_warmup=5000", "gits.num_warmup=5000 exceeds compare.num_train=1024")):
    workdir = tmp_path / "w"
    proc, cpu, times = run_cli_unchecked("--config=configs/gmm.py:gits", f"--workdir={workdir}", override,
                                          timeout=60)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr[-4000:]
    assert not workdir.exists()
    assert_reported_before_any_work(cpu, times)


def test_narrowing_a_variants_methods_runs_and_an_unread_override_is_refused(tmp_path):
  """``configs/fmnist.py:compare`` sizes the mteo section; ``--config.compare.methods`` without MTEO is accepted (the
  run gets as far as claiming the workdir, here one of another experiment, refused), while also setting
  ``--config.mteo.steps`` is an error."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "experiment.json").write_text('{"mode": "other"}')
  (workdir / "kept.txt").write_text("kept")
  narrowed = "--config.compare.methods=('base','gits')"
  for extra, message in (((), "holds another experiment"),
                         (("--config.mteo.steps=5",), r"mteo\.steps\) but no method")):
    proc, cpu, times = run_cli_unchecked("--config=configs/fmnist.py:compare", f"--workdir={workdir}", narrowed,
                                          *extra, timeout=60)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr[-4000:]
    assert (workdir / "kept.txt").read_text() == "kept"
    assert_reported_before_any_work(cpu, times)


def test_a_workdir_that_cannot_be_made_exits_2_with_one_line(tmp_path):
  """A workdir under a file is refused in one line before any work; one that cannot be created (under /proc) names
  the reason instead of a traceback."""
  (tmp_path / "file").write_text("kept")
  proc, cpu, times = run_cli_unchecked("--config=configs/gmm.py:pd", f"--workdir={tmp_path / 'file' / 'sub'}",
                                        timeout=60)
  assert proc.returncode == 2, proc.stderr[-4000:]
  assert proc.stderr.strip().splitlines() == [f"error: the workdir {tmp_path / 'file' / 'sub'} is, or lies under, "
                                              f"the file {tmp_path / 'file'}; give a directory"]
  assert_reported_before_any_work(cpu, times)
  with pytest.raises(modes.ConfigError, match=r"cannot create the workdir /proc/mteo_jax_test \(.+\); give a"):
    modes.claim_workdir("/proc/mteo_jax_test", {"mode": "x"})


def test_a_bad_value_exits_2_naming_the_valid_values(tmp_path):
  """--config.mteo.lr_decay=cosin (next to a valid override) exits 2 at the cost of an import with a one-line error
  naming the valid values, nothing else on stderr, and before the workdir is claimed."""
  workdir = tmp_path / "w"
  proc, cpu, times = run_cli_unchecked("--config=configs/digits.py:mteo", f"--workdir={workdir}",
                                        "--config.mteo.steps=500", "--config.mteo.lr_decay=cosin", timeout=60)
  assert proc.returncode == 2, proc.stderr[-4000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: invalid config for mode 'mteo': unknown mteo.lr_decay 'cosin'; expected one of "
                    "['constant', 'cosine', 'linear']"], proc.stderr[-4000:]
  assert proc.stderr.strip().splitlines() == errors  # nothing else: no traceback, no config dump before the error
  assert not workdir.exists()
  assert_reported_before_any_work(cpu, times)


def test_parse_refuses_a_section_the_mode_does_not_read():
  """modes.parse on an mteo config with a train section (or a misspelt section) is a ConfigError naming the mode's
  valid keys, and so is an unknown key inside a section."""
  config = load_config_file("digits").get_config("mteo")
  config.train = modes.base_config("train").train
  with pytest.raises(modes.ConfigError, match=r"mode 'mteo' does not read the config key\(s\) \['train'\]; its keys "
                                              r"are \['cluster', 'cpu_devices', 'distributed', 'mode', 'mteo', "
                                              r"'overwrite', 'seed'\]"):
    modes.parse(config)
  config = load_config_file("digits").get_config("mteo").to_dict()
  config["mteo"]["stepz"] = 3
  with pytest.raises(modes.ConfigError, match=r"mteo\.stepz.*valid keys of config\.mteo: \[.*'steps'"):
    modes.parse(config)
  config = load_config_file("gmm").get_config("tiny")
  config.mteo = modes.base_config("mteo").mteo
  with pytest.raises(modes.ConfigError, match=r"mode 'train' does not read the config key\(s\) \['mteo'\]; its "
                                              r"keys are \['cluster', 'cpu_devices', 'data', 'distributed', 'mode', "
                                              r"'model', "
                                              r"'overwrite', 'precond', 'seed', "
                                              r"'train'\]"):
    modes.parse(config)
