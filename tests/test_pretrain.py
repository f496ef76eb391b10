"""Backbone pretraining on ProcNet: the data, the command, and the weights the synthetic default
starts from."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pretrain as pretrain_config  # configs/pretrain.py
import synthetic as synthetic_config
from cpal_jax.data import procnet, synthetic
from cpal_jax.models import cam_net, pretrained
from cpal_jax.train import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_procnet_is_deterministic_and_its_splits_are_disjoint():
  a, b = procnet.ProcNetSource("train", num_images=8), procnet.ProcNetSource("train", num_images=8)
  val = procnet.ProcNetSource("val", num_images=8)
  for i in range(8):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["label"] == b[i]["label"]
    assert not np.array_equal(a[i]["image"], val[i]["image"])
  assert a[0]["image"].shape == (64, 64, 3) and a[0]["image"].dtype == np.uint8


def test_procnet_has_at_least_100_classes_all_drawn():
  assert procnet.NUM_CLASSES >= 100
  labels = [int(procnet.ProcNetSource("train", num_images=3000)[i]["label"]) for i in range(3000)]
  counts = np.bincount(labels, minlength=procnet.NUM_CLASSES)
  assert counts.min() > 0 and len(counts) == procnet.NUM_CLASSES


def test_every_procnet_shape_and_texture_draws_pixels():
  v, u = np.mgrid[-1.2:1.2:97j, -1.2:1.2:97j].astype(np.float32)
  areas = [procnet.shape_mask(s, u, v).mean() for s in range(len(procnet.SHAPES))]
  assert min(areas) > 0.08 and max(areas) < 0.8, areas
  masks = [procnet.shape_mask(s, u, v) for s in range(len(procnet.SHAPES))]
  for i in range(len(masks)):  # no two shapes are the same silhouette
    for j in range(i):
      assert (masks[i] != masks[j]).mean() > 0.03, (procnet.SHAPES[i], procnet.SHAPES[j])
  rng = np.random.default_rng(0)
  for t, name in enumerate(procnet.TEXTURES):
    idx = procnet.texture_index(t, u, v, rng)
    frac = idx.mean()
    assert (frac == 0.0) if name == "solid" else (0.1 < frac < 0.7), (name, frac)


def test_procnet_shares_no_class_with_the_segmentation_data():
  # Pretraining must never see the segmentation classes as labels.
  seg_names = set(synthetic.CLASS_NAMES)
  assert not seg_names & set(procnet.SHAPES)
  assert not seg_names & {procnet.class_name(i) for i in range(procnet.NUM_CLASSES)}


def tiny_pretrain_config(tmp_path):
  c = pretrain_config.get_config()
  c.out = str(tmp_path / "weights" / "tiny.npz")
  c.data.num_train = 64
  c.data.num_val = 20
  c.train.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.ckpt_every = 2
  c.eval.batch_size = 10
  c.mesh.data = 1
  return c


def test_pretrain_writes_weights_that_model_pretrained_loads_with_bn_statistics(tmp_path):
  config = tiny_pretrain_config(tmp_path)
  record = pretrain.train(config, str(tmp_path / "run"))
  assert os.path.exists(config.out)
  with open(pretrain.record_path(config.out)) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(record))
  assert saved["config_hash"] == pretrain.config_hash(config) and 0.0 <= saved["val_accuracy"] <= 1.0
  flat = pretrained.read_flat(config.out)
  assert not any("fc" in k for k in flat), "the classifier head is not part of the backbone weights"
  stats = {k: v for k, v in flat.items() if k.startswith("batch_stats/")}
  # Training moved the running statistics off their init (mean 0, var 1): they are the real ones.
  assert stats and any(np.abs(v).max() > 1e-3 for k, v in stats.items() if k.endswith("/mean"))

  cfg = synthetic_config.get_config()
  cfg.model.pretrained = config.out
  model = cam_net.from_config(cfg)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  loaded, n = pretrained.load_into(variables, config.out, prefix="backbone")
  assert n == len(flat)
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["bn1"]["mean"], flat["batch_stats/bn1/mean"])
  np.testing.assert_array_equal(loaded["batch_stats"]["backbone"]["layer4_0"]["bn3"]["var"], flat["batch_stats/layer4_0/bn3/var"])
  np.testing.assert_array_equal(loaded["params"]["backbone"]["conv1"]["kernel"], flat["params/conv1/kernel"])


def test_pretrain_refuses_a_bad_out_path_before_any_work(tmp_path):
  config = tiny_pretrain_config(tmp_path)
  config.out = str(tmp_path / "w.pth")
  with pytest.raises(ValueError, match=r"out=.*\.npz"):
    pretrain.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_the_synthetic_default_resolves_its_pretrained_backbone_offline():
  """The default needs no download and no extra command: the committed file is what the committed
  pretraining config makes (its record carries that config's hash), and it loads into the CAM net,
  the boundary net and DeepLab's backbone."""
  c = synthetic_config.get_config()
  for key, path in (
      ("model.pretrained", c.model.pretrained),
      ("refine.irn.pretrained", c.refine.irn.pretrained),
      ("seg.pretrained", c.seg.pretrained),
  ):
    assert path == c.model.pretrained and os.path.isfile(path), key
  assert c.model.batch_norm == "frozen" and c.model.detach_after == 2 and c.train.head_lr_mult == 10.0
  with open(pretrain.record_path(c.model.pretrained)) as f:
    record = json.load(f)
  made_by = (record["config_hash"], record["procnet_hash"])
  assert made_by == (pretrain.config_hash(pretrain_config.get_config()), pretrain.data_hash()), (
      "cpal_jax/assets/procnet_resnet_tiny.npz was not made by configs/pretrain.py and "
      "cpal_jax/data/procnet.py as they are now: regenerate it with `python -m cpal_jax.pretrain`"
  )
  assert record["val_accuracy"] > 10 * record["chance"]
  model = cam_net.from_config(c)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
  _, n = pretrained.load_into(variables, c.model.pretrained, prefix="backbone")
  assert n == len(pretrained.read_flat(c.model.pretrained))


def test_procnet_module_does_not_import_jax():
  # It runs inside grain worker processes.
  code = "import sys; import cpal_jax.data.procnet; assert 'jax' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
