"""Command line: ``python -m mteo_jax.main --config=configs/<name>.py[:<variant>] --workdir=<dir> [overrides]``.

The config file's ``get_config(variant)`` starts from ``modes.base_config(mode)``, which holds every key the mode
reads with its default, so ``--config.<section>.<key>=value`` works for every key of every variant. ``config.mode``
picks the job from ``modes.MODES``; the whole config is checked (unknown keys, keys the mode does not read, values,
names, the workdir) before any work.

Examples:
    python -m mteo_jax.main --config=configs/gmm.py:tiny --workdir=/tmp/gmm
    python -m mteo_jax.main --config=configs/digits.py --workdir=/tmp/digits --config.train.steps=2000
    python -m mteo_jax.main --config=configs/digits.py:mteo --workdir=/tmp/mteo --config.mteo.steps=500

Multi-host (a TPU pod slice, several GPU hosts): every process runs the same command with
``--config.distributed=True`` (or ``auto``), which calls ``jax.distributed.initialize()`` before anything else
(``parallel.initialize_distributed``; ``--config.cluster.*`` where the cluster is not detected); ``launch/tpu_pod.sh``
does it on a Cloud TPU slice.
"""

from __future__ import annotations

import importlib.util
import logging as pylogging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Collection, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mteo_jax import files, loop, modes
from mteo_jax.modes import MODES  # noqa: F401  (the registry of modes, re-exported)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/gmm.py or configs/gmm.py:tiny (variant after the colon).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, pictures and exported models.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, overridden: Collection[str] | None = None):
  """Runs the job ``config.mode`` in ``workdir`` (``modes.run``: parse, check, claim the workdir, run)."""
  return modes.run(config, workdir, overridden)


class _QuietLibraries(pylogging.Filter):
  """Drops INFO records of orbax (tens of lines per checkpoint), keeping its warnings and our own progress lines."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def check_overrides(argv: Sequence[str]) -> str | None:
  """The message for a ``--config=FILE`` that does not exist, or for the first ``--config.<key>=...`` in ``argv`` that
  names no key of the config file's config (an unknown key, or a section the chosen variant's mode does not read), or
  None when they all exist.

  ml_collections would fail on such an override with a bare ``AttributeError``/``KeyError`` traceback; this names the
  key, the variant and the valid keys of the section instead.
  """
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if spec is None:
    return None
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    return f"no config file {path!r} (e.g. --config=configs/digits.py:mteo)"
  if not overrides:
    return None
  module_spec = importlib.util.spec_from_file_location("_mteo_jax_config_check", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None) if variant else module.get_config()
  for dotted in overrides:
    node, walked = config, []
    for key in dotted.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        where = ".".join(walked) or "the config"
        valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        mode = config.get("mode", "?")
        return (f"--config.{dotted}: {where} of {spec} (mode {mode!r}) has no key {key!r}; valid keys of {where}: "
                f"{valid}")
      node = node[key]
      walked.append(key)
  return None


def resume_command(argv: Sequence[str]) -> str:
  """The command that resumes this run: the same arguments, without ``--config.overwrite=...`` (which would start
  again from scratch)."""
  args = [a for a in argv if not a.startswith("--config.overwrite")]
  return shlex.join(["python", "-m", "mteo_jax.main", *args])


def interrupt_message(signum: int, workdir: str | os.PathLike, argv: Sequence[str]) -> str:
  """One line for a run ended by SIGINT or SIGTERM: where it stopped, what is saved, and the command that resumes."""
  where = loop.progress()
  name = signal.Signals(signum).name
  if where is None:
    state = "before any training; what the job finished (references solved, rows, tables) is kept"
  else:
    run_dir = os.path.relpath(where.run_dir) if Path(where.run_dir).is_absolute() else str(where.run_dir)
    saved_step = where.newest_on_disk()
    saved = (f"its checkpoint at step {saved_step} ({run_dir}) is saved" if saved_step is not None else
             "no checkpoint of it yet")
    state = (f"in {where.desc} at step {where.step} of {where.steps}: {saved}, and what the job finished before it "
             "is kept")
  return f"interrupted ({name}) {state} in {workdir}. Resume with: {resume_command(argv)}"


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {list(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    overridden = set(config_flags.get_override_values(flags.FLAGS["config"]))
    modes.check_workdir_path(_WORKDIR.value)
    # Checked before anything is logged or done: one line, not a traceback.
    spec, typed = modes.prepare(_CONFIG.value, overridden)
    if jax.process_index() > 0:   # a multi-host run: process 0 reports, the others only warn
      logging.set_verbosity(logging.WARNING)
    logging.info("mode %r on %d device(s): %s", _CONFIG.value.mode, jax.device_count(), jax.devices())
    logging.info("config:\n%s", _CONFIG.value)
    from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import: not before the config is checked)
    with checkpoints.sigterm_as_exit():   # SIGTERM unwinds like Ctrl-C: pending checkpoints finish, then one line
      modes.run_prepared(spec, typed, _WORKDIR.value)
  except (KeyboardInterrupt, SystemExit) as error:
    if isinstance(error, SystemExit) and error.code != 128 + signal.SIGTERM:
      raise
    signum = signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM
    print(f"\n{interrupt_message(signum, _WORKDIR.value, sys.argv[1:])}", file=sys.stderr)
    sys.exit(128 + signum)
  except (modes.ConfigError, loop.ResumeMismatchError) as error:   # nothing was changed: rerun with other settings
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  except files.UnreadableFileError as error:   # the message names the file and what to do (delete it, ...)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)
  except loop.NonFiniteError as error:  # the step is named and the last checkpoint on disk is good
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  problem = check_overrides(sys.argv[1:])
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  app.run(main)
