"""Solvers: convergence orders on a closed-form Gaussian, NFE bookkeeping, the MTEO table hook, gradients, jit, remat.

Numerical tests run in float64 (``jax.enable_x64``). The expected global orders are those of the solvers *as
implemented*, warm-up and final-step handling included (see ``GLOBAL_ORDER``); the nominal order of every multistep
update is pinned separately by a local-error test with exact history.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import closed_form
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import get_backbone, make_denoiser
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import (SOLVERS, DPMSolverPP, Euler, UniPC, deis_coefficients, deis_update, dpmpp_update,
                              get_solver, ipndm_update, phi, solver_options, unic_update, unip_update)

# (name, options) -> global order of convergence as implemented, with the reason when it is below the nominal order.
GLOBAL_ORDER = {
    ("euler", ()): 1,
    ("heun", ()): 2,  # the final Euler step (EDM) has local error O(h^2): still order 2
    ("dpmpp_2m", ()): 2,
    # The reference 3M update has local error O(h^3) (see DPMSolverPP), and the DDIM first step alone leaves O(h^2).
    ("dpmpp_3m", ()): 2,
    ("dpmpp_3m", (("taylor_third_order", True),)): 2,  # local O(h^4) steps, but the DDIM first step leaves O(h^2)
    ("unipc", (("order", 1),)): 2,  # UniP-1 + UniC-1 is second order; the uncorrected last step is O(h^2) locally
    # lower_order_final (default): the last step is an uncorrected UniP-1 step, local O(h^2) -> order 2.
    ("unipc", (("order", 2),)): 2,
    ("unipc", (("order", 3),)): 2,
    ("unipc", (("order", 2), ("lower_order_final", False))): 3,
    # UniP-3 + UniC-3 is fourth order, but the UniP-1 + UniC-1 first step leaves O(h^3).
    ("unipc", (("order", 3), ("lower_order_final", False))): 3,
    ("ipndm", (("order", 1),)): 1,
    ("ipndm", (("order", 2),)): 2,
    # Equal-step Adams-Bashforth weights on a non-uniform sigma grid, and the Euler first step: O(h^2).
    ("ipndm", (("order", 3),)): 2,
    ("ipndm", (("order", 4),)): 2,
    ("deis", (("order", 1),)): 1,
    ("deis", (("order", 2),)): 2,
    ("deis", (("order", 3),)): 2,  # the Euler first step leaves O(h^2)
}
CONFIGS = sorted(GLOBAL_ORDER)
DEFAULTS = [(name, ()) for name in SOLVERS.names()]


def make(config, **extra):
  name, options = config
  return get_solver(name, **dict(options), **extra)


def config_id(config):
  name, options = config
  return name + "".join(f"-{k}={v}" for k, v in options)


def gaussian(dtype=jnp.float64):
  """A non-trivial Gaussian: three dimensions with different stds and a nonzero mean."""
  return closed_form.Gaussian(jnp.asarray([0.5, -1.0, 0.25], dtype), jnp.asarray([0.3, 1.0, 2.0], dtype))


@functools.lru_cache(maxsize=None)
def jitted_denoise():
  """``gaussian().denoise`` as one compiled program (call inside ``jax.enable_x64``), shared by the eager runs."""
  return jax.jit(gaussian().denoise)


@functools.lru_cache(maxsize=None)
def modulated_teacher():
  """``ModulatedGaussian(gaussian())`` and its jitted call (call inside ``jax.enable_x64``)."""
  teacher = ModulatedGaussian(gaussian())
  return teacher, jax.jit(teacher)


def noise(shape, sigma, seed=0, dtype=jnp.float64):
  return sigma * jax.random.normal(jax.random.key(seed), shape, dtype)


# Every test below that runs a solver uses states of this shape in float64: the solvers' update functions are jitted
# per (order, shape, dtype), so sharing one shape lets the tests share those compilations.
SHAPE = (8, 3)


# --- registry and construction ----------------------------------------------------------------------------------------

def test_registry_covers_every_solver_and_config():
  assert SOLVERS.names() == ["deis", "dpmpp_2m", "dpmpp_3m", "euler", "heun", "ipndm", "unipc"]
  assert {name for name, _ in CONFIGS} == set(SOLVERS.names())
  orders = {name: sorted({make((name, opts)).order for n, opts in CONFIGS if n == name}) for name in SOLVERS.names()}
  assert orders == {"deis": [1, 2, 3], "dpmpp_2m": [2], "dpmpp_3m": [3], "euler": [1], "heun": [2],
                    "ipndm": [1, 2, 3, 4], "unipc": [1, 2, 3]}
  for name in SOLVERS.names():
    assert get_solver(name).name == name


def test_construction_errors():
  with pytest.raises(KeyError, match="unknown solver 'rk4'.*'dpmpp_2m'"):
    get_solver("rk4")
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['order'\] for solver 'dpmpp_2m'; valid options"):
    get_solver("dpmpp_2m", order=3)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['lower_order_final'\] for solver 'ipndm'"):
    get_solver("ipndm", lower_order_final=False)
  for name, bad in (("unipc", 4), ("unipc", 0), ("ipndm", 5), ("deis", 4), ("deis", 2.0), ("ipndm", True)):
    with pytest.raises(ValueError, match=f"{name}: order must be one of"):
      get_solver(name, order=bad)
  with pytest.raises(TypeError, match="lower_order_final must be True or False"):
    get_solver("dpmpp_3m", lower_order_final=1)
  with pytest.raises(TypeError, match="remat must be True or False"):
    get_solver("euler", remat="yes")
  with pytest.raises(ValueError, match="taylor_third_order changes only the third-order update"):
    DPMSolverPP(order=2, taylor_third_order=True)
  with pytest.raises(ValueError, match="beta_d must be a finite number > 0"):
    get_solver("deis", beta_d=0.0)
  assert solver_options("dpmpp_3m") == {"lower_order_final": True, "taylor_third_order": False, "remat": False}
  with pytest.raises(dataclasses.FrozenInstanceError):
    get_solver("euler").remat = True


# --- NFE bookkeeping --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SOLVERS.names())
def test_nfe_and_its_inverse(name):
  solver = get_solver(name)
  for n in range(1, 8):
    expected = 2 * n - 1 if name == "heun" else n
    assert solver.nfe(n) == expected
    assert solver.num_steps_for_nfe(expected) == n
  with pytest.raises(ValueError, match="num_steps must be >= 1"):
    solver.nfe(0)
  with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
    solver.num_steps_for_nfe(0)


def test_heun_even_nfe_is_unreachable():
  with pytest.raises(ValueError, match=r"'heun' cannot make exactly 4 network evaluations; nearest reachable NFE: "
                                       r"3 \(N=2\) or 5 \(N=3\)"):
    get_solver("heun").num_steps_for_nfe(4)


@pytest.mark.parametrize("config", DEFAULTS + [("unipc", (("order", 3), ("lower_order_final", False)))], ids=config_id)
@pytest.mark.parametrize("num_steps", [1, 5])
def test_nfe_counts_actual_calls_and_eval_sigmas(config, num_steps):
  with jax.enable_x64(True):
    solver, denoise = make(config), jitted_denoise()
    sigmas = get_schedule("edm", num_steps, 0.002, 80.0)
    calls = []

    def counting_denoiser(x, sigma, temb=None):
      calls.append((float(sigma), None if temb is None else int(temb["row"])))
      return denoise(x, sigma)

    x_T = noise(SHAPE, 80.0)
    solver.sample(counting_denoiser, x_T, sigmas)
    nfe = solver.nfe(num_steps)
    assert len(calls) == nfe == solver.eval_sigmas(sigmas).shape[0]
    np.testing.assert_array_equal([c[0] for c in calls], solver.eval_sigmas(sigmas))
    # With a table, call i receives row i.
    calls.clear()
    solver.sample(counting_denoiser, x_T, sigmas, temb_table={"row": jnp.arange(nfe)})
    assert [c[1] for c in calls] == list(range(nfe))


def test_heun_eval_sigmas():
  sigmas = jnp.asarray([4.0, 2.0, 1.0, 0.5])
  np.testing.assert_array_equal(get_solver("heun").eval_sigmas(sigmas), [4.0, 2.0, 2.0, 1.0, 1.0])
  np.testing.assert_array_equal(get_solver("dpmpp_2m").eval_sigmas(sigmas), [4.0, 2.0, 1.0])


# --- maths: identities, local and global orders -----------------------------------------------------------------------

@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_one_step_is_ddim(config):
  """With one step every solver is DDIM: ``x_1 = (s1/s0) x_0 + (1 - s1/s0) D(x_0, s0)``."""
  with jax.enable_x64(True):
    gauss, sigmas = gaussian(), jnp.asarray([3.0, 0.7])
    x_T = noise(SHAPE, 3.0)
    expected = (0.7 / 3.0) * x_T + (1 - 0.7 / 3.0) * gauss.denoise(x_T, 3.0)
    np.testing.assert_allclose(make(config).sample(jitted_denoise(), x_T, sigmas), expected, rtol=1e-13, atol=1e-13)


def test_phi_functions():
  with jax.enable_x64(True):
    for z in (-3.0, -1.0, -0.999, -0.3, -1e-3, 1e-8, 0.5, 2.0):
      zz = np.float64(z)
      closed = {1: np.expm1(zz) / zz, 2: (np.expm1(zz) - zz) / zz ** 2,
                3: (np.expm1(zz) - zz - zz ** 2 / 2) / zz ** 3}
      for k in (1, 2, 3):
        # the closed forms themselves lose digits near 0, so compare there with the series' leading terms
        want = closed[k] if abs(z) > 0.05 else sum(zz ** n / math.factorial(n + k) for n in range(8))
        np.testing.assert_allclose(phi(k, jnp.asarray(z)), want, rtol=1e-12)
    # continuous across the switch between series and recursion, and finite gradients at 0
    np.testing.assert_allclose(phi(3, jnp.asarray(-1.0 + 1e-12)), phi(3, jnp.asarray(-1.0 - 1e-12)), rtol=1e-10)
    assert np.isfinite(jax.grad(lambda z: phi(2, z))(0.0))


def _local_slope(update, grid):
  """Log-log slope of the one-step error of ``update`` against the step size, from exact history."""
  errors, hs = [], [0.05, 0.025, 0.0125]
  for h in hs:
    sigmas_all = grid(h)          # [sigma_next, sigma_0, sigma_{-1}, ...]
    gauss = gaussian()
    x_ref = noise(SHAPE, 3.0, seed=11)
    sig = [jnp.asarray(s) for s in sigmas_all]
    exact = [gauss.ode_solution(x_ref, 3.0, s) for s in sig]
    x0s = [gauss.denoise(x, s) for x, s in zip(exact, sig)]
    out = update(gauss, sig[0], sig[1:], exact[1:], x0s[1:])
    errors.append(float(jnp.max(jnp.abs(out - exact[0]))))
  return np.polyfit(np.log(hs), np.log(errors), 1)[0]


def _lambda_grid(h):
  """Uniform in lambda = -log sigma around sigma = 1 (one step ahead, three behind)."""
  return [np.exp(-h)] + [np.exp(k * h) for k in range(4)]


def _sigma_grid(h):
  """Uniform in sigma around sigma = 1."""
  return [1.0 - h] + [1.0 + k * h for k in range(4)]


@pytest.mark.parametrize("kind, order, grid, local_order", [
    ("dpmpp", 1, _lambda_grid, 2), ("dpmpp", 2, _lambda_grid, 3), ("dpmpp", 3, _lambda_grid, 3),
    ("dpmpp_taylor", 3, _lambda_grid, 4),
    ("unip", 1, _lambda_grid, 2), ("unip", 2, _lambda_grid, 3), ("unip", 3, _lambda_grid, 4),
    ("unic", 1, _lambda_grid, 3), ("unic", 2, _lambda_grid, 4), ("unic", 3, _lambda_grid, 5),
    ("ipndm", 1, _sigma_grid, 2), ("ipndm", 2, _sigma_grid, 3), ("ipndm", 3, _sigma_grid, 4),
    ("ipndm", 4, _sigma_grid, 5), ("ipndm", 3, _lambda_grid, 3), ("ipndm", 4, _lambda_grid, 3),
    ("deis", 1, _lambda_grid, 2), ("deis", 2, _lambda_grid, 3), ("deis", 3, _lambda_grid, 4),
    ("deis", 3, _sigma_grid, 4),
])
def test_local_order_with_exact_history(kind, order, grid, local_order):
  """One update from exact history has error O(h^(p+1)) for a p-th order method.

  Pins the nominal order of each multistep update: the reference DPM-Solver++ 3M update is only locally third order
  (its Taylor-consistent variant is fourth); UniC-p adds one order to UniP-p; iPNDM's equal-step weights are of
  nominal order on a uniform sigma grid but only locally third order on a geometric one; DEIS-tAB is of nominal order
  on any grid.
  """
  with jax.enable_x64(True):
    def update(gauss, sigma_next, sigmas, states, x0s):
      eps = [(x - m) / s for x, m, s in zip(states, x0s, sigmas)]
      if kind in ("dpmpp", "dpmpp_taylor"):
        return dpmpp_update(states[0], sigma_next, sigmas[:order], x0s[:order], order, kind == "dpmpp_taylor")
      if kind == "unip":
        return unip_update(states[0], sigma_next, sigmas[:order], x0s[:order], order)
      if kind == "unic":
        predicted = unip_update(states[0], sigma_next, sigmas[:order], x0s[:order], order)
        return unic_update(states[0], sigma_next, sigmas[:order], x0s[:order], gauss.denoise(predicted, sigma_next),
                           order)
      if kind == "ipndm":
        return ipndm_update(states[0], sigmas[0], sigma_next, eps[:order], order)
      return deis_update(states[0], sigma_next, sigmas[:order], eps[:order], order)

    slope = _local_slope(update, grid)
    assert abs(slope - local_order) < 0.2, f"local order {slope:.2f}, expected {local_order}"


def test_update_identities():
  """UniP-2 is DPM-Solver++(2M); the Taylor-consistent 3M update is UniP-3; DEIS weights integrate 1 exactly."""
  with jax.enable_x64(True):
    sigmas = [jnp.asarray(s) for s in (1.0, 1.7, 2.5)]
    x0s = [noise(SHAPE, 1.0, seed=s) for s in range(3)]
    x, sigma_next = noise(SHAPE, 1.0, seed=7), jnp.asarray(0.4)
    np.testing.assert_allclose(unip_update(x, sigma_next, sigmas[:2], x0s[:2], 2),
                               dpmpp_update(x, sigma_next, sigmas[:2], x0s[:2], 2), rtol=1e-13)
    np.testing.assert_allclose(unip_update(x, sigma_next, sigmas, x0s, 3),
                               dpmpp_update(x, sigma_next, sigmas, x0s, 3, True), rtol=1e-12)
    assert not np.allclose(dpmpp_update(x, sigma_next, sigmas, x0s, 3, False),
                           dpmpp_update(x, sigma_next, sigmas, x0s, 3, True))
    for s_next, hist in ((0.4, sigmas), (0.002, [jnp.asarray(s) for s in (0.5, 3.0, 80.0)])):
      coefficients = deis_coefficients(jnp.asarray(s_next), hist, 3)
      np.testing.assert_allclose(sum(coefficients), s_next - float(hist[0]), rtol=1e-13)


def test_deis_quadrature_matches_adaptive_quadrature():
  scipy_integrate = pytest.importorskip("scipy.integrate")
  from mteo_jax.diffusion import vp_sigma_to_t
  with jax.enable_x64(True):
    hist = [0.5, 3.0, 80.0]  # a wide, few-step final interval down to 0.002: the hardest case for a fixed rule
    t_nodes = [float(vp_sigma_to_t(s)) for s in hist]
    coefficients = deis_coefficients(jnp.asarray(0.002), [jnp.asarray(s) for s in hist], 3)
    for j in range(3):
      def basis(sigma, j=j):
        t = float(vp_sigma_to_t(sigma))
        return np.prod([(t - t_nodes[k]) / (t_nodes[j] - t_nodes[k]) for k in range(3) if k != j])
      want = -scipy_integrate.quad(basis, 0.002, 0.5, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
      np.testing.assert_allclose(coefficients[j], want, rtol=1e-10)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_global_order_of_convergence(config):
  """Error at sigma_min against the exact Gaussian flow: the log-log slope is the global order as implemented.

  logSNR-uniform steps over [0.1, 2]: a range where the Gaussian's trajectory is curved throughout, so the warm-up
  and final steps weigh in early and N = 96..192 is asymptotic for every configuration (the slowest to settle is
  UniPC-3 with its first-order last step: 2.7, 2.4, 2.2 from N = 24 to 192 on its way to 2). Over the wide EDM range
  [0.002, 80] the first steps are nearly exact (the flow is almost linear at high noise) and the capped orders only
  show at far larger N.
  """
  with jax.enable_x64(True):
    gauss, denoise = gaussian(), jitted_denoise()
    x_T = gauss.mean + jnp.sqrt(gauss.std ** 2 + 4.0) * noise(SHAPE, 1.0)
    solver, errors, steps = make(config), [], (48, 96, 192)
    for num_steps in steps:
      sigmas = get_schedule("logsnr_uniform", num_steps, 0.1, 2.0)
      x = solver.sample(denoise, x_T, sigmas)
      errors.append(float(jnp.sqrt(jnp.mean((x - gauss.ode_solution(x_T, 2.0, 0.1)) ** 2))))
    slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
    assert np.all(slopes > 0.8), f"not converging: errors {errors}"
    assert abs(slopes[-1] - GLOBAL_ORDER[config]) < 0.25, (
        f"measured order {slopes[-1]:.2f} (slopes {np.round(slopes, 2)}), expected {GLOBAL_ORDER[config]}")


def test_gaussian_mixture_sanity():
  """On a non-Gaussian teacher every solver approaches the same limit as N grows.

  The reference is Heun with 1024 steps (global error ~1e-6 here, far below the tolerances); the adaptive diffrax
  reference solver is tested against closed forms in its own module.
  """
  with jax.enable_x64(True):
    mixture = closed_form.random_mixture(3, num_components=4, dim=SHAPE[1], spread=1.5, std=0.3, dtype=jnp.float64)
    denoise = jax.jit(mixture.denoise)
    x_T = noise(SHAPE, 80.0, seed=5)
    ref = get_solver("heun").sample(denoise, x_T, get_schedule("edm", 1024, 0.002, 80.0))
    for config in DEFAULTS:
      errors = []
      for num_steps in (8, 32):
        x = make(config).sample(denoise, x_T, get_schedule("edm", num_steps, 0.002, 80.0))
        errors.append(float(jnp.sqrt(jnp.mean((x - ref) ** 2))))
      assert errors[1] < 0.3 * errors[0], (config, errors)
      assert errors[1] < (0.1 if make(config).order == 1 else 0.02), (config, errors)


# --- the MTEO hook: temb_table ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so that the instance itself can be jitted
class ModulatedGaussian:
  """A cheap teacher that uses a time embedding: the Gaussian's denoiser with its shrinkage modulated by two leaves.

  ``D = mu + (1 + 0.2 tanh(<w_a, temb_a> + <w_b, temb_b>)) s^2 / (s^2 + sigma^2) (x - mu)``; by default ``temb`` is
  the "pretrained" embedding ``[cos(f log sigma)], [sin(f log sigma)]``. A handful of operations, so gradients through
  every solver compile quickly; the MLP teacher below checks the real backbone path.
  """
  gauss: closed_form.Gaussian

  def embed(self, sigma):
    angles = jnp.log(sigma)[..., None] * jnp.asarray([0.5, 1.0, 2.0, 3.0], jnp.result_type(sigma))
    return {"a": jnp.cos(angles), "b": jnp.sin(angles)}

  def __call__(self, x, sigma, temb=None):
    temb = self.embed(sigma) if temb is None else temb
    gain = 1.0 + 0.2 * jnp.tanh(temb["a"] @ jnp.asarray([0.3, -0.2, 0.5, 0.1]) + temb["b"] @ jnp.asarray(
        [0.4, 0.1, -0.3, 0.2]))
    s2 = self.gauss.std ** 2
    return self.gauss.mean + gain * s2 / (s2 + sigma ** 2) * (x - self.gauss.mean)


@functools.lru_cache(maxsize=None)
def _mlp():
  """A tiny MLP teacher in float64 (call inside ``jax.enable_x64``): backbone, pretrained embedding, denoiser."""
  backbone = get_backbone("mlp", SHAPE[1:], data_dim=SHAPE[1], width=16, depth=2, emb_dim=8, noise_channels=8)
  # init under jit: one compilation instead of one per primitive of an eager Flax init
  params = jax.jit(lambda key: jax.tree.map(lambda p: p.astype(jnp.float64), backbone.init(key)))(jax.random.key(0))
  precond = Preconditioning("edm")
  # jitted once here: one compiled program per call signature, shared by every test
  embed = jax.jit(lambda sigmas: backbone.time_embedding(params, precond.c_noise(sigmas)))
  return backbone, embed, jax.jit(make_denoiser(backbone, params, precond))


def _pretrained_table(solver, sigmas):
  """MTEO's initial table: row i is the pretrained time embedding at the noise level of network evaluation i."""
  _, embed, _ = _mlp()
  return embed(solver.eval_sigmas(sigmas))


@pytest.mark.parametrize("config", DEFAULTS, ids=config_id)
def test_pretrained_table_reproduces_the_base_solver(config):
  with jax.enable_x64(True):
    backbone, _, denoiser = _mlp()
    solver = make(config)
    sigmas = get_schedule("edm", 4, 0.002, 80.0)
    x_T = noise(SHAPE, 80.0, seed=1)
    table = _pretrained_table(solver, sigmas)
    assert set(table) == set(backbone.layer_names)
    assert all(leaf.shape == (solver.nfe(4), backbone.emb_dim) for leaf in table.values())
    plain = solver.sample(denoiser, x_T, sigmas)
    # Equal up to round-off, not bit for bit: the table is the time MLP applied to a batch of nfe noise levels, the
    # denoiser applies it to a batch of 8 copies of one level, and XLA's CPU matmul may sum in a different order for
    # different batch sizes (a last-ulp difference, seen in float32 as 6e-8 on outputs of size 0.4).
    np.testing.assert_allclose(solver.sample(denoiser, x_T, sigmas, temb_table=table), plain, rtol=1e-12, atol=1e-12)
    # With elementwise embeddings (no matmul over the batch) it does hold bit for bit.
    teacher, call = modulated_teacher()
    np.testing.assert_array_equal(
        solver.sample(call, x_T, sigmas, temb_table=teacher.embed(solver.eval_sigmas(sigmas))),
        solver.sample(call, x_T, sigmas))


def test_table_rows_reach_their_own_evaluation():
  """Changing table row i changes the sample, for every i (Heun: both calls of a step have their own row)."""
  with jax.enable_x64(True):
    teacher, call = modulated_teacher()
    sigmas = get_schedule("edm", 3, 0.002, 80.0)
    x_T = noise(SHAPE, 80.0, seed=1)
    for name in ("heun", "unipc"):
      solver = get_solver(name)
      table = teacher.embed(solver.eval_sigmas(sigmas))
      plain = solver.sample(call, x_T, sigmas, temb_table=table)
      for row in range(solver.nfe(3)):
        moved = jax.tree.map(lambda t: t.at[row].add(0.5), table)
        assert not np.allclose(solver.sample(call, x_T, sigmas, temb_table=moved), plain), (name, row)


@pytest.mark.parametrize("name", SOLVERS.names())
def test_wrong_table_length_raises(name):
  with jax.enable_x64(True):
    _, _, denoiser = _mlp()
    solver = get_solver(name)
    sigmas = get_schedule("edm", 3, 0.002, 80.0)
    nfe = solver.nfe(3)
    short = jax.tree.map(lambda t: t[:-1], _pretrained_table(solver, sigmas))
    with pytest.raises(ValueError, match=rf"temb_table leaf \['block00'\] has leading axis {nfe - 1} .*expected "
                                         rf"leading axis nfe={nfe}"):
      solver.sample(denoiser, noise(SHAPE, 80.0), sigmas, temb_table=short)
    with pytest.raises(ValueError, match="has a scalar; expected leading axis"):
      solver.sample(denoiser, noise(SHAPE, 80.0), sigmas, temb_table={"block00": jnp.float32(1)})


# --- differentiability, jit, trajectories, remat ----------------------------------------------------------------------

def _directional_fd(loss, value, direction, eps):
  plus = jax.tree.map(lambda v, d: v + eps * d, value, direction)
  minus = jax.tree.map(lambda v, d: v - eps * d, value, direction)
  return (loss(plus) - loss(minus)) / (2 * eps)


def _tree_dot(a, b):
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check_gradients(denoiser, solver, table, sigmas, sigma_max):
  """Gradients w.r.t. the table, the sigmas and x_T are finite and match central finite differences."""
  x_T, weights = noise(SHAPE, sigma_max, seed=2), noise(SHAPE, 1.0, seed=3)

  def loss(table, sigmas, x_T):
    return jnp.sum(weights * solver.sample(denoiser, x_T, sigmas, temb_table=table))

  grads = jax.grad(loss, argnums=(0, 1, 2))(table, sigmas, x_T)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads))
  directions = (jax.tree.map(lambda t: noise(t.shape, 1.0, seed=4), table),
                sigmas * noise(sigmas.shape, 1.0, seed=5),  # relative perturbations keep the sigmas decreasing
                noise(SHAPE, 1.0, seed=6))
  args = [table, sigmas, x_T]
  for i, (grad, direction, eps) in enumerate(zip(grads, directions, (1e-6, 1e-7, 1e-5))):
    def along(value, i=i):
      return loss(*(value if j == i else a for j, a in enumerate(args)))
    np.testing.assert_allclose(_tree_dot(grad, direction), _directional_fd(along, args[i], direction, eps),
                               rtol=1e-6, err_msg=f"gradient w.r.t. {['table', 'sigmas', 'x_T'][i]}")


@pytest.mark.parametrize("config", DEFAULTS, ids=config_id)
def test_gradients_match_finite_differences(config):
  with jax.enable_x64(True):
    (teacher, call), solver = modulated_teacher(), make(config)
    sigmas = get_schedule("edm", 5, 0.01, 20.0)
    _check_gradients(call, solver, teacher.embed(solver.eval_sigmas(sigmas)), sigmas, 20.0)


def test_gradients_through_the_mlp_backbone():
  with jax.enable_x64(True):
    _, _, denoiser = _mlp()
    solver, sigmas = get_solver("unipc"), get_schedule("edm", 3, 0.002, 80.0)
    _check_gradients(denoiser, solver, _pretrained_table(solver, sigmas), sigmas, 80.0)


def test_jit_with_traced_sigmas_and_table():
  with jax.enable_x64(True):
    _, _, denoiser = _mlp()
    solver = get_solver("heun")
    sigmas = get_schedule("edm", 3, 0.002, 80.0)
    table, x_T = _pretrained_table(solver, sigmas), noise(SHAPE, 80.0, seed=1)
    run = jax.jit(lambda x, s, t: solver.sample(denoiser, x, s, temb_table=t))
    np.testing.assert_allclose(run(x_T, sigmas, table), solver.sample(denoiser, x_T, sigmas, temb_table=table),
                               rtol=1e-12, atol=1e-12)


def test_jit_every_solver():
  """All solvers in one jitted function (one compilation), with traced sigmas, table and x_T."""
  with jax.enable_x64(True):
    teacher = ModulatedGaussian(gaussian())
    solvers = [get_solver(name) for name in SOLVERS.names()]
    sigmas, x_T = get_schedule("edm", 4, 0.01, 20.0), noise(SHAPE, 20.0, seed=1)
    tables = [teacher.embed(s.eval_sigmas(sigmas)) for s in solvers]
    run = jax.jit(lambda x, sig, tabs: [s.sample(teacher, x, sig, temb_table=t) for s, t in zip(solvers, tabs)])
    for s, jitted, table in zip(solvers, run(x_T, sigmas, tables), tables):
      np.testing.assert_allclose(jitted, s.sample(teacher, x_T, sigmas, temb_table=table), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("config", DEFAULTS, ids=config_id)
def test_return_trajectory(config):
  with jax.enable_x64(True):
    gauss, solver = gaussian(), make(config)
    sigmas = get_schedule("logsnr_uniform", 40, 0.1, 2.0)
    x_T = gauss.mean + jnp.sqrt(gauss.std ** 2 + 4.0) * noise(SHAPE, 1.0)
    x, states = solver.sample(jitted_denoise(), x_T, sigmas, return_trajectory=True)
    assert states.shape == (41,) + SHAPE
    np.testing.assert_array_equal(states[0], x_T)
    np.testing.assert_array_equal(states[-1], x)
    np.testing.assert_array_equal(x, solver.sample(jitted_denoise(), x_T, sigmas))
    # every state is the solver's approximation of the exact flow at its own sigma
    exact = jax.vmap(lambda s: gauss.ode_solution(x_T, 2.0, s))(sigmas)
    tol = 5e-2 if solver.order == 1 else 5e-3
    np.testing.assert_allclose(states, exact, atol=tol)


def test_unipc_trajectory_holds_the_corrected_states():
  with jax.enable_x64(True):
    gauss = gaussian()
    sigmas = get_schedule("logsnr_uniform", 6, 0.1, 2.0)
    x_T = gauss.mean + jnp.sqrt(gauss.std ** 2 + 4.0) * noise(SHAPE, 1.0)
    _, states = UniPC(order=2, lower_order_final=False).sample(gauss.denoise, x_T, sigmas, return_trajectory=True)
    # Rebuild step 1 by hand: predict x_1 from x_0 (UniP-1), correct it with D(x_1) (UniC-1).
    x0_0 = gauss.denoise(x_T, sigmas[0])
    predicted = unip_update(x_T, sigmas[1], [sigmas[0]], [x0_0], 1)
    corrected = unic_update(x_T, sigmas[1], [sigmas[0]], [x0_0], gauss.denoise(predicted, sigmas[1]), 1)
    np.testing.assert_allclose(states[1], corrected, rtol=1e-12)
    assert not np.allclose(states[1], predicted)


REMAT_PRIMITIVES = ("checkpoint", "remat2", "remat")  # the name of jax.checkpoint's primitive varies across versions


@pytest.mark.parametrize("config", DEFAULTS, ids=config_id)
def test_remat_gives_identical_values_and_gradients(config):
  with jax.enable_x64(True):
    teacher, call = modulated_teacher()
    sigmas, x_T = get_schedule("edm", 3, 0.01, 20.0), noise(SHAPE, 20.0, seed=2)
    plain, remat = make(config), make(config, remat=True)
    table = teacher.embed(plain.eval_sigmas(sigmas))

    def loss(solver, **kwargs):
      return lambda table, sigmas: jnp.sum(solver.sample(call, x_T, sigmas, temb_table=table, **kwargs) ** 2)

    values = [jax.value_and_grad(loss(s), argnums=(0, 1))(table, sigmas) for s in (plain, remat)]
    # Identical up to float64 round-off (measured: 1e-14 relative), not bit for bit: a checkpointed step is staged out
    # as one unit, so XLA may fuse (and round) its arithmetic differently from the op-by-op run.
    for a, b in zip(jax.tree.leaves(values[0]), jax.tree.leaves(values[1])):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)

    # remat really wraps the steps (one checkpoint per step), and the call-time flag overrides the solver's
    def checkpoints(solver, **kwargs):
      jaxpr = jax.make_jaxpr(loss(solver, **kwargs))(table, sigmas)
      return sum(eqn.primitive.name in REMAT_PRIMITIVES for eqn in jaxpr.jaxpr.eqns)
    assert checkpoints(remat) == 3 and checkpoints(plain, remat=True) == 3
    assert checkpoints(plain) == 0 and checkpoints(remat, remat=False) == 0


# --- options change behaviour -----------------------------------------------------------------------------------------

def _run(solver, num_steps, seed=0):
  gauss = gaussian()
  x_T = gauss.mean + jnp.sqrt(gauss.std ** 2 + 4.0) * noise(SHAPE, 1.0, seed=seed)
  return solver.sample(jitted_denoise(), x_T, get_schedule("logsnr_uniform", num_steps, 0.1, 2.0))


@pytest.mark.parametrize("order", [2, 3])
def test_dpmpp_lower_order_final(order):
  with jax.enable_x64(True):
    on, off = DPMSolverPP(order=order), DPMSolverPP(order=order, lower_order_final=False)
    assert [on.step_order(i, 5) for i in range(5)] == ([1, 2, 2, 2, 1] if order == 2 else [1, 2, 3, 2, 1])
    assert [off.step_order(i, 5) for i in range(5)] == ([1, 2, 2, 2, 2] if order == 2 else [1, 2, 3, 3, 3])
    assert not np.allclose(_run(on, 5), _run(off, 5))          # fewer than 15 steps: the final steps change
    np.testing.assert_array_equal(_run(on, 15), _run(off, 15))  # 15 or more: identical, as in diffusers


def test_dpmpp_3m_is_2m_up_to_four_steps_with_lower_order_final():
  with jax.enable_x64(True):
    for num_steps in (1, 2, 3, 4):
      np.testing.assert_array_equal(_run(get_solver("dpmpp_3m"), num_steps), _run(get_solver("dpmpp_2m"), num_steps))
    assert not np.allclose(_run(get_solver("dpmpp_3m"), 5), _run(get_solver("dpmpp_2m"), 5))


def test_unipc_lower_order_final_applies_at_any_length():
  with jax.enable_x64(True):
    on, off = UniPC(order=3), UniPC(order=3, lower_order_final=False)
    assert [on.step_order(i, 20) for i in (0, 1, 2, 18, 19)] == [1, 2, 3, 2, 1]
    assert [off.step_order(i, 20) for i in (0, 1, 2, 18, 19)] == [1, 2, 3, 3, 3]
    assert not np.allclose(_run(on, 20), _run(off, 20))


def test_taylor_third_order_changes_dpmpp_3m():
  with jax.enable_x64(True):
    ref, taylor = get_solver("dpmpp_3m"), get_solver("dpmpp_3m", taylor_third_order=True)
    np.testing.assert_array_equal(_run(ref, 4), _run(taylor, 4))  # N = 4 with lower_order_final: never third order
    assert not np.allclose(_run(ref, 6), _run(taylor, 6))


def test_deis_beta_changes_only_higher_orders():
  with jax.enable_x64(True):
    for order in (1, 2, 3):
      a, b = get_solver("deis", order=order), get_solver("deis", order=order, beta_d=5.0, beta_min=1.0)
      same = np.allclose(_run(a, 5), _run(b, 5), rtol=1e-14, atol=0)
      assert same == (order == 1)  # order 1 is DDIM: no extrapolation, so the time variable does not matter


def test_euler_ipndm1_deis1_agree():
  with jax.enable_x64(True):
    reference = _run(Euler(), 7)
    for config in (("ipndm", (("order", 1),)), ("deis", (("order", 1),))):
      np.testing.assert_allclose(_run(make(config), 7), reference, rtol=1e-13)


# --- bad input --------------------------------------------------------------------------------------------------------

def test_bad_sample_arguments():
  gauss, solver = gaussian(jnp.float32), get_solver("dpmpp_2m")
  x_T = noise((2, 3), 80.0, dtype=jnp.float32)  # errors are raised before anything is compiled
  with pytest.raises(ValueError, match=r"strictly decreasing, but sigmas\[1\] = 1.0 <= sigmas\[2\] = 2.0"):
    solver.sample(gauss.denoise, x_T, [80.0, 1.0, 2.0])
  with pytest.raises(ValueError, match="at least 2 noise levels"):
    solver.sample(gauss.denoise, x_T, [80.0])
  with pytest.raises(ValueError, match="must all be > 0"):
    solver.sample(gauss.denoise, x_T, [80.0, 1.0, 0.0])
  with pytest.raises(TypeError, match="x_T must be a floating-point array"):
    solver.sample(gauss.denoise, jnp.zeros((2, 3), jnp.int32), [80.0, 1.0])
  with pytest.raises(ValueError, match=r"denoiser returned shape \(2,\) for an input of shape \(2, 3\)"):
    solver.sample(lambda x, sigma, temb=None: x[:, 0], x_T, [80.0, 1.0])
  with pytest.raises(TypeError, match="remat must be True or False"):
    solver.sample(gauss.denoise, x_T, [80.0, 1.0], remat=1)


# --- low-precision states (the grid and the coefficients stay in float32) -----------------------------------------

@pytest.mark.parametrize("name", SOLVERS.names())
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_state_gives_the_float32_answer(name, dtype):
  """A grid valid in float32 whose last levels collapse in float16 (1e-8 underflows; 1.0/0.999 are one bf16 ulp
  apart) must not reach the step coefficients in the state's dtype: the result is the float32 one, in the state's
  dtype, within its precision."""
  gaussian = closed_form.Gaussian(jnp.zeros(2), jnp.ones(2))
  solver = get_solver(name)
  x_T = jnp.asarray([[1.0, -0.5], [300.0, 2.0]], jnp.float32)
  eps = float(jnp.finfo(dtype).eps)
  for sigmas in ([1.0, 1e-8], [80.0, 10.0, 1.0, 0.1, 1e-8], [300.0, 40.0, 0.002]):
    sigmas = jnp.asarray(sigmas, jnp.float32)
    expected = solver.sample(gaussian.denoise, x_T, sigmas)
    got, states = solver.sample(gaussian.denoise, x_T.astype(dtype), sigmas, return_trajectory=True)
    assert got.dtype == dtype and states.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=4 * eps, atol=4 * eps)
  # 1.0 and 0.999 are one bfloat16 ulp apart: a grid made in the state's dtype would take a zero step. The multistep
  # extrapolation over such close levels amplifies the state's own rounding, so only finiteness is checked here.
  got = solver.sample(gaussian.denoise, x_T.astype(dtype), jnp.asarray([80.0, 2.0, 1.0, 0.999, 1e-8]))
  assert np.all(np.isfinite(np.asarray(got, np.float32))), (name, got)


def test_issue_case_dpmpp_2m_float16_with_sigma_1e8():
  gaussian = closed_form.Gaussian(jnp.zeros(2), jnp.ones(2))
  got = get_solver("dpmpp_2m").sample(gaussian.denoise, jnp.ones((1, 2), jnp.float16), jnp.asarray([1.0, 1e-8]))
  np.testing.assert_allclose(np.asarray(got, np.float32), [[0.5, 0.5]], rtol=1e-3)


def test_grid_that_collapses_when_narrowed_names_the_entry():
  """float64 levels that are distinct only beyond float32 precision: a float32 state gets a clear error."""
  gaussian = closed_form.Gaussian(jnp.zeros(2), jnp.ones(2))
  with jax.enable_x64(True):
    sigmas = np.array([2.0, 1.0 + 1e-12, 1.0, 0.5])
    for name in ("dpmpp_2m", "unipc", "deis"):
      with pytest.raises(ValueError, match=r"valid in float64 but not in float32.*sigmas\[1\]"):
        get_solver(name).sample(gaussian.denoise, jnp.ones((1, 2), jnp.float32), sigmas)
    # The same grid with a float64 state is fine.
    get_solver("dpmpp_2m").sample(gaussian.denoise, jnp.ones((1, 2), jnp.float64), sigmas)
