"""MS COCO 2014 (81 classes): same CAM recipe as VOC, 5 epochs over 82,081 images (25,650 steps).

Skeleton until the COCO loader lands: data.name=coco is refused with a clear message for now.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config():
  c = common.base()
  c.workdir = "runs/coco"
  c.data.name = "coco"
  c.data.root = ""  # folder with train2014/, val2014/, annotations/instances_*.json
  c.data.train_split = "train2014"
  c.data.eval_split = "train2014"
  c.data.val_split = "val2014"
  c.data.num_classes = 81
  c.data.workers = 2
  c.model.backbone = "resnet50"
  c.model.detach_after = 2
  c.train.batch_size = 16
  c.train.epochs = 5
  c.train.crop_size = 512
  return c
