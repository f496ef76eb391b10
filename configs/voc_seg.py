"""PASCAL VOC 2012 segmentation stage: DeepLab-v2 (ResNet-101, ASPP, output stride 8) trained on the
pseudo masks the CAM pipeline exported into the same workdir, scored on val (docs/method.md 1.7).

kazuto1011's voc12.yaml recipe: crop 321, random scale from (0.5, 0.75, 1.0, 1.25, 1.5), flip,
batch 10, 20k iterations, lr 2.5e-4 (ASPP 10x, its biases 20x), poly 0.9, momentum 0.9, weight
decay 5e-4, MSC training at 1.0/0.75/0.5 + max; test with MSC max fusion, flip and dense CRF.

  python -m cpal_jax.main --config=configs/voc_seg.py --config.data.root=/data/VOCdevkit/VOC2012 \\
      --config.seg.pretrained=/weights/deeplab_resnet101_imagenet.npz --workdir=runs/voc

The weights are the caffe DeepLab ResNet-101 (ImageNet) converted with `python -m
cpal_jax.convert_weights`; for torchvision's resnet101 add --config.seg.layout=torchvision.
Record which init was used next to the number (the COCO-pretrained init leaks COCO into VOC).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import voc  # noqa: E402  (configs are loaded by file path, not as a package)


def get_config():
  c = voc.get_config()
  c.stages = "train_seg,eval_seg"  # common.base()'s seg keys are the VOC recipe
  # DeepLab's caffe test pads every image to 513x513 (8 * 64 + 1 cells): one compile for all of val.
  c.seg.eval.pad_multiple = 513
  return c
