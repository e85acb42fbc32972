"""A job's progress in stages: "[k/n] what" when a stage starts, its time and the job's ETA when it ends, and a line
whenever a stage has been silent for ``silence_seconds`` (a long compile, a sampling pass with no bar).

    progress = JobProgress(total=14)
    with progress.stage("teacher row (Heun, 99 NFE)", kind="teacher row"):
      ...

The ETA of the job is the sum, over the stages still to come, of the mean time of the finished stages of the same
kind (a second MTEO fit takes about as long as the first); where a kind has not run yet, it is a lower bound ("at
least"). Progress bars (``tqdm``) and log lines (``absl.logging``) count as output: the "still working" line comes
only when neither has printed for ``silence_seconds``.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import threading
import time
from typing import Callable, Iterator

import tqdm
from absl import logging

__all__ = ["JobProgress", "last_output_time"]

_LAST_RECORD = [time.monotonic()]


class _Recorder(std_logging.Filter):
  """Records the time of every absl log record (a filter that lets every record through)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    _LAST_RECORD[0] = time.monotonic()
    return True


_RECORDER = _Recorder()
std_logging.getLogger("absl").addFilter(_RECORDER)


def last_output_time() -> float:
  """``time.monotonic()`` of the newest absl log record or progress-bar refresh in this process."""
  latest = _LAST_RECORD[0]
  for bar in list(getattr(tqdm.tqdm, "_instances", ())):
    if not getattr(bar, "disable", True):
      # tqdm keeps its own clock (time.time by default): convert the bar's last print to the monotonic clock
      printed = getattr(bar, "last_print_t", None)
      if printed is not None:
        latest = max(latest, time.monotonic() - max(bar._time() - printed, 0.0))
  return latest


def _duration(seconds: float) -> str:
  seconds = max(seconds, 0.0)
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class JobProgress:
  """Stages of a job, numbered and timed, with an ETA and a heartbeat for silent stretches.

  Args:
    total: the number of stages the job will run (may be raised later with ``expect``); None: counted as they come.
    silence_seconds: a "still working" line after this many seconds with no log line or bar refresh (0: never).
    log: where lines go (default ``absl.logging.info``); ``enabled=False`` prints nothing (other processes of a
      multi-host run) but still times the stages.
    kinds: the kinds of the stages still to come, in order, for the ETA (``expect``).
  """

  def __init__(self, total: int | None = None, *, silence_seconds: float = 10.0,
               log: Callable[[str], None] | None = None, enabled: bool = True):
    if total is not None and total < 0:
      raise ValueError(f"JobProgress: total must be >= 0, got {total}")
    if silence_seconds < 0:
      raise ValueError(f"JobProgress: silence_seconds must be >= 0, got {silence_seconds}")
    self.total = total
    self.silence_seconds = silence_seconds
    self.enabled = enabled
    self._log = log or (lambda line: logging.info("%s", line))
    self.started = time.monotonic()
    self.done = 0
    self.durations: dict[str, list[float]] = {}
    self.planned: list[str] = []   # kinds of the stages to come, in order (the ETA's plan)

  def expect(self, kinds: list[str]) -> None:
    """Adds stages to come, by kind (their number raises ``total``)."""
    self.planned.extend(kinds)
    self.total = max(self.total or 0, self.done + len(self.planned))

  def say(self, line: str) -> None:
    if self.enabled:
      self._log(line)

  def eta(self) -> tuple[float, bool]:
    """``(seconds, complete)``: the estimated time of the planned stages; ``complete`` is False where some kind has
    not run yet (then the estimate leaves those stages out: a lower bound)."""
    seconds, complete = 0.0, True
    for kind in self.planned:
      past = self.durations.get(kind)
      if past:
        seconds += sum(past) / len(past)
      else:
        complete = False
    return seconds, complete

  @contextlib.contextmanager
  def stage(self, label: str, kind: str | None = None) -> Iterator[None]:
    """Runs one stage: "[k/n] label" first, then "[k/n] label: done in T; job E elapsed, about R left"."""
    kind = kind or label
    if self.planned and kind in self.planned:
      self.planned.remove(kind)
    number = self.done + 1
    total = None if self.total is None else max(self.total, number)
    tag = f"[{number}]" if total is None else f"[{number}/{total}]"
    self.say(f"{tag} {label} ...")
    start = time.monotonic()
    stop = threading.Event()
    beat = None
    if self.enabled and self.silence_seconds:
      beat = threading.Thread(target=self._heartbeat, args=(stop, tag, label, start), daemon=True)
      beat.start()
    try:
      yield
    finally:
      stop.set()
      if beat is not None:
        beat.join()
    seconds = time.monotonic() - start
    self.durations.setdefault(kind, []).append(seconds)
    self.done = number
    left, complete = self.eta()
    if self.planned and not complete and not left:
      remaining = "the rest not estimated yet"   # no stage of a kind still to come has run
    elif self.planned:
      remaining = f"about {_duration(left)} left" if complete else f"at least {_duration(left)} left"
    else:
      remaining = "nothing left" if total is not None and number >= total else "the rest not estimated"
    self.say(f"{tag} {label}: done in {_duration(seconds)}; job {_duration(time.monotonic() - self.started)} "
             f"elapsed, {remaining}")

  def _heartbeat(self, stop: threading.Event, tag: str, label: str, start: float) -> None:
    while not stop.wait(min(1.0, self.silence_seconds)):
      now = time.monotonic()
      if now - max(last_output_time(), start) >= self.silence_seconds:
        self.say(f"{tag} {label}: still working, {_duration(now - start)} in this stage")
        _LAST_RECORD[0] = time.monotonic()   # a custom ``log`` may bypass absl: the next line comes a period later
