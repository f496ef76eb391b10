"""IRN's class-boundary network (the edge branch of `EdgeDisplacement`, jiwoon-ahn/irn
net/resnet50_irn.py), docs/method.md 1.5 D3.

A frozen ResNet feeds five 1x1 heads, one per stage (stem, layer1..4): conv -> 32 channels,
GroupNorm(4), bilinear upsampling of the deeper ones to the stem's stride-4 grid, ReLU; their 160
channels go through a 1x1 conv with bias to one edge logit per stride-4 cell.

Every backbone output is under stop_gradient and BatchNorm runs on its running statistics, as IRN
detaches all five stages and keeps `self.backbone.eval()` in training: only the heads learn, so the
boundaries come from (ImageNet) features that the IR labels cannot overfit.

IRN's displacement-field branch is left out: it feeds instance segmentation only, and the semantic
masks of the random walk never read it (docs/method.md 1.5 D3, IRN issue #19); its loss terms, which IRN
adds to the total, do not reach the edge branch's parameters either.

Parameter names follow the PyTorch module (`fc_edge1/conv`, `fc_edge1/gn`, ..., `fc_edge6`) so a
trained IRN checkpoint converts one tensor to one leaf.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import image_ops
from cpal_jax.models import resnet

HEAD_MODULES = ("fc_edge1", "fc_edge2", "fc_edge3", "fc_edge4", "fc_edge5", "fc_edge6")


def _torch_bias_init(fan_in: int):
  """PyTorch's default conv bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class EdgeHead(nn.Module):
  """fc_edgeK: 1x1 conv (no bias) -> GroupNorm(4, 32) -> x`scale` bilinear -> ReLU."""

  features: int = 32
  scale: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = resnet.conv(self.features, 1, name="conv", kernel_init=resnet.torch_default_init)(x)
    x = nn.GroupNorm(num_groups=4, epsilon=1e-5, name="gn")(x)
    if self.scale > 1:
      # nn.Upsample(scale_factor=s): output s times the input, cropped to the stem's size by the caller.
      x = image_ops.resize_bilinear(x, (x.shape[1] * self.scale, x.shape[2] * self.scale))
    return nn.relu(x)


class EdgeNet(nn.Module):
  """Normalised images [B, H, W, 3] -> edge logits [B, ceil(H/4), ceil(W/4)] (with strides[0] = 2).

  strides: the backbone's (conv1, layer2, layer3, layer4) strides, IRN's (2, 2, 2, 1) by default; the
  heads upsample each stage by its stride relative to the stem, so any strides work.
  """

  backbone: str = "resnet50"
  strides: Sequence[int] = (2, 2, 2, 1)
  head_features: int = 32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # train=False: BatchNorm on running statistics, never updated (IRN's backbone.eval()).
    feats = resnet.ResNet(self.backbone, tuple(self.strides), name="backbone")(x, train=False)
    stages = [jax.lax.stop_gradient(feats[f"stage{i}"]) for i in range(5)]
    # Stride of each stage relative to the stem's output: layer1 never strides.
    rel = np.cumprod((1, 1) + tuple(self.strides[1:]))
    h, w = stages[0].shape[1:3]
    edges = [
        EdgeHead(self.head_features, int(s), name=f"fc_edge{i + 1}")(f)[:, :h, :w]
        for i, (f, s) in enumerate(zip(stages, rel))
    ]
    fan_in = 5 * self.head_features
    logit = nn.Conv(
        1,
        (1, 1),
        use_bias=True,
        kernel_init=resnet.torch_default_init,
        bias_init=_torch_bias_init(fan_in),
        name="fc_edge6",
    )(jnp.concatenate(edges, axis=-1))
    return logit[..., 0]


def from_config(config) -> EdgeNet:
  irn = config.refine.irn
  return EdgeNet(backbone=irn.backbone, strides=tuple(irn.strides))
