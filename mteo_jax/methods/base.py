"""The method interface of the harness and its registry."""

from __future__ import annotations

from typing import Any, ClassVar

from mteo_jax.harness import Artefact, Cell, Harness, Sampler
from mteo_jax.registry import Registry


class Method:
  """A few-step sampling method on a frozen teacher.

  Subclasses set ``name`` and implement:

  ``fit(harness, cell) -> Artefact``: learn what the method learns for ``cell`` (a solver and an NFE with the
    harness's base schedule) from ``harness.train_data(cell)`` (the teacher's reference states from the training
    noise at the cell's sigmas) with ``loop.fit`` in ``harness.run_dir(self.name, cell)``, so that it checkpoints,
    resumes and is timed like every other method; a training-free method returns at once.
  ``serves(cell) -> bool`` (optional, default True): whether the method has a sampler for ``cell`` at all (a PD
    student exists only for DDIM at its own step counts); the harness skips the cells it does not serve.
  ``sampler(artefact) -> (x_T, label) -> x_0``: a jitted function of ``x_T`` [B, *data_shape] float32 at the
    schedule's first sigma and ``label`` [B] int (None for an unconditional teacher), returning [B, *data_shape].

  The harness scores every method's samples from the same held-out noise against the same reference.
  """

  name: ClassVar[str] = ""

  def fit(self, harness: Harness, cell: Cell) -> Artefact:
    raise NotImplementedError

  def serves(self, cell: Cell) -> bool:
    del cell
    return True

  def sampler(self, artefact: Artefact) -> Sampler:
    raise NotImplementedError


METHODS: Registry[Any] = Registry("method")


def get_method(name: str, *args: Any, **kwargs: Any) -> Method:
  """The registered method ``name`` built with ``args`` and ``kwargs`` (KeyError listing the valid names)."""
  return METHODS.get(name)(*args, **kwargs)
