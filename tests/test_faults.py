"""The fault suite: the tiny pipeline run through the real command line, killed (SIGKILL) or
terminated (SIGTERM) at named points of every stage that writes -- in the train loops, while a
checkpoint is being written, in make_cam, the random walk and export -- and re-run with the same
command each time; the end state must equal one uninterrupted run's: the same trained parameters,
the same CAM arrays, byte-identical PNGs, the same scores."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cpal_jax import checkpointing, paths
from cpal_jax.infer import cam as infer_cam
from cpal_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = "train_cam,make_cam,eval_cam,refine,export,train_seg"
OVERRIDES = {
    "stages": STAGES,
    "train.num_steps": 6,
    "cam.scales": (1.0, 0.5),
    "refine.workers": 1,
    "refine.irn.crop_size": 64,
    "refine.irn.batch_size": 8,
    "refine.irn.num_steps": 4,
    "refine.irn.log_every": 2,
    "refine.irn.ckpt_every": 2,
    "seg.crop_size": 64,
    "seg.batch_size": 8,
    "seg.num_steps": 4,
    "seg.log_every": 2,
    "seg.ckpt_every": 2,
}
# (fault, expected exit code): each run resumes what the previous one left.
FAULTS = [
    ("train_cam/step/3", -9),  # killed between checkpoints 2 and 4
    ("train_cam/saving/4", -9),  # killed while checkpoint 4 is written asynchronously
    ("train_cam/step/5:TERM", loop.PREEMPTED_EXIT_CODE),  # preempted: saves 5 and exits
    ("make_cam/image/3", -9),
    ("make_cam/image/5:INT", loop.PREEMPTED_EXIT_CODE),  # Ctrl-C outside training: outputs kept
    ("train_irn/step/3", -9),
    ("random_walk/image/5", -9),
    ("random_walk/image/7:TERM", loop.PREEMPTED_EXIT_CODE),
    ("export/image/5", -9),
    ("export/image/7:TERM", loop.PREEMPTED_EXIT_CODE),
    ("train_seg/step/3:INT", loop.PREEMPTED_EXIT_CODE),  # Ctrl-C: saves 3 and exits
]


def write_config(tmp_path) -> str:
  path = tmp_path / "tiny_config.py"
  path.write_text(textwrap.dedent(f"""\
          import sys
          sys.path[:0] = [{os.path.join(REPO, "tests")!r}, {os.path.join(REPO, "configs")!r}]
          from test_train import tiny_config

          def get_config():
            return tiny_config(**{OVERRIDES!r})
          """))
  return str(path)


def run_cli(
    config_path: str, workdir: str, fault: str | None = None, module: str = "cpal_jax.main", *args: str
) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "CPAL_JAX_FAULT"}
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  if fault:
    env["CPAL_JAX_FAULT"] = fault
  # Started as a background job of a non-interactive shell is: SIGINT ignored, which the child
  # inherits; the stages install their handlers explicitly, so Ctrl-C-style faults still stop them.
  argv = [sys.executable, "-m", module, f"--config={config_path}", f"--workdir={workdir}", *args]
  return subprocess.run(
      ["bash", "-c", 'trap "" INT; exec "$@"', "bash", *argv],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )


def pngs(directory: str) -> dict[str, bytes]:
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


def npz_arrays(directory: str) -> dict[str, dict]:
  # npz members carry the write time in their zip headers: compare the arrays, not the bytes.
  return {f: infer_cam.load_maps(os.path.join(directory, f)) for f in sorted(os.listdir(directory))}


def final_checkpoint_arrays(ckpt_dir: str) -> dict[str, np.ndarray]:
  """The arrays of the newest checkpoint's state (its step counter included), keyed by path."""
  import jax

  tree = checkpointing.restore_raw_state(ckpt_dir)
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.slow
def test_killed_and_preempted_runs_resume_to_the_uninterrupted_result(tmp_path):
  config_path = write_config(tmp_path)
  straight, faulty = str(tmp_path / "straight"), str(tmp_path / "faulty")
  ref = run_cli(config_path, straight)
  assert ref.returncode == 0, ref.stderr[-3000:]

  for fault, code in FAULTS:
    res = run_cli(config_path, faulty, fault)
    assert res.returncode == code, f"{fault}: exit {res.returncode}\n{res.stderr[-3000:]}"
    if code == loop.PREEMPTED_EXIT_CODE:
      assert "stopped by a termination signal" in res.stderr and "Run the same command again" in res.stderr
      with open(os.path.join(faulty, "runs.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["status"] == "preempted"
      assert "Traceback" not in res.stderr
  last = run_cli(config_path, faulty)
  assert last.returncode == 0, last.stderr[-3000:]

  for sub in ("cam/ckpt", "irn/ckpt", "seg/ckpt"):
    a, b = final_checkpoint_arrays(os.path.join(straight, sub)), final_checkpoint_arrays(
        os.path.join(faulty, sub)
    )
    assert a.keys() == b.keys(), sub
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{sub}{k}")
  maps_a, maps_b = npz_arrays(paths.cam_maps(straight)), npz_arrays(paths.cam_maps(faulty))
  assert maps_a.keys() == maps_b.keys()
  for f in maps_a:
    for k in ("keys", "high_res", "cam"):
      np.testing.assert_array_equal(maps_a[f][k], maps_b[f][k], err_msg=f"{f}:{k}")
  for directory in (paths.rw_masks, paths.masks):
    assert pngs(directory(straight)) == pngs(directory(faulty)), directory.__name__
  summaries = [json.load(open(os.path.join(w, "summary.json"))) for w in (straight, faulty)]
  for key in ("seed_miou", "mask_miou"):
    assert summaries[0][key] == summaries[1][key], key
  # No temporary or half-written file was left behind by any of the kills.
  leftovers = [
      os.path.join(d, f) for d, _, files in os.walk(faulty) for f in files if ".tmp" in f and "ckpt" not in d
  ]
  assert not leftovers, leftovers


@pytest.mark.slow
def test_preempted_ablation_exits_with_the_resume_hint_and_resumes(tmp_path):
  config_path = write_config(tmp_path)
  workdir = str(tmp_path / "ablation")
  args = ("--table=1", "--rows=I", "--seeds=0")
  res = run_cli(config_path, workdir, "train_cam/step/2:TERM", "cpal_jax.ablation", *args)
  assert res.returncode == loop.PREEMPTED_EXIT_CODE, res.stderr[-3000:]
  assert "Run the same command again" in res.stderr and "Traceback" not in res.stderr
  res = run_cli(config_path, workdir, None, "cpal_jax.ablation", *args)
  assert res.returncode == 0, res.stderr[-3000:]
  rows = json.load(open(os.path.join(workdir, "table1.json")))
  assert [r["row"] for r in rows] == ["I"] and np.isfinite(rows[0]["mean"])
  summary = json.load(open(os.path.join(workdir, "table1", "I", "seed0", "summary.json")))
  assert summary["train_cam"]["steps"] == OVERRIDES["train.num_steps"]
