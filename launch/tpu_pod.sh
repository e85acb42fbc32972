#!/usr/bin/env bash
# Run one experiment on a Cloud TPU VM slice (one host or a multi-host pod) and copy its workdir back:
#
#   bash launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator-type=TYPE --config=CONFIG [options] [-- OVERRIDES...]
#
# Steps, each printed as `+ <command>` (shell-quoted, ready to copy and paste) before it runs:
#   a. reuse the TPU VM NAME if `gcloud compute tpus tpu-vm describe` finds it, else create it;
#   b. pack the source (git-tracked and untracked, not ignored, files as they are on disk, so uncommitted edits
#      travel; never .venv/, runs/ or .git/) and copy the tarball to every worker;
#   c. on every worker: unpack into ~/mteo_jax, pip install the TPU build of JAX, then `pip install -e ~/mteo_jax`;
#   d. on every worker, the same command: python3 -m mteo_jax.main --config=CONFIG --workdir=WORKDIR
#      --config.distributed=True OVERRIDES... (each process calls jax.distributed.initialize(), which finds the
#      coordinator, the process count and its own id on a TPU slice by itself);
#   e. copy ~/mteo_jax/WORKDIR back from worker 0 to LOCAL_DIR;
#   f. with --delete-after, delete the TPU VM.
#
# Options (`--opt=VALUE` or `--opt VALUE`):
#   --name NAME              TPU VM name (required)
#   --zone ZONE              e.g. us-central2-b for v4, us-west4-a for v5e (required)
#   --accelerator-type TYPE  e.g. v4-8, v4-32, v5litepod-16, v5p-16, v6e-16 (required)
#   --runtime-version V      TPU software version; default from the generation: v4 tpu-ubuntu2204-base,
#                            v5litepod/v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#                            (another generation needs it)
#   --project PROJECT        Google Cloud project, added to every gcloud command (default: gcloud's own)
#   --config CONFIG          config file relative to the repository root, with its variant: configs/digits.py:mteo
#                            (required)
#   --workdir DIR            workdir on the workers, relative to ~/mteo_jax or absolute (default:
#                            runs/<config>_<variant>, e.g. runs/digits_mteo); on a multi-host slice give a directory
#                            that every worker sees (see below)
#   --local-dir DIR          where the workdir is copied back (default: runs/tpu_<name>); an existing non-empty
#                            directory is refused before any gcloud command
#   --source DIR             the repository to install (default: the one holding this script)
#   --jax-spec SPEC          pip requirement for JAX on TPU (default: jax[tpu])
#   --spot                   create the TPU VM as a spot VM (cheaper; can be preempted)
#   --delete-after           delete the TPU VM once the workdir is copied back (after a failure it is kept, and the
#                            delete command is printed)
#   --dry-run                print every command and run none (needs no gcloud)
#   -h, --help               print this help
#   -- OVERRIDES...          everything after `--` goes to every worker's command line: -- --config.mteo.steps=500
#
# Examples:
#   bash launch/tpu_pod.sh --name=mteo-v4 --zone=us-central2-b --accelerator-type=v4-32 \
#     --config=configs/digits.py:mteo_full -- --config.mteo.batch_size=64
#   bash launch/tpu_pod.sh --name=mteo-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 --spot --delete-after \
#     --config=configs/digits.py:mteo -- --config.mteo.steps=500
#
# A v4-32 slice is 4 hosts of 4 chips, a v5litepod-16 4 hosts of 4 chips: every global batch size must be divisible
# by the total device count (16 for both), and each process feeds its own share. Every process takes part in the
# checkpoints and reads them back on a resume, and process 0 writes results.json, the pictures and the artefacts: on a
# multi-host slice the workdir must be one directory that every worker sees, e.g. a Filestore (NFS) share or a
# gcsfuse-mounted bucket mounted at the same path on every worker (--workdir=/mnt/shared/digits_mteo). The results
# are copied back from worker 0. Rerunning the command (with another --local-dir, or after moving the
# first copy away) reuses the TPU VM and resumes the workdir: the source is unpacked over ~/mteo_jax, so the workdir
# survives. The run lasts as long as the ssh session: for long runs keep the terminal open (or run this script under
# tmux or screen). Exit status 2: a usage error, or gcloud missing.
set -euo pipefail

script="${BASH_SOURCE[0]}"
prog="${script##*/}"

usage() {
  # The header comment above, without the `#`.
  local line
  while IFS= read -r line; do
    [[ ${line} == '#!'* ]] && continue
    [[ ${line} == '#'* ]] || break
    line="${line#\#}"
    printf '%s\n' "${line# }"
  done < "${script}"
}

usage_error() {
  # The synopsis (the usage's first three lines), a pointer to --help, and last the problem.
  local lines
  mapfile -t lines < <(usage)
  printf '%s\n' "${lines[@]:0:3}" >&2
  echo "(bash launch/tpu_pod.sh --help lists every option)" >&2
  echo "${prog}: error: $*" >&2
  exit 2
}

name="" zone="" accelerator_type="" runtime_version="" project="" config="" workdir="" local_dir="" source_dir=""
jax_spec="jax[tpu]" spot=0 dry_run=0 delete_after=0
extras=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  shift
  case "${arg}" in
    -h|--help) usage; exit 0 ;;
    --)
      extras=("$@")
      for extra in ${extras[@]+"${extras[@]}"}; do
        # The workers' command line takes config overrides only; this script's own options belong before `--`.
        [[ ${extra} == --config.* ]] || usage_error "'${extra}' after --: only --config.<key>=<value> overrides go" \
                                                    "there (this script's own options, e.g. --dry-run, go before --)"
      done
      break ;;
    --spot|--dry-run|--delete-after)
      case "${arg}" in
        --spot) spot=1 ;;
        --dry-run) dry_run=1 ;;
        --delete-after) delete_after=1 ;;
      esac ;;
    --spot=*|--dry-run=*|--delete-after=*) usage_error "option ${arg%%=*} takes no value" ;;
    --name|--name=*|--zone|--zone=*|--accelerator-type|--accelerator-type=*|--runtime-version|--runtime-version=*|\
    --project|--project=*|--config|--config=*|--workdir|--workdir=*|--local-dir|--local-dir=*|--source|--source=*|\
    --jax-spec|--jax-spec=*)
      option="${arg%%=*}"
      if [[ ${arg} == *=* ]]; then
        value="${arg#*=}"
      elif [[ $# -gt 0 && $1 != -* ]]; then
        value="$1"
        shift
      else
        value=""
      fi
      [[ -n ${value} ]] || usage_error "option ${option} needs a value"
      case "${option}" in
        --name) name="${value}" ;;
        --zone) zone="${value}" ;;
        --accelerator-type) accelerator_type="${value}" ;;
        --runtime-version) runtime_version="${value}" ;;
        --project) project="${value}" ;;
        --config) config="${value}" ;;
        --workdir) workdir="${value}" ;;
        --local-dir) local_dir="${value}" ;;
        --source) source_dir="${value}" ;;
        --jax-spec) jax_spec="${value}" ;;
      esac ;;
    *) usage_error "unknown option or argument '${arg}' (config overrides go after a literal --)" ;;
  esac
done

missing=()
[[ -n ${name} ]] || missing+=(--name)
[[ -n ${zone} ]] || missing+=(--zone)
[[ -n ${accelerator_type} ]] || missing+=(--accelerator-type)
[[ -n ${config} ]] || missing+=(--config)
[[ ${#missing[@]} -eq 0 ]] || usage_error "missing required option(s): ${missing[*]}"

if [[ -z ${runtime_version} ]]; then
  case "${accelerator_type%%-*}" in
    v4) runtime_version="tpu-ubuntu2204-base" ;;
    v5litepod|v5e) runtime_version="v2-alpha-tpuv5-lite" ;;
    v5p) runtime_version="v2-alpha-tpuv5" ;;
    v6e) runtime_version="v2-alpha-tpuv6e" ;;
    *) usage_error "no default runtime version for accelerator type '${accelerator_type}' (known generations: v4," \
                   "v5litepod/v5e, v5p, v6e); pass --runtime-version" ;;
  esac
fi

if [[ -z ${source_dir} ]]; then
  script_dir="${script%/*}"
  [[ ${script_dir} == "${script}" ]] && script_dir="."
  source_dir="$(cd "${script_dir}/.." && pwd)"
fi
[[ -d ${source_dir} ]] || usage_error "--source ${source_dir} is not a directory"
source_dir="$(cd "${source_dir}" && pwd)"
# The workers run from the unpacked copy of the source, so the config is named relative to its root.
[[ ${config} == "${source_dir}"/* ]] && config="${config#"${source_dir}"/}"
config_file="${config%%:*}"
[[ ${config_file} != /* ]] || usage_error "--config ${config} must be inside --source ${source_dir}"
[[ -f ${source_dir}/${config_file} ]] || usage_error "--config: no file ${config_file} in ${source_dir}"
# The variant too, before a real run, where this machine can build the config (the package installed): a typo fails
# here, not on every worker after the slice is created. (--dry-run creates nothing and skips it.)
if [[ ${dry_run} -eq 0 && ${config} == *:* ]] && python3 -c "import mteo_jax" > /dev/null 2>&1; then
  problem="$(cd "${source_dir}" && python3 - "${config_file}" "${config#*:}" 2>&1 <<'PY' | tail -n 1
import importlib.util, sys
spec = importlib.util.spec_from_file_location("config_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
try:
  if hasattr(module, "get_config"):
    module.get_config(sys.argv[2])
except Exception as error:  # the config file's own message, e.g. its list of variants
  print(f"{type(error).__name__}: {error}")
PY
)" || true
  [[ -z ${problem} ]] || usage_error "--config ${config}: ${problem}"
fi

if [[ -z ${workdir} ]]; then
  config_name="${config_file##*/}"
  config_name="${config_name%.py}"
  [[ ${config} == *:* ]] && config_name="${config_name}_${config#*:}"
  workdir="runs/${config_name//:/_}"
fi
[[ -n ${local_dir} ]] || local_dir="runs/tpu_${name}"
while [[ ${local_dir} == ?*/ ]]; do local_dir="${local_dir%/}"; done

if [[ -e ${local_dir} || -L ${local_dir} ]]; then
  [[ -d ${local_dir} ]] || { echo "${prog}: --local-dir ${local_dir} exists and is not a directory;" \
                                  "choose another --local-dir" >&2; exit 2; }
  shopt -s nullglob dotglob
  entries=("${local_dir}"/*)
  shopt -u nullglob dotglob
  [[ ${#entries[@]} -eq 0 ]] || { echo "${prog}: --local-dir ${local_dir} exists and is not empty; choose another" \
                                        "--local-dir (or move it away)" >&2; exit 2; }
fi

if [[ ${dry_run} -eq 0 ]] && ! command -v gcloud > /dev/null 2>&1; then
  echo "${prog}: gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)" \
       "and run 'gcloud auth login', or use --dry-run to see the commands" >&2
  exit 2
fi

# --- helpers -------------------------------------------------------------------------------------------------------

show() {
  # One command as `+ word word ...`, each word quoted so that the line can be pasted into bash.
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

run() {
  show "$@"
  [[ ${dry_run} -eq 1 ]] || "$@"
}

quote_words() {
  # The words joined into one string that a remote bash parses back into the same words.
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=${zone}")
[[ -z ${project} ]] || where+=("--project=${project}")

if [[ ${workdir} == /* ]]; then
  remote_workdir="${workdir}"
else
  # shellcheck disable=SC2088  # the remote side expands ~ (home on the worker), not this shell
  remote_workdir="~/mteo_jax/${workdir}"
fi

vm_ready=0
on_exit() {
  local status=$?
  [[ -z ${tmp_dir:-} ]] || rm -rf "${tmp_dir}"
  if [[ ${status} -ne 0 && ${vm_ready} -eq 1 ]]; then
    echo "${prog}: failed (exit ${status}); the TPU VM ${name} is still up. Delete it with:" >&2
    show "${tpu[@]}" delete "${name}" "${where[@]}" --quiet >&2
  fi
}
trap on_exit EXIT

# --- a. create or reuse the TPU VM ---------------------------------------------------------------------------------

create=("${tpu[@]}" create "${name}" "${where[0]}" "--accelerator-type=${accelerator_type}"
        "--version=${runtime_version}")
[[ ${spot} -eq 0 ]] || create+=(--spot)
[[ -z ${project} ]] || create+=("${where[1]}")
describe=("${tpu[@]}" describe "${name}" "${where[@]}")
if [[ ${dry_run} -eq 1 ]]; then
  show "${describe[@]}"
  echo "# if the describe above succeeds: reuse the TPU VM ${name} (no create)"
  echo "# if the describe above fails:"
  show "${create[@]}"
else
  show "${describe[@]}"
  if "${describe[@]}" > /dev/null 2>&1; then
    echo "reusing the TPU VM ${name} in ${zone} (it exists already)"
  else
    echo "no TPU VM ${name} in ${zone}: creating it"
    run "${create[@]}"
  fi
fi
vm_ready=$(( 1 - dry_run ))

# --- b. pack the source and copy it to every worker ----------------------------------------------------------------

if [[ ${dry_run} -eq 1 ]]; then
  tarball="${TMPDIR:-/tmp}/mteo_jax_tpu.XXXXXX/mteo_jax.tar.gz"  # a real run makes the directory with mktemp -d
else
  tmp_dir="$(mktemp -d "${TMPDIR:-/tmp}/mteo_jax_tpu.XXXXXX")"
  tarball="${tmp_dir}/mteo_jax.tar.gz"
fi
file_list="${tarball%/*}/files"
excluded=(.venv runs .git)
if git -C "${source_dir}" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  echo "# the files: git-tracked and untracked but not ignored, as they are on disk; no deleted ones, none under" \
       "${excluded[*]}"
  show git -C "${source_dir}" ls-files -z --cached --others --exclude-standard
  if [[ ${dry_run} -eq 0 ]]; then
    : > "${file_list}"
    while IFS= read -r -d '' path; do
      case "${path}" in .venv/*|runs/*|.git/*) continue ;; esac
      [[ -e ${source_dir}/${path} && ! -d ${source_dir}/${path} ]] || continue
      printf '%s\0' "${path}" >> "${file_list}"
    done < <(git -C "${source_dir}" ls-files -z --cached --others --exclude-standard)
  fi
  run tar -czf "${tarball}" -C "${source_dir}" --null --files-from="${file_list}"
else
  echo "# ${source_dir} is not a git work tree: every file but ${excluded[*]}"
  run tar -czf "${tarball}" -C "${source_dir}" "${excluded[@]/#/--exclude=./}" .
fi
run "${tpu[@]}" scp "${tarball}" "${name}:mteo_jax.tar.gz" "${where[@]}" --worker=all

# --- c. install on every worker ------------------------------------------------------------------------------------

install="mkdir -p ~/mteo_jax && tar -xzf ~/mteo_jax.tar.gz -C ~/mteo_jax"
install+=" && python3 -m pip install -U $(quote_words "${jax_spec}") && python3 -m pip install -e ~/mteo_jax"
run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all "--command=${install}"

# --- d. run on every worker ----------------------------------------------------------------------------------------

main_args=("--config=${config}" "--workdir=${workdir}" --config.distributed=True ${extras[@]+"${extras[@]}"})
run "${tpu[@]}" ssh "${name}" "${where[@]}" --worker=all \
  "--command=cd ~/mteo_jax && python3 -m mteo_jax.main $(quote_words "${main_args[@]}")"

# --- e. copy the workdir back from worker 0 ------------------------------------------------------------------------

case "${local_dir}" in
  /*/*|[!/]*/*) local_parent="${local_dir%/*}" ;;
  /*) local_parent="/" ;;
  *) local_parent="." ;;
esac
run mkdir -p "${local_parent}"
# scp into an existing directory would nest the workdir one level down: let scp create LOCAL_DIR itself.
[[ ! -d ${local_dir} ]] || run rmdir "${local_dir}"
run "${tpu[@]}" scp --recurse "${name}:${remote_workdir}" "${local_dir}" "${where[@]}" --worker=0
[[ ${dry_run} -eq 1 ]] || echo "copied ${remote_workdir} from worker 0 to ${local_dir}"

# --- f. delete the TPU VM ------------------------------------------------------------------------------------------

if [[ ${delete_after} -eq 1 ]]; then
  run "${tpu[@]}" delete "${name}" "${where[@]}" --quiet
  vm_ready=0
fi
