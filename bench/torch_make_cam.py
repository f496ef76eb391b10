"""PyTorch (CPU) reference of SIPE's make_cam: multi-scale + flip IS-CAM of VOC-sized images per second.

  python bench/torch_make_cam.py --images 8 --size 500x375 --threads 2 [--warmup 1] [--json out.json]

Follows chenqi1126/SIPE (commit e0c6a3b) make_cam.py with data/data_voc.py VOC12ClsDatasetMSF and
network/resnet50_SIPE.py class CAM; the network (ResNet-50 at output stride 16, side heads, seeds,
prototypes) is bench/torch_ref.py's, the same as SIPE's. Per image:
  - for each scale s of (1.0, 0.5, 1.5, 2.0): PIL bicubic rescale to (round(H*s), round(W*s))
    (imutils.pil_rescale, skipped at 1.0), torchvision mean/std normalisation in numpy, HWC->CHW,
    stacked with its horizontal flip into one batch of 2;
  - the forward of class CAM under torch.no_grad: the classifier map and the hierarchical feature
    of the two views summed (the flip's flipped back), the normalised CAM with its background
    channel, seeds from the feature correlation (SIPE's broadcast form), prototypes, and IS-CAM
    [21, h/16, w/16] (not normalised per scale);
  - on the host: each scale's IS-CAM bilinearly upsampled (align_corners=False) to the image size,
    summed over scales, max-normalised per channel (x / (max + 1e-5)), the present channels kept
    (background and the image's classes).
The timed loop covers all of it, rescaling included; images/s and s/image are over --images images
after --warmup untimed ones. Peak memory is the process's VmHWM (/proc/self/status).
--json keys: s_per_image (mean over the timed images), s_per_image_median, images_per_s, and the
mean split preprocess_s_per_image / network_s_per_image / fusion_s_per_image (the host fusion),
peak_rss_mb, rss_after_build_mb, cpu_util_cores, threads, size [W, H], scales, work, images, warmup.

Like-for-like with bench/make_cam_bench.py (our make_cam), which --work same (default) matches:
  - our make_cam also writes the stride-4 map (the random walk's input: the same sum of scales
    upsampled to (ceil(H/4), ceil(W/4)), normalised); SIPE's make_cam.py writes only the image-size
    IS_CAM. --work same computes it here too; --work sipe leaves it out.
  - SIPE upsamples all 21 channels and keeps the present ones after normalising; ours keeps them
    first (the same values: every step is per channel). --work same keeps them first; --work sipe
    upsamples all 21, as make_cam.py.
What differs either way, and why:
  - images are random uint8 arrays in memory (not JPEG files decoded), nothing is written to disk and
    SIPE's --visualize heatmaps are not drawn: the bench times the maps, as ours does;
  - the rescaling runs in the timed loop, not in DataLoader workers beside the network, as in ours;
  - weights are random (cost does not depend on them), the frozen BatchNorm statistics set from one
    batch of noise so activations stay in a normal float range (as bench/torch_ref.py does);
  - the image is read at its exact size, as SIPE's; ours pads each scale to a multiple of
    cam.pad_multiple (64), so it convolves slightly larger inputs than this reference;
  - CPU, not CUDA.
The present classes are 1 and 15 (aeroplane, person), as in bench/make_cam_bench.py.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = (1.0, 0.5, 1.5, 2.0)
PRESENT = (0, 14)  # foreground indices (0-based) of the present classes, as in make_cam_bench.py
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=8, help="timed images")
  p.add_argument("--size", default="500x375", help="W x H")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads (also OMP/MKL env)")
  p.add_argument("--warmup", type=int, default=1, help="untimed images first")
  p.add_argument(
      "--work",
      default="same",
      choices=["same", "sipe"],
      help="same: the maps our make_cam computes (present channels, image-size and stride-4 maps); "
      "sipe: SIPE make_cam.py's own host work (21 channels upsampled, image-size map only)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the results as JSON here")
  return p.parse_args(argv)


def build_model(torch, seed: int):
  import torch.nn.functional as F
  import torch_ref  # bench/torch_ref.py, beside this script: SIPE's network

  class SIPECAM(torch_ref.SIPENet):
    """network/resnet50_SIPE.py class CAM: x is an image and its flip [2, 3, h, w], label [21, 1, 1]
    with background 1; returns norm_cam [21, h16, w16] and IS_cam [21, h16, w16] of the two fused."""

    def forward(self, x, label):
      x0 = self.stage0(x)
      x1 = self.stage1(x0)
      x2 = self.stage2(x1)
      x3 = self.stage3(x2)
      x4 = self.stage4(x3)
      sides = [self.side1(x1), self.side2(x2), self.side3(x3), self.side4(x4)]
      hw = sides[2].shape[2:]
      hie_fea = torch.cat(
          [F.interpolate(torch_ref._l2n(s), hw, mode="bilinear", align_corners=False) for s in sides], dim=1
      )
      cam = self.classifier(x4)
      cam = (cam[0] + cam[1].flip(-1)).unsqueeze(0)
      hie_fea = (hie_fea[0] + hie_fea[1].flip(-1)).unsqueeze(0)
      norm_cam = F.relu(cam)
      norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
      cam_bkg = 1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1)
      norm_cam = torch.cat([cam_bkg, norm_cam], dim=1)
      norm_cam = F.interpolate(norm_cam, hw, mode="bilinear", align_corners=True)
      seeds, _ = self.get_seed(norm_cam.clone(), label.unsqueeze(0).clone(), hie_fea.clone())
      prototypes = self.get_prototype(seeds, hie_fea)
      is_cam = self.reactivate(prototypes, hie_fea)
      return norm_cam[0], is_cam[0]

  torch.manual_seed(seed)
  model = SIPECAM(num_cls=21, seed_impl="broadcast")
  g = torch.Generator().manual_seed(seed + 1000)
  torch_ref.calibrate_bn(model, torch.randn(2, 3, 128, 128, generator=g))
  return model.eval()


def main(argv=None):
  args = parse_args(argv)
  for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(args.threads)  # read once when the libraries load: before the imports
  sys.path.insert(0, HERE)
  import numpy as np
  from deeplab_common import proc_status_mb  # bench/, beside this script: VmHWM, not ru_maxrss
  import torch
  import torch.nn.functional as F
  from PIL import Image

  torch.set_num_threads(args.threads)
  w, h = (int(v) for v in args.size.split("x"))
  model = build_model(torch, args.seed)
  rss_after_build = proc_status_mb("VmRSS")

  label = torch.zeros(20)
  label[list(PRESENT)] = 1
  label = F.pad(label, (1, 0), "constant", 1.0)  # make_cam.py: background first, always present
  label4 = label.unsqueeze(-1).unsqueeze(-1)
  valid_cat = torch.nonzero(label)[:, 0].numpy()
  strided_size = (-(-h // 4), -(-w // 4))

  def preprocess(img):
    """VOC12ClsDatasetMSF.__getitem__ for one scale: rescale, normalise, CHW, with its flip."""
    out = []
    for s in SCALES:
      if s == 1:
        s_img = img
      else:
        size = (int(np.round(img.shape[0] * s)), int(np.round(img.shape[1] * s)))
        s_img = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BICUBIC))
      arr = np.asarray(s_img)
      proc = np.empty_like(arr, np.float32)
      for c in range(3):
        proc[..., c] = (arr[..., c] / 255.0 - MEAN[c]) / STD[c]
      proc = np.transpose(proc, (2, 0, 1))
      out.append(torch.from_numpy(np.stack([proc, np.flip(proc, -1)], axis=0)))  # the loader's collate
    return out

  def fuse(maps, size):
    """make_cam.py's multi-scale fusion of IS-CAMs [K, h, w] at one output size."""
    up = [F.interpolate(torch.unsqueeze(o, 1), size, mode="bilinear", align_corners=False) for o in maps]
    cam = torch.sum(torch.stack(up, 0), 0)[:, 0]
    cam /= F.adaptive_max_pool2d(cam, (1, 1)) + 1e-5
    return cam.cpu().numpy()

  def one_image(img):
    t0 = time.perf_counter()
    views = preprocess(img)
    t1 = time.perf_counter()
    with torch.no_grad():
      outputs = [model(v, label4) for v in views]
    t2 = time.perf_counter()
    is_cams = [o[1].cpu() for o in outputs]
    if args.work == "sipe":
      high_res = fuse(is_cams, (h, w))[valid_cat]
      strided = None
    else:
      keep = torch.from_numpy(valid_cat)
      is_cams = [o[keep] for o in is_cams]
      high_res = fuse(is_cams, (h, w))
      strided = fuse(is_cams, strided_size)
    t3 = time.perf_counter()
    return (t1 - t0, t2 - t1, t3 - t2), high_res, strided

  rng = np.random.default_rng(args.seed)
  images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(args.warmup + args.images)]
  for im in images[: args.warmup]:
    one_image(im)
  parts = []
  c0, t0 = time.process_time(), time.perf_counter()
  for im in images[args.warmup :]:
    t = time.perf_counter()
    split, high_res, strided = one_image(im)
    parts.append((time.perf_counter() - t, *split))
  run_s = time.perf_counter() - t0
  cpu_util = (time.process_time() - c0) / run_s
  assert high_res.shape == (len(valid_cat), h, w) and np.isfinite(high_res).all()
  assert strided is None or strided.shape == (len(valid_cat), *strided_size)

  per = [statistics.fmean(p[i] for p in parts) for i in range(4)]
  res = {
      "bench": "torch_make_cam",
      "impl": "torch sipe make_cam (reference)",
      "torch": torch.__version__,
      "python": platform.python_version(),
      "machine": platform.machine(),
      "threads": torch.get_num_threads(),
      "size": [w, h],
      "scales": list(SCALES),
      "work": args.work,
      "present_classes": [int(c) for c in valid_cat],
      "images": args.images,
      "warmup": args.warmup,
      "s_per_image": run_s / args.images,
      "s_per_image_median": statistics.median(p[0] for p in parts),
      "images_per_s": args.images / run_s,
      "preprocess_s_per_image": per[1],
      "network_s_per_image": per[2],
      "fusion_s_per_image": per[3],
      "cpu_util_cores": cpu_util,
      "peak_rss_mb": proc_status_mb("VmHWM"),
      "rss_after_build_mb": rss_after_build,
  }
  print(
      f"torch {torch.__version__} SIPE make_cam {w}x{h}, scales {list(SCALES)} + flip, "
      f"{res['threads']} threads, work={args.work}: {res['s_per_image']:.3f} s/image "
      f"({res['images_per_s']:.3f} images/s; preprocess {per[1]:.3f}, network {per[2]:.3f}, "
      f"host fusion {per[3]:.3f} s), peak RSS {res['peak_rss_mb']:.0f} MB"
  )
  print(json.dumps(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)


if __name__ == "__main__":
  main()
