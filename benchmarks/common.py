"""What every benchmark script shares: its command line, the machine description, logging and the JSON it writes.

Each benchmark in this folder is one command per figure: it writes ``<out-dir>/<name>.json`` (``{"setup": ...,
"results": ...}``, the setup naming the teacher, sizes, seeds and this machine) and ``<out-dir>/<name>.png``, and its
``--quick`` form is what the test suite runs. ``benchmarks/readme_results.py`` renders README's results from the JSON.

    parser = common.parser(__doc__, quick="smoke run: ...")
    args = parser.parse_args(argv)
    ...
    common.write_json(args.out_dir, NAME, setup={**common.machine(), ...}, results=results)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def parser(doc: str | None, *, quick: str) -> argparse.ArgumentParser:
  """An ``argparse`` parser with the options every benchmark takes: ``--quick`` (its help says what the smoke run
  does), ``--out-dir`` (default ``benchmarks/results``) and ``--work-dir`` (runs, caches; default a folder under
  ``--out-dir`` named ``work``), and ``--no-progress``."""
  p = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help=quick)
  p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where the JSON and the PNG go (default: %(default)s)")
  p.add_argument("--work-dir", default=None,
                 help="where runs and caches go; a rerun with the same setup resumes them (default: OUT_DIR/work)")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def comma_list(kind: Callable[[str], Any] = str) -> Callable[[str], list]:
  """An argparse ``type``: "a,b,c" -> ``[kind("a"), kind("b"), kind("c")]`` (empty items dropped)."""
  return lambda text: [kind(value) for value in text.split(",") if value]


def work_dir(args: argparse.Namespace, name: str) -> Path:
  """``--work-dir`` (or ``OUT_DIR/work``) / ``name`` (``-quick`` appended for a quick run), created."""
  root = Path(args.work_dir) if args.work_dir else Path(args.out_dir) / "work"
  path = root / (f"{name}-quick" if getattr(args, "quick", False) else name)
  path.mkdir(parents=True, exist_ok=True)
  return path


def cpu_count() -> int | None:
  """CPU cores this process may use."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> list[float] | None:
  """The 1, 5 and 15 minute load averages (None where the OS has none): a busy machine slows every timing."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def git_commit() -> str | None:
  """The repository's commit (with ``+dirty`` for uncommitted changes), or None outside a checkout."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                            check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, timeout=10).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def machine() -> dict[str, Any]:
  """This machine and software: device, device and CPU counts, load average, JAX, Python, commit."""
  import jax  # noqa: PLC0415  (after the caller has set any XLA flags)
  return {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "cpu_count": cpu_count(), "load_average": load_average(),
          "jax": jax.__version__, "python": platform.python_version(), "machine": platform.machine(),
          "commit": git_commit()}


def log(message: str) -> None:
  """A progress line on stderr with the wall-clock time."""
  print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def save_figure(fig: Any, path: str | os.PathLike) -> None:
  """Lays out a matplotlib figure, writes it to ``path`` (its folder created; 120 dpi, cropped to its content) and
  closes it."""
  import matplotlib.pyplot as plt  # noqa: PLC0415  (the caller has chosen the backend)
  path = Path(path)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, Path):
    return str(value)
  raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_json(out_dir: str | os.PathLike, name: str, *, setup: dict, results: Any) -> Path:
  """Writes ``{"setup": setup, "results": results}`` to ``out_dir/name.json`` atomically and returns the path."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps({"setup": setup, "results": results}, indent=2, default=_json_default) + "\n")
  os.replace(tmp, path)
  log(f"wrote {path}")
  return path


def read_json(path: str | os.PathLike) -> dict:
  """A benchmark's JSON; a missing file says which command writes it."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist; run `python benchmarks/{path.stem}.py` to write it")
  return json.loads(path.read_text())
