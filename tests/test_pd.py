"""Progressive distillation (``methods.pd``): the target against the exact two-step DDIM result, one round lowering the
student's mismatch, an interrupted round resuming to the same student, exported students and their checks, and bad
settings."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import closed_form, comparison, modes, teachers
from mteo_jax import data as data_lib
from mteo_jax import harness as harness_lib
from mteo_jax.diffusion import Preconditioning
from mteo_jax.methods import pd
from mteo_jax.methods.pd import PD, PDSettings
from mteo_jax.nets import get_backbone
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver

TINY = dict(steps=24, batch_size=64, lr=2e-4, log_every=8, checkpoint_every=8, progress=False)


def test_target_is_the_exact_two_step_ddim_result_float64():
  """With the exact denoiser of a Gaussian, the target's single DDIM step lands on the teacher's two DDIM steps (to
  1e-12), for a batch of per-sample noise levels and the last step to sigma = 0; the VP formula equals the EDM one."""
  with jax.enable_x64(True):
    rs = np.random.RandomState(0)
    gauss = closed_form.Gaussian(jnp.asarray(rs.randn(3)), jnp.asarray(0.2 + rs.rand(3)))
    x0 = jnp.asarray(rs.randn(5, 3))
    sigma = jnp.asarray([80.0, 10.0, 1.5, 0.3, 0.01])
    for sigma_mid, sigma_next2 in ((sigma * 0.6, sigma * 0.25), (sigma * 0.5, jnp.zeros(5))):
      x = x0 + sigma[:, None] * jnp.asarray(rs.randn(5, 3))
      x_mid = pd.ddim_step(x, gauss.denoise(x, sigma), sigma, sigma_mid)
      x_next2 = pd.ddim_step(x_mid, gauss.denoise(x_mid, sigma_mid), sigma_mid, sigma_next2)
      target = pd.distillation_target(x, x_next2, sigma, sigma_next2)
      assert target.dtype == jnp.float64
      np.testing.assert_allclose(pd.ddim_step(x, target, sigma, sigma_next2), x_next2, rtol=0, atol=1e-12)
      ratio = (sigma_next2 / sigma)[:, None]
      np.testing.assert_allclose(target, (x_next2 - ratio * x) / (1 - ratio), rtol=1e-12)
    # One DDIM step with the exact denoiser as "teacher" on a grid: the target is that step's own x0_hat.
    x = x0 + 2.0 * jnp.asarray(rs.randn(5, 3))
    one = pd.ddim_step(x, gauss.denoise(x, 2.0), 2.0, 0.5)
    np.testing.assert_allclose(pd.distillation_target(x, one, 2.0, 0.5), gauss.denoise(x, 2.0), atol=1e-12)


def test_loss_weights():
  sigma = jnp.asarray([0.5, 2.0])
  np.testing.assert_allclose(pd.loss_weight(sigma, "truncated_snr"), [4.0, 1.0])
  np.testing.assert_allclose(pd.loss_weight(sigma, "snr_plus_one"), [5.0, 1.25])
  with pytest.raises(ValueError, match=r"expected one of \['truncated_snr', 'snr_plus_one'\]"):
    pd.loss_weight(sigma, "snr")


@pytest.mark.parametrize("fields, message", [
    ({"end_steps": 0}, "pd.end_steps must be >= 1"),
    ({"start_steps": 12, "end_steps": 4}, "pd.start_steps must be end_steps times a power of two"),
    ({"start_steps": 4, "end_steps": 4}, "power of two >= 2"),
    ({"start_steps": 0}, "power of two"),
    ({"weighting": "snr"}, "unknown pd.weighting 'snr'"),
    ({"lr": -1.0}, "pd.lr must be a positive"),
])
def test_bad_settings_are_clear_errors(fields, message):
  with pytest.raises(ValueError, match=message):
    PDSettings(**fields)


def test_grid_points_are_the_rounds_steps():
  """Each row's student step is (grid[2i], grid[2i + 1], grid[2i + 2]) with i uniform over the N steps, a function of
  (seed, step) only."""
  grid = np.array([80.0, 20.0, 5.0, 1.0, 0.2], np.float32)
  points = pd.grid_points(grid, 4000, seed=3, step=7)
  i = np.searchsorted(-grid, -points["sigma"])
  assert set(i) == {0, 2} and abs(np.mean(i == 0) - 0.5) < 0.05
  np.testing.assert_array_equal(points["sigma_mid"], grid[i + 1])
  np.testing.assert_array_equal(points["sigma_next2"], grid[i + 2])
  again = pd.grid_points(grid, 4000, seed=3, step=7)
  assert all(np.array_equal(points[k], again[k]) for k in points)
  assert not np.array_equal(points["sigma"], pd.grid_points(grid, 4000, seed=3, step=8)["sigma"])


def test_rounds_halve_down_to_the_end():
  assert PDSettings(start_steps=64, end_steps=1).rounds == [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1)]
  assert PDSettings(start_steps=48, end_steps=3).student_steps == (24, 12, 6, 3)


def test_pd_mode_config_errors():
  """The pd mode's cells must hold DDIM at a student's step count; compare mode does not run pd."""
  config = modes.base_config("pd")
  config.compare.teacher = "pretrained:gmm"
  assert modes.parse(config)[1].compare.methods == ("base", "pd")
  config.compare.solvers = ("ipndm",)
  with pytest.raises(modes.ConfigError, match=r"compare\.nfes=\[8, 4, 2, 1\]: add 'euler'$"):
    modes.parse(config)
  config.compare.solvers, config.compare.nfes = ("euler",), (3, 5)
  with pytest.raises(modes.ConfigError, match=r"compare\.nfes=\[3, 5\]: add some of those NFEs$"):
    modes.parse(config)
  config = modes.base_config("pd")
  config.compare.teacher = "pretrained:gmm"
  config.pd.end_steps = 3
  with pytest.raises(modes.ConfigError, match="power of two"):
    modes.parse(config)
  compare = modes.base_config("compare")
  compare.compare.teacher = "pretrained:gmm"
  compare.compare.methods = ("base", "pd")
  with pytest.raises(modes.ConfigError, match=r"run it with mode 'pd' \(a config file's :pd variant"):
    modes.parse(compare)


def test_types_of_the_distillation_settings_are_checked():
  for fields, message in (({"start_steps": 8.0}, "pd.start_steps must be an int, got 8.0"),
                          ({"end_steps": True}, "pd.end_steps must be an int, got True"),
                          ({"dropout": "yes"}, "pd.dropout must be a bool, got 'yes'"),
                          ({"export_students": 1}, "pd.export_students must be a bool, got 1")):
    with pytest.raises(TypeError, match=message):
      PDSettings(**fields)


def test_settings_that_do_not_suit_the_teacher_or_the_devices_fail_before_the_workdir(tmp_path, monkeypatch):
  """A batch larger than the teacher's training set, dropout on a backbone without it, and a batch that does not
  split over the devices are config errors raised before the workdir is claimed."""
  def pd_config(**fields):
    config = modes.base_config("pd")
    config.compare.teacher = "pretrained:gmm"
    config.pd.update(fields)
    return config

  for fields, message in (
      ({"batch_size": 100000}, r"pd\.batch_size=100000 exceeds the 50000 examples of the teacher's training set 'gmm'"),
      ({"dropout": True}, r"pd\.dropout=True but the teacher's backbone 'mlp' has no dropout")):
    with pytest.raises(modes.ConfigError, match=message):
      modes.run(pd_config(**fields), tmp_path / "w")
    assert not (tmp_path / "w").exists()
  PD(PDSettings(dropout=True)).check_teacher(teachers.Teacher.load("pretrained:digits"))   # a UNet with dropout 0.1
  with monkeypatch.context() as patch:
    patch.setattr(comparison.parallel, "make_mesh", lambda *args: types.SimpleNamespace(size=3))
    with pytest.raises(modes.ConfigError, match=r"pd: batch_size=128 is not divisible by the 3 devices"):
      modes.run(pd_config(), tmp_path / "w")
  assert not (tmp_path / "w").exists()


def test_dropout_option_changes_the_loss():
  backbone = get_backbone("unet", (8, 8, 1), image_size=8, in_channels=1, model_channels=8, channel_mult=(1,),
                          num_blocks=1, attn_resolutions=(), dropout=0.5, num_classes=0)
  params = backbone.init(jax.random.key(0))
  grid = (80.0, 5.0, 1.0, 0.2, 0.002)
  batch = {"x": jax.random.normal(jax.random.key(1), (4, 8, 8, 1)), **pd.grid_points(grid, 4, seed=0, step=0)}
  values = [float(jax.jit(pd.RoundObjective(backbone, Preconditioning(), "truncated_snr", dropout))(
      params, params, batch, jax.random.key(2))) for dropout in (False, False, True)]
  assert values[0] == values[1] != values[2]


@pytest.fixture(scope="module")
def gmm():
  teacher = teachers.Teacher.load("pretrained:gmm")
  real = data_lib.get_dataset("gmm", "test", **teacher.metadata["data_options"]).get_batch(np.arange(512))["x"]
  return teacher, jnp.asarray(real)


SETTINGS = PDSettings(start_steps=4, end_steps=1, **TINY)


def light_harness(teacher, workdir):
  """What ``PD.fit`` reads of a harness (the teacher, the base schedule, the training seed, the workdir), without the
  evaluation references a real ``Harness`` solves first."""
  return types.SimpleNamespace(teacher=teacher, workdir=workdir, config=harness_lib.HarnessConfig(), train_seed=1)


def ddim_cell(nfe):
  return harness_lib.Cell("euler", nfe, get_solver("euler"), np.zeros(nfe + 1, np.float32))


@pytest.fixture(scope="module")
def distilled(gmm, tmp_path_factory):
  """Two rounds (4 -> 2 -> 1 steps) on the GMM teacher: the 1-step student's artefact, then the 2-step one's
  (reloaded from the finished first round)."""
  teacher, _ = gmm
  harness = light_harness(teacher, tmp_path_factory.mktemp("pd"))
  method = PD(SETTINGS)
  return harness, method, method.fit(harness, ddim_cell(1)), method.fit(harness, ddim_cell(2))


def test_a_round_lowers_the_mismatch_and_exports_students(gmm, distilled):
  """Each student's one-step-vs-two-teacher-steps mismatch on held-out data is below its starting point's; the
  students are exported with their parent and steps, and sample on the nested DDIM grid."""
  teacher, real = gmm
  harness, method, one, two = distilled
  assert one.curves["rounds"]["round2"]["student_steps"] == 1 and list(two.curves["rounds"]) == ["round1"]
  assert one.train_seconds > two.train_seconds > 0
  assert two.curves["rounds"]["round1"] == one.curves["rounds"]["round1"]
  grid = method.start_grid(harness)
  np.testing.assert_array_equal(grid, get_schedule("edm", 4, teacher.precond.sigma_min, teacher.precond.sigma_max))
  previous = teacher.params
  for teacher_steps, student_steps in SETTINGS.rounds:
    student, sigmas = pd.load_student(harness.workdir / "pd" / "students" / f"steps{student_steps}", parent=teacher,
                                      steps=student_steps)
    np.testing.assert_array_equal(sigmas, grid[::4 // student_steps])
    round_grid = grid[::4 // teacher_steps]
    before = pd.mismatch(teacher.backbone, teacher.precond, previous, previous, round_grid, real, seed=9)
    after = pd.mismatch(teacher.backbone, teacher.precond, student.params, previous, round_grid, real, seed=9)
    assert after < 0.8 * before, (teacher_steps, before, after)
    previous = student.params
  # The 1-step student's sample is one DDIM step with its own denoiser.
  x_T = teacher.precond.sigma_max * jax.random.normal(jax.random.key(3), (16, 2))
  denoised = student.denoiser(x_T, teacher.precond.sigma_max)
  np.testing.assert_allclose(method.sampler(one)(x_T, None), pd.ddim_step(x_T, denoised, grid[0], grid[-1]),
                             rtol=0, atol=5e-5)  # float32; x_T is of order 80
  students = harness.workdir / "pd" / "students"
  # The parent may be named as a teacher spec; the student's metadata holds its own record, not its parent's.
  student, _ = pd.load_student(students / "steps1", parent="pretrained:gmm", steps=1)
  assert "final_loss" not in student.metadata and "config" not in student.metadata
  record = student.metadata["distilled"]["distillation"]
  assert record["round"] == 2 and record["settings"]["start_steps"] == 4 and record["step"][-1] == TINY["steps"]
  with pytest.raises(TypeError, match="steps must be an integer"):
    pd.load_student(students / "steps1", steps="1")
  with pytest.raises(ValueError, match="not a PD student"):
    pd.load_student(teachers.resolve_teacher("pretrained:gmm"))
  with pytest.raises(ValueError, match="the 1-step student, not the 2-step one"):
    pd.load_student(students / "steps1", steps=2)
  other = teachers.Teacher.from_model(teacher.backbone, jax.tree.map(lambda p: p * 1.01, teacher.params),
                                      teacher.precond)
  with pytest.raises(ValueError, match="was distilled from teacher"):
    pd.load_student(students / "steps1", parent=other)
  with pytest.raises(FileNotFoundError, match="no PD student"):
    pd.load_student(students / "steps8")
  assert not method.serves(harness_lib.Cell("ipndm", 2, get_solver("ipndm"), np.zeros(2)))
  assert not method.serves(ddim_cell(3)) and method.serves(ddim_cell(2))
  with pytest.raises(ValueError, match="serves DDIM"):
    method.fit(harness, ddim_cell(3))


def test_an_interrupted_round_resumes_to_the_same_student(gmm, distilled, tmp_path):
  """Interrupted in its second round (the last checkpoint at step 8 of 24), then run again: the same 1-step student
  and losses as the uninterrupted run."""
  teacher, _ = gmm
  reference, _, one, _ = distilled

  def interrupt(step, state, metrics):
    del state, metrics
    if interrupt.round == 2 and step == 12:
      raise KeyboardInterrupt
    if step == TINY["steps"]:
      interrupt.round += 1
  interrupt.round = 1

  harness = light_harness(teacher, tmp_path)
  with pytest.raises(KeyboardInterrupt):
    PD(SETTINGS, hooks=(interrupt,)).fit(harness, ddim_cell(1))
  assert not (tmp_path / "pd" / "students" / "steps1").exists()
  assert sorted(p.name for p in (tmp_path / "pd" / "round2_2to1" / "checkpoints").iterdir() if p.name.isdigit()) \
      == ["8"]
  # The rerun also shows export_students: without it, no student is written.
  again = PD(dataclasses.replace(SETTINGS, export_students=False)).fit(harness, ddim_cell(1))
  assert not (tmp_path / "pd" / "students" / "steps1").exists()
  assert again.curves["rounds"] == {k: {**v, "train_seconds": again.curves["rounds"][k]["train_seconds"]}
                                    for k, v in one.curves["rounds"].items()}
  jax.tree.map(np.testing.assert_array_equal, again.payload[1], one.payload[1])


def test_pd_needs_the_teachers_data(gmm, tmp_path):
  teacher, _ = gmm
  memory = teachers.Teacher.from_model(teacher.backbone, teacher.params, teacher.precond)
  with pytest.raises(ValueError, match="trains on the teacher's training data"):
    PD(PDSettings(start_steps=2, end_steps=1, **TINY)).fit(light_harness(memory, tmp_path), ddim_cell(1))
