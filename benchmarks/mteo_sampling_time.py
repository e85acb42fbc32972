"""Sampling time with and without an MTEO table: same teacher, solver, NFE and noise, measured in one run.

A table replaces the time-embedding MLP at every network evaluation, so sampling with it should cost no more than the
plain solver (ratio <= 1). Timings are the median of interleaved repeats of the jitted samplers, after compilation.
Timing does not depend on the table's values: ``--table DIR`` times a trained table (e.g. WORKDIR/tables/
dpmpp_2m_nfe3 of the main job; it must belong to ``--teacher``, ``mteo.load_table``) on the grid it was trained for,
otherwise a table initialised from the teacher's embeddings is used.

    python benchmarks/mteo_sampling_time.py                 # shipped digits teacher, NFE 3, 4 solvers (~1 min on CPU)
    python benchmarks/mteo_sampling_time.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from mteo_jax import mteo, viz
from mteo_jax.reference import reference_noise
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher


def _repeat_seconds(fn, x_T, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x_T))
    times.append(time.perf_counter() - start)
  return times


def run(args: argparse.Namespace) -> dict:
  teacher = Teacher.load(args.teacher)
  precond = teacher.precond
  x_T = reference_noise(args.seed, args.batch_size, teacher.data_shape, precond.sigma_max)
  results = {}
  for name in args.solvers:
    solver = get_solver(name)
    sigmas = get_schedule("edm", solver.num_steps_for_nfe(args.nfe), precond.sigma_min, precond.sigma_max, rho=7.0)
    if args.table:
      table, meta = mteo.load_table(args.table, teacher, solver_name=name, nfe=args.nfe)
      sigmas = np.asarray(meta["sigmas"], np.float32)   # the grid the table was trained for
    else:
      table = mteo.init_table(teacher.backbone, teacher.params, precond, solver.eval_sigmas(sigmas))
    plain = jax.jit(lambda x, solver=solver, sigmas=sigmas: mteo.student_sample(
        solver, teacher.backbone, teacher.params, precond, None, x, sigmas))
    with_table = jax.jit(lambda x, table=table, solver=solver, sigmas=sigmas: mteo.student_sample(
        solver, teacher.backbone, teacher.params, precond, table, x, sigmas))
    jax.block_until_ready((plain(x_T), with_table(x_T)))  # compile both first
    plain_times, table_times = [], []
    for _ in range(args.rounds):  # interleaved, so that drifts of the machine hit both alike
      plain_times += _repeat_seconds(plain, x_T, args.repeats)
      table_times += _repeat_seconds(with_table, x_T, args.repeats)
    plain_s, table_s = statistics.median(plain_times), statistics.median(table_times)
    results[name] = {"plain_seconds": plain_s, "table_seconds": table_s, "ratio": table_s / plain_s,
                     "plain_all": plain_times, "table_all": table_times}
    print(f"{name:9s} NFE {args.nfe}: plain {1e3 * plain_s:8.2f} ms  table {1e3 * table_s:8.2f} ms  "
          f"ratio {table_s / plain_s:.3f}")
  setup = {"teacher": args.teacher, "teacher_identity": teacher.identity, "nfe": args.nfe,
           "batch_size": args.batch_size, "repeats": args.repeats, "rounds": args.rounds,
           "table": args.table or "initialised from the teacher",
           "device": str(jax.devices()[0]), "jax": jax.__version__, "machine": platform.machine()}
  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"setup": setup, "results": results}
  (out / "mteo_sampling_time.json").write_text(json.dumps(payload, indent=2))
  viz.save_bar_plot({name: r["ratio"] for name, r in results.items()}, out / "mteo_sampling_time.png",
                    ylabel="time with table / plain solver", title=f"MTEO sampling cost, NFE {args.nfe}, "
                    f"batch {args.batch_size} ({setup['device']})")
  return payload


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--teacher", default="pretrained:digits", help="exported teacher directory or pretrained:<name>")
  parser.add_argument("--table", default=None, help="a saved MTEO table (its solver must be the only one timed)")
  parser.add_argument("--solvers", default="euler,dpmpp_2m,unipc,ipndm", type=lambda s: s.split(","))
  parser.add_argument("--nfe", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="smoke run: 2 solvers, batch 16, 2 x 2 repeats")
  parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
  args = parser.parse_args(argv)
  if args.quick:
    args.solvers, args.batch_size, args.repeats, args.rounds = args.solvers[:2], 16, 2, 2
  return args


def main(argv: list[str] | None = None) -> dict:
  return run(parse_args(argv))


if __name__ == "__main__":
  main()
