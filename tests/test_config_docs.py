"""README's table of the main job's config keys comes from the config classes' docstrings (``mteo_jax.config_docs``):
it is current, it covers every key, an undocumented field is an error, grouped entries and "see X" resolve, and a
changed docstring changes the table."""

from __future__ import annotations

import dataclasses
import shutil

import pytest

from mteo_jax import config_docs, config_utils, experiment, harness, loop, modes
from mteo_jax.methods import MTEOSettings


@dataclasses.dataclass(frozen=True)
class Inner:
  """A nested section.

  Attributes:
    a, b: two numbers that one entry describes,
      over two lines.
  """
  a: int = 1
  b: float = 2.0


class Source:
  """Where another class's docstring points.

  Attributes:
    c: the text from elsewhere.
  """


@dataclasses.dataclass(frozen=True)
class Outer:
  """A section with a nested one.

  Attributes:
    inner: expanded into ``inner.a`` and ``inner.b``.
    c: see ``Source``.
  """
  inner: Inner = Inner(a=5)
  c: str = "x"


@dataclasses.dataclass(frozen=True)
class Undocumented(Outer):
  """A subclass that adds two fields and describes one.

  Attributes:
    d: described.
  """
  d: int = 0
  e: tuple[int, ...] = (1, 2)
  f: Inner = Inner()


@dataclasses.dataclass(frozen=True)
class NestedUndocumented:
  """Attributes:
    g: a section whose own fields are described nowhere.
  """

  @dataclasses.dataclass(frozen=True)
  class Bare:
    h: int = 0

  g: Bare = Bare()


def test_the_readme_table_is_current(capsys):
  """``python -m mteo_jax.config_docs --check`` passes on the committed README."""
  assert config_docs.main(["--check"]) == 0, capsys.readouterr().err


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def test_every_key_of_the_main_job_has_its_default_and_a_meaning():
  """The rows are exactly ``modes.base_config("mteo")``'s keys with its defaults, each with a non-empty meaning."""
  rows = config_docs.config_keys(experiment.MTEOExperimentConfig)
  defaults = _flatten(config_utils.to_plain(modes.base_config("mteo")))
  assert {key for key, _, _ in rows} == set(defaults)
  for key, default, meaning in rows:
    assert config_utils.to_plain(default) == defaults[key], key
    assert meaning.strip() and "see ``" not in meaning, key
  section = config_docs.config_keys(experiment.MTEOJobConfig, prefix="mteo.")
  assert [row for row in rows if row[0].startswith("mteo.")] == section
  assert {key for key, _, _ in section} >= {"mteo.steps", "mteo.granularity", "mteo.teacher", "mteo.reference.rtol"}


def test_an_undocumented_field_is_an_error_naming_it_and_its_class():
  with pytest.raises(config_docs.UndocumentedKeyError) as error:
    config_docs.config_keys(Undocumented, prefix="x.")
  assert error.value.keys == ["x.e"]   # f is described by Inner's docstring
  message = str(error.value)
  assert "x.e (test_config_docs.Undocumented)" in message and "Attributes:" in message
  assert "x.d" not in message and "x.c" not in message
  with pytest.raises(config_docs.UndocumentedKeyError, match=r"g\.h \(test_config_docs\.NestedUndocumented\.Bare\)"):
    config_docs.config_keys(NestedUndocumented)


def test_grouped_entries_see_references_and_nested_fields_resolve():
  rows = config_docs.config_keys(Outer)
  assert rows == [("inner.a", 5, "two numbers that one entry describes, over two lines."),
                  ("inner.b", 2.0, "two numbers that one entry describes, over two lines."),
                  ("c", "x", "the text from elsewhere.")]
  # The library's own: HarnessJob says "see ``HarnessConfig``", MTEOJobConfig inherits both through its MRO.
  own = config_docs.docstring_attributes(harness.HarnessConfig)
  assert config_docs.describe(harness.HarnessJob, "num_train") == own["num_train"]
  assert config_docs.describe(experiment.MTEOJobConfig, "num_eval") == own["num_eval"]
  assert config_docs.describe(harness.HarnessJob, "rho") == config_docs.describe(harness.HarnessJob, "schedule")
  assert config_docs.describe(experiment.MTEOJobConfig, "lr") == config_docs.docstring_attributes(loop.LoopConfig)["lr"]
  assert config_docs.describe(experiment.MTEOJobConfig, "nope") is None


def test_a_reference_to_a_class_that_does_not_describe_the_field_is_an_error():
  @dataclasses.dataclass(frozen=True)
  class Dangling:
    """Attributes:
      z: see ``Source``.
    """
    z: int = 0

  with pytest.raises(config_docs.UndocumentedKeyError, match="described in Source, whose docstrings do not"):
    config_docs.config_keys(Dangling)


def test_a_changed_docstring_changes_the_table(tmp_path, monkeypatch, capsys):
  """A subclass's docstring overrides its base's entry; a changed docstring of the main job's section makes README
  stale, and the rewrite changes the text between the markers only."""

  @dataclasses.dataclass(frozen=True)
  class Retold(MTEOSettings):
    """Attributes:
      lr: a made-up meaning.
    """

  base = dict((key, meaning) for key, _, meaning in config_docs.config_keys(MTEOSettings))
  retold = dict((key, meaning) for key, _, meaning in config_docs.config_keys(Retold))
  assert retold.pop("lr") == "a made-up meaning." and base.pop("lr") != "a made-up meaning."
  assert retold == base

  readme = tmp_path / "README.md"
  shutil.copy(config_docs.README, readme)
  before = readme.read_text()
  doc = experiment.MTEOJobConfig.__doc__.replace("progress: progress bars", "progress: retold progress bars")
  assert doc != experiment.MTEOJobConfig.__doc__
  monkeypatch.setattr(experiment.MTEOJobConfig, "__doc__", doc)
  assert config_docs.main(["--check", "--readme", str(readme)]) == 1
  assert "python -m mteo_jax.config_docs" in capsys.readouterr().err
  assert config_docs.main(["--readme", str(readme)]) == 0
  assert config_docs.main(["--check", "--readme", str(readme)]) == 0
  after = readme.read_text()
  assert "| `mteo.progress` | `True` | retold progress bars" in after and "retold" not in before
  start, end = before.index(config_docs.BEGIN), before.index(config_docs.END)
  assert after[:start] == before[:start] and after.endswith(before[end:])


def test_a_readme_without_the_markers_is_refused(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# no table here\n")
  with pytest.raises(ValueError, match="marker lines once each"):
    config_docs.main(["--check", "--readme", str(readme)])


def test_the_keys_a_rerun_may_change_are_those_outside_the_experiments_identity():
  harmless = config_docs.rerun_keys()
  assert set(harmless) == {f"mteo.{key}" for key in experiment.HARMLESS_KEYS} | {
      "overwrite", "distributed", "cpu_devices", "cluster.coordinator_address", "cluster.num_processes",
      "cluster.process_id"}
  assert "mteo.steps" not in harmless and "mteo.steps" in config_docs.rerun_keys(lr_decay="constant")
  assert "seed" not in harmless and "mteo.reference.rtol" not in harmless
