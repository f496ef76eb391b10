"""MS COCO 2014 (81 classes): VOC's CAM recipe over SIPE's 82,081 train2014 images
(5 epochs of 82,081 // 16 = 5,130 steps = 25,650 steps, docs/method.md 1.8), then SIPE's COCO path:
the dense CRF alone as refinement (no IRN).

  python -m cpal_jax.main --config=configs/coco.py --config.data.root=/data/coco
  python -m cpal_jax.main --config=configs/coco.py:seg --config.data.root=/data/coco --workdir=runs/coco

data.root holds train2014/, val2014/ and annotations/instances_{train,val}2014.json; the whole json
is a split (images without annotations are left out, as in SIPE's lists), or pass a .txt id list.

The `seg` variant: DeepLab-v2 on the exported train2014 pseudo masks, scored on val2014, with the
COCO recipe of LPCAM #3 and CLIMS (batch 10, 100k iterations, lr 2e-4, otherwise VOC's: crop 321,
scales, MSC, CRF).
"""

from cpal_jax import defaults


VARIANTS = ("", "seg")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/coco.py:{variant}: no such variant; use configs/coco.py or :seg")
  c = defaults.base()  # the paper's CAM recipe (docs/method.md 1.2), as configs/voc.py
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
  c.data.workers = 2
  if variant == "seg":
    c.stages = "train_seg,eval_seg"
    c.seg.num_steps = 100000
    c.seg.lr = 2e-4
    # COCO images are up to 640 px: 64-px buckets waste less than 513 and still compile a few times.
    c.seg.eval.pad_multiple = 64
  return c
