"""Few-step methods on the one harness: each is a ``Method`` registered next to its class, in one file.

    from mteo_jax import methods
    method = methods.get_method("mteo")          # or methods.MTEO(methods.MTEOSettings(steps=500))
    artefact = method.fit(harness, cell)         # learn (or load a finished run)
    x0 = method.sampler(artefact)(x_T, label)    # sample

Registered: ``base`` (the plain solver on the base schedule, nothing learned), ``mteo`` (a table of step-wise,
layer-wise time embeddings), ``gits`` (a schedule searched by dynamic programming over a fine teacher grid), ``ld3`` (a
learned global schedule), ``indis`` (an instance-aware schedule: a small network predicts each sample's own), and MTEO
on them: ``mteo_on_<gits|ld3|indis|best>`` (schedule first, then the table) and ``mteo_joint_<ld3|indis>`` (both in
one optimizer; ``methods.combined``), and ``pd`` (progressive distillation: the student network itself, DDIM at
halving step counts; ``methods.pd``).
"""

from mteo_jax.methods.base import METHODS, Method, get_method
from mteo_jax.methods.combined import ScheduledMTEO, load_combined
from mteo_jax.methods.gits import GITS, GITSSettings
from mteo_jax.methods.indis import INDIS, INDISSettings
from mteo_jax.methods.ld3 import LD3, LD3Settings
from mteo_jax.methods.mteo import MTEO, MTEOSettings
from mteo_jax.methods.pd import PD, PDSettings, load_student
from mteo_jax.methods.plain import BaseSolver

__all__ = ["METHODS", "Method", "get_method", "BaseSolver", "MTEO", "MTEOSettings", "GITS", "GITSSettings", "LD3",
           "LD3Settings", "INDIS", "INDISSettings", "ScheduledMTEO", "load_combined",
           "PD", "PDSettings", "load_student"]
