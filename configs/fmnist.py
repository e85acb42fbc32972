"""Teacher on Fashion-MNIST (28x28x1): a DDPM++-style UNet trained with EDM's objective.

Data come from the IDX files of Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), else
from tfds ``fashion_mnist`` (see ``mteo_jax.data``). Unconditional, like the digits teacher, so that later few-step
comparisons start from noise alone. Images in [-1, 1] have a pixel standard deviation of 0.71: ``sigma_data = 0.7``.

    python -m mteo_jax.main --config=configs/fmnist.py --workdir=/tmp/fmnist       # small UNet: ~45 min on 2 CPU cores
    python -m mteo_jax.main --config=configs/fmnist.py:gpu --workdir=/tmp/fmnist   # larger UNet: ~1-2 h on one GPU
    python -m mteo_jax.main --config=configs/fmnist.py:tiny --workdir=/tmp/fmnist_t  # ~1 min on CPU (smoke test)

MTEO main job on the shipped teacher (pretrained:fmnist; or --config.mteo.teacher=WORKDIR/teacher for your own):

    python -m mteo_jax.main --config=configs/fmnist.py:mteo --workdir=runs/fmnist_mteo        # NFE 3
    python -m mteo_jax.main --config=configs/fmnist.py:mteo_full --workdir=runs/fmnist_full   # NFE 3, 4 and 5

Schedules and their combination with MTEO (``mteo_jax.comparison``), iPNDM and DPM-Solver++(2M), NFE 3:

    python -m mteo_jax.main --config=configs/fmnist.py:compare --workdir=runs/fmnist_compare

Progressive distillation (mode ``pd``): DDIM with the teacher and the PD students at 8, 4, 2 and 1 steps:

    python -m mteo_jax.main --config=configs/fmnist.py:pd --workdir=runs/fmnist_pd

Variants: ``mteo``, ``mteo_full``, ``gits``, ``ld3``, ``indis`` (one method beside the plain solver), ``schedules`` (NFE
3, 4 and 5), ``combined`` (MTEO on each schedule), ``compare``, ``pd``, ``default`` (CPU-sized: 0.35M parameters, 16 base
channels, 6k steps of 32; measured 2.3-3 steps/s on a 2-core CPU machine with nothing else running, 0.6 s per step when
it shares the cores), ``gpu`` (64 base channels, two blocks per level, attention at 7x7 and 14x14, 100k steps
of 256; the GPU time is an estimate, not measured), ``tiny``.
"""

import ml_collections

from mteo_jax import comparison, modes

VARIANTS = ("default", "gpu", "tiny", "mteo", "mteo_full") + comparison.COMPARE_VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/fmnist.py; expected one of {list(VARIANTS)}")
  if variant in comparison.COMPARE_VARIANTS:
    # Few-step methods side by side on the shipped teacher (mteo_jax.comparison), sized like the mteo variant: 512
    # training trajectories, MTEO at 200 steps.
    config = comparison.config_for("pretrained:fmnist", variant, eval_batch_size=250, num_train=512)
    if variant == "pd":
      # Progressive distillation 64 -> 32 -> ... -> 1 DDIM steps, 1000 Adam steps of 32 per round: 6k student updates,
      # each with two teacher evaluations, against the teacher's 6k training steps of 32.
      config.pd.update({"start_steps": 64, "end_steps": 1, "steps": 1000, "batch_size": 32, "lr": 2e-4})
      return config
    if any(name.startswith("mteo") for name in config.compare.methods):
      config.mteo.steps = 200
    return config
  if variant in ("mteo", "mteo_full"):
    # The main job on the shipped teacher (mteo_jax/pretrained/teacher_fmnist, made by the default variant), or
    # --config.mteo.teacher=DIR (a training run's WORKDIR/teacher). A 28x28 network evaluation costs ~4x a digits one
    # on CPU: 512 training trajectories and 200 steps per (solver, NFE) keep the job near an hour on 2 cores.
    config = modes.base_config("mteo")
    config.mteo.update({"teacher": "pretrained:fmnist", "eval_batch_size": 250, "num_train": 512, "steps": 200,
                        "nfes": (3, 4, 5) if variant == "mteo_full" else (3,)})
    return config

  config = modes.base_config("train")
  config.data.name = "fashion_mnist"
  config.model = modes.model_config(
      "unet", image_size=28, in_channels=1, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1,
      attn_resolutions=(7,), dropout=0.1, num_classes=0, embedding_type="positional")
  config.precond.sigma_data = 0.7
  config.train.update({"steps": 6_000, "batch_size": 32, "lr": 1e-3, "warmup_steps": 1_000, "lr_decay": "cosine",
                       "ema_decay": 0.999, "grad_clip": 1.0, "log_every": 250, "checkpoint_every": 2_000, "keep": 2,
                       "sample_every": 5_000, "sample_steps": 18, "num_samples": 64})

  if variant == "gpu":
    config.model.kwargs.update({"model_channels": 64, "num_blocks": 2, "attn_resolutions": (7, 14)})
    config.train.update({"steps": 100_000, "batch_size": 256, "lr": 5e-4, "warmup_steps": 2_000,
                         "ema_decay": 0.9995, "checkpoint_every": 5_000, "sample_every": 10_000})
  if variant == "tiny":
    config.model.kwargs.update({"model_channels": 8, "channel_mult": (1, 2), "attn_resolutions": (),
                                "dropout": 0.0})
    config.train.update({"steps": 4, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 2,
                         "sample_steps": 2, "num_samples": 8})
  return config
