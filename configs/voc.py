"""PASCAL VOC 2012 with the paper's recipe (docs/method.md 1.2): ResNet-50 OS16, crop 512, batch 16,
5 epochs, lr 0.1 / 1.0 poly 0.9, weight decay 1e-4; then DeepLab-v2 on the pseudo masks (1.7).

  python -m cpal_jax.main --config=configs/voc.py --config.data.root=/data/VOCdevkit/VOC2012
  python -m cpal_jax.main --config=configs/voc.py:seg --config.data.root=/data/VOCdevkit/VOC2012 \\
      --config.seg.pretrained=/weights/deeplab_resnet101_imagenet.npz --workdir=runs/voc

train_split may be a list file (IRN's train_aug.txt) when SBD is merged into the tree.

The `seg` variant runs the segmentation stages alone on the masks the CAM pipeline exported into the
same workdir: kazuto1011's voc12.yaml (crop 321, random scale from 0.5..1.5, flip, batch 10, 20k
iterations, lr 2.5e-4 with ASPP 10x and its biases 20x, poly 0.9, momentum 0.9, weight decay 5e-4,
MSC training at 1.0/0.75/0.5 + max; test with MSC max fusion, flip and dense CRF). The weights are
the caffe DeepLab ResNet-101 (ImageNet) converted with `python -m cpal_jax.convert_weights`; for
torchvision's resnet101 add --config.seg.layout=torchvision. Record which init was used next to the
number (the COCO-pretrained init leaks COCO into VOC).
"""

from cpal_jax import defaults


VARIANTS = ("", "seg")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"configs/voc.py:{variant}: no such variant; use configs/voc.py or :seg")
  c = defaults.base()
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
  if variant == "seg":
    c.stages = "train_seg,eval_seg"  # defaults.seg() is the VOC recipe
    # DeepLab's caffe test pads every image to 513x513 (8 * 64 + 1 cells): one compile for all of val.
    c.seg.eval.pad_multiple = 513
  return c
