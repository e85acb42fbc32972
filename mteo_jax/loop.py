"""The one training loop: everything that learns (teachers, MTEO tables, and the methods to come) goes through ``fit``.

In the spirit of google-research/vdm's ``Experiment``: a method supplies a ``Task`` (how to initialise what it learns,
its loss, and its batches), the loop supplies the rest, the same for all of them:

    optimizer   make_optimizer(config): Adam after global-norm clipping, with a linear warm-up and then a constant,
                cosine or linear learning rate that ends at ``lr * lr_end_factor`` at ``steps``
    step        one pure jitted step on the device mesh: state replicated, batch split on "data", state donated;
                gradients reach the trainable pytree only (frozen parameters are an argument, never differentiated)
    data        the task's global batch at each step, a function of (seed, step); each process feeds its own rows
    checkpoint  every ``checkpoint_every`` steps and at the end, exact resume (same batches, same keys), the run's
                wall time and loss history kept across restarts; a checkpoint of another run is refused, naming the
                settings that differ
    NaN stop    a non-finite loss, gradient or parameter stops the run naming the step; checkpoints are written only
                after their step was checked, so the last one on disk is good
    metrics     ``metrics.jsonl``: one record per ``log_every`` steps (loss, grad_norm, lr, steps/s) and one per
                evaluation; ``history`` returns them
    progress    a tqdm bar with rate and ETA
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

from mteo_jax import config_utils, data, files, parallel

LR_DECAYS = ("constant", "cosine", "linear")


class NonFiniteError(FloatingPointError):
  """A training step produced a non-finite loss, gradient or parameter (``step`` is 1-based, as in the logs)."""

  def __init__(self, message: str, step: int, last_checkpoint: int | None):
    super().__init__(message)
    self.step = step
    self.last_checkpoint = last_checkpoint


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The settings of the training loop that every learning mode shares (its config section holds these keys).

  Attributes:
    steps: optimizer updates in total (a resumed run continues up to it).
    batch_size: global batch size, split over all devices (must be divisible by their number).
    lr: peak learning rate of Adam.
    warmup_steps: the learning rate rises linearly as ``lr * (t + 1) / warmup_steps`` over the first updates.
    lr_decay: after the warm-up, ``constant``, or ``cosine`` / ``linear`` from ``lr`` to ``lr * lr_end_factor`` at
      ``steps``.
    lr_end_factor: the learning rate at ``steps`` as a fraction of ``lr`` (cosine and linear decay; 0 = decay to 0).
    grad_clip: clip gradients to this global norm (0 = off).
    ema_decay: exponential moving average of the trained pytree (0 = none); the decay after ``t`` updates is
      ``min(ema_decay, (1 + t) / (10 + t))``, so the average forgets the initialisation early (TF's ``num_updates``).
    log_every: a ``metrics.jsonl`` record and a log line every this many updates.
    checkpoint_every: a checkpoint every this many updates (and always at the end).
    checkpoint_seconds: also a checkpoint as soon as this many seconds of training (compilation excluded) have
      passed since the last one (0 = by ``checkpoint_every`` only), so that an interrupt loses at most about this
      much training. Single-process runs only: the processes of a multi-host run must agree on the step, so there
      ``checkpoint_every`` alone applies.
    keep: checkpoints kept on disk.
    progress: show a progress bar (rate and ETA).
  """
  steps: int = 1000
  batch_size: int = 64
  lr: float = 1e-3
  warmup_steps: int = 0
  lr_decay: str = "constant"
  lr_end_factor: float = 0.0
  grad_clip: float = 0.0
  ema_decay: float = 0.0
  log_every: int = 100
  checkpoint_every: int = 1000
  checkpoint_seconds: float = 30.0
  keep: int = 2
  progress: bool = True

  section: ClassVar[str] = "train"   # the config section that holds these keys (in error messages)

  def __post_init__(self):
    self.check(where=self.section)

  def check(self, where: str) -> None:
    """Raises ValueError naming ``<where>.<key>`` for a setting out of range (called again by subclasses' checks)."""
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep"):
      if getattr(self, name) < 1:
        raise ValueError(f"{where}.{name} must be >= 1, got {getattr(self, name)}")
    if not (self.checkpoint_seconds >= 0 and math.isfinite(self.checkpoint_seconds)):
      raise ValueError(f"{where}.checkpoint_seconds must be >= 0 and finite (0 = by checkpoint_every only), got "
                       f"{self.checkpoint_seconds}")
    if self.warmup_steps < 0:
      raise ValueError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
    if not (self.lr > 0 and math.isfinite(self.lr)):
      raise ValueError(f"{where}.lr must be a positive finite number, got {self.lr}")
    if self.lr_decay not in LR_DECAYS:
      raise ValueError(f"unknown {where}.lr_decay {self.lr_decay!r}; expected one of {list(LR_DECAYS)}")
    if not 0.0 <= self.lr_end_factor <= 1.0:
      raise ValueError(f"{where}.lr_end_factor must be in [0, 1], got {self.lr_end_factor}")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"{where}.ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
    if self.grad_clip < 0:
      raise ValueError(f"{where}.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")

  def loop_settings(self) -> "LoopConfig":
    """The loop's own fields of this (possibly extended) config, as a plain ``LoopConfig``."""
    return LoopConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoopConfig)})


# --- optimizer -------------------------------------------------------------------------------------------------------

def make_lr_schedule(config: LoopConfig) -> optax.Schedule:
  """``lr * min(1, (t + 1) / warmup) * decay(t)`` at update ``t`` (0-based); decay is 1 (``constant``) or goes from 1
  at the end of the warm-up to ``lr_end_factor`` at ``steps`` along a half cosine (``cosine``) or a line (``linear``).
  """

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count, jnp.float32)
    factor = jnp.minimum(1.0, (count + 1.0) / config.warmup_steps) if config.warmup_steps else jnp.float32(1.0)
    if config.lr_decay != "constant":
      progress = jnp.clip((count - config.warmup_steps) / max(1, config.steps - config.warmup_steps), 0.0, 1.0)
      shape = 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) if config.lr_decay == "cosine" else 1.0 - progress
      factor = factor * (config.lr_end_factor + (1.0 - config.lr_end_factor) * shape)
    return config.lr * factor

  return schedule


def make_optimizer(config: LoopConfig) -> optax.GradientTransformation:
  """The optimizer of every learning mode: Adam (EDM's betas 0.9 / 0.999, eps 1e-8) on ``make_lr_schedule``, after
  global-norm clipping when ``grad_clip > 0``."""
  adam = optax.adam(make_lr_schedule(config), b1=0.9, b2=0.999, eps=1e-8)
  if config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adam)
  return adam


def ema_decay_at(num_updates: jax.Array, ema_decay: float) -> jax.Array:
  """``min(ema_decay, (1 + t) / (10 + t))``: a short memory while the parameters are still far from trained."""
  t = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


# --- task, state, step -----------------------------------------------------------------------------------------------

class Task(Protocol):
  """What a method supplies to the loop.

  ``init(key) -> trainable``: a fresh pytree to learn (jitted; ``key`` is ``fold_in(key(seed), 0)``).
  ``loss(trainable, frozen, batch, key) -> scalar``: the objective; ``frozen`` (e.g. a teacher's parameters) is never
    differentiated or updated; ``key`` is ``fold_in(run key, step)``, the same at a step after a resume.
  ``batches(start_step) -> iterator``: the global batch (a dict of host arrays ``[batch_size, ...]``) of every step
    from ``start_step`` on, a function of the step alone so that resuming is exact.
  ``frozen``: the frozen argument (None when nothing is frozen).
  """

  frozen: Any

  def init(self, key: jax.Array) -> Any: ...

  def loss(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array: ...

  def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]: ...


class ArrayTask:
  """A task that learns a pytree from a fixed set of arrays (reference trajectories, ...): batch ``s`` holds the rows
  ``epoch_permutation(num, seed, s // spe)[(s % spe) B : (s % spe + 1) B]`` of every array (``spe = num // B``
  steps per epoch), a function of ``(seed, s)`` only, so resuming is exact.

  Args:
    initial: the pytree to start from (``init`` returns a copy of it; the key is not used).
    objective: ``objective(trainable, frozen, batch) -> scalar``.
    arrays: ``{name: [num, ...]}`` host arrays with one leading size.
    batch_size: rows per step (at most ``num``).
    seed: the order of the rows.
    frozen: the frozen argument of ``objective`` (e.g. a teacher's parameters).
  """

  def __init__(self, initial: Any, objective: Callable[[Any, Any, dict], jax.Array], arrays: dict[str, np.ndarray],
               *, batch_size: int, seed: int, frozen: Any = None):
    sizes = {name: np.shape(a)[0] for name, a in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"every array needs the same leading size, got {sizes}")
    self.num = next(iter(sizes.values()))
    if not 1 <= batch_size <= self.num:
      raise ValueError(f"batch_size {batch_size} must be between 1 and the {self.num} rows of the training data")
    self.initial, self.objective, self.arrays = initial, objective, arrays
    self.batch_size, self.seed, self.frozen = batch_size, seed, frozen

  def init(self, key: jax.Array) -> Any:
    del key
    return jax.tree.map(jnp.copy, self.initial)

  def loss(self, trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    del key
    return self.objective(trainable, frozen, batch)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    spe = self.num // self.batch_size
    order = data.epoch_permutation(self.num, self.seed, step // spe)
    rows = order[(step % spe) * self.batch_size:(step % spe + 1) * self.batch_size]
    return {name: values[rows] for name, values in self.arrays.items()}

  def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. ``ema_params`` is None without an EMA; ``rng`` holds raw key data (uint32)
  so that checkpoints can store it."""
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  rng: jax.Array


def make_init(task: Task, config: LoopConfig) -> Callable[[jax.Array], TrainState]:
  """``init(key) -> TrainState``, jitted: ``task.init(fold_in(key, 0))``, the EMA equal to it, the run's key
  ``fold_in(key, 1)``."""
  optimizer = make_optimizer(config)

  def init(root: jax.Array) -> TrainState:
    params = task.init(jax.random.fold_in(root, 0))
    # The EMA is a copy, not the same buffers: the step donates the state, and a buffer cannot be donated twice.
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.fold_in(root, 1)))

  # One program for the whole initialisation, and on CPU without XLA's expensive optimisations: it runs once.
  options = ({"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
             if jax.default_backend() == "cpu" else None)
  return jax.jit(init, compiler_options=options)


def make_step(task: Task, config: LoopConfig) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The pure step ``(state, frozen, batch) -> (state, metrics)``: one Adam update of ``state.params`` on
  ``task.loss`` and the EMA update. ``metrics["finite"]`` is False when the loss, the gradient or the updated
  parameters hold a NaN or an infinity."""
  optimizer, lr_schedule = make_optimizer(config), make_lr_schedule(config)

  def step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss, grads = jax.value_and_grad(task.loss)(state.params, frozen, batch, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if config.ema_decay:
      decay = ema_decay_at(state.step, config.ema_decay)
      ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    for leaf in jax.tree.leaves(params):
      finite &= jnp.all(jnp.isfinite(leaf))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr_schedule(state.step), "finite": finite}
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

  return step


# --- resume identity -------------------------------------------------------------------------------------------------

def run_identity(config: LoopConfig, task_identity: dict) -> dict:
  """What a checkpoint must match to be resumed: the task's own identity and the loop settings that change the result
  (not ``log_every``, ``checkpoint_every``, ``checkpoint_seconds``, ``keep`` or ``progress``; not ``steps`` when the
  learning rate is constant, so that such a run can be extended)."""
  loop = {name: getattr(config, name) for name in ("batch_size", "lr", "warmup_steps", "lr_decay", "lr_end_factor",
                                                   "grad_clip", "ema_decay", "steps")}
  if config.lr_decay == "constant":
    del loop["steps"]
  return config_utils.to_plain({"task": task_identity, "loop": loop})


def describe_differences(saved: dict, current: dict) -> str:
  """``key: old -> new`` for each dotted key at which two nested dicts differ (at most 10 listed)."""
  changed = config_utils.diff(saved, current)
  parts = [f"{key}: {_lookup(saved, key)!r} -> {_lookup(current, key)!r}" for key in changed[:10]]
  if len(changed) > 10:
    parts.append(f"... and {len(changed) - 10} more")
  return "; ".join(parts)


class _Shown(str):
  """A value as shown in a message, printed without quotes (``<missing>``, ``{6 keys}``)."""

  def __repr__(self) -> str:
    return str(self)


def _lookup(tree: Any, dotted: str) -> Any:
  """The value at ``dotted``, short: ``<missing>``, a whole section as ``{N keys}`` (its keys are not compared with
  anything on the other side), a long list cut to 80 characters."""
  for key in dotted.split("."):
    if not isinstance(tree, dict) or key not in tree:
      return _Shown("<missing>")
    tree = tree[key]
  if isinstance(tree, dict):
    return _Shown(f"{{{len(tree)} keys}}") if len(json.dumps(tree, default=str)) > 40 else tree
  if isinstance(tree, list) and len(json.dumps(tree, default=str)) > 80:
    return _Shown(json.dumps(tree, default=str)[:74] + " ...]")
  return tree


class ResumeMismatchError(ValueError):
  """The run directory holds a checkpoint of a run with other settings."""


@dataclasses.dataclass
class Progress:
  """Where the latest ``fit`` of this process is (or stopped): what an interrupt message reports.

  Attributes:
    desc: the run's label (e.g. ``mteo/euler_nfe3``); run_dir: its directory.
    step: the last update done; steps: the run's total.
    saved_step: the step of the run's newest checkpoint on disk (None: none yet).
  """
  desc: str
  run_dir: Path
  step: int
  steps: int
  saved_step: int | None

  def newest_on_disk(self) -> int | None:
    """The newest complete checkpoint in ``run_dir/checkpoints`` (a local directory) now, or ``saved_step``: an
    interrupt that came while a save was starting is raised once it has started, and the run waits for it to land
    before the interrupt propagates, so after an interrupt the disk may hold a step that ``saved_step`` does not."""
    directory = Path(self.run_dir) / "checkpoints"
    try:
      steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    except OSError:
      steps = []
    return max(steps + ([] if self.saved_step is None else [self.saved_step]), default=None)


_PROGRESS: Progress | None = None


def progress() -> Progress | None:
  """The ``Progress`` of the latest ``fit`` called in this process (None if none ran)."""
  return _PROGRESS


# --- the host loop ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
  """What ``fit`` returns: the final state (on the host), the ``metrics.jsonl`` records of the whole run (``history``:
  training records ``{"step", "loss", "grad_norm", "lr", "steps_per_s"}``, the rate leaving out the compiling first
  step of a call (None for an interval of that step alone), and evaluation records ``{"step", "eval": {...}}``) and
  the training wall time in seconds, restarts included (without restore time)."""
  state: TrainState
  history: list[dict]
  train_seconds: float

  @property
  def losses(self) -> tuple[list[int], list[float]]:
    records = [r for r in self.history if "loss" in r]
    return [r["step"] for r in records], [r["loss"] for r in records]

  def evals(self, name: str) -> tuple[list[int], list[float]]:
    records = [r for r in self.history if name in r.get("eval", {})]
    return [r["step"] for r in records], [r["eval"][name] for r in records]


EvalFn = Callable[[int, TrainState], "dict[str, float] | None"]
StepHook = Callable[[int, TrainState, "dict[str, jax.Array]"], None]


def fit(task: Task, config: LoopConfig, run_dir: str | os.PathLike, *, seed: int, identity: dict,
        eval_fn: EvalFn | None = None, eval_every: int = 0, hooks: Sequence[StepHook] = (),
        mesh: jax.sharding.Mesh | None = None, desc: str = "train",
        programs: tuple[Callable, Callable] | None = None) -> Result:
  """Trains ``task`` (or resumes it) in ``run_dir`` and returns the final state, the history and the train time.

  Writes ``run_dir/checkpoints/`` and ``run_dir/metrics.jsonl``. A run directory whose checkpoint was written for a
  different ``run_identity(config, identity)`` is refused with ``ResumeMismatchError`` naming the settings that
  differ; a finished run returns its final state, history and train time without training.

  Args:
    task: the method's ``Task``.
    config: the loop settings (any ``LoopConfig`` subclass).
    run_dir: where checkpoints and metrics go (created).
    seed: the run's key is ``fold_in(key(seed), 1)``; ``task.init`` gets ``fold_in(key(seed), 0)``.
    identity: JSON-able description of everything else the result depends on (teacher, data, model, ...).
    eval_fn: ``eval_fn(step, state) -> {name: value} | None``, called every ``eval_every`` steps and at the end,
      before that step's checkpoint; returned values are written to ``metrics.jsonl``.
    hooks: ``hook(step, state, metrics)`` on the host after every step, before its checkpoint (the state is donated
      to the next step: read it, do not keep it).
    mesh: the device mesh (default: all devices on the "data" axis).
    desc: the progress bar's label.
    programs: ``(init, step)`` already jitted for this task, config and mesh (``compile_programs``), to reuse across
      runs in one process; default: compiled here.

  Raises:
    ValueError: ``batch_size`` not divisible by the device or process count, or a checkpoint beyond ``steps``.
    ResumeMismatchError: see above. NonFiniteError: a step produced NaN or Inf (the message names the step and the
      last checkpoint on disk, which holds finite values). files.UnreadableFileError: the checkpoint to resume from,
      or ``metrics.jsonl``, cannot be read (truncated, corrupted); the message names it and what to delete.

  Checkpoints: every ``checkpoint_every`` updates, at the end, and (single process) whenever ``checkpoint_seconds``
  of training have passed since the last one; any step's checkpoint resumes exactly.

  Interrupts: whatever ends the run early (an exception, ``KeyboardInterrupt``, ``SystemExit``, and SIGTERM, turned into
  ``SystemExit`` here) first waits for the pending asynchronous save, so every checkpoint already started is on disk
  when the exception propagates and the same call resumes from it; a save that could not complete is reported
  (``checkpoints.LostCheckpointWarning``).
  """
  from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import)
  run_dir = Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh()
  check_batch_size(config.batch_size, mesh, where=desc)
  init_fn, step_fn = programs or compile_programs(task, config, mesh)
  identity = run_identity(config, identity)
  metrics_path = run_dir / "metrics.jsonl"

  with checkpoints.sigterm_as_exit(), \
       checkpoints.Checkpointer(run_dir / "checkpoints", max_to_keep=config.keep,
                                save_interval_steps=config.checkpoint_every) as checkpointer:
    root = jax.random.key(seed)
    latest = checkpointer.latest_step()
    seconds_before = 0.0
    saved_seconds = None  # the train time stored with the last checkpoint of this call
    if latest is None:
      state = init_fn(root)
    else:
      saved = checkpointer.metadata(latest)
      if saved.get("identity") != identity:
        raise ResumeMismatchError(
            f"{run_dir} holds a checkpoint (step {latest}) of a run with other settings: "
            f"{describe_differences(saved.get('identity') or {}, identity)}. Resume with the same settings, or use "
            f"another workdir (or set overwrite=True to start again).")
      try:
        state = checkpointer.restore(jax.eval_shape(init_fn, root), latest)
      except files.UnreadableFileError:
        raise
      except ValueError as error:   # another structure, shape or dtype under the same identity: not this run's state
        raise files.UnreadableFileError(f"{error}; {checkpointer.delete_advice(latest)}") from None
      seconds_before = float(saved.get("train_seconds", 0.0))
      logging.info("%s: resuming from the checkpoint at step %d in %s", desc, latest, run_dir)
    start = int(state.step)
    if start > config.steps:
      raise ValueError(f"{desc}: the checkpoint in {run_dir} is at step {start}, beyond steps={config.steps}")
    global _PROGRESS
    _PROGRESS = Progress(desc, run_dir, start, config.steps, latest)
    by_time = config.checkpoint_seconds > 0 and jax.process_count() == 1
    history = _read_history(metrics_path, upto=start)
    state = parallel.replicate(state, mesh)
    frozen = None if task.frozen is None else parallel.replicate(task.frozen, mesh)
    last_good = latest
    batch_iter = iter(task.batches(start))
    t_start = t_log = t_saved = time.perf_counter()
    interval_from = start   # the step before the logged interval's first
    pending: list[tuple[int, dict]] = []

    def check_and_log(step: int) -> None:
      """Fetches the pending metrics (one device sync) and stops on a non-finite step; at a log step, appends the
      interval's record and starts a new interval."""
      nonlocal pending, t_log, interval_from
      values = jax.device_get([m for _, m in pending])
      for (s, _), m in zip(pending, values):
        if not bool(m["finite"]):
          raise NonFiniteError(
              f"{desc}: non-finite loss, gradient or parameters at step {s} (loss {float(m['loss']):.4g}, grad_norm "
              f"{float(m['grad_norm']):.4g}, lr {float(m['lr']):.3g}); nothing after step {last_good or 0} was "
              f"saved. Lower lr, set grad_clip or check the data.", s, last_good)
      if step % config.log_every and step != config.steps:
        return
      # steps since the interval began; the first step of a call (it compiles) is not in the interval's time
      timed = step - max(interval_from, start + 1)
      rate = timed / max(time.perf_counter() - t_log, 1e-9) if timed else None   # None: only the compiling step
      record = {"step": step, "loss": float(np.mean([m["loss"] for m in values])),
                "grad_norm": float(np.mean([m["grad_norm"] for m in values])), "lr": float(values[-1]["lr"]),
                "steps_per_s": rate, "num_devices": mesh.size}
      history.append(record)
      _append(metrics_path, record)
      bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)
      speed = "compiling step" if rate is None else f"{rate:.1f} steps/s  eta {(config.steps - step) / rate:.0f}s"
      logging.info("%s step %d/%d  loss %.4g  grad_norm %.3g  lr %.2e  %s", desc, step, config.steps, record["loss"],
                   record["grad_norm"], record["lr"], speed)
      pending, t_log, interval_from = [], time.perf_counter(), step

    bar = tqdm.tqdm(total=config.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
                    disable=not config.progress or not parallel.is_writer())   # one bar on a multi-host run
    with bar:
      for step in range(start + 1, config.steps + 1):
        batch = _host_rows(next(batch_iter), config.batch_size)
        state, metrics = step_fn(state, frozen, parallel.shard_batch(batch, mesh))
        if step == start + 1:
          # The first call compiled the step: the checkpoint clock, the logged rate and the bar's rate and ETA count
          # from here (else the first ETA is the compile time times the steps: hours for a minute of compiling).
          jax.block_until_ready(metrics)
          t_saved = t_log = time.perf_counter()
          logging.info("%s: step compiled and run once in %.1f s", desc, t_saved - t_start)
          bar.reset(total=config.steps)
          bar.initial = bar.n = bar.last_print_n = step
          bar.refresh()
        pending.append((step, metrics))
        for hook in hooks:
          hook(step, state, metrics)
        _PROGRESS.step = step
        save = step % config.checkpoint_every == 0 or step == config.steps or \
            (by_time and time.perf_counter() - t_saved >= config.checkpoint_seconds)
        evaluate = eval_fn is not None and eval_every and (step % eval_every == 0 or step == config.steps)
        if save or evaluate or step % config.log_every == 0 or step == config.steps:
          check_and_log(step)
        if evaluate:
          values = eval_fn(step, state)
          if values:
            record = {"step": step, "eval": {k: float(v) for k, v in values.items()}}
            history.append(record)
            _append(metrics_path, record)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record["eval"].items()}, refresh=False)
        if save:
          saved_seconds = seconds_before + time.perf_counter() - t_start
          checkpointer.save(step, jax.device_get(state), {"identity": identity, "train_seconds": saved_seconds},
                            force=True)
          last_good = _PROGRESS.saved_step = step
          t_saved = time.perf_counter()
        if step != start + 1:
          bar.update(1)
  # The time stored with the final checkpoint (the last step always saves), so that a later call on the finished run
  # returns the same value.
  train_seconds = seconds_before if saved_seconds is None else saved_seconds
  return Result(state=jax.device_get(state), history=history, train_seconds=train_seconds)


def compile_programs(task: Task, config: LoopConfig, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """``(init, step)`` jitted for ``task`` and ``config`` on ``mesh``: state and frozen arguments replicated, the batch
  split on "data", the state donated."""
  replicated, split = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  step = jax.jit(make_step(task, config), in_shardings=(replicated, replicated, split),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  return make_init(task, config), step


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, *, where: str = "train") -> None:
  """A global batch must split evenly over the processes and over the devices."""
  if batch_size % mesh.size:
    raise ValueError(f"{where}: batch_size={batch_size} is not divisible by the {mesh.size} devices; use a multiple "
                     f"of {mesh.size}")
  if batch_size % jax.process_count():
    raise ValueError(f"{where}: batch_size={batch_size} is not divisible by the {jax.process_count()} processes")


def _host_rows(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """This process's rows of the global batch (all of them on one host)."""
  if jax.process_count() == 1:
    return batch
  share = batch_size // jax.process_count()
  begin = jax.process_index() * share
  return {k: v[begin:begin + share] for k, v in batch.items()}


def _append(path: Path, record: dict) -> None:
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _read_history(path: Path, *, upto: int) -> list[dict]:
  """The records of ``metrics.jsonl`` up to step ``upto``; later ones (logged by a killed run after its last
  checkpoint, and redone now) are dropped from the file too, and so is a last line cut short by the kill (with a
  warning)."""
  if not path.exists():
    return []
  records, cut = _read_records(path, allow_cut=True)
  kept = [r for r in records if r["step"] <= upto]
  if cut:
    logging.warning("%s: its last line is cut short (a process killed while writing it; %r...): dropped, as the "
                    "steps after the checkpoint at step %d are trained again", path, cut[:40], upto)
  if (len(kept) != len(records) or cut) and jax.process_index() == 0:
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
  return kept


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The records of a ``metrics.jsonl`` file (or of ``DIR/metrics.jsonl`` for a directory) in order.

  Raises:
    files.UnreadableFileError: a line that is not a JSON record with a ``step`` (the message names the file and the
      line).
  """
  path = Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  return _read_records(path, allow_cut=False)[0]


def _read_records(path: Path, *, allow_cut: bool) -> tuple[list[dict], str]:
  """``(records, cut)``: the records of ``path``, and (``allow_cut``) its last line where that is an unfinished write
  (no newline at its end, not a record), else ""."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except (OSError, ValueError) as error:
    raise files.UnreadableFileError(f"{path} cannot be read ({files.reason(error)}); delete it: training resumes from "
                                    "the checkpoint, without the loss history before it") from None
  records, cut = [], ""
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError("not a record with a step")
    except ValueError as error:
      if allow_cut and number == len(lines):   # the last line, without its newline: a write cut short
        cut = line
        continue
      raise files.UnreadableFileError(
          f"{path} cannot be read (line {number}: {files.reason(error, 80)}); delete that line, or the file (training "
          "resumes from the checkpoint, without the loss history before it)") from None
    records.append(record)
  return records, cut
