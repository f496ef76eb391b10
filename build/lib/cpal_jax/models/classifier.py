"""The ImageNet-style classifier a backbone is pretrained as: ResNet, global average pool, one
linear layer (torchvision's `fc`). Only the backbone's weights are kept (models/pretrained.py)."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from cpal_jax.models import resnet


class Classifier(nn.Module):
  num_classes: int
  backbone: str = "resnet_tiny"
  strides: Sequence[int] = (2, 2, 2, 2)  # output stride 32, as ImageNet trains
  bn_train: bool = True  # from scratch: batch statistics, which become the frozen ones later

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    feats = resnet.ResNet(self.backbone, self.strides, bn_train=self.bn_train, name="backbone")(x, train)
    pooled = jnp.mean(feats["stage4"], axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(pooled)
