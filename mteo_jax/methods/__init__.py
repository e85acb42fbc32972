"""Few-step methods on the one harness: each is a ``Method`` registered next to its class, in one file.

    from mteo_jax import methods
    method = methods.get_method("mteo")          # or methods.MTEO(methods.MTEOSettings(steps=500))
    artefact = method.fit(harness, cell)         # learn (or load a finished run)
    x0 = method.sampler(artefact)(x_T, label)    # sample

Registered: ``base`` (the plain solver on the base schedule, nothing learned) and ``mteo`` (a table of step-wise,
layer-wise time embeddings).
"""

from mteo_jax.methods.base import METHODS, Method, get_method
from mteo_jax.methods.mteo import MTEO, MTEOSettings
from mteo_jax.methods.plain import BaseSolver

__all__ = ["METHODS", "Method", "get_method", "BaseSolver", "MTEO", "MTEOSettings"]
