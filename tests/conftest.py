"""Shared test fixtures and checks.

Real data that a machine may lack (Debian's Fashion-MNIST, ``apt-get install dataset-fashion-mnist``): every test that
needs it takes the ``fashion_mnist`` fixture. Where the data cannot be had the test is skipped with the reason, so that
README's test command passes on a fresh machine; where the environment sets ``MTEO_REQUIRE_REAL_DATA=1`` (``.ci/run``
does) it fails instead, so that CI cannot pass by silently skipping the real-data tests.

The ``slow`` marker (left out by default, ``pytest -m slow`` runs them): end-to-end runs carry it on their function;
``SLOW_CASES`` below adds it to the tests and parametrized cases that took 15 s or more each on 2 shared CPU cores
(``pytest -n 2 --durations=80``), so that the default suite stays within CI's 10 minutes; tests that an issue requires
to pass in CI (kill/resume, NaN stop, workdir refusal) stay in it whatever their time. A listed name that no longer
names a test is an error when its file is collected, so the list cannot silently rot.
"""

from __future__ import annotations

import os
import signal
from typing import Callable

# XLA's cheap compile pipeline for every test process (set before JAX starts its backend; a caller's own XLA_FLAGS
# win): the tests' programs are small and compiled once each, so compiling, not running, dominates the suite's time.
# Numerics are unchanged in kind (no fast-math either way); every test compares programs compiled alike or against
# tolerances.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")

# A shell's background job (``cmd &`` in a script, without job control) starts with SIGINT ignored, and Python then
# leaves it ignored: Ctrl-C tests would see nothing. Python's own handler is restored here, as in a terminal; the
# processes the tests start get the default disposition (a handler is reset on exec), so Python installs its own there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import numpy as np
import pytest

from mteo_jax import data

REQUIRE_REAL_DATA = "MTEO_REQUIRE_REAL_DATA"

# file -> test names (a parametrized case by its id, a whole function by its name), 15 s or more each on 2 CPU cores.
# The 8-device / two-process test and the Colab notebook test stay in the default suite (CI must run them); the last
# cases moved here to make room for them each have a default sibling or a default test of the same behaviour
# (test_loop's two-device refusal: test_parallel's refusals on 8 devices, in every mode).
SLOW_CASES: dict[str, tuple[str, ...]] = {
  "test_adapter.py": (
    "test_conditioned_layers_can_be_named",
    "test_body_sees_the_noise_level_only_through_temb",
    "test_mlp_style_model_with_its_own_calling_convention",
    "test_mteo_lowers_the_nfe3_error_of_a_third_party_unet",
    "test_unet_lifted_identity_bit_for_bit_with_one_leaf_per_time_projection",
  ),
  "test_cli.py": (
    "test_an_override_of_a_missing_key_exits_2_with_one_line[args0-message0]",
    "test_config_variants_build[cifar10]",
    "test_tiny_config_trains_end_to_end[gmm-tiny-overrides0-40]",
    "test_a_tuple_option_of_a_method_section_is_overridable_and_checked",
    "test_narrowing_a_variants_methods_runs_and_an_unread_override_is_refused",
    "test_config_variants_build[fmnist]",
    "test_tiny_config_trains_end_to_end[digits-dit_tiny-overrides2-6]",
    "test_tiny_config_trains_end_to_end[digits-tiny-overrides1-6]",
  ),
  "test_combined.py": (
    "test_a_rerun_resumes_every_run_and_adding_a_method_is_harmless",
    "test_a_sequence_trains_the_table_on_its_schedule_methods_grid",
    "test_artefacts_reload_for_their_own_run_only",
    "test_every_method_is_scored_and_every_learner_learns",
    "test_mteo_on_best_takes_the_schedule_its_selection_ranks_first_and_reuses_that_run",
  ),
  "test_dit.py": (
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[uncond-eager]",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[cond-eager]",
    "test_untrained_table_reproduces_the_base_solver[heun-10]",
    "test_shapes",
  ),
  "test_experiment.py": (
    "test_a_harmless_change_resumes_without_retraining",
    "test_main_job_on_a_16d_mixture_through_the_cli",
    "test_main_job_on_an_image_teacher",
    "test_one_teacher_identity",
    "test_readme_samples_with_a_trained_table",
    "test_a_rerun_reports_each_stage_as_k_of_n_with_an_eta",
    "test_shipped_gmm_teacher_main_job",
  ),
  "test_features.py": (
    "test_tiny_training_run_end_to_end",
    "test_training_options_change_the_result",
  ),
  "test_gits.py": (
    "test_gits_on_the_harness_searches_saves_and_reloads",
  ),
  "test_loop.py": (
    "test_fit_refuses_a_batch_that_does_not_split_over_two_devices",
  ),
  "test_pd.py": (
    "test_dropout_option_changes_the_loss",
  ),
  "test_learned_schedules.py": (
    "test_an_untrained_phi_is_the_global_schedule[heun-3]",
    "test_finished_runs_reload_and_mismatched_artefacts_are_refused",
    "test_ld3_and_indis_beat_the_base_solver",
    "test_the_time_shift_and_the_output_scale_mean_what_they_say",
  ),
  "test_methods.py": (
    "test_a_method_in_one_file_runs_on_the_harness",
  ),
  "test_metrics.py": (
    "test_mixture_log_likelihood_is_the_mean_exact_log_density",
  ),
  "test_mteo.py": (
    "test_untrained_table_reproduces_the_base_solver[shared-deis]",
    "test_untrained_table_reproduces_the_base_solver[layer-euler]",
    "test_fit_table_on_a_model_in_memory",
    "test_options_change_the_learned_table",
    "test_resume_continues_from_the_checkpoint",
    "test_training_lowers_the_loss_and_never_touches_the_backbone",
    "test_untrained_table_reproduces_the_base_solver[layer-deis]",
    "test_untrained_table_reproduces_the_base_solver[layer-dpmpp_2m]",
    "test_untrained_table_reproduces_the_base_solver[layer-dpmpp_3m]",
    "test_untrained_table_reproduces_the_base_solver[layer-heun]",
    "test_untrained_table_reproduces_the_base_solver[layer-ipndm]",
    "test_untrained_table_reproduces_the_base_solver[layer-unipc]",
    "test_untrained_table_reproduces_the_base_solver[shared-dpmpp_2m]",
    "test_untrained_table_reproduces_the_base_solver[shared-heun]",
    "test_untrained_table_reproduces_the_base_solver[shared-unipc]",
    "test_untrained_table_reproduces_the_base_solver[shared-dpmpp_3m]",
  ),
  "test_nets.py": (
    "test_unet_has_one_leaf_per_conditioned_layer[channel_mult0-1]",
    "test_denoiser_with_replaced_time_embedding_matches_the_default_path",
    "test_every_leaf_conditions_its_layer[unet]",
    "test_issue_case_edm_float16_at_sigma_300_is_not_zero",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[mlp-eager]",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[unet-eager]",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[unet-jit]",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[unet-cond-eager]",
    "test_lifted_embedding_equals_plain_forward_pass_bit_for_bit[unet-cond-jit]",
    "test_low_precision_state_gets_float32_preconditioning[bfloat16-edm]",
    "test_low_precision_state_gets_float32_preconditioning[float16-edm]",
    "test_unet_has_one_leaf_per_conditioned_layer[channel_mult1-2]",
  ),
  "test_parallel.py": (
    "test_eight_devices_match_one_device",
  ),
  "test_per_sample_sigmas.py": (
    "test_every_solver_jits_with_traced_rows",
  ),
  "test_pretrained.py": (
    "test_shipped_gmm_teacher_samples_the_mixture",
    "test_shipped_image_teacher_samples_are_recognisable[digits-digits]",
    "test_shipped_image_teacher_samples_are_recognisable[digits_dit-digits]",
  ),
  "test_reference.py": (
    "test_batched_equals_unbatched_with_labels_and_progress_bar",
    "test_benchmark_quick_mode",
    "test_cache_is_keyed_by_the_labels_not_their_seed",
    "test_cache_is_keyed_by_the_noise_not_its_seed",
    "test_finite_step_size_underflow_and_max_steps_are_not_blamed_on_nans",
    "test_gaussian_matches_exact_ode_solution[tsit5-None]",
    "test_low_precision_noise_is_solved_in_float32[bfloat16]",
    "test_low_precision_noise_is_solved_in_float32[float16]",
    "test_mixture_agrees_with_heun_within_its_error",
    "test_nonfinite_denoiser_is_found_where_it_happens[-inf]",
    "test_nonfinite_for_some_samples_with_labels_and_chunks_names_global_indices",
    "test_one_solve_at_the_union_equals_a_solve_per_grid",
    "test_second_call_with_the_same_denoiser_compiles_nothing",
  ),
  # test_reliability.py's kill/resume, NaN-stop and workdir tests stay in the default suite (CI must run them).
  "test_reliability.py": (
    "test_mteo_mode_writes_its_artefacts",
  ),
  "test_solvers.py": (
    "test_pretrained_table_reproduces_the_base_solver[dpmpp_2m]",
    "test_gaussian_mixture_sanity",
    "test_gradients_match_finite_differences[deis]",
    "test_gradients_through_the_mlp_backbone",
    "test_low_precision_state_gives_the_float32_answer[float16-deis]",
    "test_pretrained_table_reproduces_the_base_solver[deis]",
    "test_remat_gives_identical_values_and_gradients[deis]",
  ),
  "test_train.py": (
    "test_exported_teacher_rebuilds_the_denoiser",
  ),
}


@pytest.hookimpl(tryfirst=True)   # before ``-m 'not slow'`` deselects
def pytest_collection_modifyitems(config, items):
  found: set[tuple[str, str]] = set()
  files = set()
  for item in items:
    path, _, name = item.nodeid.partition("::")
    file = os.path.basename(path)
    files.add(file)
    for listed in SLOW_CASES.get(file, ()):
      if name == listed or ("[" not in listed and name.startswith(listed + "[")):
        item.add_marker(pytest.mark.slow)
        found.add((file, listed))
  stale = [f"{file}::{name}" for file, names in SLOW_CASES.items() if file in files for name in names
           if (file, name) not in found and not config.getoption("keyword") and not config.getoption("deselect")]
  if stale and not any("::" in arg for arg in config.args):
    raise pytest.UsageError(f"tests/conftest.py SLOW_CASES names tests that do not exist: {stale}")


def real_data_required() -> bool:
  """Whether ``MTEO_REQUIRE_REAL_DATA`` is set to anything but "", "0", "false" or "no"."""
  return os.environ.get(REQUIRE_REAL_DATA, "").strip().lower() not in ("", "0", "false", "no")


def missing_real_data(what: str, reason: str) -> None:
  """Skips the calling test for lack of ``what``, or fails it where real data is required."""
  message = f"{what} unavailable: {reason}"
  if real_data_required():
    pytest.fail(f"{message}\n{REQUIRE_REAL_DATA}={os.environ[REQUIRE_REAL_DATA]!r} requires the real-data tests to "
                f"run: install the data (`apt-get install dataset-fashion-mnist`) or unset {REQUIRE_REAL_DATA} to "
                "skip them", pytrace=False)
  pytest.skip(message)


def load_fashion_mnist(split: str = "test") -> data.Dataset:
  """Fashion-MNIST's ``split`` from its default places (Debian's IDX files, else tfds), or skip/fail as above."""
  try:
    return data.get_dataset("fashion_mnist", split)
  except FileNotFoundError as error:
    reason = str(error)  # it says where the files were looked for and how to install them
  missing_real_data(f"Fashion-MNIST ({split})", reason)


@pytest.fixture
def fashion_mnist() -> Callable[[str], data.Dataset]:
  """``fashion_mnist(split="test")`` -> the dataset; the test is skipped (or, under ``MTEO_REQUIRE_REAL_DATA=1``,
  failed) where the files cannot be had. Call it before any expensive work so that a skip costs nothing."""
  return load_fashion_mnist


def assert_lifted_identity(backbone, params, x, c_noise, label=None, *, eager=True):
  """``body(params, x, embed_time(params, c_noise, label)) == apply(params, x, c_noise, label)`` bit for bit, under
  jit and (``eager=True``) eagerly (DESIGN §3); returns the jitted output. Eagerly, every op of a UNet or DiT is
  dispatched and compiled on its own: minutes on 2 CPU cores, so those cases are in the slow suite."""
  plain = jax.jit(lambda p, x, c, y: backbone.apply(p, x, c, y))(params, x, c_noise, label)
  lifted = jax.jit(lambda p, x, c, y: backbone.body(p, x, backbone.embed_time(p, c, y)))(params, x, c_noise, label)
  np.testing.assert_array_equal(plain, lifted)
  if eager:
    np.testing.assert_array_equal(backbone.apply(params, x, c_noise, label),
                                  backbone.body(params, x, backbone.embed_time(params, c_noise, label)))
  return plain
