"""The main job (config ``mode="mteo"``): on a frozen teacher, for each (solver, NFE) pair, distil an MTEO table from
diffrax reference trajectories and score it against the plain solver on held-out noise, on the one harness.

    references (cached) -> teacher row -> for each cell: base solver row, MTEO training (loop.fit) and row
    -> DIR/results.json, DIR/samples.png (reference vs base vs MTEO, same noise), DIR/rmse_bars.png, DIR/tables/...

Every key of the ``mteo`` section has its default in ``modes.base_config("mteo")`` (the fields of ``MTEOJobConfig``),
and every setting is checked when the config is read, before any reference or training.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import ml_collections

from mteo_jax import config_utils, loop, parallel
from mteo_jax.harness import Harness, HarnessJob, job_stages
from mteo_jax.methods import MTEO, BaseSolver, MTEOSettings
from mteo_jax.teachers import Teacher


@dataclasses.dataclass(frozen=True)
class MTEOJobConfig(HarnessJob, MTEOSettings):
  """The ``mteo`` section: MTEO's settings (``methods.MTEOSettings``: the training loop's keys and the table's), the
  teacher, the cells and the harness's settings (``harness.HarnessJob``; here every solver MTEO is shown with by
  default).

  Attributes:
    progress: progress bars (rate and ETA) of the training and of the reference solves.
  """
  solvers: tuple[str, ...] = ("euler", "dpmpp_2m", "unipc", "ipndm")

  def check(self, where: str) -> None:
    """Every setting is checked here, before any reference solve or training: a typo costs seconds, not minutes."""
    super().check(where)
    self.check_harness(where)
    if self.batch_size > self.num_train:
      raise ValueError(f"{where}.batch_size={self.batch_size} exceeds {where}.num_train={self.num_train}")

  def method_settings(self) -> MTEOSettings:
    return MTEOSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MTEOSettings)})


@dataclasses.dataclass(frozen=True)
class MTEOExperimentConfig:
  """The whole config of the ``mteo`` mode (``modes.base_config("mteo")`` holds every key with its default).

  Attributes:
    mode: the job, ``mteo`` here (``train``, ``compare`` and ``pd`` are the other modes).
    seed: the experiment seed: training and held-out noise come from seeds ``2 seed`` and ``2 seed + 1``
      (``harness.noise_seeds``), and the training batches from the former.
    overwrite: a workdir that holds another experiment is refused, naming the keys that differ, unless this is
      True: then its results are deleted first, keeping the content-keyed ``references/`` cache
      (``modes.claim_workdir``).
    distributed: ``True``, ``False`` or ``auto``: call ``jax.distributed.initialize`` first, for a run over several
      processes or hosts (``auto``: where a TPU slice, SLURM, Open MPI or a coordinator address is detected;
      ``parallel.initialize_distributed``).
    cpu_devices: CPU devices JAX exposes when it runs on the CPU, the data-parallel mesh splitting each batch over
      them (``parallel.use_cpu_devices``: two keep both cores of a 2-core machine busy); 0 = JAX's default (one).
      Not part of the experiment: a resume may change it.
    mteo: the section below (``MTEOJobConfig``).
  """
  mode: str = "mteo"
  seed: int = 0
  overwrite: bool = False
  distributed: str | bool = "false"
  cluster: parallel.ClusterConfig = dataclasses.field(default_factory=parallel.ClusterConfig)
  cpu_devices: int = 0
  mteo: MTEOJobConfig = dataclasses.field(default_factory=MTEOJobConfig)


# Keys of the mteo section that may change between a run and its resumption: they steer what is evaluated, logged or
# shown, not what is learned (adding a solver or an NFE adds cells; the finished ones are reused).
HARMLESS_KEYS = ("solvers", "nfes", "num_eval", "eval_batch_size", "eval_every", "teacher_steps", "grid_size",
                 "progress", "log_every", "checkpoint_every", "checkpoint_seconds", "keep",
                 "save_tables", "fid_weights", "fid_stats")


def experiment_identity(config: MTEOExperimentConfig) -> dict:
  """What makes two ``mteo`` runs in one workdir the same experiment (``modes.claim_workdir``)."""
  job = {k: v for k, v in config_utils.to_plain(config.mteo).items() if k not in HARMLESS_KEYS}
  if config.mteo.lr_decay == "constant":
    job.pop("steps")
  return {"mode": "mteo", "seed": config.seed, "mteo": job}


def run_mteo(config: MTEOExperimentConfig | ml_collections.ConfigDict | dict, workdir: str | os.PathLike) -> dict:
  """The main job; returns the results dict it writes to ``workdir/results.json``.

  ``config`` is the typed config or a ConfigDict/dict with its keys (``modes.base_config("mteo")``). The CLI runs it
  through ``modes.run``, which also claims the workdir.
  """
  if not isinstance(config, MTEOExperimentConfig):
    config = config_utils.from_dict(MTEOExperimentConfig, config, where="config")
  job, workdir = config.mteo, Path(workdir)
  loop.check_batch_size(job.batch_size, parallel.make_mesh(), where="mteo")
  teacher = Teacher.load(job.teacher)
  methods = [BaseSolver(), MTEO(job.method_settings())]
  harness = Harness(teacher, workdir, job.harness_config(config.seed),
                    stages=job_stages(methods, job.solvers, job.nfes, teacher_row=job.teacher_steps > 0))
  cells = harness.cells(job.solvers, job.nfes)
  harness.teacher_row()
  harness.reference_row()
  harness.run(methods, cells)
  return harness.write_results({"config": config_utils.to_plain(config)}, picture_nfe=job.nfes[0])


