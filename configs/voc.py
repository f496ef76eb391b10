"""PASCAL VOC 2012 with the paper's CAM recipe (docs/method.md 1.2): ResNet-50 OS16, crop 512,
batch 16, 5 epochs, lr 0.1 / 1.0 poly 0.9, weight decay 1e-4.

python -m cpal_jax.main --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012
train_split may be a list file (IRN's train_aug.txt) when SBD is merged into the tree.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config():
  c = common.base()
  c.workdir = "runs/voc"
  c.data.name = "voc"
  c.data.root = ""  # VOCdevkit/VOC2012
  c.data.train_split = "train_aug"
  c.data.eval_split = "train"
  c.data.val_split = "val"
  c.data.num_classes = 21
  # Seeds and masks are scored on the fine VOC masks, not the SBD-merged ones (docs/method.md 5).
  c.data.mask_dir = "SegmentationClass"
  c.data.workers = 2
  c.model.backbone = "resnet50"
  c.model.detach_after = 2
  c.train.batch_size = 16
  c.train.epochs = 5
  c.train.crop_size = 512
  c.train.resize_long = (320, 640)
  c.eval.pad_multiple = 64
  return c
