"""``launch/tpu_pod.sh``, the TPU VM slice launcher, without a cloud: the commands its ``--dry-run`` prints (parsed back
into argv with ``shlex``), its usage errors, its refusals before any gcloud command, and one full run against a fake
``gcloud`` that records its calls (the tarball holds the files as they are on disk, uncommitted edits included)."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu_pod.sh")
REQUIRED = {"--name": "pod1", "--zone": "us-central2-b", "--accelerator-type": "v4-32",
            "--config": "configs/digits.py:mteo"}
USAGE_LINE = "Run one experiment on a Cloud TPU VM slice"
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def required_args(**changes: str | None) -> list[str]:
  """The required options as ``--opt=value``; a change to None leaves that option out."""
  options = dict(REQUIRED)
  for key, value in changes.items():
    options[f"--{key.replace('_', '-')}"] = value
  return [f"{option}={value}" for option, value in options.items() if value is not None]


def run_script(*args: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def printed_commands(stdout: str) -> list[list[str]]:
  """Every ``+ command`` line, back as the argv it stands for."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_commands(stdout: str) -> list[list[str]]:
  return [argv for argv in printed_commands(stdout) if argv[0] == "gcloud"]


def remote_command(argv: list[str]) -> list[list[str]]:
  """An ssh line's ``--command=...``, as the worker's shell splits it: one argv per ``&&``-joined part."""
  (command,) = [arg[len("--command="):] for arg in argv if arg.startswith("--command=")]
  parts, current = [], []
  for word in shlex.split(command):
    if word == "&&":
      parts.append(current)
      current = []
    else:
      current.append(word)
  return parts + [current]


def bin_dir_with(path: str, *tools: str) -> str:
  """A directory holding links to only these tools, to serve as the whole PATH."""
  os.makedirs(path)
  for tool in tools:
    os.symlink(shutil.which(tool), os.path.join(path, tool))
  return path


def test_script_is_executable_and_parses():
  """The script carries its executable bit and ``bash -n`` accepts it."""
  assert os.stat(SCRIPT).st_mode & stat.S_IXUSR
  subprocess.run(["bash", "-n", SCRIPT], check=True, timeout=30)


@pytest.mark.parametrize("accelerator_type,runtime", [("v4-32", "tpu-ubuntu2204-base"),
                                                      ("v5litepod-16", "v2-alpha-tpuv5-lite")])
def test_dry_run_prints_the_whole_sequence_in_order(tmp_path, accelerator_type, runtime):
  """describe, create (type, default runtime), scp of the tarball to all workers, install and run over ssh on all
  workers (pip lines; --config, --workdir, --config.distributed=True and the extras), scp --recurse back from worker
  0; no --project, --spot or delete unless asked."""
  proc = run_script(*required_args(accelerator_type=accelerator_type), "--dry-run", "--",
                    "--config.mteo.steps=500", "--config.mteo.solvers=('euler','ipndm')", cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  commands = gcloud_commands(proc.stdout)
  verbs = ("describe", "create", "scp", "ssh", "ssh", "scp")
  assert [argv[:5] for argv in commands] == [TPU + [verb] for verb in verbs]
  describe, create, scp_to, install, train, scp_back = commands
  zone = "--zone=us-central2-b"
  assert describe == TPU + ["describe", "pod1", zone]
  assert create == TPU + ["create", "pod1", zone, f"--accelerator-type={accelerator_type}", f"--version={runtime}"]
  tarball = scp_to[5]
  assert tarball.endswith(".tar.gz") and scp_to == TPU + ["scp", tarball, "pod1:mteo_jax.tar.gz", zone, "--worker=all"]
  assert install[4:7] == ["ssh", "pod1", zone] and "--worker=all" in install
  assert remote_command(install) == [
    ["mkdir", "-p", "~/mteo_jax"], ["tar", "-xzf", "~/mteo_jax.tar.gz", "-C", "~/mteo_jax"],
    ["python3", "-m", "pip", "install", "-U", "jax[tpu]"], ["python3", "-m", "pip", "install", "-e", "~/mteo_jax"]]
  assert train[4:7] == ["ssh", "pod1", zone] and "--worker=all" in train
  assert remote_command(train) == [
    ["cd", "~/mteo_jax"],
    ["python3", "-m", "mteo_jax.main", "--config=configs/digits.py:mteo", "--workdir=runs/digits_mteo",
     "--config.distributed=True", "--config.mteo.steps=500", "--config.mteo.solvers=('euler','ipndm')"]]
  assert scp_back == TPU + ["scp", "--recurse", "pod1:~/mteo_jax/runs/digits_mteo", "runs/tpu_pod1", zone,
                            "--worker=0"]
  # The tarball is made before it is copied, and LOCAL_DIR's parent before the copy back.
  lines = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
  tar_line = next(i for i, line in enumerate(lines) if line.startswith("+ tar -czf"))
  assert tar_line < lines.index("+ " + shlex.join(scp_to)) and "+ mkdir -p runs" in lines
  assert "--spot" not in create and not any("--project" in arg for argv in commands for arg in argv)
  assert not any(argv[4] == "delete" for argv in commands)
  assert not os.path.exists(tmp_path / "runs"), "a dry run creates nothing"


def test_dry_run_labels_both_branches_of_the_reuse_check(tmp_path):
  """Between the describe and the create, the dry run says that success reuses the VM and failure creates it."""
  proc = run_script(*required_args(), "--dry-run", cwd=str(tmp_path))
  lines = proc.stdout.splitlines()
  describe = next(i for i, line in enumerate(lines) if " describe " in line)
  create = next(i for i, line in enumerate(lines) if " create " in line)
  between = lines[describe + 1:create]
  assert any(line.startswith("#") and "succeeds" in line and "reuse" in line for line in between)
  assert between[-1] == "# if the describe above fails:"


def test_project_spot_and_delete_after(tmp_path):
  """--project lands on every gcloud line, --spot on create only, --delete-after adds the delete as the last step;
  options also take their value as the next word."""
  args = ["--name", "pod2", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16", "--config",
          "configs/gmm.py", "--project", "my-proj", "--spot", "--delete-after", "--dry-run"]
  proc = run_script(*args, cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  commands = gcloud_commands(proc.stdout)
  assert all("--project=my-proj" in argv for argv in commands)
  assert [argv[4] for argv in commands if "--spot" in argv] == ["create"]
  assert commands[-1] == TPU + ["delete", "pod2", "--zone=us-west4-a", "--project=my-proj", "--quiet"]
  assert [argv[4] for argv in commands].count("delete") == 1
  # A config without a variant gives runs/<config> as the workdir.
  assert remote_command(commands[4])[1][4] == "--workdir=runs/gmm"


@pytest.mark.parametrize("accelerator_type,runtime", [("v5e-16", "v2-alpha-tpuv5-lite"), ("v5p-16", "v2-alpha-tpuv5"),
                                                      ("v6e-16", "v2-alpha-tpuv6e"), ("v4-8", "tpu-ubuntu2204-base")])
def test_default_runtime_version_per_generation(tmp_path, accelerator_type, runtime):
  """Each known generation gets its own default runtime version."""
  proc = run_script(*required_args(accelerator_type=accelerator_type), "--dry-run", cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  (create,) = [argv for argv in gcloud_commands(proc.stdout) if argv[4] == "create"]
  assert f"--version={runtime}" in create


def test_explicit_options_override_the_defaults(tmp_path):
  """--runtime-version (also for an unknown generation), --workdir, --local-dir, --jax-spec and --source replace
  their defaults."""
  source = tmp_path / "src"
  (source / "configs").mkdir(parents=True)
  (source / "configs" / "toy.py").write_text("")
  proc = run_script(*required_args(accelerator_type="v9x-8", config="configs/toy.py:small"),
                    "--runtime-version=my-runtime", "--workdir=runs/exp7", "--local-dir=out/pod/", "--jax-spec",
                    "jax[tpu]==0.4.35", f"--source={source}", "--dry-run", cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  describe, create, scp_to, install, train, scp_back = gcloud_commands(proc.stdout)
  assert "--version=my-runtime" in create and "--accelerator-type=v9x-8" in create
  assert ["python3", "-m", "pip", "install", "-U", "jax[tpu]==0.4.35"] in remote_command(install)
  assert remote_command(train)[1][3:5] == ["--config=configs/toy.py:small", "--workdir=runs/exp7"]
  assert scp_back[6:8] == ["pod1:~/mteo_jax/runs/exp7", "out/pod"]
  (tar,) = [argv for argv in printed_commands(proc.stdout) if argv[0] == "tar"]
  assert tar[tar.index("-C") + 1] == str(source)


@pytest.mark.parametrize("args,problem", [
  (required_args() + ["--bogus=1"], "unknown option or argument '--bogus=1'"),
  (required_args() + ["stray"], "unknown option or argument 'stray'"),
  (required_args() + ["-x"], "unknown option or argument '-x'"),
  (required_args(name=None), "missing required option(s): --name"),
  (required_args(zone=None), "missing required option(s): --zone"),
  (required_args(accelerator_type=None), "missing required option(s): --accelerator-type"),
  (required_args(config=None), "missing required option(s): --config"),
  (required_args() + ["--project"], "option --project needs a value"),
  (required_args() + ["--project="], "option --project needs a value"),
  (["--zone", "--name=pod1"] + required_args(zone=None), "option --zone needs a value"),
  (required_args() + ["--spot=yes"], "option --spot takes no value"),
  (required_args(accelerator_type="v9x-8"), "pass --runtime-version"),
  (required_args(config="configs/nope.py:mteo"), "no file configs/nope.py"),
  (required_args() + ["--", "--config.mteo.steps=5", "--dry-run"], "'--dry-run' after --: only --config."),
], ids=["unknown", "positional", "short", "no-name", "no-zone", "no-type", "no-config", "no-value-at-end",
        "empty-value", "option-as-value", "flag-with-value", "unknown-generation", "no-such-config",
        "own-option-after-dashes"])
def test_usage_errors_exit_2_with_the_usage(tmp_path, args, problem):
  """Each usage error exits 2 before any command, with the usage on stderr and a last line naming the problem."""
  proc = run_script(*args, "--dry-run", cwd=str(tmp_path))
  assert proc.returncode == 2
  assert USAGE_LINE in proc.stderr and "--accelerator-type=TYPE" in proc.stderr and "--help lists" in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("tpu_pod.sh: error: ") and problem in last, last
  assert proc.stdout == ""


def test_help_prints_the_usage_with_every_option(tmp_path):
  """--help and -h exit 0 with the usage on stdout: every option, both examples and the multi-host note."""
  for flag in ("--help", "-h"):
    proc = run_script(flag, cwd=str(tmp_path))
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(USAGE_LINE)
    for option in ("--name", "--zone", "--accelerator-type", "--runtime-version", "--project", "--config",
                   "--workdir", "--local-dir", "--source", "--jax-spec", "--spot", "--dry-run", "--delete-after"):
      assert f"  {option} " in proc.stdout, option
    assert "--accelerator-type=v4-32" in proc.stdout and "--accelerator-type=v5litepod-16" in proc.stdout
    assert "worker 0" in proc.stdout and "every worker sees" in proc.stdout


def test_non_empty_local_dir_is_refused_before_any_gcloud_command(tmp_path):
  """An existing non-empty --local-dir exits 2 and prints no command; an empty one is used (removed so that scp makes
  it, rather than nesting the workdir inside it)."""
  full = tmp_path / "runs" / "tpu_pod1"
  full.mkdir(parents=True)
  (full / "results.json").write_text("{}")
  proc = run_script(*required_args(), "--dry-run", cwd=str(tmp_path))
  assert proc.returncode == 2 and printed_commands(proc.stdout) == []
  assert "choose another --local-dir" in proc.stderr
  (tmp_path / "empty").mkdir()
  proc = run_script(*required_args(), "--local-dir=empty", "--dry-run", cwd=str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  assert ["rmdir", "empty"] in printed_commands(proc.stdout)


def test_without_gcloud_a_run_asks_to_install_it_but_a_dry_run_works(tmp_path):
  """With a PATH that has no gcloud, a real run exits 2 naming the Google Cloud CLI; a dry run still prints the
  commands."""
  env = {"PATH": bin_dir_with(str(tmp_path / "bin"), "bash", "git"), "HOME": str(tmp_path)}
  proc = run_script(*required_args(), cwd=str(tmp_path), env=env)
  assert proc.returncode == 2 and printed_commands(proc.stdout) == []
  assert "install the Google Cloud CLI" in proc.stderr
  proc = run_script(*required_args(), "--dry-run", cwd=str(tmp_path), env=env)
  assert proc.returncode == 0, proc.stderr
  assert len(gcloud_commands(proc.stdout)) == 6


FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(args) + "\\n")
verb = args[3]
positional = [a for a in args[4:] if not a.startswith("-")]
if verb == "describe":
  sys.exit(int(os.environ["FAKE_DESCRIBE_RC"]))
if verb == "scp" and "--recurse" not in args:
  shutil.copy(positional[0], os.environ["FAKE_GCLOUD_TARBALL"])
elif verb == "scp":
  dest = positional[1]
  if os.path.isdir(dest):  # as scp -r does: into an existing directory, one level down
    dest = os.path.join(dest, os.path.basename(positional[0]))
  os.makedirs(dest)
  with open(os.path.join(dest, "results.json"), "w") as f:
    f.write("{{}}")
elif verb == "ssh" and "mteo_jax.main" in args[-1]:
  sys.exit(int(os.environ["FAKE_RUN_RC"]))
"""


TOY_CONFIG = """def get_config(variant=None):  # edited, not committed
  if variant != "a":
    raise ValueError(f"unknown variant {variant!r}; expected one of ['a']")
  return variant
"""


def make_source(path) -> None:
  """A small git repository: committed, edited, untracked, ignored, deleted, .venv/ and runs/ files."""
  def git(*args):
    subprocess.run(["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True, timeout=30)
  (path / "configs").mkdir(parents=True)
  (path / "configs" / "toy.py").write_text("def get_config(variant=None):\n  return variant\n")
  (path / "gone.py").write_text("deleted later\n")
  (path / ".gitignore").write_text("*.log\n")
  git("init", "-q")
  git("add", ".")
  git("commit", "-q", "-m", "init")
  (path / "configs" / "toy.py").write_text(TOY_CONFIG)
  (path / "new.py").write_text("untracked\n")
  (path / "debug.log").write_text("ignored\n")
  (path / "gone.py").unlink()
  for sub in (".venv", "runs"):
    (path / sub).mkdir()
    (path / sub / "big.bin").write_text("x")


def fake_cloud(tmp_path, *, describe_rc: int, run_rc: int = 0):
  """A source repository (``make_source``) and an environment whose gcloud is ``FAKE_GCLOUD`` (the virtualenv's
  python3 on PATH, so that the script can build configs): ``(source, env, calls log, tarball copy)``."""
  source = tmp_path / "src"
  make_source(source)
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
  (bin_dir / "gcloud").chmod(0o755)
  log, tarball = tmp_path / "calls.jsonl", tmp_path / "copied.tar.gz"
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]])
  env = dict(os.environ, PATH=path, FAKE_GCLOUD_LOG=str(log), FAKE_GCLOUD_TARBALL=str(tarball),
             FAKE_DESCRIBE_RC=str(describe_rc), FAKE_RUN_RC=str(run_rc))
  return source, env, log, tarball


@pytest.mark.parametrize("exists", [False, True], ids=["create", "reuse"])
def test_run_against_a_fake_gcloud(tmp_path, exists):
  """Without --dry-run, against a fake gcloud: create only when describe fails, the tarball holds the files as on disk
  (edits and untracked files in; ignored, deleted, .venv/ and runs/ out), the workdir lands in --local-dir even when
  that exists empty, the temporary directory is removed."""
  source, env, log, tarball = fake_cloud(tmp_path, describe_rc=0 if exists else 1)
  (tmp_path / "tmp").mkdir()
  (tmp_path / "back").mkdir()
  env["TMPDIR"] = str(tmp_path / "tmp")
  proc = run_script(*required_args(config="configs/toy.py:a"), f"--source={source}", "--local-dir=back",
                    "--delete-after", cwd=str(tmp_path), env=env)
  assert proc.returncode == 0, proc.stderr
  verbs = [json.loads(line)[3] for line in log.read_text().splitlines()]
  created = ["create"] if not exists else []
  assert verbs == ["describe", *created, "scp", "ssh", "ssh", "scp", "delete"]
  assert ("reusing the TPU VM pod1" in proc.stdout) == exists
  with tarfile.open(tarball) as tar:
    names = sorted(tar.getnames())
    assert names == [".gitignore", "configs/toy.py", "new.py"]
    assert tar.extractfile("configs/toy.py").read() == TOY_CONFIG.encode()
  assert (tmp_path / "back" / "results.json").exists()
  assert os.listdir(tmp_path / "tmp") == []


def test_failed_run_keeps_the_vm_and_prints_the_delete_command(tmp_path):
  """When the training command fails the script stops with its status, skips the copy back and the delete, and
  prints how to delete the VM."""
  source, env, log, _ = fake_cloud(tmp_path, describe_rc=0, run_rc=3)
  proc = run_script(*required_args(config="configs/toy.py"), f"--source={source}", "--delete-after",
                    cwd=str(tmp_path), env=env)
  assert proc.returncode == 3
  assert [json.loads(line)[3] for line in log.read_text().splitlines()] == ["describe", "scp", "ssh", "ssh"]
  hint = [shlex.split(line[2:]) for line in proc.stderr.splitlines() if line.startswith("+ ")]
  assert hint == [TPU + ["delete", "pod1", "--zone=us-central2-b", "--quiet"]]


def test_a_real_run_refuses_an_unknown_variant_before_any_gcloud_command(tmp_path):
  """Before a real run the config file's get_config(variant) is built here (where the package imports): a typo in the
  variant exits 2 with the config's own message, before the slice is created."""
  source, env, log, _ = fake_cloud(tmp_path, describe_rc=1)
  proc = run_script(*required_args(config="configs/toy.py:b"), f"--source={source}", cwd=str(tmp_path), env=env)
  assert proc.returncode == 2 and not log.exists(), proc.stderr
  assert "--config configs/toy.py:b: ValueError: unknown variant 'b'; expected one of ['a']" in proc.stderr
