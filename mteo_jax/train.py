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
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging

from mteo_jax import checkpoints, config_utils, data, parallel, schedules, solvers, viz
from mteo_jax.diffusion import Preconditioning, edm_training_loss
from mteo_jax.nets import Backbone, get_backbone, make_denoiser

Params = Any
Batch = dict[str, jax.Array]
LR_DECAYS = ("constant", "cosine")
TEACHER_FORMAT = "mteo_jax.teacher/1"

# Config keys that may change between a run and its resumption: they steer logging and pictures, not the optimisation.
RESUMABLE_KEYS = frozenset({"mode", "train.log_every", "train.checkpoint_every", "train.keep", "train.sample_every",
                            "train.sample_steps", "train.num_samples"})


# --- typed configuration ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DataConfig:
  """``get_dataset(name, split="train", **options)``."""
  name: str
  options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``get_backbone(backbone, data_shape, **kwargs)``."""
  backbone: str
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and host-loop settings.

  Attributes:
    steps: number of optimizer updates in total (a resumed run continues up to it).
    batch_size: global batch size (split over all devices; must be divisible by their number).
    lr: peak learning rate of Adam.
    warmup_steps: the learning rate rises linearly from ``lr / warmup_steps`` to ``lr`` over this many updates.
    lr_decay: ``constant`` after the warm-up, or ``cosine`` decay to zero at ``steps``.
    ema_decay: EMA decay per update; the effective decay is ``min(ema_decay, (1 + t) / (10 + t))`` after ``t``
      updates so that the average forgets the random initialisation early (TF's ``num_updates`` rule).
    grad_clip: clip gradients to this global norm (0 = off).
    log_every: log (and write ``metrics.jsonl``) every this many updates.
    checkpoint_every: save a checkpoint every this many updates (and always at the end).
    keep: number of checkpoints kept.
    sample_every: draw a picture of samples from the EMA parameters every this many updates (0 = only at the end).
    sample_steps: Heun steps of the sampler used for the pictures.
    num_samples: samples per picture (0 = no pictures).
  """
  steps: int
  batch_size: int
  lr: float
  warmup_steps: int = 0
  lr_decay: str = "constant"
  ema_decay: float = 0.999
  grad_clip: float = 0.0
  log_every: int = 100
  checkpoint_every: int = 1000
  keep: int = 3
  sample_every: int = 0
  sample_steps: int = 18
  num_samples: int = 64

  def __post_init__(self):
    positive = {"steps": self.steps, "batch_size": self.batch_size, "log_every": self.log_every,
                "checkpoint_every": self.checkpoint_every, "keep": self.keep, "sample_steps": self.sample_steps}
    for name, value in positive.items():
      if value < 1:
        raise ValueError(f"train.{name} must be >= 1, got {value}")
    for name in ("warmup_steps", "sample_every", "num_samples"):
      if getattr(self, name) < 0:
        raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
    if not self.lr > 0:
      raise ValueError(f"train.lr must be positive, got {self.lr}")
    if self.lr_decay not in LR_DECAYS:
      raise ValueError(f"unknown train.lr_decay {self.lr_decay!r}; expected one of {list(LR_DECAYS)}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
    if self.grad_clip < 0:
      raise ValueError(f"train.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """The sections of an experiment config that teacher training reads (other sections are left to other modes)."""
  seed: int
  data: DataConfig
  model: ModelConfig
  precond: Preconditioning
  train: TrainConfig
  mode: str = "train"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict) -> "TeacherConfig":
    plain = config_utils.to_plain(config)
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in fields if name not in plain and name != "mode"]
    if missing:
      raise ValueError(f"the config lacks the section(s) {missing} needed for teacher training")
    return config_utils.from_dict(cls, {name: plain[name] for name in fields if name in plain})


# --- state, optimiser, step ------------------------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; ``rng`` holds raw key data (uint32) so that checkpoints can store it."""
  step: jax.Array
  params: Params
  ema_params: Params
  opt_state: optax.OptState
  rng: jax.Array


def make_lr_schedule(config: TrainConfig) -> optax.Schedule:
  """``lr * min(1, (t + 1) / warmup) * decay(t)`` at update ``t`` (0-based); decay: 1, or a cosine to 0 at ``steps``."""

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    factor = jnp.minimum(1.0, (count + 1.0) / config.warmup_steps) if config.warmup_steps else jnp.float32(1.0)
    if config.lr_decay == "cosine":
      progress = jnp.clip((count - config.warmup_steps) / max(1, config.steps - config.warmup_steps), 0.0, 1.0)
      factor = factor * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return config.lr * factor

  return schedule


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Adam (EDM's betas 0.9 / 0.999) with the schedule above, after global-norm clipping when ``grad_clip > 0``."""
  adam = optax.adam(make_lr_schedule(config), b1=0.9, b2=0.999, eps=1e-8)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
  return adam


def ema_decay_at(num_updates: jax.Array, ema_decay: float) -> jax.Array:
  """``min(ema_decay, (1 + t) / (10 + t))``: a short memory while the parameters are still far from trained."""
  t = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


def make_init(backbone: Backbone, optimizer: optax.GradientTransformation) -> Callable[[jax.Array], TrainState]:
  """``init(key) -> TrainState``, jitted: params from ``fold_in(key, 0)``, the EMA equal to them, the run's key
  ``fold_in(key, 1)``."""

  def init(root: jax.Array) -> TrainState:
    params = backbone.init(jax.random.fold_in(root, 0))
    # The EMA is a copy, not the same buffers: the step donates the state, and a buffer cannot be donated twice.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                      opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.fold_in(root, 1)))

  # One program for the whole initialisation (op by op, every initializer would be compiled on its own), and on CPU
  # without XLA's expensive optimisations: it runs once, so compile time is all that counts.
  options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
             if jax.default_backend() == "cpu" else None)
  return jax.jit(init, compiler_options=options)


def init_state(backbone: Backbone, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Fresh state from ``key(seed)`` (see ``make_init``)."""
  return make_init(backbone, optimizer)(jax.random.key(seed))


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, backbone: Backbone, precond: Preconditioning,
               optimizer: optax.GradientTransformation, lr_schedule: optax.Schedule,
               ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
  """One Adam update on the EDM loss of ``batch`` ({"x": [B, ...], "label": [B] when conditional}) and the EMA update.

  ``rng`` is the run's key; the step's randomness is ``fold_in(rng, state.step)``, so a resumed run draws the same
  noise levels, noise and dropout masks as an uninterrupted one.
  """
  loss_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step))
  label = batch.get("label")

  def loss_fn(params: Params) -> jax.Array:
    denoiser = make_denoiser(backbone, params, precond, label, train=True, rng=dropout_rng)
    return jnp.mean(edm_training_loss(lambda x, sigma: denoiser(x, sigma), batch["x"], loss_rng, precond))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, ema_decay)
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state), metrics


def make_train_step(backbone: Backbone, precond: Preconditioning, config: TrainConfig,
                    mesh: jax.sharding.Mesh) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  """``train_step`` jitted over ``mesh``: state and key replicated, batch split on "data", state donated."""
  optimizer = make_optimizer(config)
  step = functools.partial(train_step, backbone=backbone, precond=precond, optimizer=optimizer,
                           lr_schedule=make_lr_schedule(config), ema_decay=config.ema_decay)
  replicated, split = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  return jax.jit(step, in_shardings=(replicated, split, replicated), out_shardings=(replicated, replicated),
                 donate_argnums=0)


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
  path = Path(path)
  try:
    viz.save_samples_picture(samples, path, reference=reference, title=path.stem)
  except Exception as error:  # noqa: BLE001  (a picture must never cost a training run)
    logging.warning("picture %s not drawn (samples of shape %s): %s: %s", path, np.shape(samples),
                    type(error).__name__, error)
    return None
  return path


# --- the host loop ---------------------------------------------------------------------------------------------------

StepHook = Callable[[int, TrainState, dict[str, jax.Array]], None]


def check_resume_config(saved: dict, current: dict) -> None:
  """A run resumes only under the config it was started with (up to logging/picture settings, and ``train.steps``
  when the learning rate does not decay towards ``steps``)."""
  ignore = set(RESUMABLE_KEYS)
  if saved.get("train", {}).get("lr_decay") == current["train"]["lr_decay"] == "constant":
    ignore.add("train.steps")
  changed = config_utils.diff(saved, current, ignore=ignore)
  if changed:
    details = "; ".join(f"{key}: {_lookup(saved, key)!r} -> {_lookup(current, key)!r}" for key in changed)
    raise ValueError(f"the workdir holds a checkpoint of a run with a different config ({details}); resume with the "
                     "same config or use a new workdir")


def _lookup(tree: dict, dotted: str) -> Any:
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return "<missing>"
    tree = tree[key]
  return tree


def train(config: TeacherConfig, workdir: str | os.PathLike, *, hooks: Sequence[StepHook] = (),
          mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains (or resumes training of) a teacher in ``workdir`` and exports its EMA parameters to ``workdir/teacher``.

  Writes ``checkpoints/``, ``metrics.jsonl`` (one JSON line per log interval), ``samples/step_*.png`` and
  ``teacher/``. ``hooks`` are called on the host after every step as ``hook(step, state, metrics)``, before that
  step's checkpoint is saved (the state is donated to the next step: read it, do not keep it). Returns the final state.

  Interrupts: whatever ends the run early (an exception from a hook, the data or the restore, ``KeyboardInterrupt``,
  ``SystemExit``, and SIGTERM, which is turned into ``SystemExit`` during the run) first waits for the pending
  asynchronous save, so every checkpoint step already saved is on disk when the exception propagates and the rerun
  resumes from it; a save that could not complete is reported (``checkpoints.LostCheckpointWarning``), here or, after
  a hard kill mid-save, when the rerun opens the checkpoint directory. Nothing is exported unless the run finishes.
  """
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tc = config.train
  mesh = mesh or parallel.make_mesh()
  if tc.batch_size % mesh.size:
    raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the {mesh.size} devices; use a multiple "
                     f"of {mesh.size}")
  dataset = data.get_dataset(config.data.name, split="train", **config.data.options)
  backbone, init_fn, step_fn = _programs(json.dumps(config_utils.to_plain(config.model), sort_keys=True),
                                         tuple(dataset.data_shape), config.precond, tc, mesh)
  use_labels = _use_labels(backbone, dataset)
  config_dict = config_utils.to_plain(config)

  # Everything from opening the checkpoints to the last save runs inside both contexts: on any exit, SIGTERM included,
  # the pending save lands (or is reported lost) and the checkpoint manager is closed before the exception propagates.
  with checkpoints.sigterm_as_exit(), \
       checkpoints.Checkpointer(workdir / "checkpoints", max_to_keep=tc.keep,
                                save_interval_steps=tc.checkpoint_every) as checkpointer:
    wall_time_before, last_loss = 0.0, float("nan")
    latest = checkpointer.latest_step()
    root = jax.random.key(config.seed)
    if latest is None:
      state = init_fn(root)
    else:
      saved = checkpointer.metadata(latest)
      check_resume_config(saved["config"], config_dict)
      state = checkpointer.restore(jax.eval_shape(init_fn, root), latest)
      wall_time_before, last_loss = float(saved.get("wall_time_s", 0.0)), float(saved.get("loss", float("nan")))
      logging.info("resuming from the checkpoint at step %d in %s", latest, workdir)
    state = parallel.replicate(state, mesh)
    start_step = int(state.step)
    if start_step > tc.steps:
      raise ValueError(f"the checkpoint is at step {start_step}, beyond train.steps={tc.steps}")

    _truncate_metrics(workdir, start_step)
    # The run's key, from a host copy: a view of state.rng would alias a buffer that the step donates.
    key = parallel.replicate(jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng))), mesh)
    sampler = _picture_sampler(config, backbone, dataset, use_labels, workdir)
    batch_iter = iter(data.batches(dataset, tc.batch_size, seed=config.seed, start_step=start_step))
    t_start = t_log = time.perf_counter()
    pending: list[dict[str, jax.Array]] = []

    def metadata() -> dict:
      return {"config": config_dict, "loss": last_loss,
              "wall_time_s": wall_time_before + time.perf_counter() - t_start}

    with tqdm.tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", disable=None,
                   dynamic_ncols=True) as progress:
      for step in range(start_step + 1, tc.steps + 1):
        host_batch = next(batch_iter)
        batch = {"x": host_batch["x"]}
        if use_labels:
          batch["label"] = host_batch["label"]
        if jax.process_count() > 1:  # every host reads the same global batch and feeds its own rows of it
          share = tc.batch_size // jax.process_count()
          batch = {k: v[jax.process_index() * share:(jax.process_index() + 1) * share] for k, v in batch.items()}
        state, metrics = step_fn(state, parallel.shard_batch(batch, mesh), key)
        pending.append(metrics)
        for hook in hooks:
          hook(step, state, metrics)
        if step % tc.log_every == 0 or step == tc.steps:
          last_loss = _log(workdir, step, tc.steps, pending, time.perf_counter() - t_log, mesh.size, progress)
          pending, t_log = [], time.perf_counter()
        checkpointer.save(step, state, metadata(), force=step == tc.steps)
        if sampler is not None and tc.sample_every and step % tc.sample_every == 0 and step != tc.steps:
          sampler(state.ema_params, step)
        progress.update(1)
  # Leaving the block waited for the final save: it is on disk (or its failure was raised) before the export.

  if sampler is not None:
    sampler(state.ema_params, tc.steps)
  export_teacher(workdir / "teacher", config, backbone, state.ema_params,
                 final_loss=last_loss, wall_time_s=metadata()["wall_time_s"])
  return state


def _programs(model_json: str, data_shape: tuple[int, ...], precond: Preconditioning, config: TrainConfig,
              mesh: jax.sharding.Mesh) -> tuple[Backbone, Callable, Callable]:
  """Backbone, jitted init and jitted step, cached so that repeated runs in one process (resumption, sweeps,
  tests) compile once; keyed by everything the programs depend on (the init does not depend on the mesh)."""
  backbone, init = _init_program(model_json, data_shape, config)
  return backbone, init, _step_program(model_json, data_shape, precond, config, mesh)


@functools.lru_cache(maxsize=4)
def _init_program(model_json: str, data_shape: tuple[int, ...], config: TrainConfig) -> tuple[Backbone, Callable]:
  backbone = build_backbone(ModelConfig(**json.loads(model_json)), data_shape)
  return backbone, make_init(backbone, make_optimizer(config))


@functools.lru_cache(maxsize=4)
def _step_program(model_json: str, data_shape: tuple[int, ...], precond: Preconditioning, config: TrainConfig,
                  mesh: jax.sharding.Mesh) -> Callable:
  backbone, _ = _init_program(model_json, data_shape, config)
  return make_train_step(backbone, precond, config, mesh)


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


def _truncate_metrics(workdir: Path, step: int) -> None:
  """Drops the records after ``step`` that a killed run logged past its last checkpoint (they are redone)."""
  path = workdir / "metrics.jsonl"
  if jax.process_index() != 0 or not path.exists():
    return
  records = read_metrics(workdir)
  kept = [r for r in records if r["step"] <= step]
  if len(kept) != len(records):
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)


def _log(workdir: Path, step: int, total: int, pending: list[dict], seconds: float, num_devices: int,
         progress: tqdm.tqdm) -> float:
  """Fetches the metrics of the interval (one device sync), appends them to metrics.jsonl, logs; returns the loss."""
  values = jax.device_get(pending)
  losses = [float(m["loss"]) for m in values]
  record = {"step": step, "loss": float(np.mean(losses)), "losses": losses,
            "grad_norm": float(np.mean([m["grad_norm"] for m in values])), "lr": float(values[-1]["lr"]),
            "steps_per_s": len(values) / max(seconds, 1e-9), "num_devices": num_devices}
  if not all(math.isfinite(x) for x in losses):
    raise FloatingPointError(f"non-finite loss at step {step}: {losses}; lower train.lr or set train.grad_clip")
  if jax.process_index() == 0:
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
  eta = (total - step) / record["steps_per_s"]
  logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.1f steps/s  eta %.0fs", step, total,
               record["loss"], record["grad_norm"], record["lr"], record["steps_per_s"], eta)
  progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
  return record["loss"]


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
  checkpoints.save_pytree(path, params, metadata, overwrite=True)


def load_teacher(path: str | os.PathLike) -> tuple[Backbone, Params, Preconditioning, dict]:
  """``(backbone, params, precond, metadata)`` of an exported teacher; ``make_denoiser(backbone, params, precond)``
  is then the teacher's denoiser."""
  metadata = checkpoints.load_metadata(path)
  missing = [k for k in ("backbone", "backbone_kwargs", "data_shape", "precond") if k not in metadata]
  if missing:
    raise ValueError(f"{path} is not an exported teacher: its metadata lacks {missing}")
  backbone = get_backbone(metadata["backbone"], tuple(metadata["data_shape"]),
                          **config_utils.tuples_from_lists(metadata["backbone_kwargs"]))
  expected = jax.eval_shape(backbone.init, jax.random.key(0))
  try:
    params = checkpoints.load_pytree(path, target=expected)
  except ValueError as error:
    raise ValueError(f"the parameters in {path} do not fit the backbone its metadata describes "
                     f"({metadata['backbone']!r} with {metadata['backbone_kwargs']}): {error}") from None
  precond = config_utils.from_dict(Preconditioning, metadata["precond"], where="precond")
  return backbone, params, precond, metadata


def train_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The ``train`` mode of the CLI: typed config at the boundary, then ``train``."""
  train(TeacherConfig.from_config(config), workdir)


def num_params(tree: Params) -> int:
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The records of ``workdir/metrics.jsonl`` in order."""
  with open(Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


__all__ = ["DataConfig", "ModelConfig", "TrainConfig", "TeacherConfig", "TrainState", "make_lr_schedule",
           "make_optimizer", "ema_decay_at", "make_init", "init_state", "train_step", "make_train_step", "make_sampler",
           "save_samples", "check_resume_config", "train", "build_backbone", "export_teacher", "load_teacher",
           "train_mode", "num_params", "read_metrics"]

