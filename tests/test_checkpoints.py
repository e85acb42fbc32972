"""Training checkpoints over orbax, and stand-alone pytree artefacts."""

import asyncio
import json
import os
import re
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from mteo_jax import checkpoints
from mteo_jax.checkpoints import Checkpointer, load_metadata, load_pytree, save_pytree


@struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array


@jax.jit
def optimizer_state(params):
  """Adam state after one update, so that the moments are not all zero (jitted: eager optax compiles op by op)."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  _, opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  return opt_state


def make_state(step: int = 0, seed: int = 0, width: int = 3) -> TrainState:
  rs = np.random.RandomState(seed)
  params = {"Dense_0": {"kernel": jnp.asarray(rs.randn(2, width), jnp.float32),
                        "bias": jnp.asarray(rs.randn(width), jnp.bfloat16)},
            "blocks": [jnp.asarray(rs.randn(width), jnp.float32), jnp.arange(4, dtype=jnp.float32) + seed]}
  return TrainState(jnp.int32(step), params, jax.tree.map(lambda p: p * 2, params), optimizer_state(params),
                    jax.random.fold_in(jax.random.key(seed), step))


def assert_trees_equal(a, b):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    if jax.dtypes.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):
      assert y.dtype == x.dtype
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------------------------------
# Checkpointer


def test_round_trip_keeps_values_dtypes_and_typed_keys(tmp_path):
  state = make_state(step=7, seed=1)
  with Checkpointer(tmp_path / "run", save_interval_steps=1) as ckpt:
    assert ckpt.save(7, state, {"loss": 0.25})
    restored = ckpt.restore(make_state())  # any state of the same structure is a valid target
  assert isinstance(restored, TrainState)
  assert_trees_equal(restored, state)
  assert restored.params["Dense_0"]["bias"].dtype == jnp.bfloat16
  # The restored key is a usable typed key that continues the same random stream.
  np.testing.assert_array_equal(jax.random.normal(restored.rng, (3,)), jax.random.normal(state.rng, (3,)))


def test_other_prng_implementations_survive(tmp_path):
  tree = {"key": jax.random.key(3, impl="rbg"), "w": jnp.ones(2)}
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(0, tree)
    restored = ckpt.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree))
  assert str(restored["key"].dtype) == "key<rbg>"
  assert_trees_equal(restored, tree)


def test_keeps_only_the_newest_k(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=1) as ckpt:
    for step in range(5):
      assert ckpt.save(step, make_state(step))
    assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=10, save_interval_steps=10) as ckpt:
    saved = [step for step in range(0, 26) if ckpt.save(step, {"w": jnp.full(2, step)})]
    assert saved == [0, 10, 20]
    assert ckpt.save(25, {"w": jnp.full(2, 25)}) is False
    assert ckpt.save(26, {"w": jnp.full(2, 26)}, force=True) is True
    assert ckpt.all_steps() == [0, 10, 20, 26]


def test_resume_from_latest_in_a_new_checkpointer(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
    for step in range(12):
      ckpt.save(step, make_state(step), {"step": step})
  with Checkpointer(tmp_path, save_interval_steps=5) as resumed:
    assert resumed.latest_step() == 10 and resumed.all_steps() == [0, 5, 10]
    assert_trees_equal(resumed.restore(make_state()), make_state(10))
    assert_trees_equal(resumed.restore(make_state(), step=5), make_state(5))
    assert resumed.metadata() == {"step": 10} and resumed.metadata(5) == {"step": 5}


def test_reads_wait_for_asynchronous_saves(tmp_path):
  big = {"w": jnp.arange(2_000_000, dtype=jnp.float32)}
  ckpt = Checkpointer(tmp_path, save_interval_steps=1)
  ckpt.save(0, big)
  # No explicit wait: every read must see the finished checkpoint.
  assert ckpt.all_steps() == [0]
  np.testing.assert_array_equal(ckpt.restore(big)["w"], big["w"])
  ckpt.close()


def test_metadata_round_trip_and_validation(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    metadata = {"config": {"lr": 1e-3, "layers": [1, 2]}, "loss": np.float32(0.5), "nfe": np.int64(3),
                "sigmas": jnp.array([80.0, 1.0]), "note": "teacher"}
    ckpt.save(1, {"w": jnp.ones(1)}, metadata)
    ckpt.save(2, {"w": jnp.ones(1)})
    assert ckpt.metadata(1) == {"config": {"lr": 1e-3, "layers": [1, 2]}, "loss": 0.5, "nfe": 3,
                                "sigmas": [80.0, 1.0], "note": "teacher"}
    assert ckpt.metadata() == {}
    with pytest.raises(TypeError, match="metadata must be a dict"):
      ckpt.save(3, {"w": jnp.ones(1)}, ["not", "a", "dict"])
    with pytest.raises(TypeError, match="not JSON-serialisable"):
      ckpt.save(3, {"w": jnp.ones(1)}, {"fn": print})


def test_restore_into_another_structure_names_the_leaf(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(0, make_state())
    wrong_shape = make_state(width=4)
    with pytest.raises(ValueError, match=r"at leaf 'params/Dense_0/bias': expected shape \(4,\) dtype bfloat16, "
                                         r"found shape \(3,\) dtype bfloat16"):
      ckpt.restore(wrong_shape)
    state = make_state()
    wrong_dtype = state.replace(step=jnp.float32(0))
    with pytest.raises(ValueError, match=r"at leaf 'step': expected shape \(\) dtype float32, found shape \(\) dtype "
                                         r"int32"):
      ckpt.restore(wrong_dtype)
    extra = state.replace(params={**state.params, "extra": jnp.ones(2)})
    with pytest.raises(ValueError, match="target leaf 'params/extra'.*is not stored"):
      ckpt.restore(extra)
    fewer = state.replace(ema_params={})
    with pytest.raises(ValueError, match="stored leaf 'ema_params/Dense_0/bias'.*missing from the target"):
      ckpt.restore(fewer)


def test_missing_checkpoints_are_clear_errors(tmp_path):
  empty = tmp_path / "empty_run"
  with Checkpointer(empty) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(FileNotFoundError, match=f"no checkpoint to restore in directory {empty}"):
      ckpt.restore({"w": jnp.ones(1)})
    with pytest.raises(FileNotFoundError, match=f"no checkpoint to restore in directory {empty}"):
      ckpt.metadata()
    ckpt.save(0, {"w": jnp.ones(1)})
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 3 .*saved steps: \[0\]"):
      ckpt.restore({"w": jnp.ones(1)}, step=3)


def test_save_never_replaces_or_goes_back(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(5, {"w": jnp.ones(1)})
    assert ckpt.save(5, {"w": jnp.zeros(1)}) is False
    with pytest.raises(ValueError, match="step 5 is already saved"):
      ckpt.save(5, {"w": jnp.zeros(1)}, force=True)
    with pytest.raises(ValueError, match="already holds the newer step 5"):
      ckpt.save(4, {"w": jnp.zeros(1)}, force=True)
    np.testing.assert_array_equal(ckpt.restore({"w": jnp.zeros(1)})["w"], [1.0])
    with pytest.raises(ValueError, match="non-negative integer"):
      ckpt.save(-1, {"w": jnp.zeros(1)})


@pytest.mark.parametrize("options", [{"max_to_keep": 0}, {"save_interval_steps": 0}, {"max_to_keep": 1.5}])
def test_bad_options(tmp_path, options):
  with pytest.raises(ValueError, match="must be a positive integer"):
    Checkpointer(tmp_path, **options)


# ----------------------------------------------------------------------------------------------------------------------
# save_pytree / load_pytree


def test_pytree_round_trip_with_and_without_target(tmp_path):
  state = make_state(step=3, seed=2)
  save_pytree(tmp_path / "teacher", state, {"dataset": "digits", "nfe": np.int32(3)})
  assert sorted(os.listdir(tmp_path / "teacher")) == ["arrays.npz", "metadata.json", "tree.json"]
  assert load_metadata(tmp_path / "teacher") == {"dataset": "digits", "nfe": 3}

  restored = load_pytree(tmp_path / "teacher", target=make_state())
  assert isinstance(restored, TrainState) and isinstance(restored.params["Dense_0"]["kernel"], jax.Array)
  assert_trees_equal(restored, state)

  as_stored = load_pytree(tmp_path / "teacher")  # no target: nested dicts and lists of numpy arrays
  assert set(as_stored) == {"step", "params", "ema_params", "opt_state", "rng"}
  kernel = as_stored["params"]["Dense_0"]["kernel"]
  assert isinstance(kernel, np.ndarray) and kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, state.params["Dense_0"]["kernel"])
  assert as_stored["params"]["Dense_0"]["bias"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(as_stored["opt_state"][1][0]["mu"]["blocks"][0], state.opt_state[1][0].mu["blocks"][0])
  assert as_stored["rng"].dtype == state.rng.dtype


def test_pytree_leaf_types_follow_the_target(tmp_path):
  tree = {"table": np.arange(6, dtype=np.float32).reshape(2, 3), "sigma_max": 80.0, "nfe": 3, "flag": True,
          "tuple": (jnp.ones(2, jnp.float16), np.int8(-4)), "key": jax.random.key(5)}
  save_pytree(tmp_path / "a", tree)
  restored = load_pytree(tmp_path / "a", target=tree)
  assert isinstance(restored["table"], np.ndarray) and isinstance(restored["tuple"][0], jax.Array)
  assert type(restored["sigma_max"]) is float and type(restored["nfe"]) is int and restored["flag"] is True
  assert isinstance(restored["tuple"], tuple) and isinstance(restored["tuple"][1], np.int8)
  assert_trees_equal(restored, tree)
  shapes = jax.tree.map(lambda x: x if isinstance(x, (bool, int, float)) else jax.ShapeDtypeStruct(x.shape, x.dtype),
                        tree)
  from_shapes = load_pytree(tmp_path / "a", target=shapes)
  np.testing.assert_array_equal(from_shapes["table"], tree["table"])
  assert isinstance(from_shapes["table"], jax.Array)
  # A single array is a pytree too.
  save_pytree(tmp_path / "single", jnp.arange(3))
  np.testing.assert_array_equal(load_pytree(tmp_path / "single"), [0, 1, 2])


def test_pytree_artefact_is_readable_with_numpy_alone(tmp_path):
  save_pytree(tmp_path / "table", {"emb": {"Dense_0": np.ones((3, 4), np.float32)}}, {"solver": "euler"})
  manifest = json.loads((tmp_path / "table" / "tree.json").read_text())
  (leaf,) = manifest["leaves"]
  assert leaf["name"] == "emb/Dense_0" and leaf["shape"] == [3, 4] and leaf["dtype"] == "float32"
  with np.load(tmp_path / "table" / "arrays.npz", allow_pickle=False) as arrays:
    np.testing.assert_array_equal(arrays[leaf["array"]], np.ones((3, 4)))
  assert json.loads((tmp_path / "table" / "metadata.json").read_text()) == {"solver": "euler"}


def test_pytree_overwrite_protection(tmp_path):
  path = tmp_path / "table"
  save_pytree(path, {"w": np.zeros(2)}, {"version": 1})
  with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
    save_pytree(path, {"w": np.ones(2)})
  np.testing.assert_array_equal(load_pytree(path)["w"], np.zeros(2))
  save_pytree(path, {"v": np.ones(3)}, {"version": 2}, overwrite=True)
  assert set(load_pytree(path)) == {"v"} and load_metadata(path) == {"version": 2}
  assert sorted(os.listdir(tmp_path)) == ["table"]  # no staging or retired copies left behind
  other = tmp_path / "results"
  other.mkdir()
  (other / "important.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="is not a save_pytree artefact; refusing"):
    save_pytree(other, {"w": np.zeros(2)}, overwrite=True)
  assert (other / "important.txt").read_text() == "keep me"


def test_pytree_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"no saved pytree at {tmp_path / 'missing'}"):
    load_pytree(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no saved pytree"):
    load_metadata(tmp_path / "missing")
  (tmp_path / "not_artefact").mkdir()
  with pytest.raises(ValueError, match="not a save_pytree artefact"):
    load_pytree(tmp_path / "not_artefact")
  save_pytree(tmp_path / "a", {"emb": [np.zeros((2, 3), np.float32)], "key": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"at leaf 'emb/0': expected shape \(2, 4\) dtype float32, found shape \(2, 3\)"):
    load_pytree(tmp_path / "a", target={"emb": [np.zeros((2, 4), np.float32)], "key": jax.random.key(0)})
  with pytest.raises(ValueError, match=r"at leaf 'emb/0': expected shape \(2, 3\) dtype float64"):
    load_pytree(tmp_path / "a", target={"emb": [np.zeros((2, 3), np.float64)], "key": jax.random.key(0)})
  with pytest.raises(ValueError, match="target leaf 'emb/1'"):
    load_pytree(tmp_path / "a", target={"emb": [np.zeros((2, 3), np.float32)] * 2, "key": jax.random.key(0)})
  with pytest.raises(ValueError, match="at leaf 'key': expected raw uint32 data, found a key<fry> key"):
    load_pytree(tmp_path / "a", target={"emb": [np.zeros((2, 3), np.float32)], "key": np.zeros(2, np.uint32)})
  with pytest.raises(TypeError, match="cannot store leaf 'name'"):
    save_pytree(tmp_path / "b", {"name": "euler"})
  with pytest.raises(TypeError, match="only str or int dict keys"):
    save_pytree(tmp_path / "c", {(1, 2): np.zeros(1)})
  assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_checkpoint_leaf_names_match_between_formats(tmp_path):
  """Both formats name leaves the same way, so their errors point at the same path."""
  state = make_state()
  save_pytree(tmp_path / "a", state)
  with Checkpointer(tmp_path / "run", save_interval_steps=1) as ckpt:
    ckpt.save(0, state)
    stored = ckpt.stored_leaves()
  names = [leaf["name"] for leaf in json.loads((tmp_path / "a" / "tree.json").read_text())["leaves"]]
  assert sorted(names) == sorted(stored)
  assert "opt_state/1/0/mu/Dense_0/kernel" in stored and stored["rng"] == ((2,), "uint32")
  assert checkpoints.PYTREE_FORMAT == "mteo_jax.pytree"


# ----------------------------------------------------------------------------------------------------------------------
# Interrupted and lost saves

SLOW = 0.6  # seconds that each save stays unfinished in the background with `slow_finalize`


@pytest.fixture
def slow_finalize(monkeypatch):
  """Orbax finalises a save (renames ``<step>.orbax-checkpoint-tmp`` to ``<step>``) SLOW seconds late, in its background
  thread: after ``save`` returns, the step is pending for that long. Returns the names of the finalised steps."""
  from orbax.checkpoint._src.path import atomicity
  original, finalized = atomicity.AtomicRenameTemporaryPath.finalize, []

  async def finalize(self):
    step = self.get_final().name.isdigit()  # not the items inside the step's directory
    if step:
      await asyncio.sleep(SLOW)
    await original(self)
    if step:
      finalized.append(self.get_final().name)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  return finalized


def leftovers(directory):
  return sorted(p.name for p in directory.iterdir() if ".orbax-checkpoint-tmp" in p.name)


def test_leaving_the_block_on_an_interrupt_waits_for_the_pending_save(tmp_path, slow_finalize):
  with pytest.raises(KeyboardInterrupt):
    with Checkpointer(tmp_path, save_interval_steps=2) as ckpt:
      ckpt.save(2, make_state(2), {"step": 2})
      assert not (tmp_path / "2").exists()  # still being written in the background
      raise KeyboardInterrupt
  assert slow_finalize == ["2"] and leftovers(tmp_path) == []
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoints.LostCheckpointWarning)
    with Checkpointer(tmp_path) as reopened:
      assert reopened.all_steps() == [2] and reopened.metadata() == {"step": 2}
      assert_trees_equal(reopened.restore(make_state()), make_state(2))


def test_a_save_that_fails_in_the_background_is_reported(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity

  async def fail(self):
    raise OSError("disk full")

  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, {"w": jnp.ones(2)})
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail)
  # An interrupt propagating stays the exception raised; the failed save is reported and noted on it.
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=rf"checkpoint step 2 in {re.escape(str(tmp_path))} was not saved: its write failed "
                          r"\(OSError: disk full\); it is lost and the latest complete checkpoint is step 1"):
    with pytest.raises(KeyboardInterrupt) as interrupt:
      with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(2, {"w": jnp.zeros(2)})
        raise KeyboardInterrupt
  assert "pending checkpoint save" in "".join(getattr(interrupt.value, "__notes__", []))
  assert leftovers(tmp_path) == []
  # Without another exception, closing raises the failure.
  with pytest.warns(checkpoints.LostCheckpointWarning, match="checkpoint step 3 .* was not saved"):
    with pytest.raises(OSError, match="disk full"):
      with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(3, {"w": jnp.zeros(2)})
  monkeypatch.undo()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]


def test_a_save_interrupted_while_starting_is_reported(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  async def interrupted(self, *args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", interrupted)
  with pytest.warns(checkpoints.LostCheckpointWarning, match=r"checkpoint step 5 .* was not saved: its save was "
                                                             r"interrupted while starting \(KeyboardInterrupt"):
    with pytest.raises(KeyboardInterrupt):
      with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        ckpt.save(5, {"w": jnp.ones(2)})
  assert not (tmp_path / "5").exists()
  # Orbax may create the step's temporary directory in a background thread after the interrupted start was
  # reported and cleared; if one appears, the next checkpointer on the directory reports it and removes it.
  monkeypatch.undo()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", checkpoints.LostCheckpointWarning)
    with Checkpointer(tmp_path) as ckpt:
      assert ckpt.all_steps() == []
  assert leftovers(tmp_path) == []


def test_an_interrupted_wait_reports_the_step_still_being_written(tmp_path, slow_finalize):
  ckpt = Checkpointer(tmp_path, save_interval_steps=1)
  ckpt.save(3, {"w": jnp.ones(2)})
  wait = ckpt._manager.wait_until_finished

  def interrupted_wait():  # a second Ctrl-C while waiting for the save
    ckpt._manager.wait_until_finished = wait
    raise KeyboardInterrupt

  ckpt._manager.wait_until_finished = interrupted_wait
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=f"checkpoint step 3 in {re.escape(str(tmp_path))} was still being written when the wait for "
                          "it was interrupted"):
    with pytest.raises(KeyboardInterrupt):
      ckpt.close()
  ckpt.close()  # still open: closing again waits, and the save lands
  assert slow_finalize == ["3"] and leftovers(tmp_path) == []
  assert Checkpointer(tmp_path).all_steps() == [3]


def test_opening_reports_and_removes_saves_killed_mid_write(tmp_path):
  with Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(2, make_state(2))
  # What a process killed mid-save leaves: the step's temporary directory (orbax 0.12's name, and the older
  # timestamped one), here with a copy of a real checkpoint's files.
  for name in ("4.orbax-checkpoint-tmp", "6.orbax-checkpoint-tmp-1712345678"):
    shutil.copytree(tmp_path / "2", tmp_path / name)
  with pytest.warns(checkpoints.LostCheckpointWarning) as record:
    ckpt = Checkpointer(tmp_path, save_interval_steps=1)
  messages = [str(w.message) for w in record if w.category is checkpoints.LostCheckpointWarning]
  assert messages == [
      f"checkpoint step {step} in {tmp_path} was interrupted while being written and is lost; the latest complete "
      f"checkpoint is step 2, where a resumed run restarts (removing the unfinished {name})"
      for step, name in ((4, "4.orbax-checkpoint-tmp"), (6, "6.orbax-checkpoint-tmp-1712345678"))]
  assert leftovers(tmp_path) == [] and ckpt.all_steps() == [2]
  assert_trees_equal(ckpt.restore(make_state()), make_state(2))
  assert ckpt.save(4, make_state(4))  # the lost step can be saved again
  ckpt.close()
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoints.LostCheckpointWarning)  # reported once: nothing is left to report
    with Checkpointer(tmp_path) as reopened:
      assert reopened.all_steps() == [2, 4]

  empty = tmp_path / "fresh"
  (empty / "0.orbax-checkpoint-tmp").mkdir(parents=True)
  with pytest.warns(checkpoints.LostCheckpointWarning,
                    match=rf"checkpoint step 0 in {re.escape(str(empty))} .* is lost; there is no complete checkpoint, "
                          "so a resumed run starts from step 0"):
    assert Checkpointer(empty).latest_step() is None
  assert leftovers(empty) == []
