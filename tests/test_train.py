"""End-to-end training on tiny synthetic data: the CLI's run(), resume, and 1 vs 8 devices."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import synthetic as synthetic_config
from cpal_jax import checkpointing, paths
from cpal_jax import stages as cli
from cpal_jax.infer import network
from cpal_jax.parallel import sharding
from cpal_jax.train import cam as cam_stage

STEPS = 6


def tiny_config(**overrides):
  c = synthetic_config.get_config()
  c.data.image_size = 64
  c.data.num_train = 32
  c.data.num_eval = 8
  c.model.backbone = "resnet_tiny"
  c.model.batch_norm = "frozen"  # the papers' mode; batch statistics are tested separately
  c.method.name = "sipe"  # the pipeline's mechanics on the base network; CPAL has cpal_config
  c.train.batch_size = 8
  c.train.num_steps = STEPS
  c.train.crop_size = 64
  c.train.resize_long = (56, 72)
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.eval.batch_size = 8
  c.mesh.data = 1
  c.report.enabled = False  # tests/test_report.py and the full-pipeline test cover it
  c.stages = "train_cam,make_cam,eval_cam"  # the later stages have their own tests
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def tree_state(root: str) -> dict:
  """{relative path: (size, mtime_ns)} of every file under root: a module fixture's run directory
  must read the same before and after a test that only works on a copy of it."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      st = os.stat(os.path.join(d, f))
      out[os.path.relpath(os.path.join(d, f), root)] = (st.st_size, st.st_mtime_ns)
  return out


def final_params(config, workdir):
  _, variables, _, step = network.load(config, workdir, sharding.make_mesh(config.mesh.data))
  return step, jax.tree.map(np.asarray, variables["params"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run through the CLI entry point: every test compares against it."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = tiny_config()
  summary = cli.run(config, workdir)
  return config, workdir, summary


def test_cli_run_writes_summary_and_artifacts(straight):
  _, workdir, summary = straight
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk == summary
  for key in (
      "seed_miou",
      "crf_miou",
      "mask_miou",
      "seg_val_miou",
      "per_class_iou",
      "thresholds",
      "stage_seconds",
      "baselines",
  ):
    assert key in summary
  assert np.isfinite(summary["seed_miou"]) and 0 <= summary["seed_miou"] <= 100
  assert summary["crf_miou"] is None  # the stage has not run
  assert summary["train_cam"]["steps"] == STEPS and np.isfinite(summary["train_cam"]["final_loss"])
  assert set(summary["stage_seconds"]) == {"train_cam", "make_cam", "eval_cam"}
  assert os.listdir(paths.cam_tb(workdir))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  with open(os.path.join(workdir, "summary.md")) as f:
    md = f.read()
  assert f"| `eval_cam` | Seed | {summary['seed_miou']:.2f} |" in md and "`refine`" not in md


def test_resume_equals_straight_run(straight, tmp_path):
  config, workdir, _ = straight
  resumed = str(tmp_path)
  cam_stage.train(tiny_config(**{"train.stop_at_step": 3}), resumed)
  step, _ = final_params(config, resumed)
  assert step == 3
  cam_stage.train(config, resumed)  # same command again: picks up at step 3
  s1, p1 = final_params(config, resumed)
  s2, p2 = final_params(config, workdir)
  assert s1 == s2 == STEPS
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def _eight_vs_one(config, tmp_path, rtol, atol):
  """Two steps on 1 and on 8 devices. Later steps are not compared: argmax seeds amplify float32
  rounding into discrete flips, while a wrong batch split or a missing all-reduce shows at once."""
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
  params = []
  for n in (1, 8):
    cfg = config.copy_and_resolve_references()
    cfg.mesh.data = n
    cfg.train.stop_at_step = 2
    cam_stage.train(cfg, str(tmp_path / str(n)))
    params.append(final_params(cfg, str(tmp_path / str(n)))[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), *params)


def test_eight_devices_match_one(tmp_path):
  _eight_vs_one(tiny_config(), tmp_path, rtol=1e-3, atol=2e-5)


@pytest.mark.slow
def test_eight_devices_match_one_with_batch_statistics(tmp_path):
  # BatchNorm on the global batch (synchronised over devices by jit); per-device statistics over
  # one image each would be far off.
  _eight_vs_one(tiny_config(**{"model.batch_norm": "train"}), tmp_path, rtol=1e-3, atol=5e-5)


def test_changed_model_is_refused_on_resume(straight, tmp_path):
  _, shared, _ = straight
  shared_before = tree_state(shared)
  workdir = str(tmp_path / "w")
  shutil.copytree(shared, workdir)  # a refused resume must not touch the module's run either way
  other = tiny_config(**{"model.backbone": "resnet_small"})
  with pytest.raises(ValueError, match="model.backbone"):
    cam_stage.train(other, workdir)
  assert tree_state(shared) == shared_before


def cpal_config(**overrides):
  # Epochs of 4 steps: the banks fill in epoch 1, k-means runs at step 4, PACAM and L_self are
  # live in steps 5-6.
  small = {
      "method.name": "cpal",
      "method.cpal.capacity": 16,
      "method.cpal.num_clusters": 4,
      "method.cpal.top_k": 2,
  }
  return tiny_config(**{**small, **overrides})


def final_state(config, workdir):
  setup = cam_stage.build(config, sharding.make_mesh(config.mesh.data), config.data.num_train)
  ckpt = checkpointing.Checkpointer(paths.cam_ckpt(workdir), async_save=False)
  state, _ = ckpt.restore(ckpt.latest_step(), setup.abstract_state)
  ckpt.close()
  return jax.tree.map(np.asarray, state)


@pytest.mark.slow
def test_cpal_resume_keeps_bank_pointers_and_centres(tmp_path):
  config = cpal_config()
  cam_stage.train(config, str(tmp_path / "straight"))
  cam_stage.train(cpal_config(**{"train.stop_at_step": 5}), str(tmp_path / "resumed"))
  cam_stage.train(config, str(tmp_path / "resumed"))
  a, b = final_state(config, str(tmp_path / "straight")), final_state(config, str(tmp_path / "resumed"))
  # Something to compare: most classes have bank entries and centres (with the seed mask a class
  # whose structure seed is empty in every image of these 6 steps has none).
  filled = np.asarray(a.extra.bank.count[:9]) > 0
  assert filled.sum() >= 6 and np.array_equal(np.asarray(a.extra.ready[:9]), filled)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_cpal_eight_devices_match_one(tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs 8 fake CPU devices (conftest)")
  states = []
  for n in (1, 8):
    cfg = cpal_config(**{"mesh.data": n})
    cam_stage.train(cfg, str(tmp_path / str(n)))
    states.append(final_state(cfg, str(tmp_path / str(n))))
  one, eight = states
  assert eight.extra.bank.feats.shape[0] == 16  # 9 classes padded to a multiple of 8 devices
  k = 9
  np.testing.assert_array_equal(one.extra.bank.count[:k], eight.extra.bank.count[:k])
  np.testing.assert_array_equal(one.extra.bank.ptr[:k], eight.extra.bank.ptr[:k])
  np.testing.assert_allclose(one.extra.bank.feats[:k], eight.extra.bank.feats[:k], rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(one.extra.centers[:k], eight.extra.centers[:k], rtol=1e-3, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), one.params, eight.params)
