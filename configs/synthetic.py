"""The embedded default: procedural multi-label images, no download, minutes on 2 CPU cores.

Sized so `python -m cpal_jax.main` trains from scratch and scores its seeds in about ten minutes
on two cores; everything is overridable, e.g. `--config.train.epochs=20`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (configs are loaded by file path, not as a package)


def get_config():
  c = common.base()
  c.workdir = "runs/synthetic"
  c.data.name = "synthetic"
  c.data.num_classes = 10  # background + 9 object classes (cpal_jax/data/synthetic.py)
  c.data.image_size = 96
  c.model.backbone = "resnet_small"
  # Random init: layers 1-2 must train, SIPE's detach assumes ImageNet features there.
  c.model.detach_after = -1
  c.train.batch_size = 16
  c.train.epochs = 12
  c.train.crop_size = 96
  c.train.resize_long = (80, 120)
  c.train.log_every = 25
  c.train.ckpt_every = 200
  c.eval.pad_multiple = 16
  return c
