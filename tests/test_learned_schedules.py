"""Learned schedules (``mteo_jax.learned_schedules``) and the LD3 and INDIS methods on the harness.

The parameterisation must give a valid grid (strictly decreasing, exact endpoints) for any logits, in float32 and
float64, and invert on the EDM schedule; an untrained phi must be the global schedule; gradients through the solver
must match finite differences (float64, a closed-form teacher); and both methods must beat the plain solver on the
shipped GMM teacher, reload a finished run and refuse an artefact of another run.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import Teacher, closed_form, harness, loop, mteo
from mteo_jax import learned_schedules as ls
from mteo_jax.diffusion import Preconditioning, broadcast_to_batch
from mteo_jax.methods.indis import INDIS, INDISSettings, build_predictor, load_predictor, make_instance_sampler
from mteo_jax.methods.ld3 import LD3, LD3Settings, load_schedule
from mteo_jax.methods.plain import BaseSolver
from mteo_jax.nets import get_backbone
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def extreme_logits(num_steps: int) -> tuple[list[str], np.ndarray]:
  """Row names and logits [rows, num_steps]: random ones, and extreme ones (±1e4, all equal, one huge, one tiny)."""
  alternating = np.where(np.arange(num_steps) % 2, -1e4, 1e4)
  one_huge, one_tiny = np.zeros(num_steps), np.zeros(num_steps)
  one_huge[num_steps // 2], one_tiny[0] = 1e4, -1e4
  rows = {f"random{i}": row for i, row in enumerate(3.0 * np.random.RandomState(0).randn(3, num_steps))}
  rows.update({"plus_minus_1e4": alternating, "minus_plus_1e4": -alternating, "all_equal": np.full(num_steps, 7.0),
               "all_1e4": np.full(num_steps, 1e4), "one_huge": one_huge, "one_tiny": one_tiny})
  return list(rows), np.stack(list(rows.values()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("num_steps", [1, 3, 12])
def test_sigmas_from_logits_is_a_valid_grid_for_any_logits(dtype, num_steps):
  """Strictly decreasing with exact endpoints for random and extreme logits, batched, with finite gradients."""
  with jax.enable_x64(dtype == "float64"):
    names, logits = extreme_logits(num_steps)
    logits = jnp.asarray(logits, dtype)
    values = np.asarray(ls.sigmas_from_logits(logits, SIGMA_MIN, SIGMA_MAX))
    assert values.dtype == np.dtype(dtype) and values.shape == (len(names), num_steps + 1)
    for name, row in zip(names, values):
      assert np.all(np.diff(row) < 0), (name, row)
      assert row[0] == np.asarray(SIGMA_MAX, dtype) and row[-1] == np.asarray(SIGMA_MIN, dtype), (name, row)
    # Every log-gap is at least the floor's share of the range (up to rounding).
    gaps = -np.diff(np.log(values.astype(np.float64)), axis=-1)
    assert np.all(gaps >= 0.99 * ls.DEFAULT_MIN_FRACTION * np.log(SIGMA_MAX / SIGMA_MIN)), gaps
    grad = jax.jit(jax.grad(lambda z: jnp.sum(jnp.log(ls.sigmas_from_logits(z, SIGMA_MIN, SIGMA_MAX)) ** 2)))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_logits_from_sigmas_inverts_on_the_edm_schedule():
  """EDM (rho = 7) -> logits -> sigmas round-trips to 1e-12 in float64 (to a few float32 ulps of log sigma in
  float32); logits -> sigmas -> logits too (up to the common shift softmax ignores, removed by centring)."""
  def round_trip(edm):
    logits = ls.logits_from_sigmas(edm)
    return logits, ls.sigmas_from_logits(logits, SIGMA_MIN, SIGMA_MAX)

  round_trip = jax.jit(round_trip)  # one program per case: eager calls compile each small op on CPU
  for num_steps in (1, 3, 20):
    for dtype, rtol in (("float32", 4e-6), ("float64", 1e-12)):
      with jax.enable_x64(dtype == "float64"):
        ramp = np.linspace(0.0, 1.0, num_steps + 1)
        edm = (SIGMA_MAX ** (1 / 7) + ramp * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7  # EDM eq. 5
        edm[0], edm[-1] = SIGMA_MAX, SIGMA_MIN
        edm = edm.astype(dtype)
        logits, again = round_trip(edm)
        assert logits.shape == (num_steps,) and logits.dtype == np.dtype(dtype)
        np.testing.assert_allclose(np.asarray(again), edm, rtol=rtol, atol=0, err_msg=f"{num_steps}")
  with jax.enable_x64(True):
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 6))
    back = ls.logits_from_sigmas(ls.sigmas_from_logits(logits, SIGMA_MIN, SIGMA_MAX))
    np.testing.assert_allclose(np.asarray(back), np.asarray(logits - logits.mean(-1, keepdims=True)), atol=1e-10)


def test_the_parameterisation_rejects_what_it_cannot_represent():
  """A gap at or below the floor has no logits; a floor that leaves no room for the softmax, or that float32 cannot
  resolve, is refused; so are endpoints out of order."""
  with pytest.raises(ValueError, match="at most min_fraction"):
    ls.logits_from_sigmas(np.array([80.0, 79.999, 1.0, 0.002]), min_fraction=0.01)
  with pytest.raises(ValueError, match="min_fraction must be in"):
    ls.sigmas_from_logits(jnp.zeros(4), SIGMA_MIN, SIGMA_MAX, min_fraction=0.25)
  with pytest.raises(ValueError, match="resolution"):
    ls.sigmas_from_logits(jnp.zeros(4, jnp.float32), SIGMA_MIN, SIGMA_MAX, min_fraction=1e-9)
  with pytest.raises(ValueError, match="sigma_min < sigma_max"):
    ls.sigmas_from_logits(jnp.zeros(4), SIGMA_MAX, SIGMA_MIN)


def test_endpoint_losses():
  """Soft teacher: radius 0 is the l2 loss; errors inside the ball cost nothing (gradient 0, finite at x == ref);
  outside, ``(rms - r)^2``. The loss names and radii are checked."""
  rs = np.random.RandomState(0)
  x, ref = jnp.asarray(rs.randn(4, 3)), jnp.asarray(rs.randn(4, 3))
  np.testing.assert_allclose(ls.soft_teacher_loss(x, ref, 0.0), ls.l2_loss(x, ref), rtol=1e-6)
  rms = np.sqrt(np.mean((np.asarray(x) - np.asarray(ref)) ** 2, axis=-1))
  radius = float(np.median(rms))
  np.testing.assert_allclose(ls.soft_teacher_loss(x, ref, radius), np.mean(np.maximum(rms - radius, 0) ** 2),
                             rtol=1e-6)
  inside = ref + 0.01
  assert float(ls.soft_teacher_loss(inside, ref, 0.1)) == 0.0
  for point in (inside, ref):
    grad = jax.grad(lambda y: ls.soft_teacher_loss(y, ref, 0.1))(point)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
  assert ls.endpoint_loss("l2") is ls.l2_loss
  with pytest.raises(ValueError, match="no radius"):
    ls.endpoint_loss("l2", 0.1)
  with pytest.raises(ValueError, match="radius > 0"):
    ls.endpoint_loss("soft_teacher", 0.0)
  with pytest.raises(KeyError, match=r"expected one of \['l2', 'soft_teacher'\]"):
    ls.endpoint_loss("l1")


@pytest.mark.parametrize("settings_class", [LD3Settings, INDISSettings])
def test_endpoint_settings_checked(settings_class):
  """LD3's and INDIS's loss, radius and gap floor are checked by their shared settings, naming the section."""
  settings_class(loss="soft_teacher", radius=0.05)
  section = settings_class.section
  bad = [({"loss": "l1"}, f"{section}.loss / {section}.radius"), ({"radius": 0.1}, "no radius"),
         ({"loss": "soft_teacher"}, "radius > 0"),
         ({"min_fraction": 0.0}, rf"{section}.min_fraction must be in \(0, 1\)"),
         ({"min_fraction": 1.0}, f"{section}.min_fraction")]
  for fields, message in bad:
    with pytest.raises(ValueError, match=message):
      settings_class(**fields)


# --- phi, the shift and the scale -----------------------------------------------------------------------------------

@functools.cache
def tiny_teacher(num_classes: int = 0):
  """A small random MLP backbone (2-D data) with EDM preconditioning: ``(backbone, params, precond)``; the parameters
  are drawn with numpy into the shapes ``init`` would give (compiling ``init`` costs seconds on CPU)."""
  backbone = get_backbone("mlp", (2,), data_dim=2, width=16, depth=2, emb_dim=8, noise_channels=8,
                          num_classes=num_classes)
  rs = np.random.RandomState(3)
  params = jax.tree.map(lambda leaf: jnp.asarray(0.5 * rs.randn(*leaf.shape), leaf.dtype),
                        jax.eval_shape(backbone.init, jax.random.key(3)))
  return backbone, params, Preconditioning(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


@pytest.mark.parametrize("solver_name, num_classes", [("ipndm", 0), ("heun", 3)])
def test_an_untrained_phi_is_the_global_schedule(solver_name, num_classes):
  """phi's zero head gives every sample the base logits (each row the EDM schedule), no shift and unit scale, and
  the same samples as the plain solver on the EDM schedule."""
  backbone, params, precond = tiny_teacher(num_classes)
  solver = get_solver(solver_name)
  nfe = 3
  num_steps = solver.num_steps_for_nfe(nfe)
  edm = np.asarray(get_schedule("edm", num_steps, SIGMA_MIN, SIGMA_MAX, rho=7.0))
  cell = harness.Cell(solver_name, nfe, solver, edm)
  predictor = build_predictor(INDISSettings(hidden=8, depth=2), cell, num_classes, SIGMA_MAX)
  x_T = SIGMA_MAX * jax.random.normal(jax.random.key(0), (6, 2))
  label = jnp.arange(6) % 3 if num_classes else None
  phi_params = predictor.init(jax.random.key(1), x_T, label)["params"]
  out = predictor.apply({"params": phi_params}, x_T, label)
  assert set(out) == {"logits", "shift", "scale"} and out["shift"].shape == out["scale"].shape == (6, nfe)
  np.testing.assert_array_equal(np.asarray(out["shift"]), 0.0)
  np.testing.assert_array_equal(np.asarray(out["scale"]), 1.0)
  sigmas = np.asarray(ls.sigmas_from_logits(out["logits"], SIGMA_MIN, SIGMA_MAX))
  np.testing.assert_allclose(sigmas, np.broadcast_to(edm, sigmas.shape), rtol=2e-6)
  sample = jax.jit(make_instance_sampler(predictor, solver, backbone, precond, SIGMA_MIN, SIGMA_MAX,
                                         ls.DEFAULT_MIN_FRACTION))
  base = jax.jit(lambda x, y: mteo.student_sample(solver, backbone, params, precond, None, x, jnp.asarray(edm), y))(
      x_T, label)
  np.testing.assert_allclose(np.asarray(sample(phi_params, params, x_T, label)), np.asarray(base), rtol=1e-4,
                             atol=1e-4)
  with pytest.raises(ValueError, match="class-conditional" if num_classes else "unconditional"):
    predictor.apply({"params": phi_params}, x_T, None if num_classes else jnp.zeros(6, jnp.int32))


def test_the_time_shift_and_the_output_scale_mean_what_they_say():
  """A shift tells the network ``sigma exp(shift)`` while the solver and preconditioning keep ``sigma``; a scale
  multiplies the denoiser's output; per-sample rows equal to a shared value give the shared result."""
  backbone, params, precond = tiny_teacher()
  solver = get_solver("ipndm")
  sigmas = jnp.asarray(get_schedule("edm", 3, SIGMA_MIN, SIGMA_MAX, rho=7.0))
  x_T = SIGMA_MAX * jax.random.normal(jax.random.key(0), (5, 2))
  shift, scale = jnp.asarray([0.3, -0.2, 0.1]), jnp.asarray([1.05, 0.9, 1.1])
  denoiser = mteo.make_denoiser(backbone, params, precond)

  def told(x, sigma):  # the network told the shifted level: the shift of each call found from its sigma
    index = jnp.argmin(jnp.abs(solver.eval_sigmas(sigmas) - sigma))
    temb = backbone.time_embedding(params, precond.c_noise(sigma * jnp.exp(shift[index])))
    return scale[index] * denoiser(x, sigma, temb=temb)

  expected = jax.jit(lambda x: solver.sample(told, x, sigmas))(x_T)
  run = jax.jit(functools.partial(ls.schedule_sample, solver, backbone, params, precond))
  got = run(x_T, sigmas, shift=shift, scale=scale)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
  per_sample = run(x_T, jnp.tile(sigmas, (5, 1)), shift=jnp.tile(shift, (5, 1)), scale=jnp.tile(scale, (5, 1)))
  np.testing.assert_allclose(np.asarray(per_sample), np.asarray(got), rtol=1e-5, atol=1e-5)
  plain = run(x_T, sigmas)
  assert np.max(np.abs(np.asarray(plain) - np.asarray(got))) > 1e-3  # both options change the result
  with pytest.raises(ValueError, match=r"shift must be \[nfe\]"):
    ls.schedule_sample(solver, backbone, params, precond, x_T, sigmas, shift=jnp.zeros(4))
  with pytest.raises(ValueError, match=r"scale must be \[nfe\]"):
    ls.schedule_sample(solver, backbone, params, precond, x_T, sigmas, scale=jnp.ones((4, 3)))


# --- gradients ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingBackbone:
  """A float64 stand-in for a backbone's time embedding: ``{"a": [B, 3] cos, "b": [B, 3] sin}`` of ``c_noise``."""

  def time_embedding(self, params, c_noise):
    del params
    angles = jnp.asarray(c_noise)[:, None] * jnp.asarray([0.5, 1.0, 2.0], jnp.float64)
    return {"a": jnp.cos(angles), "b": jnp.sin(angles)}


def mixture_teacher():
  """A closed-form mixture denoiser whose output is modulated by a time embedding (float64): ``(D, embed)``."""
  mixture = closed_form.random_mixture(3, num_components=4, dim=2, spread=1.5, std=0.3, dtype=jnp.float64)
  precond = Preconditioning(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
  embed = EmbeddingBackbone()

  def denoiser(x, sigma, temb=None):
    temb = embed.time_embedding(None, jnp.atleast_1d(precond.c_noise(sigma))) if temb is None else temb
    gain = 1.0 + 0.2 * jnp.tanh(temb["a"] @ jnp.asarray([0.3, -0.2, 0.5]) + temb["b"] @ jnp.asarray([0.4, 0.1, -0.3]))
    return broadcast_to_batch(jnp.broadcast_to(gain, x.shape[:1]), x) * mixture.denoise(x, sigma)

  return denoiser, embed, precond


def central_difference(f, x, direction, h=1e-5):
  return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("solver_name", ["ipndm"])
def test_gradients_to_the_logits_and_to_phi_match_finite_differences(solver_name):
  """float64, a closed-form teacher: d loss / d (logits, shift) of a global schedule (LD3), and d loss / d phi's head
  (per-sample logits, shift and scale: INDIS), against central differences."""
  with jax.enable_x64(True):
    denoiser, embed, precond = mixture_teacher()
    solver = get_solver(solver_name)
    nfe, batch = 3, 4
    x_T = SIGMA_MAX * jax.random.normal(jax.random.key(0), (batch, 2), jnp.float64)
    target = jax.random.normal(jax.random.key(1), (batch, 2), jnp.float64)
    edm = get_schedule("edm", 3, jnp.float64(SIGMA_MIN), jnp.float64(SIGMA_MAX), rho=7.0)

    def global_loss(theta):
      sigmas = ls.sigmas_from_logits(theta[:3], SIGMA_MIN, SIGMA_MAX)
      table = ls.shift_table(embed, None, precond, solver.eval_sigmas(sigmas), ls.bounded(theta[3:], 0.5))
      return ls.l2_loss(ls.sample_with_schedule(solver, denoiser, x_T, sigmas, temb_table=table), target)

    value_and_grad = jax.jit(jax.value_and_grad(global_loss))  # one program for the gradient and the differences
    theta = jnp.concatenate([ls.logits_from_sigmas(edm) + 0.3 * jax.random.normal(jax.random.key(2), (3,)),
                             0.5 * jax.random.normal(jax.random.key(3), (nfe,))])
    grad = np.asarray(value_and_grad(theta)[1])
    numeric = [float(central_difference(lambda t: value_and_grad(t)[0], theta, jnp.eye(6)[i])) for i in range(6)]
    assert np.max(np.abs(grad)) > 1e-4
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)

    predictor = ls.SchedulePredictor(base_logits=tuple(float(v) for v in ls.logits_from_sigmas(edm)), nfe=nfe,
                                     hidden=8, depth=1, input_scale=1.0 / SIGMA_MAX, predict_shift=True,
                                     predict_scale=True)
    phi_params = jax.tree.map(lambda p: p.astype(jnp.float64), predictor.init(jax.random.key(4), x_T)["params"])
    kernel0 = 0.3 * jax.random.normal(jax.random.key(5), phi_params["head"]["kernel"].shape, jnp.float64)

    def phi_loss(kernel):
      out = predictor.apply({"params": {**phi_params, "head": {**phi_params["head"], "kernel": kernel}}}, x_T)
      sigmas = ls.sigmas_from_logits(out["logits"], SIGMA_MIN, SIGMA_MAX)
      assert sigmas.shape == (batch, 4)
      table = ls.shift_table(embed, None, precond, solver.eval_sigmas(sigmas), out["shift"])
      x = ls.sample_with_schedule(solver, denoiser, x_T, sigmas, temb_table=table, scale=out["scale"])
      return ls.l2_loss(x, target)

    value_and_grad = jax.jit(jax.value_and_grad(phi_loss))
    grad = value_and_grad(kernel0)[1]
    for seed in range(3):
      direction = jax.random.normal(jax.random.key(10 + seed), kernel0.shape, jnp.float64)
      numeric = central_difference(lambda k: value_and_grad(k)[0], kernel0, direction)
      np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=1e-6)


# --- the methods on the harness -------------------------------------------------------------------------------------

LD3_SETTINGS = LD3Settings(steps=40, eval_every=10, log_every=10, checkpoint_every=40, progress=False)
INDIS_SETTINGS = INDISSettings(steps=40, batch_size=32, hidden=32, log_every=10, checkpoint_every=40,
                               progress=False)


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
  """The shipped GMM teacher, one cell (Euler, NFE 3), the plain solver, LD3 and INDIS fitted and scored."""
  workdir = tmp_path_factory.mktemp("learned")
  config = harness.HarnessConfig(num_train=128, num_eval=128, teacher_steps=5, progress=False)
  h = harness.Harness(Teacher.load("pretrained:gmm"), workdir, config)
  cell = h.cells(("euler",), nfes=(3,))[0]
  artefacts, rows = {}, {}
  for method in (BaseSolver(), LD3(LD3_SETTINGS), INDIS(INDIS_SETTINGS)):
    artefacts[method.name] = method.fit(h, cell)
    rows[method.name] = h.score(method.name, cell.solver_name, cell.nfe, method.sampler(artefacts[method.name]))[0]
  return h, cell, artefacts, rows


def test_ld3_and_indis_beat_the_base_solver(gmm_run):
  """Both learned schedules beat the plain Euler solver's held-out RMSE on the GMM teacher at NFE 3; INDIS's grids
  differ between samples; LD3 keeps the parameters of its best validation loss."""
  h, cell, artefacts, rows = gmm_run
  assert rows["ld3"]["rmse"] < 0.9 * rows["base"]["rmse"], rows
  assert rows["indis"]["rmse"] < 0.9 * rows["base"]["rmse"], rows
  val = artefacts["ld3"].curves["val_curve"]
  assert val["step"][0] == 0 and val["step"][-1] == LD3_SETTINGS.steps
  assert artefacts["ld3"].curves["schedule"]["best_step"] == val["step"][int(np.argmin(val["val_loss"]))]
  learned = np.asarray(artefacts["ld3"].curves["schedule"]["sigmas"])
  assert learned[0] == cell.sigmas[0] and learned[-1] == cell.sigmas[-1] and np.all(np.diff(learned) < 0)
  phi_params, _ = artefacts["indis"].payload
  predictor, _, _ = load_predictor(artefacts["indis"].path, h.teacher, solver_name="euler", nfe=3)
  out = predictor.apply({"params": phi_params}, jnp.asarray(h.x_T_eval[:16]))
  sigmas = np.asarray(ls.sigmas_from_logits(out["logits"], cell.sigmas[-1], cell.sigmas[0]))
  assert np.all(np.std(np.log(sigmas[:, 1:-1]), axis=0) > 1e-4)


def test_finished_runs_reload_and_mismatched_artefacts_are_refused(gmm_run):
  """A second fit in the same workdir returns the finished runs without training (same time, parameters and curves,
  no new metrics); saved artefacts reload for their own teacher, solver and NFE and are refused for any other."""
  h, cell, artefacts, _ = gmm_run
  for method in (LD3(LD3_SETTINGS), INDIS(INDIS_SETTINGS)):
    metrics = (h.run_dir(method.name, cell) / "metrics.jsonl").read_text()
    again = method.fit(h, cell)
    assert again.train_seconds == artefacts[method.name].train_seconds > 0
    assert (h.run_dir(method.name, cell) / "metrics.jsonl").read_text() == metrics
    assert again.curves == artefacts[method.name].curves
    jax.tree.map(np.testing.assert_array_equal, again.payload[0], artefacts[method.name].payload[0])
  # The saved artefacts are what is sampled with.
  saved = load_schedule(artefacts["ld3"].path, h.teacher, solver_name="euler", nfe=3)
  trainable = artefacts["ld3"].payload[0]
  np.testing.assert_array_equal(saved["logits"], trainable["logits"])
  np.testing.assert_array_equal(saved["sigmas"], ls.sigmas_from_logits(trainable["logits"], cell.sigmas[-1],
                                                                       cell.sigmas[0]))
  np.testing.assert_array_equal(saved["shift"], ls.bounded(trainable["shift"], LD3_SETTINGS.shift_bound))
  _, phi_params, _ = load_predictor(artefacts["indis"].path, h.teacher, solver_name="euler", nfe=3)
  jax.tree.map(np.testing.assert_array_equal, phi_params, artefacts["indis"].payload[0])
  assert saved["metadata"]["teacher"] == h.teacher.identity and saved["metadata"]["best_step"] == \
      artefacts["ld3"].curves["schedule"]["best_step"]
  for kwargs, what in (({"solver_name": "ipndm", "nfe": 3}, "solver"), ({"solver_name": "euler", "nfe": 4}, "nfe")):
    with pytest.raises(ValueError, match=f"belongs to another run: {what}"):
      load_schedule(artefacts["ld3"].path, h.teacher, **kwargs)
    with pytest.raises(ValueError, match=f"belongs to another run: {what}"):
      load_predictor(artefacts["indis"].path, h.teacher, **kwargs)
  with pytest.raises(ValueError, match="teacher: .* -> .another teacher."):
    load_schedule(artefacts["ld3"].path, types.SimpleNamespace(identity="another teacher"), solver_name="euler",
                  nfe=3)
  with pytest.raises(ValueError, match="method: 'ld3' -> 'indis'"):
    load_predictor(artefacts["ld3"].path, h.teacher, solver_name="euler", nfe=3)
  # Training again in the same run directory with other settings is refused, naming what differs.
  with pytest.raises(loop.ResumeMismatchError, match="shift_bound"):
    LD3(dataclasses.replace(LD3_SETTINGS, shift_bound=0.25)).fit(h, cell)
