"""MS COCO 2014 (81 classes): VOC's CAM recipe over 82,081 images (5 epochs = 25,650 steps).

Skeleton until the COCO loader lands: data.name=coco is refused with a clear message for now.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import voc  # noqa: E402  (configs are loaded by file path, not as a package)


def get_config():
  c = voc.get_config()
  c.workdir = "runs/coco"
  c.data.name = "coco"
  c.data.root = ""  # folder with train2014/, val2014/, annotations/instances_*.json
  c.data.train_split = "train2014"
  c.data.eval_split = "train2014"  # SIPE scores COCO seeds on train2014
  c.data.val_split = "val2014"
  c.data.num_classes = 81
  c.data.mask_dir = "auto"
  return c
