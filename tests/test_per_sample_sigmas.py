"""Per-sample grids: ``solver.sample(D, x_T, sigmas)`` with ``sigmas`` [B, N + 1], one schedule per sample.

Every registered solver must give each sample what it gives that sample alone on its own row (and, with equal rows,
what the shared grid gives), call the denoiser with each sample's own noise level at every evaluation, differentiate
in the rows, jit with traced rows, and reject bad grids naming the row and the entry. Numerical tests in float64.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mteo_jax import closed_form
from mteo_jax.diffusion import broadcast_to_batch
from mteo_jax.schedules import get_schedule, validate_per_sample_sigmas
from mteo_jax.solvers import SOLVERS, get_solver

BATCH, DIM, NUM_STEPS = 3, 2, 4


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so that the instance itself can be jitted
class EmbeddedGaussian:
  """The Gaussian's exact denoiser with its shrinkage modulated by a time embedding; ``sigma`` scalar or [B].

  ``D = mu + (1 + 0.2 tanh(<w_a, temb_a> + <w_b, temb_b>)) s^2 / (s^2 + sigma^2) (x - mu)``, ``temb`` by default the
  embedding ``[cos(f log sigma)], [sin(f log sigma)]`` of each sample's own sigma; a table row may be [3] or [B, 3].
  """
  mean: jax.Array
  std: jax.Array

  def embed(self, sigma):
    angles = jnp.log(sigma)[..., None] * jnp.asarray([0.5, 1.0, 2.0], jnp.result_type(sigma))
    return {"a": jnp.cos(angles), "b": jnp.sin(angles)}

  def __call__(self, x, sigma, temb=None):
    temb = self.embed(sigma) if temb is None else temb
    gain = 1.0 + 0.2 * jnp.tanh(temb["a"] @ jnp.asarray([0.3, -0.2, 0.5]) + temb["b"] @ jnp.asarray([0.4, 0.1, -0.3]))
    gain, sigma = broadcast_to_batch(gain, x), broadcast_to_batch(sigma, x)
    s2 = self.std ** 2
    return self.mean + gain * s2 / (s2 + sigma ** 2) * (x - self.mean)


@functools.cache
def teacher():
  """``EmbeddedGaussian`` in float64 and its jitted call (call inside ``jax.enable_x64``)."""
  model = EmbeddedGaussian(jnp.asarray([0.5, -1.0]), jnp.asarray([0.3, 2.0]))
  return model, jax.jit(model)


@functools.cache
def mixture_denoise():
  """A 4-component mixture's exact denoiser, jitted (call inside ``jax.enable_x64``): nonlinear in x and sigma."""
  mixture = closed_form.random_mixture(3, num_components=4, dim=DIM, spread=1.5, std=0.3, dtype=jnp.float64)
  return jax.jit(mixture.denoise)


def noise(shape, scale, seed, dtype=jnp.float64):
  return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


def distinct_rows(num_steps=NUM_STEPS):
  """[BATCH, num_steps + 1]: three different schedules over three different ranges."""
  return jnp.stack([get_schedule("edm", num_steps, 0.01, 20.0), get_schedule("logsnr_uniform", num_steps, 0.05, 8.0),
                    get_schedule("time_uniform", num_steps, 0.002, 40.0)])


def pretrained_table(model, solver, sigmas):
  """Row i: the embedding at call i; leaves [nfe, 3] for a shared grid, [nfe, B, 3] for per-sample grids."""
  eval_sigmas = solver.eval_sigmas(sigmas)
  return model.embed(eval_sigmas if eval_sigmas.ndim == 1 else eval_sigmas.T)


def assert_close(a, b, **kwargs):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12, **kwargs)


# --- results ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SOLVERS.names())
def test_equal_rows_give_the_shared_grid_result(name):
  with jax.enable_x64(True):
    (model, call), solver = teacher(), get_solver(name)
    shared = get_schedule("edm", NUM_STEPS, 0.01, 20.0)
    rows = jnp.tile(shared, (BATCH, 1))
    x_T = noise((BATCH, DIM), 20.0, seed=1)
    # [nfe, 3], the same rows for both paths; moved off the pretrained embedding so that it changes the result
    moved = jax.tree.map(lambda t: t + 0.3, pretrained_table(model, solver, shared))
    results = []
    for temb_table in (None, moved):
      x, states = solver.sample(call, x_T, rows, temb_table=temb_table, return_trajectory=True)
      x_shared, states_shared = solver.sample(call, x_T, shared, temb_table=temb_table, return_trajectory=True)
      assert states.shape == states_shared.shape == (NUM_STEPS + 1, BATCH, DIM)
      assert_close(x, x_shared)
      assert_close(states, states_shared)
      results.append(x)
    assert not np.allclose(results[1], results[0])  # the table reaches the per-sample path


@pytest.mark.parametrize("name", SOLVERS.names())
def test_each_sample_gets_what_its_own_row_gives_it_alone(name):
  """Sample b of a per-sample batch == sample b on the shared grid ``rows[b]``, on a mixture teacher and on a teacher
  with a per-sample pretrained table [nfe, B, 3] (which reproduces the teacher's own embedding).

  The shared-grid reference runs the whole batch on ``rows[b]`` and keeps sample b (the samples of a shared-grid run
  are independent): the same result as sample b alone, with the update programs the other tests compile already.
  """
  with jax.enable_x64(True):
    (model, call), solver, rows = teacher(), get_solver(name), distinct_rows()
    x_T = noise((BATCH, DIM), 20.0, seed=2)
    x, states = solver.sample(mixture_denoise(), x_T, rows, return_trajectory=True)
    table = pretrained_table(model, solver, rows)
    assert table["a"].shape == (solver.nfe(NUM_STEPS), BATCH, 3)
    x_table, states_table = solver.sample(call, x_T, rows, temb_table=table, return_trajectory=True)
    assert_close(x_table, solver.sample(call, x_T, rows))
    for b in range(BATCH):
      on_row, on_row_states = solver.sample(mixture_denoise(), x_T, rows[b], return_trajectory=True)
      assert_close(x[b], on_row[b], err_msg=f"sample {b}")
      assert_close(states[:, b], on_row_states[:, b], err_msg=f"sample {b}")
      # the rows really differ: every other sample ends elsewhere on row b's grid than on its own
      for other in set(range(BATCH)) - {b}:
        assert not np.allclose(x[other], on_row[other]), (b, other)
      row_table = jax.tree.map(lambda t, b=b: t[:, b], table)  # [nfe, 3]: sample b's rows
      on_row, on_row_states = solver.sample(call, x_T, rows[b], temb_table=row_table, return_trajectory=True)
      assert_close(x_table[b], on_row[b], err_msg=f"sample {b} with a table")
      assert_close(states_table[:, b], on_row_states[:, b], err_msg=f"sample {b} with a table")


@pytest.mark.parametrize("name", SOLVERS.names())
def test_denoiser_gets_each_samples_sigma_at_every_call(name):
  """Call i (Heun's second calls and UniPC's corrector calls included) gets ``eval_sigmas(rows)[:, i]`` [B] and
  table row i."""
  with jax.enable_x64(True):
    (_, call), solver, rows = teacher(), get_solver(name), distinct_rows()
    calls = []

    def recording_denoiser(x, sigma, temb=None):
      calls.append((np.asarray(sigma), None if temb is None else int(temb["row"])))
      return call(x, sigma)

    nfe = solver.nfe(NUM_STEPS)
    solver.sample(recording_denoiser, noise((BATCH, DIM), 20.0, seed=3), rows, temb_table={"row": jnp.arange(nfe)})
    expected = solver.eval_sigmas(rows)
    assert expected.shape == (BATCH, nfe) and len(calls) == nfe
    for i, (sigma, row) in enumerate(calls):
      assert sigma.shape == (BATCH,) and row == i
      np.testing.assert_array_equal(sigma, expected[:, i])


def test_eval_sigmas_of_per_sample_grids():
  rows = jnp.asarray([[4.0, 2.0, 1.0, 0.5], [8.0, 3.0, 1.5, 0.1]])
  np.testing.assert_array_equal(get_solver("heun").eval_sigmas(rows),
                                [[4.0, 2.0, 2.0, 1.0, 1.0], [8.0, 3.0, 3.0, 1.5, 1.5]])
  np.testing.assert_array_equal(get_solver("dpmpp_2m").eval_sigmas(rows), rows[:, :3])
  np.testing.assert_array_equal(get_solver("heun").eval_sigmas(rows[0]), [4.0, 2.0, 2.0, 1.0, 1.0])


# --- gradients and jit ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "ipndm", "unipc"])
def test_gradients_wrt_the_rows_match_finite_differences(name):
  """d loss / d rows is finite, row b's gradient matches central differences along row b, and row b moves sample b
  only (with the loss weights of the other samples set to 0, their rows get exactly zero gradient)."""
  with jax.enable_x64(True):
    (_, call), solver = teacher(), get_solver(name)
    rows, x_T, weights = distinct_rows(3), noise((BATCH, DIM), 20.0, seed=4), noise((BATCH, DIM), 1.0, seed=5)

    @jax.jit  # one compilation serves the gradient and every finite difference
    @jax.value_and_grad
    def loss(sigmas, weights):
      return jnp.sum(weights * solver.sample(call, x_T, sigmas))

    grad = loss(rows, weights)[1]
    assert grad.shape == rows.shape and np.all(np.isfinite(grad))
    eps = 1e-7
    for b in range(BATCH):
      direction = jnp.zeros_like(rows).at[b].set(rows[b] * noise(rows.shape[1:], 1.0, seed=6 + b))  # keeps row b
      fd = (loss(rows + eps * direction, weights)[0] - loss(rows - eps * direction, weights)[0]) / (2 * eps)
      np.testing.assert_allclose(jnp.sum(grad * direction), fd, rtol=1e-6, err_msg=f"row {b}")
      only_b = loss(rows, weights * (jnp.arange(BATCH) == b)[:, None])[1]
      np.testing.assert_array_equal(np.delete(np.asarray(only_b), b, axis=0), 0.0, err_msg=f"row {b}")
      assert_close(only_b[b], grad[b], err_msg=f"row {b}")


def test_every_solver_jits_with_traced_rows():
  """All solvers in one jitted function (one compilation), with traced rows, table and x_T."""
  with jax.enable_x64(True):
    model, call = teacher()
    solvers = [get_solver(name) for name in SOLVERS.names()]
    rows, x_T = distinct_rows(3), noise((BATCH, DIM), 20.0, seed=7)
    tables = [jax.tree.map(lambda t: t + 0.1, pretrained_table(model, s, rows)) for s in solvers]

    @jax.jit
    def run(x, sigmas, tables):
      outs = [s.sample(model, x, sigmas, temb_table=t, return_trajectory=True) for s, t in zip(solvers, tables)]
      return outs, [s.eval_sigmas(sigmas) for s in solvers]

    outs, eval_sigmas = run(x_T, rows, tables)
    for s, (x, states), evals, table in zip(solvers, outs, eval_sigmas, tables):
      eager_x, eager_states = s.sample(call, x_T, rows, temb_table=table, return_trajectory=True)
      assert_close(x, eager_x, err_msg=s.name)
      assert_close(states, eager_states, err_msg=s.name)
      np.testing.assert_array_equal(evals, s.eval_sigmas(rows))


# --- precision --------------------------------------------------------------------------------------------------------

def test_low_precision_state_uses_a_float32_grid():
  """A bfloat16 or float16 state: the rows are validated and used in float32 (row 1 has levels one bfloat16 ulp apart
  and one that underflows float16), the denoiser gets float32 sigmas [B], the state keeps its dtype, and the result
  is the float32 one within the state's precision.

  The cast happens once, in ``Solver.sample``, before any solver sees the grid; one solver per family of update
  arithmetic keeps the test short: differences in sigma (euler), exponential integrators (dpmpp_2m, unipc: phi
  functions, Vandermonde weights, the corrector) and quadrature (deis, whose nodes take the grid's dtype).
  """
  gaussian = closed_form.Gaussian(jnp.zeros(DIM), jnp.ones(DIM))
  rows = np.asarray([[80.0, 10.0, 1.0, 0.1, 0.002], [80.0, 2.0, 1.0, 0.999, 1e-8]], np.float32)
  x_T = jnp.asarray([[1.0, -0.5], [30.0, 2.0]], jnp.float32)
  seen = []

  def denoiser(x, sigma, temb=None):
    seen.append((sigma.dtype, sigma.shape))
    return gaussian.denoise(x, sigma)

  def float32_and_low_precision(solver, dtype, x_T):
    return (solver.sample(gaussian.denoise, x_T, rows),
            solver.sample(denoiser, x_T.astype(dtype), rows, return_trajectory=True))

  for name, dtype in (("euler", jnp.bfloat16), ("unipc", jnp.bfloat16), ("deis", jnp.bfloat16),
                      ("dpmpp_2m", jnp.float16)):
    solver, eps = get_solver(name), float(jnp.finfo(dtype).eps)
    seen.clear()
    # one compilation per solver; the rows are constants of the trace, so they are still validated
    expected, (got, states) = jax.jit(functools.partial(float32_and_low_precision, solver, dtype))(x_T)
    assert got.dtype == dtype and states.dtype == dtype
    assert set(seen) == {(jnp.dtype(jnp.float32), (2,))}
    # the extrapolation over row 1's close levels amplifies the state's own rounding, as on a shared grid (measured:
    # below 0.1 eps for every solver but deis, whose extrapolation in t reaches 16 bfloat16 eps)
    np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=32 * eps, atol=32 * eps,
                               err_msg=f"{name} {jnp.dtype(dtype).name}")


# --- bad input --------------------------------------------------------------------------------------------------------

def test_bad_per_sample_grids_are_clear_errors():
  gaussian, solver = closed_form.Gaussian(jnp.zeros(DIM), jnp.ones(DIM)), get_solver("dpmpp_2m")
  x_T = jnp.ones((BATCH, DIM), jnp.float32)  # errors are raised before anything is compiled
  good = [[80.0, 10.0, 1.0], [40.0, 5.0, 0.5], [20.0, 2.0, 0.1]]
  for bad, message in (
      (good[:2], r"per-sample sigmas have 2 rows \(shape \(2, 3\)\) but the batch has 3 samples"),
      ([good], (r"sigmas must be \[num_steps \+ 1\] \(one grid for the batch\) or \[B, num_steps \+ 1\] .*"
                r"got shape \(1, 3, 3\)")),
      ([[80.0], [40.0], [20.0]], "at least 2 noise levels in each row"),
      ([good[0], [40.0, 0.5, 5.0], good[2]], r"strictly decreasing, but sigmas\[1, 1\] = 0.5 <= sigmas\[1, 2\] = 5.0"),
      ([good[0], good[1], [20.0, np.nan, 0.1]], r"finite, but sigmas\[2, 1\] = nan"),
      ([good[0], good[1], [20.0, 2.0, -0.1]], r"> 0, but sigmas\[2, 2\] = -0.1"),
      # host input comes as float64: the underflow shows when JAX casts it to float32
      ([good[0], good[1], [20.0, 2.0, 1e-40]], (r"valid in float64 but not in float32.*sigmas\[2, 2\] = 9.9+\d*e-41 "
                                                r"is below the smallest normal float32")),
  ):
    with pytest.raises(ValueError, match=message):
      solver.sample(gaussian.denoise, x_T, bad)
  with pytest.raises(ValueError, match=r"strictly decreasing, but sigmas\[1, 1\] = 0.5 <= sigmas\[1, 2\] = 5.0"):
    solver.eval_sigmas([good[0], [40.0, 0.5, 5.0]])
  with pytest.raises(ValueError, match="need a state with a leading batch axis, got a scalar x_T"):
    solver.sample(gaussian.denoise, jnp.float32(1.0), good)
  # a table for an NFE the solver does not make with N = 2 steps (Heun: 3 calls)
  with pytest.raises(ValueError, match=r"leading axis 4 .*expected leading axis nfe=3 .*'heun' with 2 steps"):
    get_solver("heun").sample(gaussian.denoise, x_T, good, temb_table={"a": jnp.zeros((4, 3))})
  with pytest.raises(ValueError, match=r"'heun' cannot make exactly 4 network evaluations"):
    get_solver("heun").num_steps_for_nfe(4)


def test_row_that_collapses_in_float32_names_the_row():
  gaussian = closed_form.Gaussian(jnp.zeros(DIM), jnp.ones(DIM))
  with jax.enable_x64(True):
    rows = np.array([[2.0, 1.5, 1.0, 0.5], [2.0, 1.0 + 1e-12, 1.0, 0.5], [3.0, 1.5, 1.0, 0.5]])
    for name in ("dpmpp_2m", "unipc", "deis"):
      with pytest.raises(ValueError, match=r"valid in float64 but not in float32, the dtype in which the solver "
                                           r"computes .* for a float32 state: .*sigmas\[1, 1\] = 1.0 <= "
                                           r"sigmas\[1, 2\]"):
        get_solver(name).sample(gaussian.denoise, jnp.ones((BATCH, DIM), jnp.float32), rows)
    # the same rows with a float64 state are fine
    x = get_solver("dpmpp_2m").sample(mixture_denoise(), jnp.ones((BATCH, DIM), jnp.float64), rows)
    assert np.all(np.isfinite(x))


def test_under_jit_only_shapes_are_checked():
  gaussian, solver = closed_form.Gaussian(jnp.zeros(DIM), jnp.ones(DIM)), get_solver("euler")
  run = jax.jit(lambda x, s: solver.sample(gaussian.denoise, x, s))
  with pytest.raises(ValueError, match="per-sample sigmas have 2 rows"):
    run(jnp.ones((BATCH, DIM)), jnp.ones((2, 3)))
  # traced values cannot raise: an increasing row passes through, as it does for a shared grid
  rows = jnp.asarray([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
  assert run(jnp.ones((BATCH, DIM)), rows).shape == (BATCH, DIM)


def test_validate_per_sample_sigmas():
  rows = validate_per_sample_sigmas([[3, 2, 1], [4, 2, 1]], batch=2, dtype=jnp.float32)
  assert rows.dtype == jnp.float32 and rows.shape == (2, 3)
  with pytest.raises(ValueError, match=r"2-D array \[B, num_steps \+ 1\] .* got shape \(3,\)"):
    validate_per_sample_sigmas([3.0, 2.0, 1.0])
  with pytest.raises(ValueError, match=r"strictly decreasing, but sigmas\[0, 2\] = 1.0 <= sigmas\[0, 3\] = 1.0"):
    validate_per_sample_sigmas(jnp.asarray([[3.0, 2.0, 1.0, 1.0], [4.0, 3.0, 2.0, 1.0]]))
