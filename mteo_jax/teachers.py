"""A teacher: a frozen denoiser with one identity, from a directory, a shipped name, or a model in memory.

    teacher = Teacher.load("pretrained:digits")                 # or an exported WORKDIR/teacher
    teacher = Teacher.from_model(backbone, params, precond)     # any Backbone (LinenBackbone included)
    teacher.identity                                            # keys reference caches and artefacts alike
    teacher.denoiser(x, sigma, label=label)                     # x0_hat, one object per teacher

The identity is a hash of the parameters' bytes, the backbone's class, data shape and options, and the
preconditioning (``teacher_identity``): the same network loaded from disk or built in memory has the same identity,
and a reference or an MTEO table made for it is valid for it and for nothing else.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mteo_jax.diffusion import Preconditioning
from mteo_jax.hashing import hash_json, hash_pytree
from mteo_jax.nets import Backbone, make_denoiser

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def teacher_identity(backbone: Backbone, params: Any, precond: Preconditioning) -> str:
  """The one hash of a network teacher: its parameters (bytes, dtypes, shapes), the backbone's class, data shape and
  options, and the preconditioning. Closed-form teachers (``Gaussian``, ``GaussianMixture``) use ``hash_json``."""
  module = backbone.module
  options = {f.name: getattr(module, f.name) for f in dataclasses.fields(module) if f.name not in ("parent", "name")}
  net = {"class": type(module).__name__, "data_shape": list(backbone.data_shape), "options": options}
  return hash_json({"params": hash_pytree(params), "backbone": net, "precond": dataclasses.asdict(precond)})


def resolve_teacher(spec: str | os.PathLike) -> Path:
  """``pretrained:<name>`` -> the shipped ``mteo_jax/pretrained/teacher_<name>``; anything else is a path.

  Raises:
    FileNotFoundError: no such shipped teacher (the message lists them) or no such directory.
  """
  spec = os.fspath(spec)
  if spec.startswith("pretrained:"):
    name = spec.split(":", 1)[1]
    path = PRETRAINED_DIR / f"teacher_{name}"
    if not path.is_dir():
      raise FileNotFoundError(f"no shipped teacher {name!r}; shipped teachers: {shipped_teachers()}")
    return path
  path = Path(spec)
  if not path.is_dir():
    raise FileNotFoundError(f"teacher {spec!r} does not exist: give an exported teacher directory (a training run's "
                            f"WORKDIR/teacher) or pretrained:<name> with a name in {shipped_teachers()}")
  return path


def shipped_teachers() -> list[str]:
  return sorted(p.name.removeprefix("teacher_") for p in PRETRAINED_DIR.glob("teacher_*"))


def label_seed(noise_seed: int) -> int:
  """The seed of a conditional teacher's labels for the noise of ``noise_seed`` (part of the reference key)."""
  return noise_seed + 10_000


class Teacher:
  """A frozen teacher: backbone, parameters, preconditioning, metadata, identity and denoiser.

  Attributes:
    backbone, params, precond: the network; ``make_denoiser(backbone, params, precond)`` is its denoiser.
    metadata: the exported teacher's ``metadata.json`` (``{}`` for a model in memory).
    source: where it came from (a spec, a path, or "memory").
    identity: ``teacher_identity(backbone, params, precond)``.
    data_shape: the shape of one sample.
  """

  def __init__(self, backbone: Backbone, params: Any, precond: Preconditioning, *, metadata: dict | None = None,
               source: str = "memory"):
    if not isinstance(precond, Preconditioning):
      raise TypeError(f"precond must be a diffusion.Preconditioning, got {type(precond).__name__}")
    self.backbone, self.params, self.precond = backbone, params, precond
    self.metadata = dict(metadata or {})
    self.source = source
    self.data_shape = tuple(backbone.data_shape)
    self.identity = teacher_identity(backbone, params, precond)

  @classmethod
  def load(cls, spec: str | os.PathLike) -> "Teacher":
    """An exported teacher directory, or ``pretrained:<name>`` for a shipped one (``resolve_teacher``)."""
    from mteo_jax.train import load_teacher  # noqa: PLC0415 (train imports the data layer)
    backbone, params, precond, metadata = load_teacher(resolve_teacher(spec))
    return cls(backbone, params, precond, metadata=metadata, source=os.fspath(spec))

  @classmethod
  def from_model(cls, backbone: Backbone, params: Any, precond: Preconditioning) -> "Teacher":
    """A model in memory: any ``Backbone`` (built-in, ``DiT``, or ``LinenBackbone`` around your Linen module)."""
    return cls(backbone, params, precond)

  @property
  def num_classes(self) -> int:
    return int(self.backbone.num_classes or 0)

  def labels(self, noise_seed: int, num: int) -> np.ndarray | None:
    """Class labels drawn beside the noise of ``noise_seed`` (from ``label_seed(noise_seed)``); None when
    unconditional."""
    if not self.num_classes:
      return None
    return np.asarray(jax.random.randint(jax.random.key(label_seed(noise_seed)), (num,), 0, self.num_classes))

  @functools.cached_property
  def denoiser(self):
    """``D(x, sigma, temb=None, *, label=None)``: one object per teacher, so compiled reference solves are reused."""
    return make_denoiser(self.backbone, self.params, self.precond)

  def __repr__(self) -> str:
    return f"Teacher({self.source}, {type(self.backbone.module).__name__}, identity={self.identity[:12]})"
