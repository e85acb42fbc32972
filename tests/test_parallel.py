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


# --- every learning mode on 8 devices, and two processes of a jax.distributed run ------------------------------------

_CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _run_job(args, env_extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS=_CHEAP_COMPILE)
  env.update(env_extra)
  return subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "multidevice_jobs.py"), *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT"):])


def _assert_rows_match(rows, expected, rtol):
  cells = lambda table: [(r["method"], r["solver"], r["nfe"]) for r in table]  # noqa: E731
  assert cells(rows) == cells(expected)
  for row, want in zip(rows, expected):
    np.testing.assert_allclose(row["rmse"], want["rmse"], rtol=rtol, err_msg=row["method"])
    np.testing.assert_allclose(row["psnr"], want["psnr"], rtol=rtol, err_msg=row["method"])
    if want["loss_curve"] is not None:
      assert row["loss_curve"]["step"] == want["loss_curve"]["step"]
      np.testing.assert_allclose(row["loss_curve"]["loss"], want["loss_curve"]["loss"], rtol=rtol,
                                 err_msg=row["method"])


def _free_port():
  import socket  # noqa: PLC0415
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def test_learning_modes_on_eight_devices_and_two_processes_match_one_device(tmp_path):
  """A training batch that 8 devices cannot split is a config error before the workdir is touched, in every mode.
  compare (LD3, INDIS, MTEO beside the base solver) and pd (a round of progressive distillation), each trained,
  sampled and scored on 8 host devices, give the losses and held-out errors of the same run on 1 device; and the
  compare job (MTEO) run as two processes of ``jax.distributed`` on localhost (``--config.distributed=True`` with
  ``cluster.*``, a 2-device mesh across the processes, each feeding its half of every batch) gives
  those of one process, in both processes.

  One test, not three, so that the 1-device run and the reference solve serve all the comparisons
  (``tests/multidevice_jobs.py``)."""
  devices = _result(_run_job(["devices", str(tmp_path / "devices")],
                             {"XLA_FLAGS": f"--xla_force_host_platform_device_count=8 {_CHEAP_COMPILE}"}))
  assert devices["devices"] == 8
  for mode, (message, touched) in devices["refusals"].items():   # before any work, the workdir untouched
    section = {"compare": "mteo"}.get(mode, mode)
    assert f"{section}: batch_size=12 is not divisible by the 8 devices; use a multiple of 8" in message, message
    assert not touched, mode
  many, one = devices["many"], devices["one"]
  assert {r["method"] for r in many["compare"]} == {"teacher", "base", "ld3", "indis", "mteo"}
  assert {r["method"] for r in many["pd"]} == {"teacher", "base", "pd"}
  for mode in ("compare", "pd"):
    _assert_rows_match(many[mode], one[mode], rtol=1e-4)   # only the order of the cross-device sums differs
  curves = [r["loss_curve"]["loss"] for r in one["compare"] if r["loss_curve"]]
  assert len(curves) == 3 and all(len(set(np.round(c, 7))) > 1 for c in curves)   # real curves, not one value

  port = _free_port()
  procs = [_run_job(["processes", str(tmp_path / "processes"), f"localhost:{port}", "2", str(index),
                     str(tmp_path / "devices" / "many" / "compare")], {})
           for index in range(2)]
  results = [_result(proc, timeout=600) for proc in procs]
  assert [(r["processes"], r["devices"], r["process_index"]) for r in results] == [(2, 2, 0), (2, 2, 1)]
  expected = [r for r in one["compare"] if r["method"] in ("teacher", "base", "mteo")]
  for result in results:
    _assert_rows_match(result["compare"], expected, rtol=1e-4)
  saved = json.loads((tmp_path / "processes" / "results.json").read_text())
  assert [r["method"] for r in saved["rows"]] == ["teacher", "base", "mteo"]   # process 0 wrote it, once


def test_distributed_settings_are_checked_before_any_work():
  """config.distributed takes True, False or auto (any case); cluster.* must be consistent; a bad value is a
  ConfigError naming the key."""
  from mteo_jax import modes  # noqa: PLC0415
  assert [parallel.distributed_choice(v) for v in (True, False, "auto", "TRUE", " False ")] == \
      ["true", "false", "auto", "true", "false"]
  for mode in ("train", "mteo", "compare", "pd"):
    config = modes.base_config(mode)
    assert config.distributed == "false" and dict(config.cluster) == {
        "coordinator_address": "", "num_processes": 0, "process_id": -1}
  config = modes.base_config("mteo")
  config.mteo.teacher = "pretrained:gmm"
  modes.parse(config)
  config.distributed = "sometimes"
  with pytest.raises(modes.ConfigError, match=r"distributed must be True, False or auto, got 'sometimes'"):
    modes.parse(config)
  for fields, message in (({"num_processes": -1}, r"cluster\.num_processes must be >= 0"),
                          ({"process_id": -2}, r"cluster\.process_id must be >= 0, or -1"),
                          ({"num_processes": 2, "process_id": 2}, r"process_id=2 is not below num_processes=2"),
                          ({"coordinator_address": "localhost"}, r"coordinator_address must be host:port"),
                          ({"num_processes": 2, "process_id": 1},
                           r"cluster is set \(\['num_processes', 'process_id'\]\) but distributed is False")):
    config = modes.base_config("mteo")
    config.mteo.teacher = "pretrained:gmm"
    config.cluster.update(fields)
    with pytest.raises(modes.ConfigError, match=message):
      modes.parse(config)


def test_auto_initialises_only_in_a_cluster_and_late_initialisation_is_a_clear_error(monkeypatch):
  """``auto`` acts on the environments jax.distributed detects (TPU VM slice, JAX_COORDINATOR_ADDRESS, SLURM or
  Open MPI with more than one task) and does nothing elsewhere; ``false`` never initialises; asking for it after JAX
  has run (as here) is a ValueError that says it must come first."""
  assert not parallel.cluster_detected({})
  assert not parallel.cluster_detected({"SLURM_NTASKS": "1", "OMPI_COMM_WORLD_SIZE": "1"})
  for env in ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"},
              {"SLURM_NTASKS": "4"}, {"OMPI_COMM_WORLD_SIZE": "2"}):
    assert parallel.cluster_detected(env), env
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  for name in parallel._CLUSTER_VARIABLES + ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  assert parallel.initialize_distributed("auto") is False and parallel.initialize_distributed(False) is False
  assert calls == []
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert parallel.initialize_distributed("auto") is True
  assert parallel.initialize_distributed("true", parallel.ClusterConfig("localhost:1", 2, 1)) is True
  assert calls == [{"coordinator_address": None, "num_processes": None, "process_id": None},
                   {"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 1}]
  def undetected(**kwargs):
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(jax.distributed, "initialize", undetected)
  with pytest.raises(ValueError, match=r"set cluster\.coordinator_address, cluster\.num_processes and "
                                       r"cluster\.process_id where the cluster is not detected"):
    parallel.initialize_distributed("true")
  monkeypatch.undo()
  jax.numpy.zeros(1).block_until_ready()   # the backend is up, as in any process that has run JAX
  with pytest.raises(ValueError, match=r"must come before any other JAX call"):
    parallel.initialize_distributed("true", parallel.ClusterConfig("localhost:1", 2, 0))


def test_batched_pads_each_chunk_to_the_mesh_and_drops_the_padding():
  """harness.batched: chunks split over the mesh's devices, padded to one size (a multiple of the device count), the
  padding dropped; None arguments pass through."""
  from mteo_jax.harness import batched  # noqa: PLC0415
  seen = []

  def fn(x, label):
    seen.append((x.shape, label))
    return x * 2

  x = np.arange(10.0).reshape(5, 2)
  np.testing.assert_array_equal(batched(fn, 2, x, None), 2 * x)
  assert seen == [((2, 2), None)] * 3   # 2 + 2 + (1 padded to 2)
  seen.clear()
  np.testing.assert_array_equal(batched(jax.jit(fn), 8, x, None, mesh=parallel.make_mesh()), 2 * x)


CPU_DEVICES_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mteo_jax import modes, parallel, reference
    from mteo_jax.teachers import Teacher
    config = modes.base_config("mteo")
    config.mteo.teacher = "pretrained:gmm"
    config.cpu_devices = int(sys.argv[1])
    modes.prepare(config)                 # what the command line does first
    import jax
    teacher = Teacher.load("pretrained:gmm")
    x_T = np.random.default_rng(0).standard_normal((6, 2)).astype(np.float32) * teacher.precond.sigma_max
    sigmas = np.array([teacher.precond.sigma_max, 1.0, teacher.precond.sigma_min], np.float32)
    ref = reference.reference_trajectories(teacher.denoiser, x_T, sigmas, rtol=1e-4, atol=1e-4, batch_size=3,
                                           progress=False)
    parallel.use_cpu_devices(int(sys.argv[1]) + 1)   # too late: the backend has started; a warning, no change
    print("RESULT" + json.dumps({"devices": jax.device_count(), "states": ref.states.tolist(),
                                 "nfe": ref.nfe.tolist()}))
""")


def test_cpu_devices_sets_the_cpu_device_count_before_jax_starts_and_references_split_over_them():
  """``cpu_devices`` (applied by ``modes.prepare``, before any JAX computation) makes JAX expose that many CPU devices
  whatever XLA_FLAGS says, and 0 leaves XLA_FLAGS' count; the reference solve splits its chunks over them (chunks of
  3 padded to 4, on 4 devices and on 2) with the same trajectories and NFE; once JAX has started, another count only
  warns; a negative count is refused."""

  def probe(count, xla_count):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={xla_count}"}
    out = subprocess.run([sys.executable, "-c", CPU_DEVICES_PROBE, str(count)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):]), out.stderr

  four, log = probe(4, xla_count=3)
  assert four["devices"] == 4
  assert "cpu_devices=5 is not applied: JAX started with 4 CPU device(s)" in log
  default, _ = probe(0, xla_count=2)
  assert default["devices"] == 2   # XLA_FLAGS' count: 0 changes nothing
  # Each sample is its own adaptive solve; float rounding of another batch split moves its steps within the solve's
  # tolerance (rtol = atol = 1e-4 of states up to sigma_max = 80 in size), so the two agree to that order, and a few
  # steps may be accepted or rejected otherwise.
  states, expected = np.asarray(four["states"]), np.asarray(default["states"])
  assert np.abs(states - expected).max() <= 1e-3 * np.abs(expected).max(), np.abs(states - expected).max()
  assert abs(np.mean(four["nfe"]) / np.mean(default["nfe"]) - 1) < 0.1, (four["nfe"], default["nfe"])
  with pytest.raises(ValueError, match=r"cpu_devices must be >= 0 \(0 = JAX's default\), got -1"):
    parallel.use_cpu_devices(-1)
  from mteo_jax import modes  # noqa: PLC0415
  config = modes.base_config("mteo")
  config.mteo.teacher = "pretrained:gmm"
  config.cpu_devices = -2
  with pytest.raises(modes.ConfigError, match=r"cpu_devices must be >= 0"):
    modes.parse(config)
