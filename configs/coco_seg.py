"""MS COCO 2014 segmentation stage: DeepLab-v2 on the exported train2014 pseudo masks, scored on
val2014 (81 classes). The COCO recipe of LPCAM #3 and CLIMS: batch 10, 100k iterations, lr 2e-4,
otherwise VOC's (crop 321, scales, MSC, CRF).

Waits on the COCO loader like configs/coco.py: data.name=coco is refused with a clear message.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import coco  # noqa: E402  (configs are loaded by file path, not as a package)

from cpal_jax.train import seg  # noqa: E402


def get_config():
  c = coco.get_config()
  c.stages = "train_seg,eval_seg"
  if "seg" not in c:
    c.seg = seg.default_config()
  c.seg.num_steps = 100000
  c.seg.lr = 2e-4
  # COCO images are up to 640 px: 64-px buckets waste less than 513 and still compile a few times.
  c.seg.eval.pad_multiple = 64
  return c
