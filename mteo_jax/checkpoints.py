"""Checkpoints of training state (orbax ``CheckpointManager``) and small stand-alone artefacts (``save_pytree``).

``Checkpointer`` keeps the newest ``max_to_keep`` steps of a run, each an orbax ``Composite`` of the state pytree
(``StandardSave``) and a JSON metadata dict (``JsonSave``). Saves are asynchronous: ``save`` returns once the arrays are
copied off the devices, so the next training step may donate them; every read waits for pending writes first.
Typed PRNG keys (``jax.random.key``) are stored as key data and restored as typed keys of the same implementation.

Interruptions: a save that was started either lands whole or is reported lost. ``close`` (and leaving a ``with``
block, on any exception, ``KeyboardInterrupt`` and ``SystemExit`` included) waits for the pending save first; a save
that could not complete is reported as a ``LostCheckpointWarning`` (and an absl warning) naming the directory and the
step. A process killed mid-save (SIGKILL, power loss) leaves orbax's ``<step>.orbax-checkpoint-tmp`` directory behind:
the next ``Checkpointer`` on that directory reports the lost step and the latest complete one, then removes the
leftover. ``sigterm_as_exit`` turns SIGTERM into ``SystemExit`` so that a terminated training loop waits too.

``save_pytree`` writes one artefact, a directory of three files that numpy alone can read (no orbax, no nesting, so it
ships as package data): ``arrays.npz`` (one entry per leaf), ``tree.json`` (the leaf paths, shapes and dtypes) and
``metadata.json`` (the caller's metadata).

Both check a restore target against what is stored before reading any array: another structure, shape or dtype is a
``ValueError`` that names the first mismatching leaf, e.g. ``params/Dense_0/kernel``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import threading
import uuid
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from mteo_jax import files

PYTREE_FORMAT = "mteo_jax.pytree"
PYTREE_VERSION = 1
_ARRAYS_FILE, _TREE_FILE, _METADATA_FILE = "arrays.npz", "tree.json", "metadata.json"

LeafSpec = tuple[tuple[int, ...], str]  # (shape, dtype name)


# ----------------------------------------------------------------------------------------------------------------------
# Pytree helpers shared by both formats


def _key_entry(key: Any) -> tuple[str, Any]:
  """One step of a ``jax.tree_util`` key path as ``(kind, value)``: dict key, sequence index or attribute name."""
  if isinstance(key, jax.tree_util.DictKey):
    if not isinstance(key.key, (str, int)) or isinstance(key.key, bool):
      raise TypeError(f"only str or int dict keys can be stored, got {key.key!r} of type {type(key.key).__name__}")
    return ("dict", key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return ("index", key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ("attr", key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return ("index", key.key)
  raise TypeError(f"unsupported pytree key {key!r} of type {type(key).__name__}")


def _path_name(entries) -> str:
  """A readable leaf path such as ``opt_state/1/0/mu/Dense_0/kernel``."""
  return "/".join(str(value) for _, value in entries) or "<root>"


def _is_prng_key(leaf: Any) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _target_spec(leaf: Any) -> LeafSpec:
  """Shape and dtype a target leaf expects in storage (typed keys: their key data)."""
  if _is_prng_key(leaf):
    data = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(data.shape), np.dtype(data.dtype).name
  if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
    return tuple(leaf.shape), np.dtype(leaf.dtype).name
  if isinstance(leaf, (bool, int, float, complex)):
    array = np.asarray(leaf)
    return tuple(array.shape), array.dtype.name
  raise TypeError(f"unsupported leaf of type {type(leaf).__name__}; expected an array, a ShapeDtypeStruct or a "
                  "Python number")


def _format_spec(spec: LeafSpec) -> str:
  return f"shape {spec[0]} dtype {spec[1]}"


def _check_against_stored(where: str, target, stored: dict[str, LeafSpec]) -> None:
  """Raise ``ValueError`` naming the first target leaf whose path, shape or dtype differs from ``stored``."""
  target_leaves = jax.tree_util.tree_flatten_with_path(target)[0]
  target_names = []
  for path, leaf in target_leaves:
    name = _path_name([_key_entry(k) for k in path])
    target_names.append(name)
    if name not in stored:
      raise ValueError(f"{where} does not match the target: target leaf {name!r} ({_format_spec(_target_spec(leaf))}) "
                       f"is not stored; stored leaves: {sorted(stored)[:20]}")
    expected, found = _target_spec(leaf), stored[name]
    if expected != found:
      raise ValueError(f"{where} does not match the target at leaf {name!r}: expected {_format_spec(expected)}, "
                       f"found {_format_spec(found)}")
  extra = sorted(set(stored) - set(target_names))
  if extra:
    raise ValueError(f"{where} does not match the target: stored leaf {extra[0]!r} ({_format_spec(stored[extra[0]])}) "
                     f"is missing from the target ({len(extra)} such leaves)")


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)) and not _is_prng_key(value):
    return np.asarray(value).tolist()
  raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _to_json(metadata: dict | None) -> dict:
  """``metadata`` as plain JSON types (numpy/jax numbers and arrays become numbers and lists)."""
  if metadata is None:
    return {}
  if not isinstance(metadata, dict):
    raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
  return json.loads(json.dumps(metadata, default=_json_default))


def _local_or_remote(path: os.PathLike | str) -> epath.Path:
  """An absolute ``epath.Path`` (local paths are made absolute; ``gs://`` and the like are kept)."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints


class LostCheckpointWarning(UserWarning):
  """A checkpoint save that was started but never completed: its step cannot be restored."""


def _report_lost(message: str) -> None:
  logging.warning("%s", message)
  warnings.warn(message, LostCheckpointWarning, stacklevel=3)


def _unfinished_writes(directory: epath.Path) -> list[tuple[int | None, epath.Path]]:
  """``(step, path)`` of every temporary directory that a save left in ``directory`` without finalising it.

  With orbax 0.12 on a local disk that is ``<step>.orbax-checkpoint-tmp`` (older versions appended ``-<timestamp>``);
  on GCS it is a ``<step>`` directory without its commit file. ``step`` is None for a name without a step.
  """
  found = []
  for temporary in ocp.path.step.all_temporary_paths(directory):
    path = temporary.get()
    try:
      step = ocp.path.step.step_from_checkpoint_name(path.name)
    except ValueError:
      step = None
    found.append((step, path))
  return sorted(found, key=lambda item: (item[0] is None, item[0] or 0, item[1].name))


def _remove(paths: list[epath.Path]) -> None:
  if jax.process_index() != 0:  # one process removes, as orbax does
    return
  for path in paths:
    try:
      path.rmtree()
    except FileNotFoundError:
      pass


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
  """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread instead of ending the process on the spot.

  Python's default for SIGTERM (``kill PID``, a scheduler's pre-emption notice) skips every ``finally`` block, so a
  pending asynchronous checkpoint would be lost; as an exception it unwinds the training loop, which waits for the
  save and then exits. Does nothing off the main thread or when SIGTERM already has a handler; the default comes back
  after the block.
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def terminate(signum, frame):
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, terminate)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def quiet_abandoned_reads() -> None:
  """Drops the ``RuntimeError: Event loop is closed`` that tensorstore's reads still in flight report, one traceback
  each, after a failed orbax restore closed its event loop (a read of an unreadable file fails the restore at once;
  its sibling reads end later and cannot deliver their results). Only that error is dropped; every other one reaches
  the ``sys.unraisablehook`` that was in place. Called where a read failed; installed once per process."""
  previous = sys.unraisablehook
  if getattr(previous, "_mteo_quiet_abandoned_reads", False):
    return

  def hook(unraisable) -> None:
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook._mteo_quiet_abandoned_reads = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
  """Within the block, SIGINT and SIGTERM (where Python handles them) are held, and the first one that arrived is
  delivered to its handler when the block ends (``KeyboardInterrupt``; ``SystemExit`` under ``sigterm_as_exit``).

  ``Checkpointer.save`` holds them while it waits for the previous save and starts its own. Orbax starts a save in
  several steps, one of them a background thread writing into a temporary directory: an interrupt between them leaves
  that thread writing into a directory that the clean-up then removes, and one in orbax's wait logs the interrupt's
  traceback; either comes after the run's last line. Held, the interrupt comes once the save has started, and the
  exit waits for it to land. Does nothing off the main thread.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  held: list[int] = []
  previous = {}
  for signum in (signal.SIGINT, signal.SIGTERM):
    handler = signal.getsignal(signum)
    if callable(handler):   # SIG_DFL and SIG_IGN (ints) and handlers set outside Python (None) are left alone
      previous[signum] = handler
      signal.signal(signum, lambda number, frame: held.append(number))
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if held:
      previous[held[0]](held[0], None)


class Checkpointer:
  """The newest ``max_to_keep`` checkpoints of a run in ``directory``, saved every ``save_interval_steps`` steps.

  Use it as a context manager (or call ``close``): leaving the block, on success or on any exception, waits for the
  pending save, so that a step whose save was started is on disk before an interrupt propagates. Opening a directory
  reports (``LostCheckpointWarning``) and removes what saves killed mid-write left there; a directory belongs to one
  run at a time, so an unfinished save in it is one that will never finish.
  """

  def __init__(self, directory: os.PathLike | str, *, max_to_keep: int = 3, save_interval_steps: int = 1000):
    for label, value in (("max_to_keep", max_to_keep), ("save_interval_steps", save_interval_steps)):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    self.directory = _local_or_remote(directory)
    self.max_to_keep, self.save_interval_steps = int(max_to_keep), int(save_interval_steps)
    self._pending: set[int] = set()  # steps whose save was started and not yet seen to land
    self._start_errors: dict[int, str] = {}  # pending steps whose `save` call itself raised: why
    self._closed = False
    # Leftovers are removed by `_clear_unfinished_writes` (reported first, synchronously), not by orbax's
    # `cleanup_tmp_directories`, which deletes them in the background, unreported, before the first save.
    options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, save_interval_steps=self.save_interval_steps)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        # Handlers named up front: a fresh manager on an existing run can then read item metadata before any save.
        item_handlers={"state": ocp.StandardCheckpointHandler(), "metadata": ocp.JsonCheckpointHandler()})
    try:
      self._clear_unfinished_writes()
    except BaseException:
      self._manager.close()
      raise

  def _resume_note(self) -> str:
    steps = self._manager.all_steps()
    if steps:
      return f"the latest complete checkpoint is step {max(steps)}, where a resumed run restarts"
    return "there is no complete checkpoint, so a resumed run starts from step 0"

  def _clear_unfinished_writes(self) -> None:
    """Report, then remove, the temporary directories of saves that never completed (a process killed mid-save)."""
    leftovers = _unfinished_writes(self.directory)
    if not leftovers:
      return
    complete = set(self._manager.all_steps())
    for step in sorted({s for s, _ in leftovers if s is not None}):
      names = ", ".join(p.name for s, p in leftovers if s == step)
      if step in complete:  # a second, unfinished write of a step that is complete: nothing is lost
        logging.warning("removing %s in %s: an unfinished write of step %d, which is complete", names,
                        self.directory, step)
      else:
        _report_lost(f"checkpoint step {step} in {self.directory} was interrupted while being written and is lost; "
                     f"{self._resume_note()} (removing the unfinished {names})")
    unnamed = [p.name for s, p in leftovers if s is None]
    if unnamed:
      _report_lost(f"{self.directory} holds unfinished checkpoint writes {unnamed}; {self._resume_note()} "
                   "(removing them)")
    _remove([p for _, p in leftovers])

  def save(self, step: int, state: Any, metadata: dict | None = None, *, force: bool = False) -> bool:
    """Save ``state`` at ``step`` if ``step`` is a multiple of ``save_interval_steps`` or ``force``; True if saved.

    A step already saved is skipped (False) unless ``force``, which refuses to overwrite it; a step older than the
    latest saved one is an error (a run writing into another run's directory), so nothing is silently replaced.
    The save goes on in the background after this returns; ``close`` waits for it. A save that is interrupted while
    starting (an exception or ``KeyboardInterrupt`` inside this call) is checked by ``close`` like any other: it
    landed, or it is reported lost and its temporary directory removed. SIGINT and SIGTERM are held while the previous
    save is waited for and this one starts (``signals_held``), and raised once it has started.
    """
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    latest = self._manager.latest_step()
    if latest is not None and step < latest:
      raise ValueError(f"cannot save step {step} in {self.directory}: it already holds the newer step {latest}; "
                       "resume from it or use a fresh directory")
    if latest is not None and step == latest:
      if force:
        raise ValueError(f"step {step} is already saved in {self.directory}; a checkpoint is never overwritten")
      return False
    if not force and not self._manager.should_save(step):
      return False
    # An interrupt that arrives from here on is raised once this save has started whole: in orbax's wait for the
    # previous save or in its start, it would leave that save unfinished, or a thread writing this one into a
    # directory that the clean-up removes (a traceback after the run's last line either way).
    with signals_held():
      # Orbax waits for the previous save before starting the next; waiting here first reports its failure as its own.
      self.wait_until_finished()
      args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(_to_json(metadata)))
      self._pending.add(step)
      try:
        saved = bool(self._manager.save(step, args=args, force=force))
      except BaseException as error:
        self._start_errors[step] = f"its save was interrupted while starting ({type(error).__name__}: {error})"
        raise
      if not saved:
        self._pending.discard(step)
    return saved

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none (waits for pending saves)."""
    self.wait_until_finished()
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The saved steps in increasing order (waits for pending saves)."""
    self.wait_until_finished()
    return sorted(self._manager.all_steps())

  def _resolve_step(self, step: int | None) -> int:
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint to restore in directory {self.directory}")
    if step is None:
      return steps[-1]
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in directory {self.directory}; saved steps: {steps}")
    return int(step)

  def delete_advice(self, step: int) -> str:
    """What to do about the unreadable checkpoint ``step``: delete its directory, and where a resumed run restarts."""
    earlier = [s for s in self._manager.all_steps() if s < step]
    then = (f"resume from the checkpoint at step {max(earlier)}" if earlier else
            "train the run again from step 0")
    return f"delete {self.directory / str(step)} to {then}"

  @contextlib.contextmanager
  def _reading(self, step: int) -> Iterator[None]:
    """Turns an error of orbax or tensorstore while reading ``step`` (a truncated or corrupted file: pages of
    asynchronous tracebacks) into one ``UnreadableFileError`` naming the step's directory and what to do."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (JSONDecodeError, tensorstore's ValueError, OSError, KeyError, ...)
      quiet_abandoned_reads()
      raise files.UnreadableFileError(
          f"the checkpoint at step {step} in {self.directory} cannot be read ({files.reason(error)}); "
          f"{self.delete_advice(step)}") from None

  def stored_leaves(self, step: int | None = None) -> dict[str, LeafSpec]:
    """``{leaf path: (shape, dtype)}`` of the state saved at ``step`` (default: the latest), read from its metadata.

    Raises:
      FileNotFoundError: no such step. files.UnreadableFileError: its metadata cannot be read.
    """
    step = self._resolve_step(step)
    with self._reading(step):
      tree = self._manager.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
      leaves = jax.tree_util.tree_flatten_with_path(tree,
                                                    is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
      return {_path_name([_key_entry(k) for k in path]): (tuple(meta.shape), np.dtype(meta.dtype).name)
              for path, meta in leaves[0]}

  def restore(self, target: Any, step: int | None = None) -> Any:
    """The state saved at ``step`` (default: the latest), with the structure, shapes and dtypes of ``target``.

    ``target`` is a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``s); restored arrays take its
    shardings.

    Raises:
      FileNotFoundError: no such step. ValueError: a stored structure, shape or dtype other than the target's (naming
      the first such leaf). files.UnreadableFileError: a file of the step cannot be read (truncated, corrupted); the
      message names the step's directory and says to delete it.
    """
    step = self._resolve_step(step)
    _check_against_stored(f"checkpoint {self.directory}/{step}", target, self.stored_leaves(step))
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def metadata(self, step: int | None = None) -> dict:
    """The metadata dict saved with ``step`` (default: the latest).

    Raises:
      FileNotFoundError: no such step. files.UnreadableFileError: it cannot be read (as in ``restore``).
    """
    step = self._resolve_step(step)
    with self._reading(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
      metadata = restored["metadata"]
      if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"its metadata is a {type(metadata).__name__}, not a dict")
    return dict(metadata or {})

  def wait_until_finished(self) -> None:
    """Block until every asynchronous save has been written.

    A save that could not complete is reported (``LostCheckpointWarning``), its temporary directory removed, and the
    error raised. If the wait itself is interrupted (``KeyboardInterrupt``, ``SystemExit``), the pending step is
    reported as still being written (it lands if the process lives long enough; otherwise the next ``Checkpointer``
    on the directory reports it lost) and the interrupt propagates.
    """
    pending = sorted(self._pending)
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      self._pending.clear()
      self._report_unlanded(pending, f"its write failed ({type(error).__name__}: {error})")
      raise
    except BaseException:
      for step in pending:
        _report_lost(f"checkpoint step {step} in {self.directory} was still being written when the wait for it was "
                     "interrupted; it is lost if the process ends before the write does (the next run reports it)")
      raise
    self._pending.clear()
    self._report_unlanded(pending, "its write did not complete")

  def _report_unlanded(self, steps: list[int], reason: str) -> None:
    """Report the ``steps`` whose save was started and is not on disk, and remove their temporary directories."""
    start_errors, self._start_errors = self._start_errors, {}
    if not steps:
      return
    landed = set(ocp.path.step.checkpoint_steps(self.directory))
    lost = [step for step in steps if step not in landed]
    if not lost:
      return
    with contextlib.suppress(Exception):
      self._manager.reload()  # forget the lost steps that orbax may still list
    leftovers = _unfinished_writes(self.directory)
    for step in lost:
      _report_lost(f"checkpoint step {step} in {self.directory} was not saved: "
                   f"{start_errors.get(step, reason)}; it is lost and {self._resume_note()}")
    _remove([path for s, path in leftovers if s in lost])

  def close(self) -> None:
    """Finish pending saves and release orbax's resources (idempotent).

    Raises, after releasing what it can, when a pending save could not complete (reported as in
    ``wait_until_finished``); an interrupt while waiting propagates at once, leaving the background write running and
    the checkpointer open (a second ``close`` waits again).
    """
    if self._closed:
      return
    try:
      self.wait_until_finished()
    except Exception:
      self._closed = True
      with contextlib.suppress(Exception):  # orbax re-raises the failed save on every wait, its close included
        self._manager.close()
      raise
    # An interrupted wait (KeyboardInterrupt, SystemExit) propagates above with the manager open: closing again waits.
    self._closed = True
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    """Close, on success and on every exception: the pending save lands (or is reported lost) before it propagates.

    While an exception propagates, a failed pending save is reported (warning) and noted on that exception, which
    stays the one raised.
    """
    if exc_type is None:
      self.close()
      return
    try:
      self.close()
    except Exception as error:  # already reported; the original exception (an interrupt, say) is the one to see
      if hasattr(exc, "add_note"):
        exc.add_note(f"while unwinding, a pending checkpoint save in {self.directory} failed: {error!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Stand-alone artefacts


def _is_artefact(path: epath.Path) -> bool:
  tree_file = path / _TREE_FILE
  if not tree_file.exists():
    return False
  try:
    return json.loads(tree_file.read_text()).get("format") == PYTREE_FORMAT
  except (ValueError, AttributeError):
    return False


def save_pytree(path: os.PathLike | str, tree: Any, metadata: dict | None = None, *, overwrite: bool = False) -> None:
  """Write ``tree`` (arrays, numbers, typed PRNG keys) and ``metadata`` as the artefact directory ``path``.

  An existing ``path`` is an error unless ``overwrite``; even then only a previous artefact is replaced, never some
  other directory, and the new one is complete before the old one is removed. Only process 0 writes.

  Raises:
    FileExistsError: ``path`` exists (without ``overwrite``, or it is not an artefact). files.UnreadableFileError:
      ``path`` is an artefact whose ``tree.json`` cannot be read (it is left as it is; the message says to delete it).
  """
  path = _local_or_remote(path)
  metadata = _to_json(metadata)
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    if (path / _TREE_FILE).exists():   # replaced only once read: an unreadable one is the user's to delete
      _read_manifest(path, f"it is not replaced unread: delete {path} to write it again")
    if not _is_artefact(path):
      raise FileExistsError(f"{path} exists and is not a save_pytree artefact; refusing to replace it")
  if jax.process_index() != 0:  # artefacts are small and replicated: one writer on a multi-host run
    return
  leaves, arrays = [], {}
  for index, (key_path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    entries = [_key_entry(k) for k in key_path]
    entry = {"path": [list(e) for e in entries], "name": _path_name(entries), "array": f"leaf_{index}"}
    if _is_prng_key(leaf):
      entry.update(prng_impl=str(jax.random.key_impl(leaf)), key_dtype=str(leaf.dtype))
      value = np.asarray(jax.random.key_data(leaf))
    elif isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
      value = np.asarray(leaf)
    else:
      raise TypeError(f"cannot store leaf {entry['name']!r} of type {type(leaf).__name__}; expected an array, a typed "
                      "PRNG key or a Python number")
    if value.dtype.kind not in "biufc" and not value.dtype.type.__module__.startswith("ml_dtypes"):
      raise TypeError(f"cannot store leaf {entry['name']!r} of dtype {value.dtype}; expected a numeric array")
    entry.update(shape=list(value.shape), dtype=value.dtype.name)
    arrays[entry["array"]] = value
    leaves.append(entry)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  manifest = {"format": PYTREE_FORMAT, "version": PYTREE_VERSION, "leaves": leaves}

  # Write beside the destination, then swap, so a crash never leaves a half-written artefact at `path`.
  staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
  staging.mkdir(parents=True)
  (staging / _ARRAYS_FILE).write_bytes(buffer.getvalue())
  (staging / _TREE_FILE).write_text(json.dumps(manifest, indent=1))
  (staging / _METADATA_FILE).write_text(json.dumps(metadata, indent=1, sort_keys=True))
  if path.exists():
    retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
    path.rename(retired)
    staging.rename(path)
    retired.rmtree()
  else:
    staging.rename(path)


_LOAD_ADVICE = "delete it and rerun the job that wrote it"


def _read_manifest(path: epath.Path, advice: str = _LOAD_ADVICE) -> dict:
  """The artefact's ``tree.json``. Raises FileNotFoundError (no directory), ValueError (no ``tree.json``: not an
  artefact; another version) or ``files.UnreadableFileError`` (a ``tree.json`` that cannot be read)."""
  if not path.exists():
    raise FileNotFoundError(f"no saved pytree at {path} (expected a directory with {_ARRAYS_FILE}, {_TREE_FILE} and "
                            f"{_METADATA_FILE})")
  if not (path / _TREE_FILE).exists():
    raise ValueError(f"{path} is not a save_pytree artefact (no {_TREE_FILE})")
  manifest = _read_json(path / _TREE_FILE, advice)
  if manifest.get("format") != PYTREE_FORMAT or not isinstance(manifest.get("leaves"), list):
    raise files.UnreadableFileError(f"{path / _TREE_FILE} is not the manifest of a save_pytree artefact (format "
                                    f"{manifest.get('format')!r}); {advice}")
  if manifest.get("version") != PYTREE_VERSION:
    raise ValueError(f"{path}: unsupported artefact version {manifest.get('version')}; expected {PYTREE_VERSION}")
  return manifest


def _read_json(path: epath.Path, advice: str) -> dict:
  """A JSON object of an artefact (local or remote); ``files.UnreadableFileError`` where it cannot be read."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as error:
    raise files.UnreadableFileError(f"{path} cannot be read ({files.reason(error)}); {advice}") from None
  if not isinstance(value, dict):
    raise files.UnreadableFileError(f"{path} cannot be read (a JSON {type(value).__name__}, expected an object); "
                                    f"{advice}")
  return value


def _stored_value(entry: dict, arrays) -> Any:
  value = arrays[entry["array"]]
  if value.dtype.name != entry["dtype"]:  # dtypes numpy cannot name in .npz (bfloat16, ...) come back as raw bytes
    value = value.view(jnp.dtype(entry["dtype"]))
  return value


def _insert(container: Any, entries: list, value: Any) -> Any:
  """Place ``value`` at ``entries`` in nested dicts (dict keys, attributes) and lists (indices); [] is the root."""
  if not entries:
    return value
  (kind, key), rest = entries[0], entries[1:]
  if container is None:
    container = [] if kind == "index" else {}
  if kind == "index":
    container.extend([None] * (key + 1 - len(container)))
    container[key] = _insert(container[key], rest, value)
  else:
    container[key] = _insert(container.get(key), rest, value)
  return container


def load_pytree(path: os.PathLike | str, target: Any = None) -> Any:
  """The pytree saved at ``path``.

  Without ``target``: nested dicts (dict keys, attributes) and lists (indices) of numpy arrays, typed PRNG keys as jax
  key arrays. With ``target``: its structure, with shapes and dtypes checked first; each leaf comes back as the
  target's leaf type (jax arrays, on the target's sharding; numpy arrays; Python numbers).

  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: not an artefact, or one that does not match ``target``.
    files.UnreadableFileError (a ValueError): a file of it that cannot be read (the message names it).
  """
  path = _local_or_remote(path)
  manifest = _read_manifest(path)
  try:
    with np.load(io.BytesIO((path / _ARRAYS_FILE).read_bytes()), allow_pickle=False) as arrays:
      stored = {entry["name"]: (entry, _stored_value(entry, arrays)) for entry in manifest["leaves"]}
  except Exception as error:  # noqa: BLE001 (zipfile.BadZipFile, EOFError, KeyError, OSError, ValueError, ...)
    raise files.UnreadableFileError(f"{path / _ARRAYS_FILE} cannot be read ({files.reason(error)}); "
                                    f"{_LOAD_ADVICE}") from None

  def as_stored(entry: dict, value: np.ndarray) -> Any:
    if entry.get("prng_impl"):
      return jax.random.wrap_key_data(value, impl=entry["prng_impl"])
    return value

  if target is None:
    tree = None
    for entry, value in stored.values():
      tree = _insert(tree, [tuple(e) for e in entry["path"]], as_stored(entry, value))
    return {} if tree is None else tree

  specs = {name: (tuple(entry["shape"]), entry["dtype"]) for name, (entry, _) in stored.items()}
  _check_against_stored(f"saved pytree {path}", target, specs)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
  restored = []
  for key_path, leaf in leaves:
    name = _path_name([_key_entry(k) for k in key_path])
    entry, value = stored[name]
    if _is_prng_key(leaf) or entry.get("prng_impl"):
      # Key data and raw uint32 arrays have equal shapes and dtypes: the key type itself must match too.
      expected = str(leaf.dtype) if _is_prng_key(leaf) else None
      if entry.get("key_dtype") != expected:
        describe = lambda key_dtype: f"a {key_dtype} key" if key_dtype else f"raw {entry['dtype']} data"
        raise ValueError(f"saved pytree {path} does not match the target at leaf {name!r}: expected "
                         f"{describe(expected)}, found {describe(entry.get('key_dtype'))}")
      restored.append(jax.device_put(jax.random.wrap_key_data(value, impl=entry["prng_impl"]),
                                     getattr(leaf, "sharding", None)))
    elif isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
      restored.append(jax.device_put(value, getattr(leaf, "sharding", None)))
    elif isinstance(leaf, (bool, int, float, complex)):
      restored.append(type(leaf)(value.item()))
    elif isinstance(leaf, np.generic):
      restored.append(value[()])
    else:
      restored.append(value)
  return jax.tree_util.tree_unflatten(treedef, restored)


def load_metadata(path: os.PathLike | str) -> dict:
  """The metadata dict saved with the artefact at ``path`` (raises as ``load_pytree``)."""
  path = _local_or_remote(path)
  _read_manifest(path)
  return _read_json(path / _METADATA_FILE, _LOAD_ADVICE)
