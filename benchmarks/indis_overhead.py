"""Sampling overhead of INDIS's schedule network phi: INDIS sampling time over the plain solver's, measured in one run.

INDIS (``mteo_jax.methods.indis``) runs phi(x_T) once per sample (an MLP over the flattened noise), turns its logits
into a grid per sample [B, N + 1], and samples with a per-sample time shift (a time embedding per sample and
evaluation) and output scale. The plain solver runs the teacher on one shared EDM grid. Both are jitted as the harness
jits them (``methods/plain.py``, ``INDIS.sampler``), compiled first, then timed as the median of interleaved repeats
(plain, INDIS, phi alone) on the same noise and batch. phi alone is ``predictor.apply`` jitted, reported as a share
of INDIS's time.

Timing does not depend on phi's values: phi is a fresh ``predictor.init`` with the default ``INDISSettings`` (hidden
128, depth 2, time shift and output scale on). Its head starts at zero, so its grid is the EDM one, but the sampler
still runs the per-sample path (the grid, shift and scale are traced arrays, not constants).

    python benchmarks/indis_overhead.py            # digits and gmm, ipndm/dpmpp_2m, NFE 3 and 5, batch 500 (~6 min)
    python benchmarks/indis_overhead.py --quick    # smoke run: digits only, batch 32, 3 repeats (~2 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from mteo_jax import mteo
from mteo_jax.harness import Cell
from mteo_jax.methods import indis
from mteo_jax.reference import reference_noise
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher

NAME = "indis_overhead"


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _seconds(fn, *args) -> float:
  """Wall time of one call of the jitted ``fn``, in seconds, until its outputs are ready."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def time_case(teacher: Teacher, solver_name: str, nfe: int, settings: indis.INDISSettings, x_T: jax.Array,
              label: jax.Array | None, repeats: int, seed: int) -> dict:
  """Times one (teacher, solver, NFE) cell.

  Args:
    teacher: the frozen teacher. solver_name: a registered solver. nfe: network evaluations per sample.
    settings: phi's architecture (``INDISSettings``). x_T: [B, *data_shape] float32, the noise at sigma_max.
    label: [B] int for a conditional teacher, else None. repeats: timed calls of each function (interleaved).
    seed: the key of phi's (fresh, untrained) parameters.
  Returns:
    ``{"plain_ms", "indis_ms", "phi_ms"}`` (medians, milliseconds), ``"ratio"`` (INDIS / plain), ``"phi_share"``
    (phi / INDIS), ``"compile_seconds"`` (compiling and the first call of all three) and every repeat's time
    (``"*_all_ms"``).
  """
  precond = teacher.precond
  solver = get_solver(solver_name)
  sigmas = get_schedule("edm", solver.num_steps_for_nfe(nfe), precond.sigma_min, precond.sigma_max, rho=7.0)
  cell = Cell(solver_name, nfe, solver, sigmas)
  sigma_min, sigma_max = float(cell.sigmas[-1]), float(cell.sigmas[0])
  predictor = indis.build_predictor(settings, cell, teacher.num_classes, sigma_max)
  phi_params = predictor.init(jax.random.key(seed), x_T[:1], None if label is None else label[:1])["params"]
  sample = indis.make_instance_sampler(predictor, solver, teacher.backbone, precond, sigma_min, sigma_max,
                                       settings.min_fraction)
  # As the harness jits them: the teacher's parameters closed over, phi's passed in (methods/plain.py, INDIS.sampler).
  plain = jax.jit(lambda x, y: mteo.student_sample(solver, teacher.backbone, teacher.params, precond, None, x,
                                                   cell.sigmas, y))
  indis_sample = jax.jit(lambda phi, x, y: sample(phi, teacher.params, x, y))
  phi_only = jax.jit(lambda phi, x, y: predictor.apply({"params": phi}, x, y))
  calls = {"plain": (plain, (x_T, label)), "indis": (indis_sample, (phi_params, x_T, label)),
           "phi": (phi_only, (phi_params, x_T, label))}
  start = time.perf_counter()
  for fn, args in calls.values():  # compile (and run once) before any timing
    jax.block_until_ready(fn(*args))
  compile_seconds = time.perf_counter() - start
  times = {name: [] for name in calls}
  for _ in range(repeats):  # interleaved, so that drifts of a shared machine hit all three alike
    for name, (fn, args) in calls.items():
      times[name].append(1e3 * _seconds(fn, *args))
  medians = {name: statistics.median(values) for name, values in times.items()}
  return {"plain_ms": medians["plain"], "indis_ms": medians["indis"], "phi_ms": medians["phi"],
          "ratio": medians["indis"] / medians["plain"], "phi_share": medians["phi"] / medians["indis"],
          "num_steps": len(cell.sigmas) - 1, "compile_seconds": compile_seconds,
          "phi_num_params": sum(int(leaf.size) for leaf in jax.tree.leaves(phi_params)),
          "predictor": indis.predictor_config(predictor),
          **{f"{name}_all_ms": values for name, values in times.items()}}


def save_plot(results: dict, path: Path, title: str) -> None:
  """Grouped bars: one group per (solver, NFE), one bar per teacher, of INDIS time / plain time; a line at 1."""
  groups = {}
  for teacher, cases in results.items():
    for key, r in cases.items():
      groups.setdefault(key, {})[teacher] = r["ratio"]
  labels, teachers = list(groups), list(results)
  width = 0.8 / len(teachers)
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) * len(teachers) + 1.5), 3.8))
  for k, teacher in enumerate(teachers):
    positions = [g + (k - (len(teachers) - 1) / 2) * width for g in range(len(labels))]
    heights = [groups[label][teacher] for label in labels]
    bars = ax.bar(positions, heights, width, label=teacher, color=f"C{k}")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
  ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
  ax.set_xticks(range(len(labels)), [label.replace("_nfe", "\nNFE ") for label in labels])
  ax.set_ylabel("INDIS time / plain solver time")
  ax.set_ylim(0, max(1.1, 1.15 * max(h for g in groups.values() for h in g.values())))
  ax.legend(title="teacher", fontsize=8)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def run(args: argparse.Namespace) -> dict:
  settings = indis.INDISSettings()
  cases = [(solver, nfe) for solver in args.solvers for nfe in args.nfes]
  total, done = len(args.teachers) * len(cases), 0
  results, identities = {}, {}
  for spec in args.teachers:
    teacher = Teacher.load(spec)
    name = spec.removeprefix("pretrained:")
    identities[name] = teacher.identity
    x_T = reference_noise(args.seed, args.batch_size, teacher.data_shape, teacher.precond.sigma_max)
    labels = teacher.labels(args.seed, args.batch_size)
    label = None if labels is None else jnp.asarray(labels)
    results[name] = {}
    for solver_name, nfe in cases:
      _log(f"[{done + 1}/{total}] {name} {solver_name} NFE {nfe}: compiling, then {args.repeats} repeats x 3 ...")
      r = time_case(teacher, solver_name, nfe, settings, x_T, label, args.repeats, args.phi_seed)
      results[name][f"{solver_name}_nfe{nfe}"] = r
      done += 1
      _log(f"[{done}/{total}] {name:7s} {solver_name:9s} NFE {nfe}: plain {r['plain_ms']:8.2f} ms  INDIS "
           f"{r['indis_ms']:8.2f} ms  ratio {r['ratio']:.3f}  phi {r['phi_ms']:6.2f} ms "
           f"({100 * r['phi_share']:.1f} % of INDIS)  compile {r['compile_seconds']:.1f} s")
  device = str(jax.devices()[0])
  setup = {"teachers": args.teachers, "teacher_identity": identities, "solvers": args.solvers, "nfes": args.nfes,
           "batch_size": args.batch_size, "repeats": args.repeats,
           "timing": "median of interleaved calls (plain, INDIS, phi alone) of the jitted functions after one "
                     "compiling call each; jax.block_until_ready; milliseconds",
           "schedule": "EDM, rho = 7, from the teacher's sigma_max to sigma_min", "noise_seed": args.seed,
           "phi_params": f"fresh predictor.init(jax.random.key({args.phi_seed})), untrained: timing does not depend "
                         "on the parameters' values",
           "indis_settings": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)},
           "device": device, "device_count": jax.device_count(), "cpu_count": _cpu_count(), "jax": jax.__version__,
           "machine": platform.machine(), "python": platform.python_version(), "quick": args.quick}
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"setup": setup, "results": results}
  (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2))
  save_plot(results, out / f"{NAME}.png", f"INDIS sampling overhead (phi + per-sample grid), batch "
            f"{args.batch_size}, median of {args.repeats} ({device})")
  _log(f"wrote {out / f'{NAME}.json'} and {out / f'{NAME}.png'}")
  return payload


def _cpu_count() -> int | None:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teachers", default="pretrained:digits,pretrained:gmm", type=lambda s: s.split(","),
                      help="comma-separated exported teacher directories or pretrained:<name>")
  parser.add_argument("--solvers", default="ipndm,dpmpp_2m", type=lambda s: s.split(","))
  parser.add_argument("--nfes", default="3,5", type=lambda s: [int(v) for v in s.split(",")])
  parser.add_argument("--batch-size", type=int, default=500)
  parser.add_argument("--repeats", type=int, default=8, help="timed calls of each function, interleaved")
  parser.add_argument("--seed", type=int, default=1, help="the noise seed (reference_noise)")
  parser.add_argument("--phi-seed", type=int, default=0, help="the key of phi's fresh parameters")
  parser.add_argument("--quick", action="store_true", help="smoke run: first teacher only, batch 32, 3 repeats")
  parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if args.quick:
    args.teachers, args.batch_size, args.repeats = args.teachers[:1], 32, 3
  return args


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
