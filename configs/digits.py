"""Teacher on scikit-learn's 8x8 digits: a small DDPM++-style UNet trained with EDM's objective (no download needed).

Unconditional by default: the later comparisons (MTEO tables, learned schedules, solvers) then start from noise alone
and their errors are not mixed with label effects; ``cond`` trains the class-conditional teacher (10 classes) for
those who want labels. The 1500 training digits, mapped to [-1, 1], have a pixel standard deviation of 0.75, which
is the ``sigma_data`` of EDM's preconditioning here.

    python -m mteo_jax.main --config=configs/digits.py --workdir=/tmp/digits         # ~1 h on 2 CPU cores
    python -m mteo_jax.main --config=configs/digits.py:cond --workdir=/tmp/digits_c  # the same, class-conditional
    python -m mteo_jax.main --config=configs/digits.py:tiny --workdir=/tmp/digits_t  # < 1 min on CPU, mostly compiling

Measured on a shared 2-core CPU machine: ~3 steps/s (4000 steps in 31 min give recognisable digits); a GPU should
take a few minutes for the 10k steps (an estimate, not measured).

MTEO main job on the shipped teacher (references -> MTEO at NFE 3 -> held-out evaluation):

    python -m mteo_jax.main --config=configs/digits.py:mteo --workdir=runs/digits_mteo        # < 5 min on 2 CPU cores
    python -m mteo_jax.main --config=configs/digits.py:mteo_full --workdir=runs/digits_full   # NFE 3, 4 and 5

DiT teacher (Peebles & Xie 2023; 2x2 patches, 6 adaLN-Zero blocks of width 96, 1.04M parameters) and its main job:

    python -m mteo_jax.main --config=configs/digits.py:dit --workdir=/tmp/digits_dit   # 135 s on one H200 GPU
    python -m mteo_jax.main --config=configs/digits.py:mteo_dit --workdir=runs/digits_mteo_dit

Schedules and their combination with MTEO (``mteo_jax.comparison``), iPNDM and DPM-Solver++(2M):

    python -m mteo_jax.main --config=configs/digits.py:compare --workdir=runs/digits_compare      # every method
    python -m mteo_jax.main --config=configs/digits.py:schedules --workdir=runs/digits_schedules  # NFE 3, 4 and 5
    python -m mteo_jax.main --config=configs/digits.py:combined --workdir=runs/digits_combined    # MTEO on each

Progressive distillation (mode ``pd``): DDIM with the teacher and the PD students at 8, 4, 2 and 1 steps:

    python -m mteo_jax.main --config=configs/digits.py:pd --workdir=runs/digits_pd

Variants: ``mteo``, ``mteo_full``, ``mteo_dit``, ``gits``, ``ld3``, ``indis`` (one method beside the plain solver),
``schedules``, ``combined``, ``compare``, ``pd``, ``default``, ``cond``, ``dit``, ``tiny`` (one 8x8 level of 8
channels, a few steps), ``dit_tiny``.
"""

import ml_collections

from mteo_jax import comparison, modes

VARIANTS = ("default", "cond", "tiny", "dit", "dit_tiny", "mteo", "mteo_full", "mteo_dit") + comparison.COMPARE_VARIANTS
MTEO_VARIANTS = {"mteo": "pretrained:digits", "mteo_full": "pretrained:digits", "mteo_dit": "pretrained:digits_dit"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/digits.py; expected one of {list(VARIANTS)}")
  if variant in comparison.COMPARE_VARIANTS:
    # Few-step methods side by side on the shipped UNet teacher (mteo_jax.comparison); every key has its default from
    # modes.base_config("compare").
    config = comparison.config_for("pretrained:digits", variant)
    if variant == "pd":
      # Progressive distillation 64 -> 32 -> ... -> 1 DDIM steps, 1000 Adam steps of 64 per round: 6k student updates,
      # each with two teacher evaluations, against the teacher's 4k training steps of 64.
      config.pd.update({"start_steps": 64, "end_steps": 1, "steps": 1000, "batch_size": 64, "lr": 2e-4})
    return config
  if variant in MTEO_VARIANTS:
    # The main job on a shipped teacher: mteo_jax/pretrained/teacher_digits (made by the default variant with
    # --config.train.steps=4000 --config.train.warmup_steps=200) or teacher_digits_dit (the dit variant). Every
    # other key has its default from modes.base_config("mteo").
    config = modes.base_config("mteo")
    config.mteo.teacher = MTEO_VARIANTS[variant]
    config.mteo.nfes = (3, 4, 5) if variant == "mteo_full" else (3,)
    if variant == "mteo":
      # README's first command, sized to finish in under five minutes on 2 CPU cores (benchmarks/main_job.py times
      # it): iPNDM and DPM-Solver++(2M), 256 training trajectories, 500 held-out noises, references at rtol = atol =
      # 1e-4 (their error, 2e-4 RMSE, is far below the errors compared), no Heun teacher row (the adaptive reference
      # row is the teacher at ~93 NFE), 150 Adam steps at a higher learning rate; two CPU devices, so that the
      # data-parallel mesh keeps both cores busy (XLA runs one device on about 1.3 cores). mteo_full keeps every
      # default.
      config.cpu_devices = 2
      config.mteo.update({"solvers": ("ipndm", "dpmpp_2m"), "num_train": 256, "num_eval": 500, "teacher_steps": 0,
                          "steps": 150, "lr": 4e-2, "eval_every": 50})
      config.mteo.reference.update({"rtol": 1e-4, "atol": 1e-4})
    return config

  config = modes.base_config("train")
  config.data.name = "digits"
  config.model = modes.model_config(
      "unet", image_size=8, in_channels=1, model_channels=32, channel_mult=(1, 2), num_blocks=1,
      attn_resolutions=(4,), dropout=0.1, num_classes=0, embedding_type="positional")
  config.precond.sigma_data = 0.75
  config.train.update({"steps": 10_000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 500, "lr_decay": "cosine",
                       "ema_decay": 0.999, "grad_clip": 1.0, "log_every": 250, "checkpoint_every": 1_000, "keep": 2,
                       "sample_every": 2_500, "sample_steps": 18, "num_samples": 100})

  if variant in ("dit", "dit_tiny"):
    # DiT (Peebles & Xie 2023) on 2x2 patches of the 8x8 digits: 16 tokens, adaLN-Zero blocks.
    config.model = modes.model_config(
        "dit", image_size=8, in_channels=1, patch_size=2, hidden_size=96, depth=6, num_heads=4, mlp_ratio=4.0,
        num_classes=0, noise_channels=96, embedding_type="positional")
    config.train.update({"lr": 3e-4, "warmup_steps": 500, "steps": 15_000, "batch_size": 128})
  if variant == "dit_tiny":
    config.model.kwargs.update({"hidden_size": 32, "depth": 2, "num_heads": 2, "noise_channels": 32})
    config.train.update({"steps": 6, "batch_size": 16, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 3,
                         "sample_steps": 2, "num_samples": 16})
  if variant == "cond":
    config.model.kwargs.num_classes = 10
  if variant == "tiny":
    config.model.kwargs.update({"model_channels": 8, "channel_mult": (1,), "num_blocks": 0, "attn_resolutions": (),
                                "dropout": 0.0})
    config.train.update({"steps": 6, "batch_size": 16, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 3,
                         "sample_steps": 2, "num_samples": 16})
  return config
