"""ResNet backbones in the torchvision layout, with frozen BatchNorm.

Parameter names mirror torchvision (`conv1`, `bn1`, `layer1_0/conv1`, `layer1_0/downsample_conv`,
...), so an ImageNet checkpoint converts one tensor to one leaf. The bottleneck puts its stride on
the 3x3 conv (torchvision v1.5, as IRN/SIPE use); `stride_on_1x1=True` with `ceil_pool=True` gives
the caffe (MSRA) layout of the DeepLab initialisation. Padding is explicit and symmetric so output
sizes match PyTorch, where Flax's 'SAME' would pad stride-2 convolutions asymmetrically.

`dtype` is the compute dtype (model.compute_dtype): with bfloat16 the convolutions run in bfloat16
on float32 parameters (cast per use, so gradients and optimiser state stay float32), BatchNorm
reduces and normalises in float32 (its statistics are float32) and hands bfloat16 on, and the stage
outputs are bfloat16; the heads that use them cast back to float32 (cam_net, deeplab).

BatchNorm is frozen by default (`bn_train=False`): running statistics in the `batch_stats`
collection, never updated, as the WSSS recipes do with ImageNet weights (batches of 16 large crops
give poor statistics). A network trained from scratch has no statistics to freeze (frozen BN at
init is the identity and the net barely learns), so `bn_train=True` normalises with the statistics
of the global batch in training (synchronised over devices by jit) and updates the running ones.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The input normalisation of torchvision's ImageNet weights, which every pretrained network here
# (converted or ProcNet) expects: (x / 255 - mean) / std per RGB channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's conv init (kaiming normal, fan_out, relu).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d init (kaiming uniform, a=sqrt(5)), used by the new heads of CAM nets.
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ARCHS = {
    # name: (blocks per stage, stem/base width)
    "resnet50": ((3, 4, 6, 3), 64),
    "resnet101": ((3, 4, 23, 3), 64),
    # CPU-sized variants with the same structure (bottlenecks, 4 stages, expansion 4).
    "resnet_small": ((1, 1, 2, 1), 32),
    "resnet_tiny": ((1, 1, 1, 1), 16),
}

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str, key: str = "model.compute_dtype"):
  """The jnp dtype of a compute_dtype config value; `key` names the setting in the error."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"{key}={name!r}: choose one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


class Conv1x1(nn.Module):
  """A 1x1 convolution computed as a matmul over channels, with nn.Conv's parameters (`kernel`
  [1, 1, in, out], `bias`), initialisation and dtype handling, so checkpoints and converted weights
  are the same either way (values equal to float32 rounding).

  Why: XLA's CPU backend computes a convolution's kernel gradient as another convolution over the
  activations transposed to a feature-major layout, and those transposes, fused into the forward
  pass's BatchNorm/ReLU, cost as much as the convolutions themselves in the CAM train step
  (bench/profile_step.py). As a dot the kernel gradient is one GEMM over the same memory: a ResNet
  1x1 layer's forward + backward runs ~1.5x faster on CPU. Accelerators lower both forms to the same
  matrix units.
  """

  features: int
  stride: int = 1
  use_bias: bool = False
  kernel_init: Any = conv_init
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    if self.stride > 1:  # a 1x1 window with stride s and no padding reads every s-th position
      x = x[:, :: self.stride, :: self.stride, :]
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    return y if bias is None else y + bias


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    dilation: int = 1,
    name: str | None = None,
    use_bias: bool = False,
    kernel_init=conv_init,
    dtype: Any = jnp.float32,
) -> nn.Module:
  """dtype: of the computation (inputs and kernel are cast to it); parameters are float32. A 1x1
  kernel is a Conv1x1 (the same parameters and values as nn.Conv, a faster gradient on CPU)."""
  if kernel == 1:
    return Conv1x1(features, stride, use_bias, kernel_init, dtype, name=name)
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation),
      use_bias=use_bias,
      kernel_init=kernel_init,
      dtype=dtype,
      param_dtype=jnp.float32,
      name=name,
  )


def batch_norm(name: str, use_batch_stats: bool = False, dtype: Any = jnp.float32) -> nn.BatchNorm:
  """dtype: of the output only; statistics, running averages and the normalisation are float32."""
  # momentum 0.9 is PyTorch's 0.1: short from-scratch runs need running stats that keep up.
  return nn.BatchNorm(
      use_running_average=not use_batch_stats,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=jnp.float32,
      force_float32_reductions=True,
      name=name,
  )


def max_pool_3x3_s2(x: jnp.ndarray, ceil: bool = False) -> jnp.ndarray:
  """ceil: PyTorch's ceil_mode, which the caffe stem uses; one more -inf row/column on the far side
  gives exactly its output size (and never a window that starts in the padding)."""
  far = 2 if ceil else 1
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, far), (1, far)))


class Bottleneck(nn.Module):
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  stride_on_1x1: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train_bn: bool = False):
    s1, s3 = (self.stride, 1) if self.stride_on_1x1 else (1, self.stride)
    bn = lambda name: batch_norm(name, train_bn, self.dtype)
    cv = lambda *a, **kw: conv(*a, **kw, dtype=self.dtype)
    out = nn.relu(bn("bn1")(cv(self.planes, 1, s1, name="conv1")(x)))
    out = nn.relu(bn("bn2")(cv(self.planes, 3, s3, self.dilation, name="conv2")(out)))
    out = bn("bn3")(cv(self.planes * 4, 1, name="conv3")(out))
    if self.downsample:
      x = bn("downsample_bn")(cv(self.planes * 4, 1, self.stride, name="downsample_conv")(x))
    return nn.relu(out + x)


class ResNet(nn.Module):
  """Returns the outputs of the stem and the four stages (NHWC).

  strides: of conv1, layer2, layer3, layer4 (IRN's convention; the max-pool always halves and
  layer1 never strides). (2, 2, 2, 1) gives output stride 16, (2, 2, 1, 1) output stride 8.
  detach_after: stop gradients at the output of this stage (SIPE/IRN detach stage 2, so the stem,
  layer1 and layer2 never train); -1 lets gradients reach the stem.
  """

  arch: str = "resnet50"
  strides: Sequence[int] = (2, 2, 2, 1)
  dilations: Sequence[int] = (1, 1, 1, 1)
  stride_on_1x1: bool = False
  ceil_pool: bool = False  # caffe stem: the max-pool rounds its output size up
  detach_after: int = -1
  bn_train: bool = False
  dtype: Any = jnp.float32  # compute dtype (module docstring); parameters are float32 either way

  @nn.compact
  def __call__(self, x, train: bool = False) -> dict:
    """train: with bn_train, normalise with batch statistics and update the running ones."""
    if self.arch not in ARCHS:
      raise ValueError(
          f"unknown backbone {self.arch!r}; choose one of {sorted(ARCHS)} (config key model.backbone)"
      )
    blocks, width = ARCHS[self.arch]
    x = conv(width, 7, self.strides[0], name="conv1", dtype=self.dtype)(x)
    train_bn = train and self.bn_train
    x = max_pool_3x3_s2(nn.relu(batch_norm("bn1", train_bn, self.dtype)(x)), self.ceil_pool)
    if self.detach_after == 0:
      x = jax.lax.stop_gradient(x)
    feats = {"stage0": x}
    layer_strides = (1,) + tuple(self.strides[1:])
    in_ch = width
    for i, (n, stride, dilation) in enumerate(zip(blocks, layer_strides, self.dilations)):
      planes = width * 2**i
      for b in range(n):
        s = stride if b == 0 else 1
        down = b == 0 and (s != 1 or in_ch != planes * 4)
        x = Bottleneck(
            planes, s, dilation, down, self.stride_on_1x1, dtype=self.dtype, name=f"layer{i + 1}_{b}"
        )(x, train_bn)
        in_ch = planes * 4
      if self.detach_after == i + 1:
        x = jax.lax.stop_gradient(x)
      feats[f"stage{i + 1}"] = x
    return feats


def stage_channels(arch: str) -> tuple[int, int, int, int]:
  """Output channels of stages 1..4."""
  width = ARCHS[arch][1]
  return tuple(width * 4 * 2**i for i in range(4))
