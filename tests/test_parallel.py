"""The data-parallel mesh helpers, and teacher training (through ``loop.fit``) on 8 host devices against 1 device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from mteo_jax import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_and_shardings():
  """make_mesh puts the devices on one "data" axis (a subset on request, none refused); the shardings split on it or
  replicate."""
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.size == jax.device_count()
  assert parallel.data_sharding(mesh).spec == PartitionSpec("data")
  assert parallel.replicated_sharding(mesh).spec == PartitionSpec()
  one = parallel.make_mesh(jax.devices()[:1])
  assert one.size == 1
  with pytest.raises(ValueError, match="at least one device"):
    parallel.make_mesh([])


def test_shard_batch_and_replicate_keep_values():
  """shard_batch and replicate place arrays on the mesh without changing their values."""
  mesh = parallel.make_mesh()
  batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "label": np.arange(4, dtype=np.int32)}
  sharded = parallel.shard_batch(batch, mesh)
  assert sharded["x"].sharding == parallel.data_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(sharded["x"]), batch["x"])
  np.testing.assert_array_equal(np.asarray(sharded["label"]), batch["label"])
  tree = parallel.replicate({"w": jnp.ones((2, 2))}, mesh)
  assert tree["w"].sharding == parallel.replicated_sharding(mesh)


def test_shard_batch_rejects_bad_batches():
  """Arrays of different leading sizes, scalars and empty batches are refused with a message saying why."""
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="same leading batch dimension"):
    parallel.shard_batch({"x": np.zeros((4, 2)), "label": np.zeros((3,))}, mesh)
  with pytest.raises(ValueError, match="same leading batch dimension"):
    parallel.shard_batch({"x": np.float32(1.0)}, mesh)
  with pytest.raises(ValueError, match="empty batch"):
    parallel.shard_batch({}, mesh)


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import configs.gmm
    from mteo_jax import parallel, train

    assert jax.device_count() == 8, jax.devices()
    mesh8, mesh1 = parallel.make_mesh(), parallel.make_mesh(jax.devices()[:1])

    # shard_batch splits the rows evenly, and refuses a batch that 8 devices cannot split.
    sharded = parallel.shard_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh8)
    rows = sorted(tuple(np.asarray(s.data).ravel()) for s in sharded["x"].addressable_shards)
    assert rows == [(2.0 * i, 2.0 * i + 1) for i in range(8)], rows
    try:
      parallel.shard_batch({"x": np.zeros((12, 1))}, mesh8)
      raise SystemExit("a batch of 12 on 8 devices was accepted")
    except ValueError as error:
      assert "not divisible by the 8 devices" in str(error), error

    config = configs.gmm.get_config("tiny")
    config.train.update(steps=12, batch_size=12, log_every=1, checkpoint_every=100, num_samples=0)
    try:
      train.train(train.TeacherConfig.from_config(config), f"{sys.argv[1]}/twelve", mesh=mesh8)
      raise SystemExit("train accepted a batch of 12 on 8 devices")
    except ValueError as error:
      assert "batch_size=12 is not divisible by the 8 devices" in str(error), error
    config.train.batch_size = 64
    config = train.TeacherConfig.from_config(config)
    out = {}
    for name, mesh in (("eight", mesh8), ("one", mesh1)):
      state = train.train(config, f"{sys.argv[1]}/{name}", mesh=mesh)
      out[name] = {"losses": [r["loss"] for r in train.read_metrics(f"{sys.argv[1]}/{name}")],
                   "devices": [r["num_devices"] for r in train.read_metrics(f"{sys.argv[1]}/{name}")],
                   "params": [float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(state.params)],
                   "ema": [float(np.abs(np.asarray(p)).sum()) for p in jax.tree.leaves(state.ema_params)]}
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_match_one_device(tmp_path):
  """On 8 host devices a batch is split row-wise (an indivisible one refused by shard_batch and by loop.fit via
  train), and a teacher trained through loop.fit on 8 devices has the loss curve, parameters and EMA of 1 device."""
  # Eight host devices; XLA's cheap compile pipeline because compiling dominates the time of this test.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                       "--xla_llvm_disable_expensive_passes=true",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
  eight, one = result["eight"], result["one"]
  assert eight["devices"] == [8] * 12 and one["devices"] == [1] * 12
  # Same data, same noise (threefry is partitionable), only the order of the cross-device sums differs.
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-4)
  np.testing.assert_allclose(eight["params"], one["params"], rtol=1e-4)
  np.testing.assert_allclose(eight["ema"], one["ema"], rtol=1e-4)
  assert eight["ema"] != eight["params"]  # the EMA is a separate average, not the parameters again
  assert len(set(np.round(one["losses"], 6))) > 1  # a real curve, not one value repeated
