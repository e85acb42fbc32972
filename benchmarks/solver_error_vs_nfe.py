"""Error to the diffrax reference vs NFE of every registered few-step solver, on a closed-form Gaussian-mixture teacher.

What it measures: from held-out noise ``x_T = 80 N(0, I)`` (seed 1, never a training seed), each solver of
``mteo_jax.solvers.SOLVERS`` (its default, i.e. highest, order, plus variants of lower order) samples with the EDM
schedule (rho=7, sigma 80 -> 0.002) at every reachable NFE in 3..20, and its sample is compared with the reference
sample: the probability-flow ODE solved from the same noise by diffrax (Tsit5, rtol=atol=1e-10, float64). The figure is
the RMSE to the reference (per-sample root mean square over coordinates, averaged over samples; ``metrics.rmse``).
The teacher is exact (the mixture's closed-form denoiser), so the numbers are pure solver error: no network error.

Run (from the repository root):
    python benchmarks/solver_error_vs_nfe.py                 # full: 4000 samples, NFE 3..20; ~1-2 min on 2 CPU cores
    python benchmarks/solver_error_vs_nfe.py --quick         # smoke run: 128 samples, NFE 3..6; ~15 s
Options: --out-dir (default benchmarks/results), --num-samples, --nfe-max, --teacher {mixture8d,ring2d}, --seed,
--solvers (a subset, e.g. euler,unipc), --cache-dir (reuse the reference across runs), --no-progress.
Writes ``<out-dir>/solver_error_vs_nfe.json`` (setup + RMSE per solver per NFE) and
``<out-dir>/solver_error_vs_nfe.png`` (log-log).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

import diffrax  # noqa: E402
from mteo_jax import metrics  # noqa: E402
from mteo_jax.closed_form import GaussianMixture, random_mixture, ring_mixture  # noqa: E402
from mteo_jax.hashing import hash_json  # noqa: E402
from mteo_jax.reference import ReferenceCache, reference_trajectories, seeded_reference  # noqa: E402
from mteo_jax.schedules import get_schedule  # noqa: E402
from mteo_jax.solvers import SOLVERS, get_solver, solver_options  # noqa: E402

NAME = "solver_error_vs_nfe"
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
# Lower-order variants worth seeing next to each solver's default (highest) order.
EXTRA_VARIANTS = (("unipc", {"order": 2}), ("ipndm", {"order": 2}), ("ipndm", {"order": 3}), ("deis", {"order": 2}))


def make_teacher(name: str) -> tuple[GaussianMixture, dict]:
  """The closed-form teacher and its description for the JSON."""
  if name == "mixture8d":
    options = {"seed": 0, "num_components": 8, "dim": 8, "spread": 1.0, "std": 0.2}
    return random_mixture(dtype=jnp.float64, **options), {"name": "random_mixture", **options}
  if name == "ring2d":
    options = {"num_components": 8, "radius": 1.0, "std": 0.1, "dim": 2}
    return ring_mixture(dtype=jnp.float64, **options), {"name": "ring_mixture", **options}
  raise ValueError(f"unknown teacher {name!r}; expected 'mixture8d' or 'ring2d'")


def solver_variants() -> list[tuple[str, str, dict]]:
  """``(label, registry name, options)``: every registered solver at its defaults, then the extra variants.

  A solver with an ``order`` option is labelled with it (``unipc[order=3]``), so that defaults and variants read alike.
  """
  variants = []
  for name, options in [(name, {}) for name in SOLVERS.names()] + [v for v in EXTRA_VARIANTS if v[0] in SOLVERS]:
    shown = dict(options)
    if "order" in solver_options(name) and "order" not in shown:
      shown["order"] = get_solver(name).order
    label = f"{name}[{','.join(f'{k}={v}' for k, v in shown.items())}]" if shown else name
    variants.append((label, name, options))
  return variants


def run(args: argparse.Namespace) -> dict:
  start_time = time.perf_counter()
  nfe_max = 6 if args.quick else args.nfe_max
  num_samples = args.num_samples if args.num_samples is not None else (128 if args.quick else 4000)
  rtol = atol = 1e-8 if args.quick else 1e-10
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  # float64 throughout, so that the reference error (and rounding) stays far below the smallest solver error
  with jax.enable_x64(True):
    teacher, teacher_info = make_teacher(args.teacher)
    data_shape = (teacher.dim,)
    save_sigmas = np.array([SIGMA_MAX, SIGMA_MIN], np.float64)
    cache = ReferenceCache(args.cache_dir) if args.cache_dir else None
    t0 = time.perf_counter()
    x_T, reference = seeded_reference(
        teacher.denoise, teacher_hash=hash_json(teacher), precond=None, noise_seed=args.seed, num=num_samples,
        data_shape=data_shape, save_sigmas=save_sigmas, dtype=jnp.float64, solver="tsit5", rtol=rtol, atol=atol,
        cache=cache, progress=args.progress)
    reference_seconds = time.perf_counter() - t0
    # How good is the reference? Against a 100x looser solve: the gap bounds the looser one's error, and the
    # tight one is better still; it must sit far below every solver's error for the curves to mean anything.
    # (Skipped by --quick, whose looser reference is a smoke test only.)
    reference_check = None
    if not args.quick:
      looser = reference_trajectories(teacher.denoise, x_T, save_sigmas, rtol=100 * rtol, atol=100 * atol,
                                      progress=False)
      reference_check = metrics.rmse(looser.final, reference.final)

    denoiser = jax.jit(teacher.denoise)   # the solvers' step loops are Python-unrolled: run them eagerly around it
    schedules = {}                        # num_steps -> sigmas, shared by all solvers
    results = {}
    variants = [v for v in solver_variants() if args.solvers is None or v[0] in args.solvers or v[1] in args.solvers]
    for label, name, options in tqdm.tqdm(variants, desc="solvers", disable=not args.progress):
      solver = get_solver(name, **options)
      rmse, steps = {}, {}
      for nfe in range(3, nfe_max + 1):
        try:
          num_steps = solver.num_steps_for_nfe(nfe)
        except ValueError:         # e.g. even NFE for Heun
          continue
        if num_steps not in schedules:
          schedules[num_steps] = get_schedule("edm", num_steps, SIGMA_MIN, SIGMA_MAX, rho=RHO)
        sample = solver.sample(denoiser, x_T, schedules[num_steps])
        rmse[str(nfe)] = metrics.rmse(np.asarray(sample), reference.final)
        steps[str(nfe)] = num_steps
      results[label] = {"solver": name, "options": options, "order": solver.order, "rmse": rmse, "num_steps": steps}

  report = {
      "benchmark": NAME,
      "setup": {
          "teacher": teacher_info,
          "num_samples": num_samples,
          "noise": {"seed": args.seed, "x_T": f"{SIGMA_MAX} * N(0, I)", "held_out": True},
          "schedule": {"name": "edm", "rho": RHO, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX},
          "nfe_range": [3, nfe_max],
          "dtype": "float64",
          "metric": "RMSE to reference: mean over samples of sqrt(mean over coordinates of (x - x_ref)^2)",
          "reference": {"solver": "tsit5", "integration_variable": "log sigma", "rtol": rtol, "atol": atol,
                        "nfe_mean": float(np.mean(reference.nfe)), "nfe_max": int(np.max(reference.nfe)),
                        "seconds": reference_seconds, "rmse_of_100x_looser_solve": reference_check},
          "quick": bool(args.quick),
          "versions": {"python": platform.python_version(), "jax": jax.__version__, "diffrax": diffrax.__version__},
          "device": str(jax.devices()[0].device_kind),
      },
      "results": results,
      "wall_seconds": time.perf_counter() - start_time,
  }
  json_path = out_dir / f"{NAME}.json"
  json_path.write_text(json.dumps(report, indent=2) + "\n")
  plot(report, out_dir / f"{NAME}.png")
  return report


def plot(report: dict, path: Path) -> None:
  """Log-log RMSE vs NFE: one colour per solver family, solid for its default order, dashed/dotted for variants."""
  fig, ax = plt.subplots(figsize=(8, 5.5))
  families = sorted({entry["solver"] for entry in report["results"].values()})
  colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(families)}
  variant_styles, seen = ("--", ":", "-."), {}
  markers = "osD^v<>ph*Xd"
  for i, (label, entry) in enumerate(report["results"].items()):
    nfes = sorted(int(n) for n in entry["rmse"])
    index = seen.setdefault(entry["solver"], 0)
    seen[entry["solver"]] += 1
    style = "-" if not entry["options"] else variant_styles[(index - 1) % len(variant_styles)]
    ax.plot(nfes, [entry["rmse"][str(n)] for n in nfes], marker=markers[i % len(markers)], markersize=4,
            linestyle=style, color=colours[entry["solver"]], label=label)
  setup = report["setup"]
  ax.set_xscale("log")
  ax.set_yscale("log")
  lo, hi = setup["nfe_range"]
  ticks = [n for n in (3, 4, 5, 6, 7, 8, 10, 12, 15, 20, 25, 30, 40, 50) if lo <= n <= hi]
  ax.set_xticks(ticks)
  ax.set_xticklabels([str(n) for n in ticks])
  ax.minorticks_off()
  ax.set_xlabel("NFE (network evaluations)")
  ax.set_ylabel("RMSE to diffrax reference")
  teacher, reference = setup["teacher"], setup["reference"]
  ax.set_title(f"{teacher['name']} (dim {teacher['dim']}, {teacher['num_components']} components), "
               f"EDM schedule rho={setup['schedule']['rho']:g}, {setup['num_samples']} held-out samples", fontsize=9)
  note = f"reference: {reference['solver']} in log sigma, rtol=atol={reference['rtol']:g}"
  if reference["rmse_of_100x_looser_solve"] is not None:
    note += f"\nRMSE vs a 100x looser solve: {reference['rmse_of_100x_looser_solve']:.1e}"
  ax.text(0.02, 0.02, note, transform=ax.transAxes, fontsize=7, color="0.3", va="bottom")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="smoke run: 128 samples, NFE 3..6, looser reference")
  parser.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where JSON and PNG go")
  parser.add_argument("--num-samples", type=int, default=None, help="held-out samples (default 4000; 128 if --quick)")
  parser.add_argument("--nfe-max", type=int, default=20, help="largest NFE (full run; --quick uses 6)")
  parser.add_argument("--teacher", default="mixture8d", choices=("mixture8d", "ring2d"),
                      help="random 8-D mixture (8 components) or the 2-D ring of 8 components")
  parser.add_argument("--seed", type=int, default=1, help="held-out noise seed")
  parser.add_argument("--cache-dir", default=None, help="cache the reference there (mteo_jax.reference.ReferenceCache)")
  parser.add_argument("--solvers", default=None,
                      help="comma-separated solver names or variant labels to run (default: all), e.g. euler,unipc")
  parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
  args = parser.parse_args(argv)
  if args.solvers is not None:
    args.solvers = [name.strip() for name in args.solvers.split(",") if name.strip()]
    valid = {name for variant in solver_variants() for name in variant[:2]}
    unknown = sorted(set(args.solvers) - valid)
    if unknown or not args.solvers:
      parser.error(f"--solvers: unknown {unknown or 'empty list'}; valid names and labels: {sorted(valid)}")
  if args.num_samples is not None and args.num_samples < 1:
    parser.error(f"--num-samples must be >= 1, got {args.num_samples}")
  if args.nfe_max < 3:
    parser.error(f"--nfe-max must be >= 3, got {args.nfe_max}")
  return args


def main(argv: list[str] | None = None) -> dict:
  report = run(parse_args(argv))
  print(format_table(report))
  return report


def format_table(report: dict) -> str:
  """The RMSE table as Markdown (rows: solvers, columns: NFE)."""
  nfes = list(range(report["setup"]["nfe_range"][0], report["setup"]["nfe_range"][1] + 1))
  lines = ["| solver | " + " | ".join(str(n) for n in nfes) + " |", "|---" * (len(nfes) + 1) + "|"]
  for label, entry in report["results"].items():
    cells = [f"{entry['rmse'][str(n)]:.2e}" if str(n) in entry["rmse"] else "" for n in nfes]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  main(sys.argv[1:])
