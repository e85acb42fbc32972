"""mteo_jax: three-step diffusion sampling in JAX/Flax.

The public face: diffusion maths (``diffusion``), backbones with lifted time embeddings (``nets``), closed-form
teachers (``closed_form``); solvers, schedules, reference trajectories, training and MTEO live in their own modules.
"""

from mteo_jax import closed_form, diffusion, nets
from mteo_jax.closed_form import Gaussian, GaussianMixture
from mteo_jax.diffusion import Preconditioning
from mteo_jax.nets import Backbone, get_backbone, make_denoiser

__version__ = "0.1.0"

__all__ = ["closed_form", "diffusion", "nets", "Gaussian", "GaussianMixture", "Preconditioning", "Backbone",
           "get_backbone", "make_denoiser"]
