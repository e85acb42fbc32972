"""The host loop shared by every method that learns a small pytree against teacher trajectories (MTEO tables, learned
schedules): deterministic minibatches of trajectories, one jitted data-parallel step, held-out evaluation, a progress
bar, checkpoints and resume."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from mteo_jax import data as data_lib
from mteo_jax import parallel


@flax.struct.dataclass
class StudentState:
  step: jax.Array
  trainable: Any
  opt_state: Any


LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(learning_rate: float, steps: int, warmup_steps: int = 0, grad_clip: float = 1.0,
                   schedule: str = "cosine") -> optax.GradientTransformation:
  """Adam with linear warm-up, then constant or cosine decay to 10 %, and global-norm clipping (0 = none)."""
  if schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup_steps, 1), max(steps, warmup_steps + 1),
                                            end_value=0.1 * learning_rate)
  elif schedule == "constant":
    lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1)),
                               optax.constant_schedule(learning_rate)], [max(warmup_steps, 1)])
  else:
    raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {list(LR_SCHEDULES)}")
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(lr))


def init_state(trainable: Any, optimizer: optax.GradientTransformation) -> StudentState:
  return StudentState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=optimizer.init(trainable))


def make_train_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation):
  """One pure step ``(state, params, batch) -> (state, metrics)``: gradients reach the trainable pytree only.

  The backbone's ``params`` are an argument that is never differentiated or returned, so the optimizer cannot touch
  them: this is the parameter partition that keeps the teacher frozen.
  """

  def train_step(state: StudentState, params: Any, batch: dict[str, jax.Array]):
    loss, grads = jax.value_and_grad(loss_fn)(state.trainable, params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return StudentState(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def trajectory_batch(train_data: dict[str, np.ndarray], batch_size: int, seed: int, step: int) -> dict[str, np.ndarray]:
  """Minibatch ``step`` of the training trajectories: a function of ``(seed, step)`` only, so resuming is exact."""
  num = next(iter(train_data.values())).shape[0]
  spe = data_lib.steps_per_epoch(num, batch_size)
  indices = data_lib.epoch_permutation(num, seed, step // spe)[(step % spe) * batch_size:(step % spe + 1) * batch_size]
  return {name: values[indices] for name, values in train_data.items()}


def fit(loss_fn: Callable[[Any, Any, dict], jax.Array], trainable: Any, params: Any,
        train_data: dict[str, np.ndarray], optimizer: optax.GradientTransformation, *, steps: int, batch_size: int,
        seed: int, eval_fn: Callable[[Any], float] | None = None, eval_every: int = 0,
        checkpoint_dir: str | None = None, checkpoint_every: int = 0, metadata: dict | None = None,
        progress: bool = True, desc: str = "fit") -> tuple[Any, dict[str, list]]:
  """Minimises ``loss_fn(trainable, params, batch)`` over ``trainable`` only; ``params`` stay frozen.

  Returns the trained pytree and a history ``{"step", "loss", "eval_step", "eval"}``. With ``checkpoint_dir`` the run
  resumes from its latest checkpoint, and a checkpoint written for other ``metadata`` is an error.

  Interrupts: whatever ends the loop early (an exception from ``eval_fn`` or the step, ``KeyboardInterrupt``,
  ``SystemExit``, and SIGTERM, which is turned into ``SystemExit`` while checkpointing) first waits for the pending
  asynchronous save, so every checkpoint step already reached is on disk when the exception propagates, and the rerun
  resumes from it; a save that could not complete is reported (``checkpoints.LostCheckpointWarning``), here or, after
  a hard kill mid-save, when the rerun opens the directory.
  """
  num = next(iter(train_data.values())).shape[0]
  if batch_size > num:
    raise ValueError(f"batch_size {batch_size} exceeds the {num} training trajectories")
  mesh = parallel.make_mesh()
  replicated, sharded = parallel.replicated_sharding(mesh), parallel.data_sharding(mesh)
  step_fn = jax.jit(make_train_step(loss_fn, optimizer), in_shardings=(replicated, replicated, sharded),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  history: dict[str, list] = {"step": [], "loss": [], "eval_step": [], "eval": []}
  with contextlib.ExitStack() as stack:  # on any exit: pending saves land (or are reported), then the manager closes
    # The step donates its state: copy, so that the caller's ``trainable`` stays valid.
    state = init_state(jax.tree.map(jnp.copy, trainable), optimizer)
    checkpointer = None
    if checkpoint_dir is not None:
      from mteo_jax import checkpoints  # noqa: PLC0415 (orbax is slow to import)
      stack.enter_context(checkpoints.sigterm_as_exit())
      checkpointer = stack.enter_context(
          checkpoints.Checkpointer(checkpoint_dir, max_to_keep=2, save_interval_steps=max(checkpoint_every, 1)))
      if checkpointer.latest_step() is not None:
        stored = checkpointer.metadata()
        if metadata is not None and stored.get("run") != metadata:
          raise ValueError(f"{checkpoint_dir} holds a checkpoint of another run; expected metadata {metadata}, found "
                           f"{stored.get('run')}. Use a fresh workdir or delete that directory.")
        state = checkpointer.restore(state)
    state = parallel.replicate(state, mesh)
    params = parallel.replicate(params, mesh)
    start = int(state.step)
    bar = stack.enter_context(tqdm.tqdm(range(start, steps), desc=desc, disable=not progress, initial=start,
                                        total=steps, dynamic_ncols=True, mininterval=2.0))
    for step in bar:
      batch = parallel.shard_batch(trajectory_batch(train_data, batch_size, seed, step), mesh)
      state, metrics = step_fn(state, params, batch)
      done = step + 1
      if checkpointer is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
        checkpointer.save(done, jax.device_get(state), {"run": metadata}, force=True)
      if eval_fn is not None and eval_every and (done % eval_every == 0 or done == steps):
        history["eval_step"].append(done)
        history["eval"].append(float(eval_fn(state.trainable)))
      if done % max(1, min(50, steps // 20)) == 0 or done == steps:
        history["step"].append(done)
        history["loss"].append(float(metrics["loss"]))
        postfix = {"loss": f"{history['loss'][-1]:.3e}"}
        if history["eval"]:
          postfix["held_out_rmse"] = f"{history['eval'][-1]:.4f}"
        bar.set_postfix(postfix)
  return jax.device_get(state.trainable), history
