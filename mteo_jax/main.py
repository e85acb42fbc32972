"""Command line: ``python -m mteo_jax.main --config=configs/<name>.py[:<variant>] --workdir=<dir> [overrides]``.

The config file's ``get_config(variant)`` builds an ml_collections ``ConfigDict``; ``--config.train.steps=10`` and the
like override single fields. ``config.mode`` picks the job from ``MODES``; a job is ``mode(config, workdir) -> None``
and converts the config to its typed dataclass itself. Adding one is a single line here:

    MODES.register("train")(train.train_mode)

Examples:
    python -m mteo_jax.main --config=configs/gmm.py:tiny --workdir=/tmp/gmm
    python -m mteo_jax.main --config=configs/digits.py --workdir=/tmp/digits --config.train.steps=2000

Multi-host: add ``jax.distributed.initialize()`` before ``run`` (every process runs the same command).
"""

from __future__ import annotations

import logging as pylogging
import os
from typing import Callable, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mteo_jax import experiment, train
from mteo_jax.registry import Registry

Mode = Callable[[ml_collections.ConfigDict, str], None]

MODES: Registry[Mode] = Registry("mode")
MODES.register("train")(train.train_mode)
MODES.register("mteo")(experiment.mteo_mode)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/gmm.py or configs/gmm.py:tiny (variant after the colon).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, pictures and exported models.")
flags.mark_flags_as_required(["config", "workdir"])


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Runs the job ``config.mode`` in ``workdir``."""
  if "mode" not in config:
    raise ValueError(f"the config has no 'mode'; expected one of {MODES.names()}")
  try:
    mode = MODES.get(config.mode)
  except KeyError as error:
    raise ValueError(error.args[0]) from None
  mode(config, os.fspath(workdir))


class _QuietLibraries(pylogging.Filter):
  """Drops INFO records of orbax (tens of lines per checkpoint), keeping its warnings and our own progress lines."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {list(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info("mode %r on %d device(s): %s", _CONFIG.value.mode, jax.device_count(), jax.devices())
  logging.info("config:\n%s", _CONFIG.value)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
