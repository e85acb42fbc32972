"""Adding a method to the harness, as README shows: one class (here in the test file) with ``fit`` and ``sampler``,
trained through ``loop.fit`` on the harness's training references, scored beside the plain solver and MTEO on the
same held-out noise."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import Teacher, files, harness, loop, methods, mteo
from mteo_jax.harness import Artefact
from mteo_jax.methods import METHODS, Method


class TimeShift(Method):
  """A per-evaluation shift of the noise level the network is told, ``sigma_i * exp(delta_i)`` (LD3's decoupled time
  shift, without the schedule), learned by matching the reference's final state from the same noise."""

  name = "time_shift"

  def __init__(self, settings: loop.LoopConfig = loop.LoopConfig(steps=60, lr=5e-2, batch_size=16, log_every=10,
                                                                 checkpoint_every=30)):
    self.settings = settings

  @staticmethod
  def _sample(teacher, cell):
    eval_sigmas = jnp.asarray(cell.solver.eval_sigmas(cell.sigmas))

    def sample(shift, x_T, label):
      table = teacher.backbone.time_embedding(teacher.params, teacher.precond.c_noise(eval_sigmas * jnp.exp(shift)))
      return mteo.student_sample(cell.solver, teacher.backbone, teacher.params, teacher.precond, table, x_T,
                                 cell.sigmas, label)

    return sample

  def fit(self, h: harness.Harness, cell: harness.Cell) -> Artefact:
    sample = self._sample(h.teacher, cell)

    def objective(shift, params, batch):
      del params  # the teacher's parameters reach the sampler through the closure; they are not trained
      return jnp.mean((sample(shift, batch["x_T"], batch.get("label")) - batch["ref"][:, -1]) ** 2)

    task = loop.ArrayTask(jnp.zeros((cell.nfe,), jnp.float32), objective, h.train_data(cell),
                          batch_size=self.settings.batch_size, seed=h.train_seed)
    result = loop.fit(task, self.settings, h.run_dir(self.name, cell), seed=h.train_seed,
                      identity={"teacher": h.teacher.identity, "cell": cell.tag}, desc="time shift")
    steps, losses = result.losses
    return Artefact(self.name, cell, payload=(result.state.params, sample), train_seconds=result.train_seconds,
                    curves={"loss_curve": {"step": steps, "loss": losses}})

  def sampler(self, artefact: Artefact):
    shift, sample = artefact.payload
    run = jax.jit(sample)
    return lambda x_T, label: run(shift, x_T, label)


@pytest.fixture(scope="module")
def gmm_teacher():
  return Teacher.load("pretrained:gmm")


def test_a_method_in_one_file_runs_on_the_harness(gmm_teacher, tmp_path):
  """README's five harness lines with a new method beside the plain solver and MTEO: every method gets a row from
  the same held-out noise, the learned ones beat the plain solver, and results.json holds their curves."""
  METHODS.register(TimeShift.name)(TimeShift)
  try:
    method = methods.get_method("time_shift")
    h = harness.Harness(gmm_teacher, tmp_path, harness.HarnessConfig(num_train=128, num_eval=128, teacher_steps=5,
                                                                      grid_size=64, progress=False))
    cells = h.cells(solvers=("euler",), nfes=(3,))
    h.teacher_row()
    mteo_settings = methods.MTEOSettings(steps=40, batch_size=16, log_every=10, eval_every=0, progress=False)
    rows = h.run([methods.BaseSolver(), methods.MTEO(mteo_settings), method], cells)
    results = h.write_results()
  finally:
    METHODS._entries.pop(TimeShift.name)
  by_method = {r["method"]: r for r in rows}
  assert list(by_method) == ["base", "mteo", "time_shift"]
  assert by_method["time_shift"]["rmse"] < 0.9 * by_method["base"]["rmse"], by_method
  assert by_method["mteo"]["rmse"] < 0.9 * by_method["base"]["rmse"], by_method
  assert by_method["time_shift"]["train_seconds"] > 0 and by_method["base"]["train_seconds"] == 0
  stored = json.loads((tmp_path / "results.json").read_text())
  assert [r["method"] for r in stored["rows"]] == ["teacher", "base", "mteo", "time_shift"] == \
      [r["method"] for r in results["rows"]]
  assert stored["rows"][-1]["loss_curve"]["step"][-1] == 60
  # Where the wall time went: every phase of the job is timed, and the phases add up to the total.
  timings = stored["timings"]
  assert set(timings["phases"]) == {"references", "teacher_row", "training", "evaluation", "pictures", "other"}
  assert all(seconds >= 0 for seconds in timings["phases"].values())
  assert timings["phases"]["training"] > 0 and timings["phases"]["references"] > 0
  assert sum(timings["phases"].values()) == pytest.approx(timings["total_seconds"], abs=0.01)
  assert "picture_errors" not in results and (tmp_path / "rmse_bars.png").exists()   # at the first NFE by default
  assert (tmp_path / "time_shift" / "euler_nfe3" / "metrics.jsonl").exists()
  # The training noise was solved once, for all three methods: one reference file for it, one for the held-out noise.
  assert len(list((tmp_path / "references").glob("reference-*.npz"))) == 2
  # Every picture names its method.
  assert {"samples_euler.png", "samples_euler_MTEO.png", "samples_euler_TIME_SHIFT.png"} <= \
      {p.name for p in tmp_path.iterdir()}


def test_phase_timer_charges_nested_time_to_the_inner_phase_unless_the_outer_absorbs_it(monkeypatch):
  """Time in a nested phase counts once, for the inner phase; an absorbing phase keeps what runs inside it; time in
  no phase is ``other``; the phases sum to the total. (A fake clock: each reading advances one second.)"""
  clock = iter(range(1000))
  monkeypatch.setattr(harness.time, "perf_counter", lambda: float(next(clock)))
  timer = harness.PhaseTimer()
  with timer.phase("training"):
    with timer.phase("references"):
      pass
  with timer.phase("teacher_row", absorb=True):
    with timer.phase("evaluation"):
      pass
  with timer.phase("evaluation"):
    pass
  summary = timer.summary()
  phases = summary["phases"]
  assert set(phases) == {"training", "references", "teacher_row", "evaluation", "other"}
  assert phases["references"] > 0 and phases["training"] > 0 and phases["teacher_row"] > 0
  assert phases["evaluation"] == 1.0    # only the phase outside teacher_row; the one inside it was absorbed
  assert sum(phases.values()) == summary["total_seconds"]


def test_unknown_method_lists_the_registered_ones():
  """``get_method`` of a misspelt name says which methods exist."""
  with pytest.raises(KeyError, match=r"unknown method 'mteoo'; expected one of \[.*'base'.*'mteo'.*\]") as error:
    methods.get_method("mteoo")
  assert all(repr(name) in str(error.value) for name in METHODS.names())
  assert isinstance(methods.get_method("base"), methods.BaseSolver)
  assert methods.get_method("mteo", methods.MTEOSettings(steps=5)).settings.steps == 5
  assert {"base", "mteo"} <= set(METHODS.names())


def test_the_harness_knows_the_reference_solvers_without_importing_diffrax():
  """The config check's list of reference solvers is the reference module's registry, and a config is checked
  without importing diffrax (which takes a second of a 2-second config error)."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415

  from mteo_jax.reference import REFERENCE_SOLVERS  # noqa: PLC0415
  assert tuple(REFERENCE_SOLVERS.names()) == harness.REFERENCE_SOLVER_NAMES
  with pytest.raises(KeyError, match="unknown reference solver 'rk4'"):
    harness.ReferenceConfig(solver="rk4")
  probe = ("import sys; from mteo_jax import modes; c = modes.base_config('mteo'); c.mteo.teacher = 'pretrained:gmm'; "
           "modes.parse(c); print(sorted(m for m in ('diffrax', 'orbax', 'matplotlib') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                       env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "[]", out.stdout


def test_the_teacher_row_is_read_back_and_sampled_again_when_its_key_changes(gmm_teacher, tmp_path, monkeypatch):
  """A rerun in the same workdir reads the teacher row from teacher_row.json instead of sampling; other Heun steps or
  other held-out noise sample again and replace it; an unreadable file is an error that says to delete it, and is
  left as it was. (The reference and the sampling are
  stubbed: this is the cache's logic; the comparison runs of README exercise the real row.)"""
  from mteo_jax.reference import Reference  # noqa: PLC0415
  monkeypatch.setattr(harness.Harness, "reference", lambda self, x_T, labels, seed, sigmas: Reference(
      np.zeros((len(sigmas), *x_T.shape), np.float32), np.full(x_T.shape[0], 99), np.asarray(sigmas)))
  sampled = []

  def score(self, method, solver_name, nfe, sample, **kwargs):
    row = {"method": method, "solver": solver_name, "nfe": nfe, "rmse": 0.01 * (len(sampled) + 1)}
    sampled.append(row)
    self.rows.append(row)
    return row, None

  monkeypatch.setattr(harness.Harness, "score", score)

  def teacher_row(**config):
    return harness.Harness(gmm_teacher, tmp_path, harness.HarnessConfig(
        **{"num_train": 8, "num_eval": 16, "teacher_steps": 4, "progress": False, **config})).teacher_row()

  first = teacher_row()
  assert first["nfe"] == 7 and teacher_row() == first and len(sampled) == 1
  assert teacher_row(teacher_steps=5)["nfe"] == 9 and len(sampled) == 2
  assert teacher_row(teacher_steps=5)["rmse"] == 0.02 and len(sampled) == 2
  assert teacher_row(teacher_steps=5, seed=1)["rmse"] == 0.03 and len(sampled) == 3
  (tmp_path / harness.TEACHER_ROW_FILE).write_text("{not json")
  with pytest.raises(files.UnreadableFileError, match=rf"^{re.escape(str(tmp_path / harness.TEACHER_ROW_FILE))} "
                     r"cannot be read \(JSONDecodeError: .*\); delete it to sample the teacher row again$"):
    teacher_row(teacher_steps=5, seed=1)
  assert (tmp_path / harness.TEACHER_ROW_FILE).read_text() == "{not json" and len(sampled) == 3   # left as it was
  (tmp_path / harness.TEACHER_ROW_FILE).unlink()
  assert teacher_row(teacher_steps=5, seed=1)["rmse"] == 0.04
  assert json.loads((tmp_path / harness.TEACHER_ROW_FILE).read_text())["row"] == sampled[-1]


def test_the_teacher_row_compiles_on_one_heun_step_and_samples_each_chunk_once(gmm_teacher, tmp_path, monkeypatch):
  """The teacher row's warm-up is one Heun step on the first chunk (1 evaluation), not a whole chunk of the teacher's
  NFE; the row is Heun from the held-out noise against the reference, as without the warm-up."""
  from mteo_jax import metrics, solvers  # noqa: PLC0415
  from mteo_jax.schedules import get_schedule  # noqa: PLC0415
  heun, calls = solvers.get_solver("heun"), []

  class CountingHeun:
    def nfe(self, steps):
      return heun.nfe(steps)

    def sample(self, denoiser, x_T, sigmas, **kwargs):
      def counted(x, sigma, *args, **kw):
        calls.append(x.shape[0])
        return denoiser(x, sigma, *args, **kw)
      return heun.sample(counted, x_T, sigmas, **kwargs)

  get_solver = harness.get_solver
  monkeypatch.setattr(harness, "get_solver", lambda name: CountingHeun() if name == "heun" else get_solver(name))
  h = harness.Harness(gmm_teacher, tmp_path, harness.HarnessConfig(num_train=8, num_eval=16, eval_batch_size=8,
                                                                   teacher_steps=4, progress=False))
  row = h.teacher_row()
  assert row["nfe"] == 7 and row["n_eval"] == 16
  assert h.progress.done == 2 and list(h.progress.durations) == ["set-up", "teacher row"]   # its stages, in order
  assert calls == [8] * (1 + 2 * 7), calls   # the warm-up (one Heun step: its last is Euler), two chunks of 7 NFE
  precond = gmm_teacher.precond
  sigmas = get_schedule("edm", 4, precond.sigma_min, precond.sigma_max, rho=7.0)
  expected = heun.sample(lambda x, sigma: gmm_teacher.denoiser(x, sigma), jnp.asarray(h.x_T_eval), sigmas)
  assert row["rmse"] == pytest.approx(float(metrics.rmse(np.asarray(expected), h.eval_reference.final)), rel=1e-5)


def test_teacher_steps_zero_leaves_the_teacher_row_out(gmm_teacher, tmp_path):
  """teacher_steps=0: no Heun row, no teacher_row.json, no stage for it (the reference row stands for the teacher);
  a negative count is refused."""
  h = harness.Harness(gmm_teacher, tmp_path, harness.HarnessConfig(num_train=8, num_eval=16, teacher_steps=0,
                                                                   progress=False))
  assert h.teacher_row() is None and h.rows == [] and not (tmp_path / harness.TEACHER_ROW_FILE).exists()
  assert h.progress.done == 1 and list(h.progress.durations) == ["set-up"]
  base = [methods.get_method("base")]
  assert harness.job_stages(base, ["euler"], [3]) == ["set-up", "teacher row", "base"]
  assert harness.job_stages(base, ["euler"], [3], teacher_row=False) == ["set-up", "base"]
  with pytest.raises(ValueError, match=r"teacher_steps must be >= 0 \(0: no teacher row\), got -1"):
    harness.HarnessConfig(teacher_steps=-1)


def test_the_plain_row_mteo_monitor_and_mteo_row_run_one_compiled_sampler(gmm_teacher, tmp_path):
  """The plain solver's row is the table sampler with the teacher's own embeddings: one compiled program serves it,
  MTEO's held-out monitor (sampled in the evaluation's chunks) and MTEO's row; the plain row equals the pretrained
  path (no table) up to float rounding, and the monitor's RMSE is that of its first ``num`` noises."""
  h = harness.Harness(gmm_teacher, tmp_path, harness.HarnessConfig(num_train=32, num_eval=64, eval_batch_size=32,
                                                                   teacher_steps=0, progress=False))
  cells = h.cells(("ipndm",), (3,))
  settings = methods.MTEOSettings(steps=4, batch_size=16, warmup_steps=1, eval_every=2, log_every=2,
                                  checkpoint_every=4, progress=False, save_tables=False)
  base_row, mteo_row = h.run([methods.get_method("base"), methods.MTEO(settings)], cells)
  assert len(mteo_row["held_out_curve"]["rmse"]) == 2   # the monitor ran at steps 2 and 4
  assert h.table_sampler(cells[0]) is h.table_sampler(cells[0]) and h.table_sampler(cells[0])._cache_size() == 1
  cell = cells[0]
  plain = jax.jit(lambda x: mteo.student_sample(cell.solver, gmm_teacher.backbone, gmm_teacher.params,
                                                gmm_teacher.precond, None, x, cell.sigmas))
  from mteo_jax import metrics  # noqa: PLC0415
  expected = float(metrics.rmse(np.asarray(plain(jnp.asarray(h.x_T_eval))), h.eval_reference.final))
  assert base_row["rmse"] == pytest.approx(expected, rel=1e-4)
  assert mteo_row["rmse"] < base_row["rmse"]
  sample = lambda x, label: plain(jnp.asarray(x))  # noqa: E731
  direct = float(metrics.rmse(np.asarray(plain(jnp.asarray(h.x_T_eval[:40]))), h.eval_reference.final[:40]))
  assert h.held_out_rmse(sample, num=40) == pytest.approx(direct, rel=1e-5)
