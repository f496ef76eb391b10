"""MS COCO 2014 (81 classes): VOC's CAM recipe over SIPE's 82,081 train2014 images
(5 epochs of 82,081 // 16 = 5,130 steps = 25,650 steps, docs/method.md 1.8), then SIPE's COCO path:
the dense CRF alone as refinement (no IRN).

python -m cpal_jax.main --config=configs/coco.py --config.data.root=/data/coco
data.root holds train2014/, val2014/ and annotations/instances_{train,val}2014.json; the whole json
is a split (images without annotations are left out, as in SIPE's lists), or pass a .txt id list.
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
  c.data.train_split = "train2014"  # or a .txt id list (file stems or integer image ids)
  c.data.eval_split = "train2014"  # SIPE scores COCO seeds on train2014
  c.data.val_split = "val2014"
  c.data.num_classes = 81
  # auto: <root>/mask/<split> (SIPE's precomputed PNGs) if present, else rasterised from the json;
  # none: always rasterise; or a folder of <id>.png.
  c.data.mask_dir = "auto"
  # Which instances json a .txt list of plain integer ids refers to (train2014 | val2014); auto reads
  # it from COCO_<subset>_ file stems.
  c.data.coco_subset = "auto"
  c.train.epochs = 5  # train.num_steps stays 0: 25,650 steps on the 82,081 images
  # SIPE skips IRN on COCO (its cost on 82k images): cam2ir.py's IR labels (two label CRFs, 255
  # where they disagree) are the pseudo masks, their unsure pixels ignored by DeepLab's loss.
  c.refine.mode = "ir_label"
  return c
