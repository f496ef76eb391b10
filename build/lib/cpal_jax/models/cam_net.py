"""The CAM network: ResNet backbone, 1x1 classifier, and SIPE's side heads (docs/method.md 2.1-2.2).

The module only computes features; the SIPE/CPAL/PPC math lives in `cpal_jax.method` as pure
functions over its outputs, which is what lets CPAL plug into other CAM models.

model.compute_dtype=bfloat16 runs the backbone in bfloat16 (models/resnet.py); its stage outputs
are cast to float32 here, so the heads and every output (CAM, score, x4, F_hie, projection) are
float32 and the losses, CPAL's bank and k-means never see bfloat16.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cpal_jax import image_ops
from cpal_jax.method import sipe
from cpal_jax.models import resnet

# Parameter groups of the optimiser: new layers train at 10x the backbone's learning rate.
HEAD_MODULES = ("classifier", "side1", "side2", "side3", "side4", "proj")


class CAMNet(nn.Module):
  num_classes: int  # background included; the classifier has num_classes - 1 outputs
  backbone: str = "resnet50"
  strides: Sequence[int] = (2, 2, 2, 1)
  # layer1..layer4: a backbone pretrained with a stage strided (ImageNet, ProcNet at output stride
  # 32) keeps its receptive fields at a smaller output stride only if that stage is dilated.
  dilations: Sequence[int] = (1, 1, 1, 1)
  detach_after: int = 2
  side_dims: Sequence[int] = (128, 128, 256, 256)
  proj_dim: int = 0  # >0: a 1x1 conv + ReLU projection of x4 (CPAL's conv256 head, PPC's fc_proj)
  bn_train: bool = False  # see resnet: batch statistics for networks trained from scratch
  dtype: Any = jnp.float32  # the backbone's compute dtype; parameters and outputs are float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> dict:
    """x: normalised images [B, H, W, 3]. Returns the raw CAM, GAP score, x4 and F_hie (float32)."""
    backbone = resnet.ResNet(
        self.backbone,
        self.strides,
        dilations=self.dilations,
        detach_after=self.detach_after,
        bn_train=self.bn_train,
        dtype=self.dtype,
        name="backbone",
    )
    feats = backbone(x, train)
    # The heads run in float32 on float32 features: the outputs feed the losses and the bank.
    feats = {k: v.astype(jnp.float32) for k, v in feats.items()}
    x4 = feats["stage4"]
    cam = resnet.conv(self.num_classes - 1, 1, name="classifier", kernel_init=resnet.torch_default_init)(x4)
    # Side heads see detached stages: the GSC loss trains them without touching the backbone.
    sides = [
        resnet.conv(d, 1, name=f"side{i + 1}", kernel_init=resnet.torch_default_init)(
            jax.lax.stop_gradient(feats[f"stage{i + 1}"])
        )
        for i, d in enumerate(self.side_dims)
    ]
    size = sides[2].shape[1:3]
    hie = sipe.hierarchical_feature(sides, size, image_ops.resize_bilinear)
    out = {"cam": cam, "score": jnp.mean(cam, axis=(1, 2)), "x4": x4, "hie": hie}
    if self.proj_dim:
      proj = resnet.conv(self.proj_dim, 1, name="proj", kernel_init=resnet.torch_default_init)
      out["proj"] = nn.relu(proj(x4))
    return out


def scaled_side_dims(arch: str) -> tuple[int, ...]:
  """SIPE's side widths (128, 128, 256, 256) for ResNet-50, scaled with the backbone width."""
  ratio = resnet.stage_channels(arch)[0] / 256
  return tuple(max(8, int(d * ratio)) for d in (128, 128, 256, 256))


def uses_proj_head(config) -> bool:
  m = config.method
  return m.name == "ppc" or (m.name == "cpal" and m.cpal.proj_head == "conv256")


def proj_dim(config) -> int:
  if not uses_proj_head(config):
    return 0
  return config.method.ppc.proj_dim if config.method.name == "ppc" else config.method.cpal.proj_dim


def projected_features(config, out: dict):
  """The feature space of the prototypes: CPAL's F_hie or conv256 projection, PPC's fc_proj."""
  return out["proj"] if uses_proj_head(config) else out["hie"]


def output_stride(config) -> int:
  """Input pixels per map cell: the stem's max-pool (2) times the configured strides."""
  return 2 * math.prod(config.model.strides)


def from_config(config) -> CAMNet:
  m = config.model
  side_dims = tuple(m.side_dims) if m.get("side_dims") else scaled_side_dims(m.backbone)
  return CAMNet(
      num_classes=config.data.num_classes,
      backbone=m.backbone,
      strides=tuple(m.strides),
      dilations=tuple(m.get("dilations", (1, 1, 1, 1))),
      detach_after=m.detach_after,
      side_dims=side_dims,
      bn_train=m.batch_norm == "train",
      proj_dim=proj_dim(config),
      dtype=resnet.compute_dtype(m.get("compute_dtype", "float32")),
  )
