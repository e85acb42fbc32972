"""Teacher on CIFAR-10 at the size of EDM's DDPM++ (our UNet's defaults: 61M parameters; EDM reports 56M), for GPUs.

Data: tfds ``cifar10`` through ``tfds.data_source`` (array_record). Prepare it once with internet, e.g.
``tfds build cifar10 --file_format=array_record``, or set ``--config.data.options.download=True``. Training follows
EDM's CIFAR-10 recipe where this code has the same knobs: batch 512, Adam lr 1e-3, 10M-image warm-up (19.5k steps),
EMA half-life of 0.5M images (decay 0.5^(512/500000) = 0.99929 per step), dropout 0.13, 200M images (390k steps).
EDM's non-leaking augmentation is not implemented, so expect a FID somewhat above its 1.97.

    python -m mteo_jax.main --config=configs/cifar10.py --workdir=/tmp/cifar10       # days on one GPU (see below)
    python -m mteo_jax.main --config=configs/cifar10.py:tiny --workdir=/tmp/cifar_t  # a minute (needs the data)

Runtime (an estimate, not measured here): EDM reports about 2 days on 8 V100 GPUs for these 200M images, so expect
several days on a single modern GPU; use several devices (the batch is split over all of them) or fewer steps.
A CPU is not an option for the default variant (minutes per step).

Variants: ``default``, ``tiny`` (8 base channels, one level, a few steps).
"""

import ml_collections

from mteo_jax import modes

VARIANTS = ("default", "tiny")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "default"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/cifar10.py; expected one of {list(VARIANTS)}")
  config = modes.base_config("train")
  config.data.name = "tfds"
  config.data.options = ml_collections.ConfigDict({"tfds_name": "cifar10", "download": False})
  config.model = modes.model_config(
      "unet", image_size=32, in_channels=3, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
      attn_resolutions=(16,), dropout=0.13, num_classes=0, embedding_type="positional")
  config.precond.sigma_data = 0.5
  config.train.update({"steps": 390_625, "batch_size": 512, "lr": 1e-3, "warmup_steps": 19_531,
                       "lr_decay": "constant", "ema_decay": 0.99929, "grad_clip": 0.0, "log_every": 500,
                       "checkpoint_every": 10_000, "keep": 3, "sample_every": 25_000, "sample_steps": 18,
                       "num_samples": 64})

  if variant == "tiny":
    config.model.kwargs.update({"model_channels": 8, "channel_mult": (1,), "num_blocks": 1, "attn_resolutions": (),
                                "dropout": 0.0})
    config.train.update({"steps": 4, "batch_size": 8, "warmup_steps": 2, "log_every": 2, "checkpoint_every": 2,
                         "sample_steps": 2, "num_samples": 8})
  return config
