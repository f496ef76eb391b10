"""DeepLab-v2 (docs/method.md 1.7): a dilated ResNet at output stride 8 under ASPP, the segmentation network
trained on the exported pseudo masks.

ASPP is four 3x3 convolutions (dilations 6/12/18/24, with bias) from the last stage straight to the
class logits, and their outputs are summed: there is no shared 1x1 projection and no image pooling
(those are DeepLab-v3). Layer3 and layer4 keep their resolution and dilate every block by 2 and 4
(seg.dilations: a backbone trained at output stride 8 without dilation keeps its features with 1s).
BatchNorm is frozen as in the reference code. seg.compute_dtype=bfloat16 runs the backbone in
bfloat16 (models/resnet.py); ASPP and the logits stay float32.

Two backbone layouts, so either family of pretrained weights loads one tensor to one leaf:
  caffe        the MSRA ResNet-101 of the DeepLab initialisation (kazuto1011/deeplab-pytorch, the
               WSSS papers' segmentation stage): stride on the first 1x1 conv of a block, a
               ceil-mode stem max-pool, BGR input in 0..255 minus the caffe mean.
  torchvision  torchvision's ResNet: stride on the 3x3 conv, floor-mode max-pool, RGB input
               normalised with the ImageNet mean and std.
Both have bias-free backbone convs and the same BatchNorm (eps 1e-5), so beyond the structure above
only the parameter names differ, which `convert_torch_state` maps.

MSC (kazuto1011's multi-scale wrapper) is `msc_logits` + `fuse_max`: the network runs on the input
resized by each scale factor (as F.interpolate(scale_factor=s, mode='bilinear')), the logits of the
other scales are upsampled to those of the first scale and fused by an element-wise max.
"""

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from cpal_jax import image_ops
from cpal_jax.models import resnet

LAYOUTS = ("caffe", "torchvision")
# Output stride 8: conv1, layer2 stride 2 (and the stem's max-pool); layer3, layer4 dilate instead.
STRIDES = (2, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
OUTPUT_STRIDE = 8
# The DeepLab caffe models' input: BGR minus this mean, no scaling (kazuto1011 voc12.yaml).
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def matching_dilations(strides: Sequence[int]) -> tuple[int, ...]:
  """The layer1..4 dilations under which this network at output stride 8 computes the features of
  a backbone trained with `strides` (conv1, layer2, layer3, layer4; the stem max-pool halves; at
  stride 8 after layer2, as here): each later layer dilates by the stride it had beyond 8, as
  DeepLab does to ImageNet ResNets."""
  out, total = [], 2 * strides[0]  # conv1 and the max-pool
  for layer, stride in enumerate((1, *strides[1:])):
    total *= stride
    out.append(max(1, total // OUTPUT_STRIDE) if layer >= 2 else 1)
  return tuple(out)


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"seg.layout={layout!r}: choose one of {LAYOUTS}")


class AtrousConv(nn.Module):
  """A 3x3 convolution with bias at dilation `rate` (nn.Conv's parameters and initialisation) that
  leaves out the kernel rows/columns whose taps fall wholly in the zero padding.

  Exact: those taps only ever multiply zeros. It matters where the rate reaches past the map: on the
  synthetic 96 px crops (12x12 maps) rates 12, 18 and 24 are 1x1 convolutions of the centre tap, and
  XLA's CPU dilated convolution spends time on the padding in proportion to the rate (DeepLab's ASPP
  took 0.18 of a 0.45 s train step there). On VOC's 41x41 maps every tap is kept.
  """

  features: int
  rate: int
  kernel_init: Callable = nn.initializers.normal(0.01)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    r = self.rate
    rows = slice(1, 2) if r >= x.shape[1] else slice(0, 3)
    cols = slice(1, 2) if r >= x.shape[2] else slice(0, 3)
    kernel = kernel[rows, cols]
    pad = [(r, r) if n == 3 else (0, 0) for n in kernel.shape[:2]]
    y = lax.conv_general_dilated(
        x, kernel, (1, 1), pad, rhs_dilation=(r, r), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


class ASPP(nn.Module):
  """Sum of parallel dilated 3x3 convolutions, each mapping the features to the class logits."""

  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    # N(0, 0.01) weights and zero biases, as DeepLab initialises the new layers.
    branches = [AtrousConv(self.num_classes, r, name=f"c{i}")(x) for i, r in enumerate(self.rates)]
    return sum(branches[1:], branches[0])


class DeepLabV2(nn.Module):
  num_classes: int  # background included
  backbone: str = "resnet101"
  layout: str = "caffe"
  rates: Sequence[int] = (6, 12, 18, 24)
  dilations: Sequence[int] = DILATIONS  # layer1..layer4
  bn_train: bool = False  # batch statistics in training (networks trained from scratch only)
  dtype: Any = jnp.float32  # the backbone's compute dtype; parameters and logits are float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """x: images normalised by `normalize` [N, H, W, 3] -> logits [N, ceil(H/8), ceil(W/8), C]."""
    check_layout(self.layout)
    caffe = self.layout == "caffe"
    feats = resnet.ResNet(
        self.backbone,
        STRIDES,
        tuple(self.dilations),
        stride_on_1x1=caffe,
        ceil_pool=caffe,
        bn_train=self.bn_train,
        dtype=self.dtype,
        name="backbone",
    )(x, train)
    return ASPP(self.num_classes, tuple(self.rates), name="aspp")(feats["stage4"].astype(jnp.float32))


def from_config(config) -> DeepLabV2:
  s = config.seg
  return DeepLabV2(
      num_classes=config.data.num_classes,
      backbone=s.backbone,
      layout=s.layout,
      rates=tuple(s.atrous_rates),
      dilations=tuple(s.dilations),
      bn_train=s.batch_norm == "train",
      dtype=resnet.compute_dtype(s.get("compute_dtype", "float32"), "seg.compute_dtype"),
  )


def normalize(image_u8: jnp.ndarray, valid: jnp.ndarray, layout: str) -> jnp.ndarray:
  """uint8 RGB [N, H, W, 3] -> the input convention of the layout's weights, 0 outside `valid`.

  Zero there is what the references feed: kazuto1011 pads crops with the mean before subtracting
  it, torchvision-style pipelines zero-pad the normalised crop."""
  check_layout(layout)
  x = image_u8.astype(jnp.float32)
  if layout == "caffe":
    x = x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)
  else:
    x = (x - jnp.asarray(resnet.IMAGENET_MEAN, jnp.float32) * 255.0) / (
        jnp.asarray(resnet.IMAGENET_STD, jnp.float32) * 255.0
    )
  return x * valid[..., None].astype(jnp.float32)


# ------------------------------------------------------------------------------------------- MSC
def _factor_matrix(n_in: int, n_out: int, factor: float) -> np.ndarray:
  """[n_out, n_in] bilinear weights of F.interpolate(scale_factor=factor, align_corners=False).

  Unlike a resize to a given size, torch then maps coordinates with 1/factor, not n_in/n_out, and
  in float32: src = float32(1/factor) * (dst + 0.5) - 0.5 (float64 would drift by 1e-4 at 321 px)."""
  scale = np.float32(1.0 / factor)
  src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float64)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def scaled_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
  """torch's output size for scale_factor: floor(side * factor)."""
  return int(size[0] * factor), int(size[1] * factor)


def resize_by_factor(x: jnp.ndarray, factor: float) -> jnp.ndarray:
  """F.interpolate(x, scale_factor=factor, mode='bilinear', align_corners=False) on [N, H, W, C]."""
  if factor == 1.0:
    return x
  h, w = x.shape[1:3]
  oh, ow = scaled_size((h, w), factor)
  if min(oh, ow) < 1:
    raise ValueError(f"scale {factor} of a {h}x{w} input leaves no pixel")
  my = jnp.asarray(_factor_matrix(h, oh, factor), x.dtype)
  mx = jnp.asarray(_factor_matrix(w, ow, factor), x.dtype)
  return jnp.einsum("yh,nhwc,xw->nyxc", my, x, mx)


def msc_logits(
    apply_fn: Callable[[jnp.ndarray], jnp.ndarray], x: jnp.ndarray, scales: Sequence[float]
) -> list:
  """The logits of the input resized by each scale factor, each at its own resolution."""
  return [apply_fn(resize_by_factor(x, s)) for s in scales]


def fuse_max(per_scale: Sequence[jnp.ndarray]) -> jnp.ndarray:
  """Element-wise max of the logits, upsampled (bilinear, align_corners=False) to the first's size."""
  size = per_scale[0].shape[1:3]
  return jnp.max(jnp.stack([image_ops.resize_bilinear(l, size) for l in per_scale]), axis=0)


# ----------------------------------------------------------------------------- weight conversion
_CAFFE_BRANCH = {"reduce": "1", "conv3x3": "2", "increase": "3"}
_BN_LEAVES = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def torch_module_name(name: str, layout: str) -> tuple[str, str] | None:
  """(flax module path, 'conv' | 'bn') of a torch module name, None for heads and other layers.

  Shared with the checkpoint converter (cpal_jax.convert_weights), which converts every backbone."""
  parts = name.split(".")
  if layout == "torchvision":
    if parts[0] in ("conv1", "bn1"):
      return parts[0], "bn" if parts[0] == "bn1" else "conv"
    if parts[0].startswith("layer") and len(parts) == 3:
      block, mod = f"{parts[0]}_{parts[1]}", parts[2]
      return f"{block}/{mod}", "bn" if mod.startswith("bn") else "conv"
    if parts[0].startswith("layer") and len(parts) == 4 and parts[2] == "downsample":
      kind = "conv" if parts[3] == "0" else "bn"
      return f"{parts[0]}_{parts[1]}/downsample_{kind}", kind
    return None
  # caffe, kazuto1011 names (an MSC checkpoint's "base." prefix stripped by the caller's split)
  if parts[:2] == ["layer1", "conv1"] and len(parts) == 3:
    return ("conv1", "conv") if parts[2] == "conv" else ("bn1", "bn")
  if parts[0].startswith("layer") and len(parts) == 4 and parts[1].startswith("block"):
    layer = int(parts[0][len("layer") :]) - 1  # kazuto's layer1 is the stem
    block = f"layer{layer}_{int(parts[1][len('block'):]) - 1}"
    kind = parts[3]
    if parts[2] == "shortcut":
      return f"{block}/downsample_{kind}", kind
    if parts[2] not in _CAFFE_BRANCH:
      return None
    return f"{block}/{kind}{_CAFFE_BRANCH[parts[2]]}", kind
  return None


def convert_torch_state(state: Mapping[str, np.ndarray], layout: str) -> dict[str, np.ndarray]:
  """A PyTorch ResNet state dict (tensors as numpy arrays) -> the flat keys of models.pretrained.

  torchvision layout: torchvision's `resnet101` names; caffe layout: kazuto1011's DeepLab names
  (`layer1.conv1.conv`, `layer2.block1.reduce.bn`, ..., with or without the MSC `base.` prefix).
  Only the backbone converts (keys like `params/layer1_0/conv1/kernel`, loaded with prefix
  'backbone' as the CAM stage loads its ResNet): classifier and ASPP heads are dropped, since
  their class count belongs to another dataset. Conv kernels go from OIHW to HWIO.
  """
  check_layout(layout)
  out = {}
  for key, value in state.items():
    name = key[len("base.") :] if key.startswith("base.") else key
    module, _, leaf = name.rpartition(".")
    found = torch_module_name(module, layout)
    if found is None or leaf == "num_batches_tracked":
      continue
    path, kind = found
    value = np.asarray(value)
    if kind == "conv":
      if leaf != "weight":
        raise ValueError(f"{key}: the {layout} ResNet has no conv {leaf}")
      out[f"params/{path}/kernel"] = np.transpose(value, (2, 3, 1, 0))
    else:
      col, flax_leaf = _BN_LEAVES[leaf]
      out[f"{col}/{path}/{flax_leaf}"] = value
  if not out:
    raise ValueError(f"no {layout} ResNet tensor among the {len(state)} keys; is it the other layout?")
  return out


def init_name(seg_cfg) -> str:
  """Where the backbone started, as the summaries record it."""
  return "cam" if seg_cfg.init_from_cam else (seg_cfg.pretrained or "random")
