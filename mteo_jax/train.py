"""Teacher training with the EDM objective: one pure jitted step over a data-parallel mesh, a resumable host loop.

The loss is EDM's ``E_{sigma, n} lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2`` (``diffusion.edm_training_loss``)
with the preconditioning of the config, minimised by Adam with a linear warm-up (optionally followed by a cosine decay
to zero) and optional gradient clipping; an exponential moving average (EMA) of the parameters is the teacher that is
sampled from and exported.

    step: (TrainState, batch, rng) -> (TrainState, metrics)    # pure, jitted, state donated, batch sharded on "data"

The host loop around it reads batches (deterministic in ``(seed, step)``), logs, draws sample pictures with the EMA
parameters, saves checkpoints and resumes from the latest one; at the end it exports the EMA parameters with the
metadata that ``load_teacher`` needs to rebuild the denoiser.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from mteo_jax import config_utils, data, files, loop, parallel, schedules, solvers
from mteo_jax.diffusion import Preconditioning, edm_training_loss
from mteo_jax.nets import Backbone, get_backbone, make_denoiser
from mteo_jax.nets.backbone import BACKBONES

Params = Any
Batch = dict[str, jax.Array]
TEACHER_FORMAT = "mteo_jax.teacher/1"



# --- typed configuration ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``get_dataset(name, split="train", **options)``; ``name`` is required (one of ``data.DATASETS``)."""
  name: str = ""
  options: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.name:
      raise ValueError(f"data.name is required; expected one of {data.DATASETS.names()}")
    data.DATASETS.get(self.name)   # KeyError listing the valid names


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``get_backbone(backbone, data_shape, **kwargs)``; ``backbone`` is required (one of ``nets.BACKBONES``), and
  ``kwargs`` are the options of its module (``modes.model_config`` lists them all with their defaults)."""
  backbone: str = ""
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.backbone:
      raise ValueError(f"model.backbone is required; expected one of {BACKBONES.names()}")
    BACKBONES.get(self.backbone)   # KeyError listing the valid names


@dataclasses.dataclass(frozen=True)
class TrainConfig(loop.LoopConfig):
  """The ``train`` section: the loop's settings (``loop.LoopConfig``: steps, batch_size, lr, warmup_steps, lr_decay,
  lr_end_factor, grad_clip, ema_decay, log_every, checkpoint_every, keep, progress) with a teacher's defaults, and the
  sample pictures drawn with the EMA parameters during training.

  Attributes:
    sample_every: draw a picture of samples every this many updates (0 = only at the end).
    sample_steps: Heun steps of the sampler used for the pictures.
    num_samples: samples per picture (0 = no pictures).
  """
  steps: int = 10_000
  batch_size: int = 64
  lr: float = 1e-3
  warmup_steps: int = 500
  lr_decay: str = "cosine"
  grad_clip: float = 1.0
  ema_decay: float = 0.999
  log_every: int = 250
  sample_every: int = 2_500
  sample_steps: int = 18
  num_samples: int = 64

  def check(self, where: str) -> None:
    super().check(where)
    if self.sample_steps < 1:
      raise ValueError(f"{where}.sample_steps must be >= 1, got {self.sample_steps}")
    for name in ("sample_every", "num_samples"):
      if getattr(self, name) < 0:
        raise ValueError(f"{where}.{name} must be >= 0, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """The whole config of the ``train`` mode (``modes.base_config("train")`` holds every key with its default).

  Attributes:
    mode: "train". seed: the run's seed (initialisation, data order, noise). overwrite: replace a workdir that holds
    another experiment (``modes.claim_workdir``). distributed, cluster: multi-process runs
    (``parallel.initialize_distributed``; every mode has them). cpu_devices: CPU devices JAX exposes on a CPU-only
    run (``parallel.use_cpu_devices``; 0 = JAX's default). data, model, precond, train: the sections above.
  """
  mode: str = "train"
  seed: int = 0
  overwrite: bool = False
  distributed: str | bool = "false"   # True, False or auto: parallel.initialize_distributed
  cluster: parallel.ClusterConfig = dataclasses.field(default_factory=parallel.ClusterConfig)
  cpu_devices: int = 0
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  precond: Preconditioning = dataclasses.field(default_factory=Preconditioning)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict) -> "TeacherConfig":
    """The typed config; unknown keys, missing required ones and bad values are errors naming the key."""
    return config_utils.from_dict(cls, config, where="config")


# --- the teacher's task in the training loop -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TeacherObjective:
  """The EDM loss of a backbone: ``init(key) -> params`` and ``loss(params, None, batch, key)`` for ``loop.fit``.

  ``batch`` is ``{"x": [B, ...], "label": [B] when conditional}``; ``key`` is the step's key (``fold_in(run key,
  step)``), split into the loss's noise and the dropout masks, so a resumed run draws what an uninterrupted one would.
  """
  backbone: Backbone
  precond: Preconditioning
  frozen: Any = None

  def init(self, key: jax.Array) -> Params:
    return self.backbone.init(key)

  def loss(self, params: Params, frozen: Any, batch: Batch, key: jax.Array) -> jax.Array:
    del frozen
    loss_rng, dropout_rng = jax.random.split(key)
    denoiser = make_denoiser(self.backbone, params, self.precond, batch.get("label"), train=True, rng=dropout_rng)
    return jnp.mean(edm_training_loss(lambda x, sigma: denoiser(x, sigma), batch["x"], loss_rng, self.precond))


@dataclasses.dataclass(frozen=True)
class TeacherTask:
  """``TeacherObjective`` on a dataset: batch ``s`` is ``data.batches(dataset, batch_size, seed=seed)``'s ``s``-th."""
  objective: TeacherObjective
  dataset: Any
  batch_size: int
  seed: int
  use_labels: bool
  frozen: Any = None

  def init(self, key: jax.Array) -> Params:
    return self.objective.init(key)

  def loss(self, params: Params, frozen: Any, batch: Batch, key: jax.Array) -> jax.Array:
    return self.objective.loss(params, frozen, batch, key)

  def batches(self, start_step: int):
    for batch in data.batches(self.dataset, self.batch_size, seed=self.seed, start_step=start_step):
      yield {"x": batch["x"], **({"label": batch["label"]} if self.use_labels else {})}


# --- sampling for pictures -------------------------------------------------------------------------------------------

def make_sampler(backbone: Backbone, precond: Preconditioning, num_steps: int) -> Callable[..., jax.Array]:
  """``sample(params, noise, label) -> x0``: EDM's Heun sampler on the EDM (rho = 7) schedule from
  ``x_T = sigma_max * noise``."""
  solver = solvers.get_solver("heun")
  sigmas = schedules.get_schedule("edm", num_steps, precond.sigma_min, precond.sigma_max)

  @jax.jit
  def sample(params: Params, noise: jax.Array, label: jax.Array | None = None) -> jax.Array:
    denoiser = make_denoiser(backbone, params, precond, label)
    return solver.sample(denoiser, precond.sigma_max * noise, sigmas)

  return sample


def save_samples(samples: np.ndarray, path: Path, reference: np.ndarray | None = None) -> Path | None:
  """A picture of samples of any shape (``viz.save_samples_picture``): an image grid for [N, H, W, C], else a
  histogram (1-D), scatter (2-D) or PCA projection (D > 2) over ``reference`` in one frame fitted on it. A picture
  that cannot be drawn is logged and skipped (returns None): it never stops training."""
  from mteo_jax import viz  # noqa: PLC0415 (matplotlib is slow to import)
  path = Path(path)
  try:
    viz.save_samples_picture(samples, path, reference=reference, title=path.stem)
  except Exception as error:  # noqa: BLE001  (a picture must never cost a training run)
    logging.warning("picture %s not drawn (samples of shape %s): %s: %s", path, np.shape(samples),
                    type(error).__name__, error)
    return None
  return path


# --- the host loop ---------------------------------------------------------------------------------------------------

def train(config: TeacherConfig, workdir: str | os.PathLike, *, hooks: Sequence[loop.StepHook] = (),
          mesh: jax.sharding.Mesh | None = None) -> loop.TrainState:
  """Trains (or resumes training of) a teacher in ``workdir`` with ``loop.fit`` and exports its EMA parameters (its
  parameters when ``train.ema_decay`` is 0) to ``workdir/teacher``.

  Writes ``checkpoints/``, ``metrics.jsonl``, ``samples/step_*.png`` and ``teacher/``. ``hooks`` are called on the
  host after every step as ``hook(step, state, metrics)``, before that step's checkpoint. Returns the final state.
  A workdir whose checkpoint was written under another data, model, preconditioning, seed or optimisation setting is
  refused (``loop.ResumeMismatchError``); logging, checkpoint and picture settings may change, and so may
  ``train.steps`` when the learning rate is constant. Interrupts and NaN: see ``loop.fit``. Nothing is exported unless
  the run finishes.
  """
  workdir = Path(workdir)
  tc = config.train
  mesh = mesh or parallel.make_mesh()
  loop.check_batch_size(tc.batch_size, mesh, where="train")
  dataset = data.get_dataset(config.data.name, split="train", **config.data.options)
  backbone, programs = _programs(json.dumps(config_utils.to_plain(config.model), sort_keys=True),
                                 tuple(dataset.data_shape), config.precond, tc.loop_settings(), mesh)
  task = TeacherTask(TeacherObjective(backbone, config.precond), dataset, tc.batch_size, config.seed,
                     _use_labels(backbone, dataset))
  sampler = _picture_sampler(config, backbone, dataset, task.use_labels, workdir)

  def draw(step: int, state: loop.TrainState) -> None:
    if step != tc.steps:  # the final picture is drawn after the export
      sampler(_exported(state), step)

  identity = config_utils.to_plain({"seed": config.seed, "data": config.data, "model": config.model,
                                    "precond": config.precond})
  result = loop.fit(task, tc, workdir, seed=config.seed, identity=identity, hooks=hooks, mesh=mesh, desc="train",
                    eval_fn=draw if sampler is not None else None,
                    eval_every=tc.sample_every if sampler is not None else 0, programs=programs)
  state = result.state
  if sampler is not None:
    sampler(_exported(state), tc.steps)
  final_loss = next((r["loss"] for r in reversed(result.history) if "loss" in r), float("nan"))
  export_teacher(workdir / "teacher", config, backbone, _exported(state), final_loss=final_loss,
                 wall_time_s=result.train_seconds)
  return state


def _exported(state: loop.TrainState) -> Params:
  """The parameters a teacher is sampled from: the EMA when there is one."""
  return state.params if state.ema_params is None else state.ema_params


@functools.lru_cache(maxsize=4)
def _programs(model_json: str, data_shape: tuple[int, ...], precond: Preconditioning, config: loop.LoopConfig,
              mesh: jax.sharding.Mesh) -> tuple[Backbone, tuple[Callable, Callable]]:
  """Backbone and the loop's jitted init and step, cached so that repeated runs in one process (resumption, sweeps,
  tests) compile once; keyed by everything the programs depend on."""
  backbone = build_backbone(ModelConfig(**json.loads(model_json)), data_shape)
  return backbone, loop.compile_programs(TeacherObjective(backbone, precond), config, mesh)


def build_backbone(model: ModelConfig, data_shape: tuple[int, ...]) -> Backbone:
  """``get_backbone`` plus a check that the network maps data of ``data_shape`` to the same shape."""
  backbone = get_backbone(model.backbone, data_shape, **config_utils.tuples_from_lists(model.kwargs))
  params = jax.eval_shape(backbone.init, jax.random.key(0))
  label = jnp.zeros((1,), jnp.int32) if backbone.num_classes else None
  out = jax.eval_shape(lambda p: backbone.apply(p, jnp.zeros((1,) + tuple(data_shape)), jnp.zeros((1,)), label),
                       params)
  if tuple(out.shape[1:]) != tuple(data_shape):
    raise ValueError(f"backbone {model.backbone!r} with {model.kwargs} maps data of shape {tuple(data_shape)} to "
                     f"{tuple(out.shape[1:])}; make model.kwargs match the data (data_dim, image_size, in_channels)")
  return backbone


def _use_labels(backbone: Backbone, dataset) -> bool:
  if backbone.num_classes and not dataset.num_classes:
    raise ValueError(f"the model is class-conditional (num_classes={backbone.num_classes}) but dataset "
                     f"{dataset.name!r} has no labels")
  if backbone.num_classes and backbone.num_classes != dataset.num_classes:
    raise ValueError(f"model.kwargs.num_classes={backbone.num_classes} but dataset {dataset.name!r} has "
                     f"{dataset.num_classes} classes")
  return bool(backbone.num_classes)


def _picture_sampler(config: TeacherConfig, backbone: Backbone, dataset, use_labels: bool,
                     workdir: Path) -> Callable[[Params, int], None] | None:
  """``draw(ema_params, step)`` writing ``samples/step_XXXXXXX.png`` from fixed noise (comparable across steps)."""
  tc = config.train
  if tc.num_samples == 0:
    return None
  sample = make_sampler(backbone, config.precond, tc.sample_steps)
  key = jax.random.fold_in(jax.random.key(config.seed), 2)
  label = np.arange(tc.num_samples, dtype=np.int32) % backbone.num_classes if use_labels else None
  # Noise drawn inside the jitted program (one compile, not one per eager op), the same at every picture.
  draw_samples = jax.jit(lambda params: sample(params, jax.random.normal(key, (tc.num_samples,) + backbone.data_shape),
                                               label))
  reference = None
  if len(backbone.data_shape) == 1:
    reference = dataset.get_batch(np.arange(min(len(dataset), 2000)))["x"]

  def draw(ema_params: Params, step: int) -> None:
    samples = draw_samples(ema_params)  # every host runs the program; one writes the picture
    if jax.process_index() == 0:
      save_samples(jax.device_get(samples), workdir / "samples" / f"step_{step:07d}.png", reference)

  return draw


# --- the exported teacher --------------------------------------------------------------------------------------------

def export_teacher(path: str | os.PathLike, config: TeacherConfig, backbone: Backbone, ema_params: Params, *,
                   final_loss: float, wall_time_s: float) -> None:
  """Writes the EMA parameters with everything ``load_teacher`` needs to rebuild the denoiser."""
  params = jax.device_get(ema_params)
  metadata = {
      "format": TEACHER_FORMAT,
      "backbone": config.model.backbone,
      "backbone_kwargs": config_utils.to_plain(config.model.kwargs),
      "data_shape": list(backbone.data_shape),
      "num_classes": backbone.num_classes,
      "precond": config_utils.to_plain(config.precond),
      "dataset": config.data.name,
      "data_options": config_utils.to_plain(config.data.options),
      "seed": config.seed,
      "steps": config.train.steps,
      "num_params": num_params(params),
      "final_loss": final_loss,
      "wall_time_s": wall_time_s,
      "config": config_utils.to_plain(config),
  }
  from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import)
  checkpoints.save_pytree(path, params, metadata, overwrite=True)


def load_teacher(path: str | os.PathLike) -> tuple[Backbone, Params, Preconditioning, dict]:
  """``(backbone, params, precond, metadata)`` of an exported teacher; ``make_denoiser(backbone, params, precond)``
  is then the teacher's denoiser."""
  from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import)
  metadata = checkpoints.load_metadata(path)
  missing = [k for k in ("backbone", "backbone_kwargs", "data_shape", "precond") if k not in metadata]
  if missing:
    raise ValueError(f"{path} is not an exported teacher: its metadata lacks {missing}")
  backbone = get_backbone(metadata["backbone"], tuple(metadata["data_shape"]),
                          **config_utils.tuples_from_lists(metadata["backbone_kwargs"]))
  expected = jax.eval_shape(backbone.init, jax.random.key(0))
  try:
    params = checkpoints.load_pytree(path, target=expected)
  except files.UnreadableFileError:
    raise
  except ValueError as error:
    raise ValueError(f"the parameters in {path} do not fit the backbone its metadata describes "
                     f"({metadata['backbone']!r} with {metadata['backbone_kwargs']}): {error}") from None
  precond = config_utils.from_dict(Preconditioning, metadata["precond"], where="precond")
  return backbone, params, precond, metadata




def num_params(tree: Params) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


read_metrics = loop.read_metrics


__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "TeacherConfig", "TeacherObjective", "TeacherTask",
           "make_sampler", "save_samples", "train", "build_backbone", "export_teacher", "load_teacher",
           "num_params", "read_metrics"]
