"""The CLI's modes and their configs: every key a mode reads has its default in the config tree.

A mode is a typed dataclass for the *whole* config (``mode``, ``seed``, ``overwrite`` and the mode's sections), a run
function and an experiment identity. ``base_config(mode)`` is that dataclass's defaults as an ``ml_collections``
``ConfigDict`` (the Flax examples' ``default.py``): a config file starts from it and overrides only what differs, so
every documented ``--config.<section>.<key>=value`` works for every variant. ``parse`` turns a config into the typed
dataclass, refusing unknown keys and sections the mode does not read (naming the valid ones) and checking every
value, all before any work; ``claim_workdir`` refuses a workdir that holds another experiment unless
``overwrite=True``.

    config = modes.base_config("mteo")               # in configs/<name>.py's get_config(variant)
    config.mteo.teacher = "pretrained:digits"
    modes.run(config, workdir)                       # parse -> claim the workdir -> the mode's run function

Adding a mode is one ``MODES.register`` call with its ``Mode``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any, Callable, Collection

import ml_collections
from absl import logging

from mteo_jax import comparison, config_utils, experiment, files, loop, parallel, train
from mteo_jax.registry import Registry

EXPERIMENT_FILE = "experiment.json"
# Entries of a workdir that are not the result of an experiment: caches that are keyed by their content.
_SHARED_ENTRIES = frozenset({EXPERIMENT_FILE, "references"})


@dataclasses.dataclass(frozen=True)
class Mode:
  """A mode of the CLI.

  Attributes:
    name: the value of ``config.mode``.
    config_class: a frozen dataclass for the whole config; every field has a default (nested dataclasses recurse).
      The built-in modes' have ``distributed`` and ``cluster`` (multi-host runs); a mode without them runs on one
      process.
    run: ``run(typed_config, workdir: Path)``.
    identity: ``identity(typed_config) -> dict``: what makes two runs in one workdir the same experiment (leave out
      what may change between a run and its resumption: logging, progress, evaluation sizes, ...).
    check: ``check(typed_config)``, or None: the checks that need the devices or the teacher (batch sizes over the
      devices, settings against the teacher's data and backbone), run before the workdir is claimed; raises
      ValueError.
  """
  name: str
  config_class: type
  run: Callable[[Any, Path], Any]
  identity: Callable[[Any], dict]
  check: Callable[[Any], None] | None = None


MODES: Registry[Mode] = Registry("mode")


class ConfigError(ValueError):
  """A config (or a workdir) that cannot be run: the message names the key, what it holds and what is expected."""


def _teacher_identity(config: train.TeacherConfig) -> dict:
  return {"mode": "train", **loop.run_identity(config.train, {
      "seed": config.seed, "data": config.data, "model": config.model, "precond": config.precond})}


def _check_train(config: train.TeacherConfig) -> None:
  loop.check_batch_size(config.train.batch_size, parallel.make_mesh(), where="train")


def _check_mteo(config: experiment.MTEOExperimentConfig) -> None:
  loop.check_batch_size(config.mteo.batch_size, parallel.make_mesh(), where="mteo")


MODES.register("train")(Mode("train", train.TeacherConfig, train.train, _teacher_identity, _check_train))
MODES.register("mteo")(Mode("mteo", experiment.MTEOExperimentConfig, experiment.run_mteo,
                            experiment.experiment_identity, _check_mteo))
MODES.register("compare")(Mode("compare", comparison.CompareConfig, comparison.run_compare,
                               comparison.compare_identity, comparison.check_runnable))
MODES.register("pd")(Mode("pd", comparison.PDConfig, comparison.run_compare, comparison.compare_identity,
                          comparison.check_runnable))


# --- defaults --------------------------------------------------------------------------------------------------------

def _config_value(value: Any) -> Any:
  """A default as a config value: a dataclass instance becomes a dict of its fields; tuples stay tuples (a list in a
  ConfigDict cannot be overridden from the command line, ``--config.gits.coeffs='(1.15,)'``)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _config_value(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
  if isinstance(value, (tuple, list)):
    return tuple(_config_value(v) for v in value)
  return config_utils.to_plain(value)


def defaults(cls: type) -> dict:
  """The defaults of a config dataclass as a nested dict (nested dataclass fields recurse by their type)."""
  hints = typing.get_type_hints(cls)
  tree = {}
  for field in dataclasses.fields(cls):
    if not field.init:
      continue
    kind = hints[field.name]
    if dataclasses.is_dataclass(kind) and field.default is dataclasses.MISSING:
      tree[field.name] = defaults(kind)
    elif field.default is not dataclasses.MISSING:
      tree[field.name] = _config_value(field.default)
    elif field.default_factory is not dataclasses.MISSING:
      tree[field.name] = _config_value(field.default_factory())
    else:
      raise TypeError(f"{cls.__name__}.{field.name} has no default; every config key needs one")
  return tree


def base_config(mode: str) -> ml_collections.ConfigDict:
  """Every key that ``mode`` reads, with its default: the config a config file starts from."""
  spec = _get_mode(mode)
  config = ml_collections.ConfigDict(defaults(spec.config_class))
  config.mode = mode
  return config


def model_config(backbone: str, **kwargs: Any) -> ml_collections.ConfigDict:
  """``{"backbone": name, "kwargs": {...}}`` holding every option of the backbone's module with its default, updated
  with ``kwargs``, so that each option can be overridden from the command line."""
  from mteo_jax.nets.backbone import BACKBONES  # noqa: PLC0415
  module = BACKBONES.get(backbone)
  options = {f.name: f.default for f in dataclasses.fields(module)
             if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING}
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(module)})
  if unknown:
    raise ValueError(f"unknown option(s) {unknown} of backbone {backbone!r}; its options: {sorted(options)}")
  options.update(kwargs)
  return ml_collections.ConfigDict({"backbone": backbone, "kwargs": options})


# --- parsing and the workdir -----------------------------------------------------------------------------------------

def _get_mode(name: Any) -> Mode:
  try:
    return MODES.get(name)
  except KeyError as error:
    raise ConfigError(error.args[0]) from None


def parse(config: ml_collections.ConfigDict | dict, overridden: Collection[str] | None = None) -> tuple[Mode, Any]:
  """``(mode, typed config)``; every key and value checked (unknown keys, sections the mode does not read, types,
  ranges, names of solvers, schedules, backbones, datasets, teachers), before any work.

  ``overridden``: the dotted keys set on the command line over a config file's variant (``main`` passes them). A
  comparison's method section that no listed method reads is an error where one of them sets it; without
  ``overridden``, where it differs from its defaults (``CompareConfig.check_unread``).
  """
  plain = config_utils.to_plain(config)
  if "mode" not in plain:
    raise ConfigError(f"the config has no 'mode'; expected one of {MODES.names()}")
  spec = _get_mode(plain["mode"])
  valid = [f.name for f in dataclasses.fields(spec.config_class) if f.init]
  unread = sorted(set(plain) - set(valid))
  if unread:
    raise ConfigError(f"mode {spec.name!r} does not read the config key(s) {unread}; its keys are {sorted(valid)} "
                      f"(start the config from modes.base_config({spec.name!r}))")
  try:
    typed = config_utils.from_dict(spec.config_class, plain, where="config")
    distributed, cluster = _distributed_settings(typed)
    distributed = parallel.distributed_choice(distributed)
    cluster.check()
    parallel.check_cpu_devices(getattr(typed, "cpu_devices", 0))
    if distributed == "false" and cluster != parallel.ClusterConfig():
      changed = config_utils.diff(config_utils.to_plain(parallel.ClusterConfig()), config_utils.to_plain(cluster))
      raise ValueError(f"cluster is set ({changed}) but distributed is False: cluster.* is read only with "
                       "distributed=True or auto")
    if hasattr(typed, "check_unread"):
      typed.check_unread(overridden)
    return spec, typed
  except (ValueError, KeyError, TypeError, FileNotFoundError) as error:
    message = error.args[0] if error.args else repr(error)
    raise ConfigError(f"invalid config for mode {spec.name!r}: {message}") from None


def _distributed_settings(typed: Any) -> tuple[Any, parallel.ClusterConfig]:
  """``(distributed, cluster)`` of a typed config; a mode without those keys runs on one process."""
  return getattr(typed, "distributed", False), getattr(typed, "cluster", parallel.ClusterConfig())


def check_workdir_path(workdir: str | os.PathLike) -> None:
  """Raises ConfigError where ``workdir`` is a file or lies under one (checked before any work)."""
  workdir = Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"the workdir {workdir} exists and is not a directory; give a new or empty directory")
  for path in workdir.parents:
    if path.exists():
      if not path.is_dir():
        raise ConfigError(f"the workdir {workdir} is, or lies under, the file {path}; give a directory")
      return


def claim_workdir(workdir: str | os.PathLike, identity: dict, *, overwrite: bool = False) -> None:
  """Marks ``workdir`` as holding the experiment ``identity`` (``experiment.json``).

  A workdir that holds results of another experiment is refused, naming the settings that differ, unless
  ``overwrite``: then those results (everything but the content-keyed ``references/`` cache) are deleted first. A
  workdir of the same experiment is resumed; one without results is simply claimed. A non-empty directory without
  ``experiment.json`` is refused whatever ``overwrite`` says: nothing that this library did not write is deleted.
  On a multi-host run every process checks and process 0 deletes and writes, between barriers.

  Raises:
    ConfigError: a workdir of another experiment (without ``overwrite``; only the settings that differ are named,
      ``key: saved -> current``), a non-empty directory without ``experiment.json``, or one that cannot be created.
    files.UnreadableFileError: an ``experiment.json`` that cannot be read (without ``overwrite``, which deletes the
      results as for another experiment).
  """
  workdir = Path(workdir)
  check_workdir_path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as error:
    raise ConfigError(f"cannot create the workdir {workdir} ({error.strerror or error}); give a directory that can "
                      "be created and written") from None
  marker = workdir / EXPERIMENT_FILE
  identity = config_utils.to_plain(identity)
  parallel.barrier("claim_workdir:start")   # every process looks before any writes (multi-host on a shared disk)
  held = [p for p in workdir.iterdir() if p.name not in _SHARED_ENTRIES]
  if marker.exists() and held:
    try:
      stored = files.read_json(marker, "it records which experiment the workdir holds: rerun with "
                               "--config.overwrite=True to delete the workdir's results and start again, or use "
                               "another workdir")
    except files.UnreadableFileError:
      if not overwrite:
        raise
      stored = None
    if stored != identity:
      if not overwrite:
        raise ConfigError(f"{workdir} holds another experiment ({describe_experiment_change(stored, identity)}); use "
                         "another workdir, rerun with the settings it was made with, or pass --config.overwrite=True "
                         "to delete its results and start again")
      logging.warning("overwrite=True: deleting the results of another experiment in %s: %s", workdir,
                      sorted(p.name for p in held))
      parallel.barrier("claim_workdir:checked")
      for path in held if parallel.is_writer() else ():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
  elif held and not marker.exists():
    raise ConfigError(f"{workdir} is not empty ({sorted(p.name for p in held)[:5]}) and holds no {EXPERIMENT_FILE} of "
                     "this library, so nothing in it is deleted or overwritten; use an empty or new workdir")
  if parallel.is_writer():
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True))
    os.replace(tmp, marker)
  parallel.barrier("claim_workdir:done")


def describe_experiment_change(stored: dict, identity: dict) -> str:
  """The settings at which the experiment of a workdir (``stored``) and this run's (``identity``) differ, as
  ``key: saved -> current``; another mode is only that: the other sections of two modes do not compare."""
  if stored.get("mode") != identity.get("mode"):
    return f"mode: {stored.get('mode', '<missing>')!r} -> {identity.get('mode')!r}, whose settings are not compared"
  return loop.describe_differences(stored, identity)


def prepare(config: ml_collections.ConfigDict | dict, overridden: Collection[str] | None = None) -> tuple[Mode, Any]:
  """``parse``, then the CPU device count (``parallel.use_cpu_devices``) and ``jax.distributed.initialize`` where
  ``config.distributed`` asks for it, then the mode's checks
  that need the devices or the teacher (``Mode.check``): every error a config can raise, as a ``ConfigError``, before
  the workdir is touched."""
  spec, typed = parse(config, overridden)
  try:   # before anything touches the devices: the CPU device count, then the processes of a multi-host run meet here
    parallel.use_cpu_devices(getattr(typed, "cpu_devices", 0))
    parallel.initialize_distributed(*_distributed_settings(typed))
  except ValueError as error:
    raise ConfigError(f"invalid config for mode {spec.name!r}: {error}") from None
  if spec.check is not None:
    try:
      spec.check(typed)
    except (ValueError, TypeError, FileNotFoundError) as error:
      message = error.args[0] if error.args else repr(error)
      raise ConfigError(f"invalid config for mode {spec.name!r}: {message}") from None
  return spec, typed


def run_prepared(spec: Mode, typed: Any, workdir: str | os.PathLike) -> Any:
  """Claims ``workdir`` for a ``prepare``d config, then runs its mode in it; returns the mode's result."""
  claim_workdir(workdir, spec.identity(typed), overwrite=typed.overwrite)
  return spec.run(typed, Path(workdir))


def run(config: ml_collections.ConfigDict | dict, workdir: str | os.PathLike,
        overridden: Collection[str] | None = None) -> Any:
  """Parses and checks ``config`` (``prepare``), claims ``workdir``, then runs ``config.mode`` in it; returns the
  mode's result."""
  return run_prepared(*prepare(config, overridden), workdir)
