"""The pod path on one machine: every stage of the smoke config as 2 JAX processes x 2 CPU devices
(launch/local.sh, one global mesh over both processes) against 1 process x 4 devices with the same
seed. The same global batches in the same order reach the same 4-device mesh, so the networks agree
to float rounding and the pipeline's figures and files are the same; a process killed mid-training
stops the launcher, and the same command resumes to the same end."""

import glob
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/synthetic.py:smoke"
FIGURES = ("seed_miou", "crf_miou", "mask_miou", "seg_val_miou", "seg_val_miou_crf")
# Per-image outputs: each must be written once, by whichever process holds the image.
OUTPUTS = ("cam/maps", "irn/ir_label", "refine/crf", "refine/rw", "masks", "seg/pred", "seg/pred_crf")
# A run from the first stages only, for the kill test: the seed figure closes it.
CAM_STAGES = "--config.stages=train_cam,make_cam,eval_cam"

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("CPAL_JAX_FAULT", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, **extra)
  return env


def run_one(workdir, *flags, devices: int = 4) -> subprocess.CompletedProcess:
  """One process over `devices` fake CPU devices."""
  argv = [sys.executable, "-m", "cpal_jax.main", SMOKE, f"--workdir={workdir}", *flags]
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def run_pod(workdir, *flags, **env) -> subprocess.CompletedProcess:
  """2 processes x 2 fake CPU devices through the launcher."""
  argv = ["bash", os.path.join(REPO, "launch", "local.sh"), "2", "2", "--", SMOKE, f"--workdir={workdir}", *flags]
  return subprocess.run(argv, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=900)


def _ok(res: subprocess.CompletedProcess) -> None:
  assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(1 x 4 workdir, 2 x 2 workdir, the launcher's output) of the whole smoke pipeline."""
  root = tmp_path_factory.mktemp("pod")
  one, pod = root / "one", root / "pod"
  _ok(run_one(one))
  res = run_pod(pod)
  _ok(res)
  return one, pod, res.stdout


def _state(directory) -> dict:
  """A checkpoint's parameters, BatchNorm statistics and method state (CPAL's bank), as host arrays."""
  from cpal_jax import checkpointing

  state = checkpointing.restore_raw_state(str(directory))
  return {k: state[k] for k in ("params", "batch_stats", "extra") if k in state}


@pytest.mark.parametrize("stage", ["cam", "irn", "seg"])
def test_pod_trains_the_same_networks(runs, stage):
  one, pod, _ = runs
  a, b = _state(one / stage / "ckpt"), _state(pod / stage / "ckpt")
  paths_a = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(a)]
  assert paths_a == [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)]
  for name, x, y in zip(paths_a, jax.tree.leaves(a), jax.tree.leaves(b)):
    # CPAL's banks and k-means centres included: the FIFO order of the entries is the same too.
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5, err_msg=f"{stage} {name}")


def test_pod_scores_the_same(runs):
  one, pod, _ = runs
  a = json.loads((one / "summary.json").read_text())
  b = json.loads((pod / "summary.json").read_text())
  for k in FIGURES:
    assert a[k] is not None and abs(a[k] - b[k]) <= 0.1, (k, a[k], b[k])
  # Counts of every process, not process 0's share.
  assert b["make_cam"]["written"] == a["make_cam"]["written"] == a["make_cam"]["images"]
  assert b["export"]["written"] == a["export"]["written"]
  assert b["eval_seg"]["predicted"] == a["eval_seg"]["predicted"]


def _files(workdir, folder) -> set[str]:
  return {os.path.basename(p) for p in glob.glob(os.path.join(workdir, folder, "*")) if os.path.isfile(p)}


@pytest.mark.parametrize("folder", OUTPUTS)
def test_pod_writes_the_same_files(runs, folder):
  one, pod, _ = runs
  assert _files(one, folder), f"nothing in {one / folder}"
  assert _files(pod, folder) == _files(one, folder)


def test_pod_writes_the_run_record_once(runs):
  _, pod, out = runs
  assert len((pod / "runs.jsonl").read_text().splitlines()) == 1
  for tb in ("cam/tb", "irn/tb", "seg/tb"):
    assert len(glob.glob(os.path.join(pod, tb, "events.*"))) == 1, tb
  assert (pod / "summary.md").exists() and (pod / "report").is_dir()
  # The summary is printed by process 0 alone, after the last stage of both.
  assert out.count("== cpal_jax summary ==") == 1 and "[p0]   seed_miou" in out
  assert "[p1] " in out and "stage 7/7 eval_seg" in out


def test_killed_process_stops_the_launcher_and_the_same_command_resumes(runs, tmp_path):
  one, _, _ = runs
  workdir = tmp_path / "killed"
  flags = [CAM_STAGES, "--config.train.ckpt_every=2"]
  t0 = time.time()
  res = run_pod(workdir, *flags, CPAL_JAX_FAULT="train_cam/step/7@1", LOCAL_LAUNCH_GRACE="3")
  took = time.time() - t0
  assert res.returncode == 128 + 9, (res.stdout + res.stderr)[-4000:]  # process 1's SIGKILL
  assert "[launch] process 1 exited with status 137: stopping the others" in res.stdout
  assert took < 240, f"the launcher took {took:.0f} s: it waited for JAX's heartbeat timeout"
  from cpal_jax import checkpointing

  saved = checkpointing.latest_step(str(workdir / "cam" / "ckpt"))
  assert saved in (2, 4, 6), saved
  if (workdir / "summary.json").exists():
    assert json.loads((workdir / "summary.json").read_text())["seed_miou"] is None

  res = run_pod(workdir, *flags)
  _ok(res)
  assert f"train_cam: resumed from step {saved}" in res.stdout
  a, b = _state(one / "cam" / "ckpt"), _state(workdir / "cam" / "ckpt")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5)
  ref = json.loads((one / "summary.json").read_text())["seed_miou"]
  assert abs(json.loads((workdir / "summary.json").read_text())["seed_miou"] - ref) <= 0.1
