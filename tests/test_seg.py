"""DeepLab-v2 and its two stages: output stride and dilations, ASPP as a sum, both weight layouts
against a PyTorch reference, MSC resizing and loss against kazuto1011's code path (torch + PIL),
eval fusion on a stand-in model, and train_seg/eval_seg end to end (loss goes down, resume is
bit-identical, a missing pseudo mask is named)."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from PIL import Image

from cpal_jax import checkpointing, defaults, image_ops, paths
from cpal_jax.data import palette, pipeline
from cpal_jax.eval import seg as seg_eval
from cpal_jax.models import deeplab, pretrained, resnet
from cpal_jax.parallel import sharding
from cpal_jax.train import seg
from test_train import tiny_config

STEPS = 6


pytestmark = pytest.mark.usefixtures("fast_compiles")


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize(
    "layout, size, cells",
    [
        ("caffe", 321, 41),
        ("torchvision", 321, 41),
        ("caffe", 96, 13),
        ("torchvision", 96, 12),
        ("caffe", 100, 13),
    ],
)
def test_output_stride_8(layout, size, cells):
  # The caffe stem's ceil-mode max-pool rounds up: 96 px -> 48 -> 25 -> 13 cells, torchvision's 12.
  model = deeplab.DeepLabV2(5, "resnet_tiny", layout)
  x = jnp.zeros((2, size, size, 3))
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0), x), x)
  assert out.shape == (2, cells, cells, 5)


def _convs(layout: str) -> list:
  """(rhs_dilation, window_strides, kernel spatial shape) of every convolution in the forward; a
  strided 1x1 convolution (resnet.Conv1x1: a strided slice, then a matmul) counts as ((1, 1), stride,
  (1, 1))."""
  model = deeplab.DeepLabV2(5, "resnet_small", layout)
  x = jnp.zeros((1, 200, 200, 3))  # 25x25 maps: every ASPP rate keeps its 3x3 taps
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x)
  convs = []
  for e in jaxpr.jaxpr.eqns:
    if e.primitive.name == "conv_general_dilated":
      convs.append(
          (tuple(e.params["rhs_dilation"]), tuple(e.params["window_strides"]), e.invars[1].aval.shape[:2])
      )
    elif e.primitive.name == "slice" and e.params["strides"] and tuple(e.params["strides"][1:3]) != (1, 1):
      convs.append(((1, 1), tuple(e.params["strides"][1:3]), (1, 1)))
  return convs


@pytest.mark.parametrize("layout", deeplab.LAYOUTS)
def test_dilations_actually_used(layout):
  convs = _convs(layout)
  blocks = resnet.ARCHS["resnet_small"][0]  # (1, 1, 2, 1)
  dilated = {}
  for dil, stride, k in convs:
    if dil != (1, 1):
      assert stride == (1, 1) and k == (3, 3)  # dilation replaces striding, only on 3x3 kernels
      dilated[dil[0]] = dilated.get(dil[0], 0) + 1
  # Every 3x3 of layer3 at 2, of layer4 at 4 (the first blocks too), one ASPP branch per rate.
  assert dilated == {2: blocks[2], 4: blocks[3], 6: 1, 12: 1, 18: 1, 24: 1}
  strided = [(k, s) for _, s, k in convs if s != (1, 1)]
  # conv1 7x7 and layer2's first block (its stride-carrying conv and the shortcut): output stride 8.
  carrier = (1, 1) if layout == "caffe" else (3, 3)
  assert sorted(strided) == sorted([((7, 7), (2, 2)), (carrier, (2, 2)), ((1, 1), (2, 2))])


def test_aspp_is_the_sum_of_four_dilated_branches():
  # An impulse through one input channel: branch i (all taps i + 1, bias 10^i) answers at the
  # 3x3 grid of spacing rate_i around it, and the branches add up.
  rates = (6, 12, 18, 24)
  aspp = deeplab.ASPP(1, rates)
  size = 2 * max(rates) + 1
  x = np.zeros((1, size, size, 2), np.float32)
  c = max(rates)
  x[0, c, c, 0] = 1.0
  params = aspp.init(jax.random.key(0), x)["params"]
  params = {
      f"c{i}": {
          "kernel": np.zeros((3, 3, 2, 1), np.float32) + np.array([i + 1, 0], np.float32)[:, None],
          "bias": np.full((1,), 10.0**i, np.float32),
      }
      for i in range(4)
  }
  out = np.asarray(aspp.apply({"params": params}, x))[0, :, :, 0]
  expected = np.full((size, size), 1111.0, np.float32)
  for i, r in enumerate(rates):
    for dy in (-r, 0, r):
      for dx in (-r, 0, r):
        expected[c + dy, c + dx] += i + 1
  np.testing.assert_allclose(out, expected)


@pytest.mark.parametrize("size", [(12, 12), (12, 30), (30, 12), (30, 30)])
def test_atrous_conv_drops_only_the_taps_in_the_padding(size):
  rate = 12
  x = jax.random.normal(jax.random.key(1), (2, *size, 6))
  conv = deeplab.AtrousConv(4, rate)
  params = conv.init(jax.random.key(0), x)["params"]
  params = {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 6, 4)), "bias": jnp.arange(4.0)}

  def full(p, x):  # the whole 3x3 kernel over the zero-padded input
    pad = ((rate, rate), (rate, rate))
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (1, 1), pad, rhs_dilation=(rate, rate), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + p["bias"]

  def ours(p, x):
    return conv.apply({"params": p}, x)

  np.testing.assert_allclose(ours(params, x), full(params, x), rtol=1e-5, atol=1e-5)
  g_ours, g_full = (jax.grad(lambda p, f=f: jnp.sum(jnp.sin(f(p, x))))(params) for f in (ours, full))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_full)
  kernels = [
      e.invars[1].aval.shape[:2]
      for e in jax.make_jaxpr(ours)(params, x).jaxpr.eqns
      if e.primitive.name == "conv_general_dilated"
  ]
  assert kernels == [(1 if size[0] <= rate else 3, 1 if size[1] <= rate else 3)]


# ------------------------------------------------------------------------- layouts vs PyTorch
class _TorchBlock(torch.nn.Module):
  """A bottleneck as torchvision names it; `caffe` moves the stride to the first 1x1 conv."""

  def __init__(self, cin, planes, stride, dilation, caffe):
    super().__init__()
    s1, s3 = (stride, 1) if caffe else (1, stride)
    nn = torch.nn
    self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, s1, bias=False), nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, s3, dilation, dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
    self.downsample = nn.Sequential(
        nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4)
    )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class _TorchDeepLab(torch.nn.Module):
  """kazuto1011's DeepLabV2 (caffe) or a torchvision ResNet under ASPP, resnet_tiny-sized."""

  def __init__(self, num_classes, caffe):
    super().__init__()
    nn = torch.nn
    self.caffe = caffe
    self.conv1, self.bn1 = nn.Conv2d(3, 16, 7, 2, 3, bias=False), nn.BatchNorm2d(16)
    cin = 16
    for i, (stride, dil) in enumerate(zip((1, 2, 1, 1), (1, 1, 2, 4))):
      planes = 16 * 2**i
      setattr(self, f"layer{i + 1}", nn.Sequential(_TorchBlock(cin, planes, stride, dil, caffe)))
      cin = planes * 4
    self.aspp = nn.ModuleList([nn.Conv2d(cin, num_classes, 3, 1, r, r) for r in (6, 12, 18, 24)])

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1, ceil_mode=self.caffe)
    for i in range(4):
      x = getattr(self, f"layer{i + 1}")(x)
    return sum(c(x) for c in self.aspp)


def _kazuto_names(state: dict) -> dict:
  """torchvision names -> kazuto1011's (`layer1.conv1.conv`, `layer2.block1.reduce.bn`, ...)."""
  branch = {"1": "reduce", "2": "conv3x3", "3": "increase"}
  out = {}
  for k, v in state.items():
    parts = k.split(".")
    if parts[0] in ("conv1", "bn1"):
      name = f"layer1.conv1.{'conv' if parts[0] == 'conv1' else 'bn'}.{parts[1]}"
    elif parts[0].startswith("layer"):
      layer, block = int(parts[0][5:]) + 1, int(parts[1]) + 1
      if parts[2] == "downsample":
        mod = f"shortcut.{'conv' if parts[3] == '0' else 'bn'}"
        leaf = parts[4]
      else:
        mod = f"{branch[parts[2][-1]]}.{'conv' if parts[2].startswith('conv') else 'bn'}"
        leaf = parts[3]
      name = f"layer{layer}.block{block}.{mod}.{leaf}"
    else:
      name = k
    out["base." + name] = v
  return out


@pytest.mark.parametrize("layout", deeplab.LAYOUTS)
def test_layout_matches_pytorch_reference(layout, tmp_path):
  torch.manual_seed(0)
  ref = _TorchDeepLab(4, layout == "caffe").eval()
  with torch.no_grad():
    for m in ref.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  state = {k: v.numpy() for k, v in ref.state_dict().items()}
  if layout == "caffe":
    state = _kazuto_names(state)
  flat = deeplab.convert_torch_state(state, layout)
  assert not any("aspp" in k for k in flat)  # heads belong to another dataset's classes
  np.savez(tmp_path / "w.npz", **flat)

  image = np.random.default_rng(0).integers(0, 256, (2, 50, 66, 3)).astype(np.uint8)  # even sides
  model = deeplab.DeepLabV2(4, "resnet_tiny", layout)
  x = deeplab.normalize(jnp.asarray(image), jnp.ones(image.shape[:3]), layout)
  variables, n = pretrained.load_into(
      jax.jit(model.init)(jax.random.key(0), x), str(tmp_path / "w.npz"), "backbone"
  )
  assert n == len(flat)
  for i, conv in enumerate(ref.aspp):
    variables["params"]["aspp"][f"c{i}"] = {
        "kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0),
        "bias": conv.bias.detach().numpy(),
    }
  if layout == "caffe":
    t_in = image[..., ::-1].astype(np.float32) - np.asarray(deeplab.CAFFE_MEAN_BGR, np.float32)
  else:
    t_in = (image / 255.0 - np.asarray([0.485, 0.456, 0.406])) / np.asarray([0.229, 0.224, 0.225])
  with torch.no_grad():
    expected = ref(torch.from_numpy(np.ascontiguousarray(t_in.transpose(0, 3, 1, 2), np.float32))).numpy()
  out = np.asarray(jax.jit(model.apply)(variables, x))
  assert out.shape == expected.transpose(0, 2, 3, 1).shape
  np.testing.assert_allclose(out, expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ MSC + loss
@pytest.mark.parametrize(
    "size, factor", [((41, 41), 0.5), ((321, 300), 0.75), ((50, 33), 0.5), ((13, 12), 0.75)]
)
def test_resize_by_factor_matches_torch(size, factor):
  x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
  out = np.asarray(deeplab.resize_by_factor(jnp.asarray(x), factor))
  ref = (
      F.interpolate(
          torch.from_numpy(x.transpose(0, 3, 1, 2)), scale_factor=factor, mode="bilinear", align_corners=False
      )
      .numpy()
      .transpose(0, 2, 3, 1)
  )
  assert out.shape == ref.shape
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _pil_resize_labels(labels: np.ndarray, size) -> np.ndarray:
  """kazuto1011's resize_labels: float PIL image, NEAREST."""
  return np.stack(
      [
          np.asarray(Image.fromarray(l.astype(np.float32)).resize((size[1], size[0]), Image.NEAREST))
          for l in labels
      ]
  ).astype(np.int64)


@pytest.mark.parametrize("balanced", [False, True])
def test_multiscale_loss_matches_reference(balanced):
  rng = np.random.default_rng(2)
  c, crop = 5, 75
  scales = (1.0, 0.75, 0.5)
  per_scale = [rng.normal(size=(2, n, n, c)).astype(np.float32) * 3 for n in (10, 8, 5)]
  labels = rng.integers(0, c, (2, crop, crop)).astype(np.uint8)
  labels[:, :20, :30] = 255  # ignored padding
  labels[1, 40:] = 0

  # kazuto1011 MSC: upsample to the 1.0 logits, max; CE per output with PIL-shrunk labels.
  t = [torch.from_numpy(l.transpose(0, 3, 1, 2)) for l in per_scale]
  fused = torch.max(
      torch.stack(
          [t[0]] + [F.interpolate(l, size=(10, 10), mode="bilinear", align_corners=False) for l in t[1:]]
      ),
      dim=0,
  )[0]
  expected = {}
  for name, logit in zip(("s1", "s0.75", "s0.5", "max"), t + [fused]):
    lab = torch.from_numpy(_pil_resize_labels(labels, logit.shape[2:]))
    if balanced:
      nll = F.cross_entropy(logit, lab, ignore_index=255, reduction="none")
      bg, fg = lab == 0, (lab != 255) & (lab > 0)
      expected[name] = float(nll[bg].mean() + nll[fg].mean())
    else:
      expected[name] = float(F.cross_entropy(logit, lab, ignore_index=255))

  loss = jax.jit(lambda p, l: seg.multiscale_loss(p, l, scales, balanced))
  total, terms = loss([jnp.asarray(l) for l in per_scale], jnp.asarray(labels))
  assert set(terms) == set(expected)
  for k, v in expected.items():
    np.testing.assert_allclose(float(terms[k]), v, rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(float(total), sum(expected.values()), rtol=1e-5)


def test_single_scale_has_no_max_term():
  logits = jnp.zeros((1, 4, 4, 3))
  total, terms = seg.multiscale_loss([logits], jnp.zeros((1, 32, 32), jnp.uint8), (1.0,))
  assert set(terms) == {"s1"} and np.isclose(float(total), np.log(3))


def test_augment_pads_bottom_right_with_ignore():
  rng = np.random.default_rng(3)
  el = {"image": rng.integers(0, 256, (30, 40, 3)).astype(np.uint8), "mask": np.full((30, 40), 3, np.uint8)}
  aug = seg.SegAugment(48, (1.0,), flip=False)
  out = aug.random_map(el, np.random.default_rng(0))
  assert {k: v.shape for k, v in out.items()} == {"image": (48, 48, 3), "valid": (48, 48), "mask": (48, 48)}
  # Smaller than the crop: the image sits at the top left, padding is ignore / invalid / zero.
  np.testing.assert_array_equal(out["image"][:30, :40], el["image"])
  assert (
      (out["mask"][:30, :40] == 3).all()
      and (out["mask"][30:] == 255).all()
      and (out["mask"][:, 40:] == 255).all()
  )
  assert out["valid"].sum() == 30 * 40 and not out["image"][30:].any()
  big = seg.SegAugment(16, (0.5, 1.5)).random_map(el, np.random.default_rng(1))
  assert big["image"].shape == (16, 16, 3) and set(np.unique(big["mask"])) <= {3, 255}


def test_optimizer_groups_follow_the_reference():
  # One step from zero momentum with unit gradients: the update is -lr_group * (1 + wd * p).
  cfg = defaults.seg()
  model = deeplab.DeepLabV2(3, "resnet_tiny", "caffe")
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  params = jax.tree.map(lambda a: jnp.full(a.shape, 2.0, a.dtype), shapes)

  def first_update(cfg):
    tx = seg.make_optimizer(cfg, 100, params)
    step = jax.jit(lambda p: tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)[0])
    return traverse_util.flatten_dict(step(params), sep="/")

  lr, wd = cfg.lr, cfg.weight_decay
  u = first_update(cfg)
  np.testing.assert_allclose(u["backbone/layer3_0/conv2/kernel"], -lr * (1 + 2 * wd), rtol=1e-6)
  np.testing.assert_allclose(u["aspp/c2/kernel"], -10 * lr * (1 + 2 * wd), rtol=1e-6)
  np.testing.assert_allclose(u["aspp/c2/bias"], -20 * lr, rtol=1e-6)  # no weight decay on biases
  assert not np.any(u["backbone/layer3_0/bn2/scale"]) and not np.any(u["backbone/bn1/bias"])  # frozen BN
  cfg.batch_norm = "train"
  np.testing.assert_allclose(first_update(cfg)["backbone/bn1/scale"], -lr * (1 + 2 * wd), rtol=1e-6)


@pytest.mark.parametrize("size", [(20, 30), (61, 47)])
def test_host_bilinear_is_the_unantialiased_grid(size):
  # cv2.INTER_LINEAR's grid, which torch's bilinear (align_corners=False, no antialias) shares.
  image = np.random.default_rng(6).integers(0, 256, (40, 50, 3)).astype(np.uint8)
  ref = (
      F.interpolate(
          torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1))[None],
          size=size,
          mode="bilinear",
          align_corners=False,
      )[0]
      .numpy()
      .transpose(1, 2, 0)
  )
  out = seg.resize_bilinear_u8(image, size)
  assert out.dtype == np.uint8 and np.abs(out.astype(np.float32) - ref).max() <= 0.5 + 1e-3


# ------------------------------------------------------------------------------------ eval fusion
class _StandIn:
  """A 'network' with known logits: 8x8 average pooling (output stride 8), a fixed 3 -> C mixing and
  a column ramp, so flips and scales change the answer."""

  def __init__(self, num_classes=4):
    self.mix = np.random.default_rng(4).normal(size=(3, num_classes)).astype(np.float32)

  def apply(self, variables, x):
    del variables
    n, h, w, _ = x.shape
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    x = jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    pooled = x.reshape(n, hp // 8, 8, wp // 8, 8, 3).mean((2, 4))
    ramp = jnp.linspace(0.0, 1.0, wp // 8)[None, None, :, None] * jnp.arange(self.mix.shape[1])
    return pooled @ self.mix + ramp

  def numpy_apply(self, x):
    n, h, w, _ = x.shape
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    x = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    pooled = x.reshape(n, hp // 8, 8, wp // 8, 8, 3).mean((2, 4))
    return pooled @ self.mix + np.linspace(0.0, 1.0, wp // 8)[None, None, :, None] * np.arange(
        self.mix.shape[1]
    )


@pytest.mark.parametrize("flip", [False, True])
def test_eval_fusion_on_known_outputs(flip):
  cfg = defaults.seg()
  cfg.layout = "torchvision"
  cfg.eval.scales = (1.0, 0.75, 0.5)
  cfg.eval.flip = flip
  model = _StandIn()
  rng = np.random.default_rng(5)
  image = rng.integers(0, 256, (2, 64, 80, 3)).astype(np.uint8)
  valid = np.ones((2, 64, 80), np.uint8)
  valid[1, 50:] = 0
  pred, fused = jax.device_get(seg_eval.make_predict(model, cfg)(None, image, valid))

  def torch_resize(x, **kw):
    return (
        F.interpolate(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
            mode="bilinear",
            align_corners=False,
            **kw,
        )
        .numpy()
        .transpose(0, 2, 3, 1)
    )

  x = (image / 255.0 - np.asarray([0.485, 0.456, 0.406])) / np.asarray([0.229, 0.224, 0.225])
  x = (x * valid[..., None]).astype(np.float32)

  def msc_max(x):
    logits = [model.numpy_apply(x if s == 1.0 else torch_resize(x, scale_factor=s)) for s in (1.0, 0.75, 0.5)]
    size = logits[0].shape[1:3]
    return np.max([logits[0]] + [torch_resize(l.astype(np.float32), size=size) for l in logits[1:]], axis=0)

  expected = msc_max(x)
  if flip:
    expected = np.maximum(expected, msc_max(np.ascontiguousarray(x[:, :, ::-1]))[:, :, ::-1])
  np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-4)
  up = torch_resize(expected.astype(np.float32), size=(64, 80))
  agree = (pred == up.argmax(-1)).mean()
  assert pred.dtype == np.uint8 and agree > 0.999  # exact up to float ties


# ------------------------------------------------------------------------------------ end to end
def seg_config(**overrides):
  c = tiny_config()
  c.unlock()
  c.seg = defaults.seg()
  s = c.seg
  s.backbone = "resnet_tiny"
  s.layout = "torchvision"
  s.batch_norm = "train"
  s.crop_size = 48
  s.rescale = (0.75, 1.0)
  s.msc_scales = (1.0, 0.5)
  s.batch_size = 8
  s.num_steps = STEPS
  s.head_lr_mult = 1.0
  s.head_bias_lr_mult = 2.0
  s.lr = 0.05
  s.clip_norm = 1.0  # as the synthetic recipe: random init needs it at this rate
  s.log_every = 2
  s.ckpt_every = 2
  s.ckpt_keep = 10
  s.eval.scales = (1.0, 0.5)
  s.eval.pad_multiple = 16
  s.eval.crf_workers = 1  # in process: a spawned pool costs more than 8 tiny CRFs
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def write_gt_masks(config, workdir):
  """Pseudo masks that are the ground truth: a stand-in for the export stage."""
  source = pipeline.make_source(config, seg.train_split(config), with_mask=True)
  os.makedirs(paths.masks(workdir), exist_ok=True)
  for i in range(len(source)):
    el = source[i]
    palette.save_label_png(os.path.join(paths.masks(workdir), f"{el['id']}.png"), el["mask"])


def restore(config, workdir, step):
  ckpt = checkpointing.Checkpointer(paths.seg_ckpt(workdir), async_save=False)
  state, _ = ckpt.restore(step, seg.build(config, sharding.make_mesh(1), STEPS).abstract_state)
  ckpt.close()
  return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run keeping every checkpoint (steps 2, 4, 6)."""
  workdir = str(tmp_path_factory.mktemp("seg_straight"))
  config = seg_config()
  write_gt_masks(config, workdir)
  return config, workdir, seg.train(config, workdir)


def test_loss_goes_down(straight):
  t = straight[2]["train_seg"]
  assert t["steps"] == STEPS and t["init"] == "random" and np.isfinite(t["final_loss"])
  assert t["final_loss"] < 0.8 * t["first_loss"]  # steps 5-6 against steps 1-2


def test_resume_from_a_killed_run_is_bit_identical(straight, tmp_path):
  config, workdir, _ = straight
  # A copy of the run as if killed after step 2, restarted with stop_at_step=4.
  resumed = str(tmp_path / "run")
  shutil.copytree(workdir, resumed)
  for step in ("4", "6"):
    shutil.rmtree(os.path.join(paths.seg_ckpt(resumed), step))
  out = seg.train(seg_config(**{"seg.stop_at_step": 4}), resumed)["train_seg"]
  assert out["steps"] == 4 and checkpointing.latest_step(paths.seg_ckpt(resumed)) == 4
  a, b = restore(config, workdir, 4), restore(config, resumed, 4)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # params, BN statistics, momentum, step


def kazuto_dense_crf(image, probmap, iter_max=10, pos_w=3, pos_xy_std=1, bi_w=4, bi_xy_std=67, bi_rgb_std=3):
  """kazuto1011's libs/utils/crf.DenseCRF (its VOC config's parameters), pydensecrf called directly."""
  import pydensecrf.densecrf as dcrf
  import pydensecrf.utils as utils

  c, h, w = probmap.shape
  u = np.ascontiguousarray(utils.unary_from_softmax(probmap))
  image = np.ascontiguousarray(image)
  d = dcrf.DenseCRF2D(w, h, c)
  d.setUnaryEnergy(u)
  d.addPairwiseGaussian(sxy=pos_xy_std, compat=pos_w)
  d.addPairwiseBilateral(sxy=bi_xy_std, srgb=bi_rgb_std, rgbim=image, compat=bi_w)
  return np.array(d.inference(iter_max)).reshape((c, h, w))


def direct_miou(gts, preds, c):
  """Dataset mIoU (%) from one confusion matrix, GT 255 ignored, nan-mean over occurring classes."""
  hist = np.zeros((c, c), np.int64)
  for g, p in zip(gts, preds):
    keep = g != 255
    hist += np.bincount(c * g[keep].astype(np.int64) + p[keep], minlength=c * c).reshape(c, c)
  with np.errstate(invalid="ignore"):  # 0/0: a class in neither GT nor prediction, left out
    iou = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist)).astype(np.float64)
  return 100 * np.nanmean(iou)


def test_evaluate_scores_and_resumes(straight, monkeypatch):
  config, workdir, _ = straight
  jobs = []  # the CRF jobs (image, logits, padded size, params, png path), seen in process
  crf_job = seg_eval._crf_job
  monkeypatch.setattr(seg_eval, "_crf_job", lambda job: (jobs.append(job), crf_job(job))[1])
  # Six steps from random init predict background everywhere, where a CRF has nothing to do: the
  # ASPP head is perturbed at load so that the logits vary and both columns have work to do.
  load_model = seg_eval.load_model

  def perturbed_load_model(*args):
    model, variables, step = load_model(*args)
    leaves, treedef = jax.tree.flatten(variables["params"]["aspp"])
    rng = np.random.default_rng(0)
    leaves = [x + jnp.asarray(10 * float(np.std(x)) * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    params = {**variables["params"], "aspp": jax.tree.unflatten(treedef, leaves)}
    return model, {**variables, "params": params}, step

  monkeypatch.setattr(seg_eval, "load_model", perturbed_load_model)
  out = seg_eval.evaluate(config, workdir)
  assert 0 <= out["seg_val_miou"] <= 100 and 0 <= out["seg_val_miou_crf"] <= 100
  # The CRF column pinned: every image's fused logits (those the plain argmax used), upsampled,
  # softmax'd, through kazuto1011's DenseCRF called directly, argmax'd, scored as one matrix.
  assert config.seg.eval.crf_params.to_dict() == {
      "iters": 10, "gauss_sxy": 1, "gauss_compat": 3, "bi_sxy": 67, "bi_srgb": 3, "bi_compat": 4
  }
  source = pipeline.make_source(config, config.data.val_split, with_mask=True)
  by_id = {os.path.basename(job[4])[: -len(".png")]: job for job in jobs}
  assert sorted(by_id) == sorted(source.ids()) and len(jobs) == len(source)
  gts, plain, with_crf = [], [], []
  for i in range(len(source)):
    el = source[i]
    image, logits, padded, _, path = by_id[el["id"]]
    np.testing.assert_array_equal(image, el["image"])
    h, w = image.shape[:2]
    up = image_ops.resize_bilinear_host(logits, padded)[:, :h, :w]
    ref_up = F.interpolate(
        torch.from_numpy(np.array(logits))[None], size=tuple(padded), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(up, ref_up[0, :, :h, :w].numpy(), rtol=1e-5, atol=1e-5)
    probs = torch.softmax(torch.from_numpy(np.asarray(up, np.float32)), dim=0).numpy()
    want = np.argmax(kazuto_dense_crf(image, probs), axis=0)
    got = palette.load_label_png(path)
    np.testing.assert_array_equal(got, want, err_msg=el["id"])
    pred = palette.load_label_png(os.path.join(paths.seg_pred(workdir), f"{el['id']}.png"))
    assert (np.argmax(up, 0) == pred).mean() > 0.999  # the logits are the plain prediction's
    gts.append(el["mask"])
    plain.append(pred)
    with_crf.append(want)
  c = config.data.num_classes
  assert out["seg_val_miou_crf"] == pytest.approx(direct_miou(gts, with_crf, c), abs=1e-3)
  assert out["seg_val_miou"] == pytest.approx(direct_miou(gts, plain, c), abs=1e-3)
  assert np.mean([(a != b).mean() for a, b in zip(plain, with_crf)]) > 0.02  # the CRF did something
  assert abs(out["seg_val_miou_crf"] - out["seg_val_miou"]) > 0.1  # so the two columns are told apart
  assert set(out["per_class_iou"]) == {"seg", "seg_crf"}
  assert out["eval_seg"]["predicted"] == config.data.num_eval and out["eval_seg"]["checkpoint_step"] == STEPS
  source = pipeline.make_source(config, config.data.val_split, with_mask=True)
  for d in (paths.seg_pred(workdir), paths.seg_pred_crf(workdir)):
    assert sorted(os.listdir(d)) == sorted(f"{i}.png" for i in source.ids())
    first = palette.load_label_png(os.path.join(d, f"{source.ids()[0]}.png"))
    assert first.shape == source[0]["mask"].shape and first.max() < config.data.num_classes
  with open(paths.seg_eval_json(workdir)) as f:
    record = json.load(f)
  assert record["miou"] == out["seg_val_miou"] and record["protocol"]["scales"] == [1.0, 0.5]

  again = seg_eval.evaluate(config, workdir)  # every PNG exists: nothing is predicted again
  assert again["eval_seg"]["predicted"] == 0 and again["seg_val_miou"] == out["seg_val_miou"]
  other = seg_config(**{"seg.eval.scales": (1.0,)})
  with pytest.raises(ValueError, match="scales.*delete"):
    seg_eval.evaluate(other, workdir)


def test_missing_mask_names_the_file_and_the_export_stage(tmp_path):
  config = seg_config()
  write_gt_masks(config, str(tmp_path))
  gone = os.path.join(paths.masks(str(tmp_path)), "train_000005.png")
  os.remove(gone)
  with pytest.raises(FileNotFoundError, match=r"train_000005\.png.*export stage"):
    seg.train(config, str(tmp_path))


def test_bad_mask_value_names_the_file(tmp_path):
  config = seg_config()
  write_gt_masks(config, str(tmp_path))
  path = os.path.join(paths.masks(str(tmp_path)), "train_000003.png")
  mask = palette.load_label_png(path).copy()
  mask[0, 0] = 40  # not a class of the 10, nor 255
  palette.save_label_png(path, mask)
  source = seg.PseudoMaskSource(
      pipeline.make_source(config, "train"), paths.masks(str(tmp_path)), config.data.num_classes
  )
  with pytest.raises(ValueError, match=r"train_000003\.png holds value 40"):
    source[3]


def test_evaluate_without_checkpoint_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match="train_seg"):
    seg_eval.evaluate(seg_config(), str(tmp_path))


def test_matching_dilations_keep_a_backbone_trained_at_another_stride():
  assert deeplab.matching_dilations((2, 2, 2, 2)) == deeplab.DILATIONS  # ImageNet ResNets
  assert deeplab.matching_dilations((2, 2, 2, 1)) == (1, 1, 2, 2)  # IRN/SIPE CAM nets, OS16
  assert deeplab.matching_dilations((2, 2, 1, 1)) == (1, 1, 1, 1)  # the synthetic CAM net, OS8


def test_init_from_cam_starts_the_backbone_from_the_cam_checkpoint(tmp_path, caplog):
  from cpal_jax.train import cam as cam_stage

  workdir = str(tmp_path)
  config = seg_config(**{"seg.init_from_cam": True, "seg.dilations": (1, 1, 1, 1)})
  assert tuple(config.model.strides) == (2, 2, 1, 1)
  with pytest.raises(FileNotFoundError, match="no CAM checkpoint.*run train_cam first"):
    seg.cam_backbone(config, workdir)
  mesh = sharding.make_mesh(1)
  cam_state = cam_stage.build(config, mesh, config.data.num_train).init_state()
  # Shifted so that a fresh DeepLab init cannot match it by sharing the init seed.
  cam_state = cam_state.replace(
      params=jax.tree.map(lambda x: x + 0.25, cam_state.params),
      batch_stats=jax.tree.map(lambda x: x + 0.5, cam_state.batch_stats),
  )
  ckpt = checkpointing.Checkpointer(paths.cam_ckpt(workdir), async_save=False)
  ckpt.save(3, cam_state, None, {})
  ckpt.close()

  seg_state = seg.build(config, mesh, STEPS, seg.cam_backbone(config, workdir)).init_state()
  for col in ("params", "batch_stats"):
    want = traverse_util.flatten_dict(getattr(cam_state, col)["backbone"])
    got = traverse_util.flatten_dict(getattr(seg_state, col)["backbone"])
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{col}/{k}")
  assert np.all(np.abs(np.asarray(seg_state.params["aspp"]["c0"]["bias"])) == 0)  # the new head stays new
  assert not [r for r in caplog.records if r.name == seg.__name__ and r.levelno >= logging.WARNING]
  # DeepLab's own dilations would give the CAM weights other receptive fields: said, not refused.
  with caplog.at_level(logging.WARNING, logger=seg.__name__):
    seg.cam_backbone(seg_config(**{"seg.init_from_cam": True}), workdir)
  assert "seg.dilations=(1, 1, 1, 1), not (1, 1, 2, 4)" in caplog.text

  with pytest.raises(ValueError, match="seg.backbone == model.backbone"):
    seg.cam_backbone(seg_config(**{"seg.init_from_cam": True, "seg.layout": "caffe"}), workdir)


def test_fingerprint_keeps_checkpoints_from_before_seg_dilations_resumable():
  assert seg.fingerprint(seg_config(), STEPS)["seg.dilations"] is None  # DeepLab's (1, 1, 2, 4)
  assert seg.fingerprint(seg_config(**{"seg.dilations": (1, 1, 1, 1)}), STEPS)["seg.dilations"] == [
      1,
      1,
      1,
      1,
  ]


@pytest.mark.parametrize("bn_train", [False, True])
def test_frozen_parameters_get_no_gradient(bn_train):
  model = deeplab.DeepLabV2(5, "resnet_tiny", "caffe")
  x = jax.random.normal(jax.random.key(1), (1, 33, 33, 3))
  variables = model.init(jax.random.key(0), x)

  def loss(params, constants):
    if constants:
      params = seg.frozen_as_constants(params, bn_train)
    return jnp.sum(model.apply({**variables, "params": params}, x) ** 2)

  full = traverse_util.flatten_dict(jax.grad(loss)(variables["params"], False))
  got = traverse_util.flatten_dict(jax.grad(loss)(variables["params"], True))
  frozen = {k for k in full if seg.param_label(k, bn_train) == seg.FROZEN}
  assert bool(frozen) != bn_train  # frozen BatchNorm: its scale and bias; batch statistics: none
  for k in full:
    if k in frozen:
      assert not np.asarray(got[k]).any() and np.asarray(full[k]).any(), k
    else:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(full[k]), err_msg=str(k))
