"""Teacher on a 2-D Gaussian mixture: a residual MLP trained with EDM's objective on samples of the 8-mode ring.

The mixture's density and denoiser are known exactly (``data.get_mixture("ring8")``), which makes this the testbed
where every few-step method can be scored against the truth. ``ring8`` (radius 0.7, std 0.1) has a per-coordinate
standard deviation of 0.505, so EDM's preconditioning uses ``sigma_data = 0.5``.

    python -m mteo_jax.main --config=configs/gmm.py --workdir=/tmp/gmm          # 7 min on 2 CPU cores; ~1 min on a GPU
    python -m mteo_jax.main --config=configs/gmm.py:tiny --workdir=/tmp/gmm_t   # ~20 s on CPU, mostly compiling

Measured on a shared 2-core CPU machine: 20k steps in 7 min, and the EMA teacher's 18-step Heun samples have the
same mean log-likelihood under the true mixture as held-out data (-0.293 vs -0.293). GPU times are estimates.

MTEO main job on the shipped teacher:

    python -m mteo_jax.main --config=configs/gmm.py:mteo --workdir=runs/gmm_mteo              # ~5 min on 2 CPU cores

Schedules and their combination with MTEO (``mteo_jax.comparison``), iPNDM and DPM-Solver++(2M):

    python -m mteo_jax.main --config=configs/gmm.py:compare --workdir=runs/gmm_compare       # the issue's comparison
    python -m mteo_jax.main --config=configs/gmm.py:schedules --workdir=runs/gmm_schedules   # GITS, LD3, INDIS, NFE 3-5
    python -m mteo_jax.main --config=configs/gmm.py:combined --workdir=runs/gmm_combined     # MTEO on each schedule

Progressive distillation (mode ``pd``): DDIM with the teacher and the PD students at 8, 4, 2 and 1 steps:

    python -m mteo_jax.main --config=configs/gmm.py:pd --workdir=runs/gmm_pd

Variants: ``mteo``, ``mteo_full``, ``gits``, ``ld3``, ``indis`` (one method beside the plain solver), ``schedules``,
``combined``, ``compare``, ``pd``, ``default``, ``tiny`` (a 2-block MLP of width 32, a few hundred steps).
"""

import ml_collections

from mteo_jax import comparison, modes

VARIANTS = ("default", "tiny", "mteo", "mteo_full") + comparison.COMPARE_VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/gmm.py; expected one of {list(VARIANTS)}")
  if variant in comparison.COMPARE_VARIANTS:
    # Few-step methods side by side on the shipped teacher (mteo_jax.comparison): every key has its default from
    # modes.base_config("compare").
    config = comparison.config_for("pretrained:gmm", variant, grid_size=1000)
    if variant == "pd":
      # Progressive distillation 64 -> 32 -> ... -> 1 DDIM steps, 2000 Adam steps of 512 per round: 6 rounds of 12k
      # student updates, each with two teacher evaluations, against the teacher's 20k training steps of 512.
      config.pd.update({"start_steps": 64, "end_steps": 1, "steps": 2000, "batch_size": 512, "lr": 2e-4})
    return config
  if variant in ("mteo", "mteo_full"):
    # The main job on the shipped teacher (mteo_jax/pretrained/teacher_gmm, made by the default variant); every other
    # key has its default from modes.base_config("mteo").
    config = modes.base_config("mteo")
    config.mteo.update({"teacher": "pretrained:gmm", "grid_size": 1000,
                        "nfes": (3, 4, 5) if variant == "mteo_full" else (3,)})
    return config

  config = modes.base_config("train")
  config.data.name = "gmm"
  config.data.options = ml_collections.ConfigDict({"mixture": "ring8", "num_samples": 50_000, "seed": 0})
  config.model = modes.model_config("mlp", data_dim=2, width=128, depth=3, emb_dim=64, embedding_type="fourier")
  config.precond.sigma_data = 0.5
  config.train.update({"steps": 20_000, "batch_size": 512, "lr": 1e-3, "warmup_steps": 500, "lr_decay": "cosine",
                       "ema_decay": 0.999, "grad_clip": 1.0, "log_every": 500, "checkpoint_every": 5_000, "keep": 2,
                       "sample_every": 5_000, "sample_steps": 18, "num_samples": 2_000})

  if variant == "tiny":
    config.data.options.num_samples = 4_096
    config.model.kwargs.update({"width": 32, "depth": 2, "emb_dim": 32, "noise_channels": 16})
    config.train.update({"steps": 300, "batch_size": 256, "lr": 3e-3, "warmup_steps": 20, "log_every": 20,
                         "checkpoint_every": 100, "sample_every": 0, "sample_steps": 8, "num_samples": 256})
  return config
