"""mteo_jax: three-step diffusion sampling in JAX/Flax.

The public face: diffusion maths (``diffusion``), backbones with lifted time embeddings (``nets``), closed-form
teachers (``closed_form``), schedules and solvers, diffrax references, MTEO tables (``mteo``) and the student loop
(``fitting``). Training, data, checkpoints, metrics and the CLI are imported from their modules when needed (they pull
in orbax, tfds and matplotlib).
"""

from mteo_jax import closed_form, diffusion, fitting, mteo, nets, reference, schedules, solvers
from mteo_jax.closed_form import Gaussian, GaussianMixture
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import Backbone, get_backbone, make_denoiser
from mteo_jax.schedules import get_schedule
from mteo_jax.solvers import get_solver

__version__ = "0.1.0"

__all__ = ["closed_form", "diffusion", "fitting", "mteo", "nets", "reference", "schedules", "solvers", "Gaussian",
           "GaussianMixture", "Preconditioning", "Backbone", "get_backbone", "make_denoiser", "get_schedule",
           "get_solver"]
