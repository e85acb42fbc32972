#!/usr/bin/env bash
# Retrain the shipped teachers (mteo_jax/pretrained/teacher_{gmm,digits,fmnist,digits_dit}) with the commands that
# made them. Run from the repository root with the virtual env active:
#
#   bash launch/train_teachers.sh [gmm|digits|fmnist|digits_dit ...]     (default: all four, one after the other)
#
# Each run trains into runs/teacher_<name> (resumable: rerunning continues from the last checkpoint) and exports the
# EMA weights to runs/teacher_<name>/teacher. The shipped copy is replaced only with OVERWRITE=1; otherwise the script
# says where the new teacher is. Measured on a 2-core CPU machine (wall time in each teacher's metadata.json):
#   gmm     20000 steps   498 s    final EDM loss 0.856
#   digits   4000 steps  1838 s    final EDM loss 0.331
#   fmnist   6000 steps  2472 s    final EDM loss 0.214
#   digits_dit 15000 steps 117 s (one H200 GPU; ~5 steps/s, ~50 min, on 2 CPU cores)  final EDM loss 0.300
# Fashion-MNIST comes from Debian's `dataset-fashion-mnist` IDX files (apt-get install -y dataset-fashion-mnist).
set -euo pipefail

declare -A CONFIG=(
  [gmm]="configs/gmm.py"
  [digits]="configs/digits.py"
  [fmnist]="configs/fmnist.py"
  [digits_dit]="configs/digits.py:dit"
)
declare -A EXTRA=(
  [gmm]=""
  [digits]="--config.train.steps=4000 --config.train.warmup_steps=200 --config.train.sample_every=1000"
  [fmnist]=""
  [digits_dit]=""
)

names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(gmm digits fmnist digits_dit)
for name in "${names[@]}"; do
  if [[ -z ${EXTRA[$name]+set} ]]; then
    echo "unknown teacher '$name'; expected one of: ${!EXTRA[*]}" >&2
    exit 2
  fi
done

for name in "${names[@]}"; do
  workdir="runs/teacher_${name}"
  # shellcheck disable=SC2086  # the extra flags are meant to split
  python -m mteo_jax.main --config="${CONFIG[$name]}" --workdir="${workdir}" ${EXTRA[$name]}
  shipped="mteo_jax/pretrained/teacher_${name}"
  if [[ "${OVERWRITE:-0}" == 1 ]]; then
    rm -rf "${shipped}" && cp -r "${workdir}/teacher" "${shipped}"
    echo "replaced ${shipped} with ${workdir}/teacher"
  else
    echo "trained ${workdir}/teacher; ${shipped} left as it is (OVERWRITE=1 replaces it)"
  fi
done
