#!/usr/bin/env bash
# Train the two offline feature networks shipped in mteo_jax/pretrained/ (for FD-digits and FD-fmnist; see
# mteo_jax/features.py). CPU only, one after the other. Run from the repository root with the virtual env active.
# Fashion-MNIST comes from Debian's `dataset-fashion-mnist` IDX files (apt-get install -y dataset-fashion-mnist).
#
# Measured on a shared, heavily loaded 2-core CPU machine (jax 0.10.2, one core each), as recorded in each network's
# metadata.json:
#   digits         test accuracy 0.9596 (297 held-out images), training 44 s
#   Fashion-MNIST  test accuracy 0.9004 (10000 held-out images), training 761 s
set -euo pipefail

# digits: 1500 train / 297 test images; random +-1 pixel shifts make up for the small training set.
python -m mteo_jax.features --dataset=digits --steps=2000 --batch_size=128 --seed=0 --learning_rate=2e-3 \
  --augment_shift=1 --out=mteo_jax/pretrained/features_digits --overwrite "$@"

# Fashion-MNIST: 60000 train / 10000 test images; no augmentation (it did not help at this step count).
python -m mteo_jax.features --dataset=fashion_mnist --steps=2000 --batch_size=128 --seed=0 --learning_rate=2e-3 \
  --out=mteo_jax/pretrained/features_fmnist --overwrite "$@"
