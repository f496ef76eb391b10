"""PyTorch (CPU) reference for one DeepLab-v2 MSC training step, the anchor of deeplab_step_bench.py.

The model and the step are written after kazuto1011/deeplab-pytorch, the DeepLab-v2 the WSSS papers
train their segmentation stage with:
  libs/models/resnet.py     _ConvBnReLU, _Bottleneck (MSRA/caffe: the stride on the first 1x1 conv,
                            `reduce`), _ResLayer (a shortcut conv in the first block of every layer),
                            _Stem (7x7/2 conv, 3x3/2 max-pool with ceil_mode)
  libs/models/deeplabv2.py  DeepLabV2: layer3 strided, layer4/5 dilated 2/4 (output stride 8); _ASPP:
                            four 3x3 convs with bias at rates 6/12/18/24 straight to the classes,
                            summed, N(0, 0.01) weights and zero biases; freeze_bn (BN in eval mode)
  libs/models/msc.py        MSC: the base on x, and on F.interpolate(x, scale_factor=p, bilinear) for
                            p in 0.5, 0.75; the pixel-wise max of the three after upsampling the
                            smaller logits to the first's size; in training all four are returned
  main.py (train)           one CrossEntropyLoss(ignore_index=255) per returned logit against the
                            labels shrunk to its size with PIL's nearest (resize_labels), summed and
                            divided by ITER_SIZE; SGD momentum 0.9 in three groups (get_params):
                            backbone convs lr, ASPP weights 10x lr, ASPP biases 20x lr without weight
                            decay (BN parameters are in no group); poly lr (PolynomialLR)
  configs/voc12.yaml        crop 321, lr 2.5e-4, weight decay 5e-4, poly 0.9, 20k iterations

One step as timed: zero the gradients; for each of --iter-size chunks of the batch, forward through
MSC, the four losses (labels resized on the CPU with PIL, as the reference does every iteration),
backward; set the poly lr of this step; SGD step. The batch is the output of the reference's data
loader (float BGR minus the caffe mean, NCHW; int64 labels), built once from a fixed seed
(deeplab_common.synthetic_batch, which the JAX side trains on too).

Where this differs from kazuto1011's code, it follows cpal_jax's train_seg (the thing it is timed
against): the lr decays every step (the reference every 10: LR_DECAY), the batch is one forward of
--batch images (--iter-size 2 with --batch 10 gives the reference's 5 x 2), the initialisation is
random (kaiming normal fan_out for the backbone convs, as ours; the reference loads the caffe
weights) with the frozen BN statistics set from one forward of the first image (calibrate_bn), so
that the frozen BatchNorms normalise as pretrained ones would: the identity statistics of a fresh
BN leave the random network unnormalised (ResNet-101's logits reach ~5e6 at init on 65 px crops).
For the same reason the lr is 1e-7 by default, not the recipe's 2.5e-4: a random network's stem
gradients (norm ~1e4 at init) make the recipe's lr wreck it in one step, and the loss is nan by the
third; a step on infs and nans is not the step to time. The lr is a value the step multiplies by,
so the work per step does not depend on it.

  python bench/torch_deeplab.py --batch 10 --size 321 --steps 10 --warmup 2 --threads 2 --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import deeplab_common  # bench/deeplab_common.py, beside this script

CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)  # configs/voc12.yaml IMAGE.MEAN


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=10)
  p.add_argument("--size", type=int, default=321, help="square crop H=W")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--threads", type=int, default=2, help="intra-op threads (also OMP/MKL env)")
  p.add_argument("--backbone", default="resnet101", choices=sorted(deeplab_common.ARCHS))
  p.add_argument("--num-classes", type=int, default=21, help="classes incl. background")
  p.add_argument("--rates", default="6,12,18,24", help="ASPP dilation rates")
  p.add_argument("--scales", default="0.5,0.75", help="MSC's input scales besides the 1.0 one")
  p.add_argument("--iter-size", type=int, default=1, help="gradient accumulation chunks of the batch")
  # Not the recipe's 2.5e-4, which a random init does not survive (module docstring).
  p.add_argument("--lr", type=float, default=1e-7, help="backbone lr; ASPP weights 10x, biases 20x")
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=5e-4)
  p.add_argument("--poly-power", type=float, default=0.9)
  p.add_argument("--max-step", type=int, default=20000, help="poly-lr horizon")
  p.add_argument("--channels-last", action="store_true", help="channels_last tensors (not the reference's)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting pass")
  p.add_argument("--json", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  if args.batch % args.iter_size:
    p.error(f"--batch {args.batch} is not a multiple of --iter-size {args.iter_size}")
  return args


if __name__ == "__main__":
  ARGS = parse_args()
  # Before torch is imported: its OpenMP/MKL pools read these once. (Imported as a module, by the
  # parity test, it leaves the importer's threads alone.)
  for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402


# ------------------------------------------------------------------------- model (resnet.py etc.)
class ConvBnReLU(nn.Sequential):

  def __init__(self, in_ch, out_ch, kernel_size, stride, padding, dilation, relu=True):
    super().__init__()
    self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation, bias=False))
    self.add_module("bn", nn.BatchNorm2d(out_ch, eps=1e-5, momentum=1 - 0.999))
    if relu:
      self.add_module("relu", nn.ReLU())


class Bottleneck(nn.Module):

  def __init__(self, in_ch, out_ch, stride, dilation, downsample):
    super().__init__()
    mid_ch = out_ch // 4
    self.reduce = ConvBnReLU(in_ch, mid_ch, 1, stride, 0, 1, True)
    self.conv3x3 = ConvBnReLU(mid_ch, mid_ch, 3, 1, dilation, dilation, True)
    self.increase = ConvBnReLU(mid_ch, out_ch, 1, 1, 0, 1, False)
    self.shortcut = ConvBnReLU(in_ch, out_ch, 1, stride, 0, 1, False) if downsample else nn.Identity()

  def forward(self, x):
    h = self.reduce(x)
    h = self.conv3x3(h)
    h = self.increase(h)
    h += self.shortcut(x)
    return F.relu(h)


class ResLayer(nn.Sequential):

  def __init__(self, n_layers, in_ch, out_ch, stride, dilation):
    super().__init__()
    for i in range(n_layers):
      self.add_module(
          f"block{i + 1}",
          Bottleneck(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1, dilation, i == 0),
      )


class Stem(nn.Sequential):

  def __init__(self, out_ch):
    super().__init__()
    self.add_module("conv1", ConvBnReLU(3, out_ch, 7, 2, 3, 1))
    self.add_module("pool", nn.MaxPool2d(3, 2, 1, ceil_mode=True))


class ASPP(nn.Module):

  def __init__(self, in_ch, out_ch, rates):
    super().__init__()
    for i, rate in enumerate(rates):
      self.add_module(f"c{i}", nn.Conv2d(in_ch, out_ch, 3, 1, padding=rate, dilation=rate, bias=True))
    for m in self.children():
      nn.init.normal_(m.weight, mean=0, std=0.01)
      nn.init.constant_(m.bias, 0)

  def forward(self, x):
    return sum([stage(x) for stage in self.children()])


class DeepLabV2(nn.Sequential):
  """Output stride 8; `width` 64 and blocks (3, 4, 23, 3) are ResNet-101."""

  def __init__(self, n_classes, n_blocks, atrous_rates, width=64):
    super().__init__()
    ch = [width * 2**p for p in range(6)]
    self.add_module("layer1", Stem(ch[0]))
    self.add_module("layer2", ResLayer(n_blocks[0], ch[0], ch[2], 1, 1))
    self.add_module("layer3", ResLayer(n_blocks[1], ch[2], ch[3], 2, 1))
    self.add_module("layer4", ResLayer(n_blocks[2], ch[3], ch[4], 1, 2))
    self.add_module("layer5", ResLayer(n_blocks[3], ch[4], ch[5], 1, 4))
    self.add_module("aspp", ASPP(ch[5], n_classes, atrous_rates))
    for name, m in self.named_modules():
      # Random init in place of the caffe weights: cpal_jax's (torchvision's) conv init.
      if isinstance(m, nn.Conv2d) and name.startswith("layer"):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def freeze_bn(self):
    for m in self.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.eval()


class MSC(nn.Module):

  def __init__(self, base, scales):
    super().__init__()
    self.base = base
    self.scales = scales

  def forward(self, x):
    logits = self.base(x)
    _, _, H, W = logits.shape
    interp = lambda l: F.interpolate(l, size=(H, W), mode="bilinear", align_corners=False)
    logits_pyramid = []
    for p in self.scales:
      h = F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False)
      logits_pyramid.append(self.base(h))
    logits_all = [logits] + [interp(l) for l in logits_pyramid]
    logits_max = torch.max(torch.stack(logits_all), dim=0)[0]
    if self.training:
      return [logits] + logits_pyramid + [logits_max]
    return logits_max


def calibrate_bn(base, x):
  """Sets every BN's running statistics to those of its input in one no-grad forward of x (biased
  variance, as BN normalises), each BN normalising with its new statistics before the next layer's
  are taken: the activation scale of a pretrained network, which random init lacks."""

  def take(m, inputs):
    t = inputs[0]
    m.running_mean.copy_(t.mean(dim=(0, 2, 3)))
    m.running_var.copy_(t.var(dim=(0, 2, 3), unbiased=False))

  hooks = [m.register_forward_pre_hook(take) for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
  with torch.no_grad():
    base(x)
  for h in hooks:
    h.remove()


# ---------------------------------------------------------------------------- step (main.py train)
def get_params(model, key):
  """kazuto1011's parameter groups: only conv parameters reach the optimiser."""
  for name, m in model.named_modules():
    if not isinstance(m, nn.Conv2d):
      continue
    if key == "1x" and "layer" in name:
      yield from m.parameters()
    if key == "10x" and "aspp" in name:
      yield m.weight
    if key == "20x" and "aspp" in name:
      yield m.bias


def resize_labels(labels, size):
  """The reference's label shrink: PIL's nearest on each label map (size = (H, W))."""
  out = []
  for label in labels:
    label = Image.fromarray(label.float().numpy()).resize((size[1], size[0]), resample=Image.NEAREST)
    out.append(np.asarray(label))
  # np.stack first: torch.LongTensor(list of arrays), as the reference writes it, copies element-wise.
  return torch.from_numpy(np.stack(out)).long()


class PolyLR:
  """lr of each group = base * (1 - it / max_step) ** power, set before the it-th update (it from 0),
  as optax's schedule count in ours."""

  def __init__(self, optimizer, max_step, power):
    self.optimizer, self.max_step, self.power = optimizer, max_step, power
    self.base = [g["lr"] for g in optimizer.param_groups]
    self.it = 0

  def step(self):
    mult = max(0.0, 1.0 - self.it / self.max_step) ** self.power
    for g, base in zip(self.optimizer.param_groups, self.base):
      g["lr"] = base * mult
    self.it += 1


def build(args):
  torch.manual_seed(args.seed)
  blocks, width = deeplab_common.ARCHS[args.backbone]
  rates = [int(r) for r in args.rates.split(",")]
  scales = [float(s) for s in args.scales.split(",") if s]
  model = MSC(DeepLabV2(args.num_classes, blocks, rates, width), scales)
  batch = deeplab_common.synthetic_batch(args.batch, args.size, args.num_classes, args.seed)
  # The reference loader's output: BGR float minus the mean, zero (= the mean padding) outside.
  x = batch["image"][..., ::-1].astype(np.float32) - np.asarray(CAFFE_MEAN_BGR, np.float32)
  x *= batch["valid"][..., None]
  images = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  labels = torch.from_numpy(batch["mask"].astype(np.int64))
  model.train()
  model.base.freeze_bn()
  calibrate_bn(model.base, images[:1])
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(
      params=[
          {"params": get_params(model.base, "1x"), "lr": args.lr, "weight_decay": args.weight_decay},
          {"params": get_params(model.base, "10x"), "lr": 10 * args.lr, "weight_decay": args.weight_decay},
          {"params": get_params(model.base, "20x"), "lr": 20 * args.lr, "weight_decay": 0.0},
      ],
      lr=args.lr,
      momentum=args.momentum,
  )
  return model, optimizer, PolyLR(optimizer, args.max_step, args.poly_power), images, labels


def losses(model, criterion, images, labels):
  total = 0
  for logit in model(images):
    _, _, H, W = logit.shape
    total = total + criterion(logit, resize_labels(labels, (H, W)))
  return total


def train_step(model, optimizer, scheduler, criterion, images, labels, iter_size):
  optimizer.zero_grad()
  loss = 0.0
  for imgs, labs in zip(images.chunk(iter_size), labels.chunk(iter_size)):
    iter_loss = losses(model, criterion, imgs, labs) / iter_size
    iter_loss.backward()
    loss += float(iter_loss.detach())
  scheduler.step()
  optimizer.step()
  return loss


def count_flops(model, criterion, images, labels):
  """Executed FLOPs of one forward and backward of the whole batch (torch.utils.flop_counter)."""
  from torch.utils.flop_counter import FlopCounterMode

  with FlopCounterMode(display=False) as fwd_mode:
    loss = losses(model, criterion, images, labels)
  with FlopCounterMode(display=False) as bwd_mode:
    loss.backward()
  model.zero_grad(set_to_none=True)
  fwd, bwd = fwd_mode.get_total_flops(), bwd_mode.get_total_flops()
  return {"fwd": int(fwd), "bwd": int(bwd), "executed_total": int(fwd + bwd)}


# ------------------------------------------------------------------------------------------ main
def main(args):
  torch.set_num_threads(args.threads)
  model, optimizer, scheduler, images, labels = build(args)
  criterion = nn.CrossEntropyLoss(ignore_index=deeplab_common.IGNORE)
  rss_after_build = deeplab_common.proc_status_mb("VmRSS")

  def step():
    return train_step(model, optimizer, scheduler, criterion, images, labels, args.iter_size)

  losses_seen = [step() for _ in range(args.warmup)]
  times = []
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    losses_seen.append(step())
    times.append(time.perf_counter() - t0)
  cpu_util = (time.process_time() - c0) / (time.perf_counter() - w0)
  peak = deeplab_common.proc_status_mb("VmHWM")  # before the FLOP pass, which holds one more graph
  with torch.no_grad():
    logit_sizes = [list(l.shape[2:]) for l in model(images[:1])]

  med = statistics.median(times)
  res = {
      "mode": "bench",
      "args": vars(args),
      "torch": torch.__version__,
      "python": platform.python_version(),
      "machine": platform.processor() or platform.machine(),
      "threads": torch.get_num_threads(),
      "step_s": {
          "median": med,
          "mean": statistics.fmean(times),
          "min": min(times),
          "max": max(times),
          "all": times,
      },
      "images_per_s": args.batch / med,
      "peak_rss_mb": peak,
      "rss_after_build_mb": rss_after_build,
      "cpu_util_cores": cpu_util,
      "logit_sizes": logit_sizes,
      "losses_first_last": [losses_seen[0], losses_seen[-1]],
  }
  if not args.no_flops:
    fl = count_flops(model, criterion, images, labels)
    res["flops"] = fl
    res["gflops_per_s_executed"] = fl["executed_total"] / med / 1e9

  print(
      f"torch {torch.__version__}  threads={res['threads']}  B={args.batch} {args.size}x{args.size} "
      f"{args.backbone}  iter_size={args.iter_size}  warmup={args.warmup} steps={args.steps}"
  )
  print(f"step time  median {med:.4f}s  min {min(times):.4f}s  max {max(times):.4f}s")
  print(f"images/s   {res['images_per_s']:.3f}")
  print(f"peak RSS   {peak:.0f} MiB (VmHWM; after build {rss_after_build:.0f})  cpu {cpu_util:.2f} cores")
  if "flops" in res:
    gflop = res["flops"]["executed_total"] / 1e9
    print(f"GFLOP/step {gflop:.1f} -> {res['gflops_per_s_executed']:.1f} GFLOP/s")
  print(f"loss first {losses_seen[0]:.4f}  last {losses_seen[-1]:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)
  if not all(np.isfinite(losses_seen)):
    print("non-finite loss: the timed step is not the real one", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main(ARGS)
