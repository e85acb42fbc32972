"""Reading back what the library wrote: a file that cannot be read is one clear error, never a wall of tracebacks.

Everything a rerun reads from a workdir (``experiment.json``, checkpoints, ``metrics.jsonl``, the teacher row, the
reference cache, tables, schedules, ``results.json``) can be truncated or corrupted by a full disk, a killed copy or a
hand edit. Such a file raises ``UnreadableFileError``, whose message names the file, says what is wrong in a few words
and what to do (delete it, or that directory, to compute it again); the command line prints it as one line. Nothing
unreadable is deleted or replaced without saying so.
"""

from __future__ import annotations

import json
import os
from typing import Any


class UnreadableFileError(ValueError):
  """A file or directory written by this library that cannot be read back (truncated, corrupted, or not what its name
  says); the message names it and says what to do."""


def reason(error: BaseException, limit: int = 160) -> str:
  """``Type: message`` of ``error`` on one line, cut to ``limit`` characters (tensorstore's messages run to pages)."""
  text = " ".join(str(error).split())
  if len(text) > limit:
    text = text[:limit - 3] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_json(path: str | os.PathLike, advice: str, *, kind: type | None = dict) -> Any:
  """The JSON value in ``path``; ``UnreadableFileError`` naming it, why and ``advice`` where it cannot be read or
  (``kind``) is not of that type.

  Raises:
    FileNotFoundError: no file at ``path`` (callers check for it where a missing file is normal).
    UnreadableFileError: an unreadable file, invalid JSON, or a value that is not a ``kind``.
  """
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    raise
  except (OSError, ValueError) as error:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
    raise UnreadableFileError(f"{os.fspath(path)} cannot be read ({reason(error)}); {advice}") from None
  if kind is not None and not isinstance(value, kind):
    raise UnreadableFileError(f"{os.fspath(path)} cannot be read (a JSON {type(value).__name__}, expected a "
                              f"{kind.__name__}); {advice}")
  return value
