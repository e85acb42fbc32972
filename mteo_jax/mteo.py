"""MTEO: multi-layer time-embedding optimisation (DESIGN §3, §5).

The backbone stays frozen. What is learned is a *table* with the structure of the backbone's ``TimeEmb``: for network
evaluation ``i`` of a few-step solver and conditioned layer ``l``, ``table[l][i]`` replaces the time part of the
embedding the backbone would compute from ``c_noise(sigma_i)``. The table is initialised from exactly those
embeddings, so an untrained table reproduces the base solver, and is trained by unrolling the solver from the same
``x_T`` as the teacher and matching the teacher's states at the student's sigmas and at the end:

    L(table) = d(x_N, x_N^ref) + w * mean_{0 < k < N} d(x_k, x_k^ref),

with ``d`` one of L2 / L1 / pseudo-Huber (mean over features). Class labels keep their own embedding, added by the
denoiser as the backbone does. ``granularity="shared"`` learns one vector per evaluation for all layers (the ablation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mteo_jax import files
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import Backbone, make_denoiser
from mteo_jax.registry import Registry

Table = dict[str, jax.Array]
SHARED_KEY = "shared"
GRANULARITIES = ("layer", "shared")

# --- per-sample distances -----------------------------------------------------------------------------------------

DISTANCES: Registry[Callable[..., jax.Array]] = Registry("MTEO loss")


def _per_sample_mean(values: jax.Array) -> jax.Array:
  return jnp.mean(values.reshape(values.shape[0], -1), axis=-1)


@DISTANCES.register("l2")
def l2_distance(x: jax.Array, y: jax.Array, huber_c: float = 0.0) -> jax.Array:
  """Mean squared error per sample."""
  del huber_c
  return _per_sample_mean((x - y) ** 2)


@DISTANCES.register("l1")
def l1_distance(x: jax.Array, y: jax.Array, huber_c: float = 0.0) -> jax.Array:
  """Mean absolute error per sample."""
  del huber_c
  return _per_sample_mean(jnp.abs(x - y))


@DISTANCES.register("pseudo_huber")
def pseudo_huber_distance(x: jax.Array, y: jax.Array, huber_c: float = 0.03) -> jax.Array:
  """``sqrt(mse + c^2) - c`` per sample (Song & Dhariwal 2023): quadratic below ``c``, linear above."""
  return jnp.sqrt(_per_sample_mean((x - y) ** 2) + huber_c ** 2) - huber_c


# --- the table ----------------------------------------------------------------------------------------------------

def init_table(backbone: Backbone, params: Any, precond: Preconditioning, eval_sigmas: jax.Array,
               granularity: str = "layer") -> Table:
  """The pretrained time embeddings at each evaluation's sigma: ``{layer: [NFE, D]}`` or ``{"shared": [NFE, D]}``."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {list(GRANULARITIES)}")
  eval_sigmas = jnp.asarray(eval_sigmas)
  if eval_sigmas.ndim != 1 or eval_sigmas.shape[0] < 1:
    raise ValueError(f"eval_sigmas must be a non-empty 1-D array (one sigma per network evaluation), got shape "
                     f"{eval_sigmas.shape}")
  temb = backbone.time_embedding(params, precond.c_noise(eval_sigmas))
  if granularity == "shared":
    # The default path broadcasts one embedding to all layers, so any leaf is the shared one.
    return {SHARED_KEY: temb[backbone.layer_names[0]]}
  # Distinct buffers per layer: the default path shares one array between all leaves, and a donated train state
  # may not hold the same buffer twice.
  return {name: jnp.array(leaf, copy=True) for name, leaf in temb.items()}


def table_granularity(table: Table) -> str:
  return "shared" if set(table) == {SHARED_KEY} else "layer"


def expand_table(table: Table, layer_names: tuple[str, ...]) -> Table:
  """The per-layer table a solver consumes: a ``shared`` table is broadcast to every layer."""
  if table_granularity(table) == "shared":
    return {name: table[SHARED_KEY] for name in layer_names}
  if set(table) != set(layer_names):
    raise ValueError(f"table layers {sorted(table)} do not match the backbone's conditioned layers "
                     f"{sorted(layer_names)}")
  return table


def table_nfe(table: Table) -> int:
  lengths = {leaf.shape[0] for leaf in table.values()}
  if len(lengths) != 1:
    raise ValueError(f"table leaves disagree on the number of network evaluations: {sorted(lengths)}")
  return lengths.pop()


# --- loss and training step ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """``distance``: l2 | l1 | pseudo_huber; ``intermediate_weight``: w above (0 matches the final state only)."""
  distance: str = "l2"
  intermediate_weight: float = 0.1
  huber_c: float = 0.03

  def __post_init__(self):
    DISTANCES.get(self.distance)  # raises with the valid names
    if self.intermediate_weight < 0:
      raise ValueError(f"intermediate_weight must be >= 0, got {self.intermediate_weight}")


def trajectory_loss(states: jax.Array, ref_states: jax.Array, config: LossConfig) -> jax.Array:
  """Loss between a student trajectory and the teacher's, both ``[N+1, B, ...]`` (x_T first, the sample last)."""
  if states.shape != ref_states.shape:
    raise ValueError(f"student states {states.shape} and reference states {ref_states.shape} must have the same "
                     "shape [N+1, batch, ...]: the references must be saved at the student's sigmas")
  distance = DISTANCES.get(config.distance)
  final = jnp.mean(distance(states[-1], ref_states[-1], config.huber_c))
  num_steps = states.shape[0] - 1
  if num_steps < 2 or config.intermediate_weight == 0:
    return final
  intermediate = jnp.mean(jax.vmap(lambda s, r: distance(s, r, config.huber_c))(states[1:-1], ref_states[1:-1]))
  return final + config.intermediate_weight * intermediate


def student_sample(solver: Any, backbone: Backbone, params: Any, precond: Preconditioning, table: Table | None,
                   x_T: jax.Array, sigmas: jax.Array, label: jax.Array | None = None,
                   return_trajectory: bool = False):
  """The few-step solver on the frozen teacher, with the table (or, ``table=None``, the plain pretrained path)."""
  denoiser = make_denoiser(backbone, params, precond, label)
  temb_table = None if table is None else expand_table(table, backbone.layer_names)
  return solver.sample(denoiser, x_T, sigmas, temb_table=temb_table, return_trajectory=return_trajectory)


def make_loss_fn(solver: Any, backbone: Backbone, precond: Preconditioning, sigmas: jax.Array,
                 config: LossConfig) -> Callable[..., jax.Array]:
  """``loss(table, params, batch)`` with batch ``{"x_T": [B, ...], "ref": [B, N+1, ...], "label"?: [B]}``."""

  def loss_fn(table: Table, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    _, states = student_sample(solver, backbone, params, precond, table, batch["x_T"], sigmas, batch.get("label"),
                               return_trajectory=True)
    return trajectory_loss(states, jnp.swapaxes(batch["ref"], 0, 1), config)

  return loss_fn


# --- MTEO on a model in memory -------------------------------------------------------------------------------------

def train_settings(**overrides: Any):
  """MTEO's training defaults as a ``loop.LoopConfig`` (300 Adam steps at lr 1e-2, 20 warm-up steps, cosine to 10 %,
  clipping at 1, batch 32), with ``overrides``."""
  from mteo_jax import loop  # noqa: PLC0415
  defaults = dict(steps=300, batch_size=32, lr=1e-2, warmup_steps=20, lr_decay="cosine", lr_end_factor=0.1,
                  grad_clip=1.0, log_every=10, checkpoint_every=100)
  return loop.LoopConfig(**{**defaults, **overrides})


def table_task(solver: Any, backbone: Backbone, params: Any, precond: Preconditioning, sigmas: Any, table: Table,
               train_data: dict[str, np.ndarray], loss: LossConfig, *, batch_size: int, seed: int):
  """The training loop's task for a table: ``make_loss_fn`` over the rows of ``train_data`` (``{"x_T": [M, ...],
  "ref": [M, N + 1, ...], "label"?: [M]}``), the backbone's ``params`` frozen."""
  from mteo_jax import loop  # noqa: PLC0415
  return loop.ArrayTask(table, make_loss_fn(solver, backbone, precond, jnp.asarray(sigmas), loss), train_data,
                        batch_size=batch_size, seed=seed, frozen=params)


def fit_table(backbone: Backbone, params: Any, precond: Preconditioning, solver: Any, sigmas: Any, *,
              run_dir: str | os.PathLike, num_train: int = 1024, noise_seed: int = 0,
              labels: jax.Array | None = None, granularity: str = "layer", loss: LossConfig = LossConfig(),
              train: Any = None, reference_solver: str = "tsit5", rtol: float = 1e-5, atol: float = 1e-5,
              reference_batch_size: int = 512, eval_fn: Callable[[Table], float] | None = None,
              eval_every: int = 0) -> tuple[Table, Any]:
  """MTEO on any backbone and parameters in memory: references, table, training, in one call.

  Draws ``num_train`` noises ``x_T = sigmas[0] * N(0, I)`` from ``noise_seed``, solves the teacher's probability-flow
  ODE from them with diffrax at ``sigmas`` (``reference.reference_trajectories``), initialises the table at the
  solver's evaluation sigmas (so it starts as the base solver) and trains it with the library's training loop
  (``loop.fit``: checkpoints and exact resume in ``run_dir``, NaN stop, ``metrics.jsonl``); the backbone's
  parameters are never updated. Score the result on noise from another seed (e.g. ``noise_seed + 1``).

  Args:
    backbone: any ``Backbone`` (a built-in one, ``DiT``, or a ``LinenBackbone`` around your own Linen model).
    params: its parameters; precond: its preconditioning.
    solver: a solver object (``get_solver(...)``); sigmas: [N + 1] its grid (``solver.num_steps_for_nfe(nfe)`` steps).
    run_dir: checkpoints and metrics (an interrupted call resumes there; a directory of another run is refused).
    labels: [num_train] integer labels for a class-conditional backbone, else None.
    train: the loop's settings, a ``loop.LoopConfig`` (default ``train_settings()``).
    eval_fn: ``eval_fn(table) -> float`` every ``eval_every`` steps (e.g. a held-out RMSE), in ``metrics.jsonl``.
  Returns:
    ``(table, result)``: ``{layer: [nfe, D]}`` (or ``{"shared": ...}``) and the ``loop.Result`` (history, train time).
  Raises:
    ValueError / KeyError: bad settings (before the reference solve); the reference solve's errors
    (``reference.NonFiniteDenoiserError`` for a NaN teacher, ...); ``loop.NonFiniteError``.
  """
  from mteo_jax import loop, parallel, reference  # noqa: PLC0415 (the loop imports the data layer; keep mteo light)
  from mteo_jax.teachers import teacher_identity  # noqa: PLC0415
  train = train_settings() if train is None else train
  # The cheap parts first: they check the grid, granularity and settings before the reference solve.
  sigmas = jnp.asarray(sigmas)
  table = init_table(backbone, params, precond, solver.eval_sigmas(sigmas), granularity)
  if train.batch_size > num_train:
    raise ValueError(f"train.batch_size={train.batch_size} exceeds num_train={num_train}")
  loop.check_batch_size(train.batch_size, parallel.make_mesh(), where="fit_table")
  x_T = reference.reference_noise(noise_seed, num_train, backbone.data_shape, float(sigmas[0]))
  ref = reference.reference_trajectories(make_denoiser(backbone, params, precond), x_T, sigmas,
                                         solver=reference_solver, rtol=rtol, atol=atol,
                                         batch_size=min(reference_batch_size, num_train), labels=labels,
                                         progress=train.progress)
  train_data = {"x_T": np.asarray(x_T), "ref": np.swapaxes(ref.states, 0, 1)}
  if labels is not None:
    train_data["label"] = np.asarray(labels)
  task = table_task(solver, backbone, params, precond, sigmas, table, train_data, loss, batch_size=train.batch_size,
                    seed=noise_seed)
  identity = {"teacher": teacher_identity(backbone, params, precond), "solver": solver.name,
              "sigmas": [float(s) for s in sigmas], "num_train": num_train, "noise_seed": noise_seed,
              "granularity": granularity, "loss": dataclasses.asdict(loss),
              "reference": {"solver": reference_solver, "rtol": rtol, "atol": atol},
              "labels": None if labels is None else np.asarray(labels).tolist()}
  result = loop.fit(task, train, run_dir, seed=noise_seed, identity=identity,
                    eval_fn=None if eval_fn is None else (lambda step, state: {"eval": eval_fn(state.params)}),
                    eval_every=eval_every, desc=f"MTEO {solver.name} NFE {solver.nfe(sigmas.shape[0] - 1)}")
  return jax.device_get(result.state.params), result


# --- the artefact -------------------------------------------------------------------------------------------------

TABLE_FORMAT = "mteo_jax.mteo_table/1"


def table_metadata(teacher_hash: str, solver_name: str, solver_options: dict, schedule: str, sigmas: Any,
                   table: Table, layer_names: tuple[str, ...], loss: LossConfig | None = None,
                   extra: dict | None = None) -> dict:
  """What a table belongs to: it is only valid for this teacher, solver (with options), schedule and NFE."""
  return {
      "format": TABLE_FORMAT,
      "teacher": teacher_hash,
      "solver": solver_name,
      "solver_options": dict(solver_options),
      "schedule": schedule,
      "sigmas": [float(s) for s in jnp.asarray(sigmas)],
      "nfe": table_nfe(table),
      "granularity": table_granularity(table),
      "layer_names": list(layer_names),
      "loss": None if loss is None else dataclasses.asdict(loss),
      **(extra or {}),
  }


def save_table(path: str | os.PathLike, table: Table, metadata: dict, *, overwrite: bool = False) -> None:
  """The table as an orbax checkpoint (``path/table``) with its metadata beside it (``path/metadata.json``).

  Written to a staging directory and renamed into place, so an interrupted save leaves nothing half-written; an
  existing artefact is never replaced unless ``overwrite``, and then only if it is an MTEO table.

  Raises:
    ValueError: ``metadata`` not made by ``table_metadata``. FileExistsError: ``path`` exists and not ``overwrite``.
    files.UnreadableFileError: ``path`` exists and its ``metadata.json`` is missing, unreadable or not a table's (it
      is left as it is; the message says to delete it).
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415 (slow to import; only the artefact needs it)
  if metadata.get("format") != TABLE_FORMAT:
    raise ValueError(f"metadata must come from table_metadata() (format {TABLE_FORMAT!r})")
  path = pathlib.Path(path).absolute()
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    # Refuses to delete anything that is not a readable table artefact: the user deletes it, not this function.
    _read_table_metadata(path, f"it is not replaced unread: delete {path} (the run's checkpoints remake it)")
  staging = path.with_name(f".{path.name}.staging-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(staging / "table", jax.device_get(table))
  checkpointer.wait_until_finished()
  (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
  if path.exists():
    shutil.rmtree(path)
  staging.rename(path)


def _read_table_metadata(path: pathlib.Path, advice: str) -> dict:
  """The metadata of the table at ``path``; ``files.UnreadableFileError`` (a ``ValueError``) naming the file and
  ``advice`` where it is missing, unreadable or not a table's."""
  try:
    metadata = files.read_json(path / "metadata.json", advice)
  except FileNotFoundError:
    raise files.UnreadableFileError(f"{path} is not an MTEO table: it has no metadata.json; {advice}") from None
  if metadata.get("format") != TABLE_FORMAT:
    raise files.UnreadableFileError(f"{path} is not an MTEO table (format {metadata.get('format')!r} in its "
                                    f"metadata.json, expected {TABLE_FORMAT!r}); {advice}")
  return metadata


def load_table(path: str | os.PathLike, teacher: Any, *, solver_name: str, nfe: int,
               solver_options: dict | None = None, sigmas: Any = None) -> tuple[Table, dict]:
  """Loads a table saved by ``save_table``, checking that it belongs to ``teacher`` (a ``teachers.Teacher``; its
  ``identity`` must be the one the table was trained for), this solver and NFE (and sigmas, when given).

  Returns:
    ``(table, metadata)``; sample with ``student_sample(solver, teacher.backbone, teacher.params, teacher.precond,
    table, x_T, metadata["sigmas"])``.
  Raises:
    FileNotFoundError: nothing at ``path``. ValueError: a table of another teacher, solver, NFE or grid (the message
    lists what differs, ``key: table -> expected``). files.UnreadableFileError (a ValueError): not a table, or a
    truncated or corrupted one (the message names the file and says to delete it). TypeError: ``teacher`` is not a
    teacher object.
  """
  import orbax.checkpoint as ocp  # noqa: PLC0415
  identity = getattr(teacher, "identity", None)
  if not isinstance(identity, str):
    raise TypeError(f"teacher must be a teachers.Teacher (Teacher.load(...) or Teacher.from_model(...)), got "
                    f"{type(teacher).__name__}")
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no MTEO table at {path}")
  advice = f"delete {path} and rerun the job that wrote it"
  metadata = _read_table_metadata(path, advice)
  expected = {"teacher": identity, "solver": solver_name, "nfe": nfe}
  if solver_options is not None:
    expected["solver_options"] = dict(solver_options)
  stored_part = {key: metadata.get(key, "<missing>") for key in expected}
  if sigmas is not None:
    wanted = [float(s) for s in jnp.asarray(sigmas)]
    saved = metadata.get("sigmas")
    expected["sigmas"] = wanted
    stored_part["sigmas"] = (wanted if isinstance(saved, list) and len(saved) == len(wanted)
                             and np.allclose(saved, wanted, rtol=1e-6) else saved)
  if stored_part != expected:
    from mteo_jax.loop import describe_differences  # noqa: PLC0415
    raise ValueError(f"the MTEO table at {path} does not belong to this run (table -> expected): "
                     f"{describe_differences(stored_part, expected)}")
  try:
    stored = ocp.StandardCheckpointer().restore(path / "table")
    table = {name: jnp.asarray(leaf) for name, leaf in stored.items()}
  except Exception as error:  # noqa: BLE001 (tensorstore's ValueError, JSONDecodeError, OSError, ...)
    from mteo_jax.checkpoints import quiet_abandoned_reads  # noqa: PLC0415
    quiet_abandoned_reads()
    raise files.UnreadableFileError(f"the MTEO table {path / 'table'} cannot be read ({files.reason(error)}); "
                                    f"{advice}") from None
  if table_nfe(table) != nfe:
    raise ValueError(f"the MTEO table at {path} has {table_nfe(table)} rows, expected {nfe}")
  return table, metadata
