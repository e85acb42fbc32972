"""mteo_jax: three-step diffusion sampling in JAX/Flax.

The public face: diffusion maths (``diffusion``), backbones with lifted time embeddings (``nets``), closed-form
teachers (``closed_form``), schedules and solvers, diffrax references, teachers with one identity (``teachers``),
MTEO tables (``mteo``) and the one training loop (``loop``). The harness, the methods, teacher training, data,
checkpoints, metrics and the CLI are imported from their modules when needed (they pull in orbax, tfds and
matplotlib).
"""

from mteo_jax import closed_form, diffusion, loop, mteo, nets, schedules, solvers, teachers
from mteo_jax.closed_form import Gaussian, GaussianMixture
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import Backbone, get_backbone, make_denoiser
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver
from mteo_jax.teachers import Teacher

__version__ = "0.1.0"


def __getattr__(name: str):
  """``mteo_jax.reference`` on first use: it imports diffrax, which takes a second that a config check should not."""
  if name == "reference":
    import importlib  # noqa: PLC0415
    return importlib.import_module("mteo_jax.reference")
  raise AttributeError(f"module 'mteo_jax' has no attribute {name!r}")

__all__ = ["closed_form", "diffusion", "loop", "mteo", "teachers", "Teacher", "nets", "reference", "schedules",
           "solvers", "Gaussian",
           "GaussianMixture", "Preconditioning", "Backbone", "get_backbone", "make_denoiser", "get_schedule",
           "get_solver"]
