"""make_cam throughput: multi-scale + flip seed maps per second on VOC-sized images.

  python bench/make_cam_bench.py --images 8 --size 500x375 --backbone resnet50 --method sipe

Runs the jitted per-scale predictor of cpal_jax/infer/cam.py (randomly initialised network of the
VOC recipe: ResNet-50 at output stride 16) on random images of one size at the scales of the config
(1.0, 0.5, 1.5, 2.0), each with its flip, plus the host-side upsampling and fusion, and reports
images/s after one warm-up image per scale bucket (compile excluded). Weights do not change the
cost, so no checkpoint is needed.
"""

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--size", default="500x375", help="W x H")
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--method", default="sipe", choices=["cam", "sipe"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--json", default=None)
  args = p.parse_args()

  sys.path.insert(0, os.path.join(REPO, "configs"))
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  import voc

  from cpal_jax.infer import cam as infer_cam
  from cpal_jax.models import cam_net

  c = voc.get_config()
  c.method.name = args.method
  c.model.backbone = args.backbone
  model = cam_net.from_config(c)
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
  predict = infer_cam.make_predict(model, c)
  w, h = (int(v) for v in args.size.split("x"))
  rng = np.random.default_rng(0)
  label = np.zeros((1, c.data.num_classes - 1), np.float32)
  label[0, [0, 14]] = 1
  keys = infer_cam.channel_keys(label[0], infer_cam.has_background(c))
  channels = keys if infer_cam.has_background(c) else keys - 1

  def one_image(image):
    per_scale = []
    for s in c.cam.scales:
      scaled = infer_cam.rescale(image, s)
      batch = infer_cam.padded_batch([scaled], np.repeat(label, 1, 0), c.cam.pad_multiple, args.batch)
      maps = np.asarray(predict(variables, None, batch))
      stride = batch["image"].shape[1] // maps.shape[1]
      hv, wv = -(-scaled.shape[0] // stride), -(-scaled.shape[1] // stride)
      per_scale.append(np.moveaxis(maps[0, :hv, :wv], -1, 0)[channels])
    infer_cam.normalise(infer_cam.fuse_scales(per_scale, (h, w)))
    infer_cam.normalise(infer_cam.fuse_scales(per_scale, (-(-h // 4), -(-w // 4))))

  images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(args.images)]
  t0 = time.perf_counter()
  one_image(images[0])  # compiles every scale bucket
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for im in images:
    one_image(im)
  run_s = time.perf_counter() - t0
  out = {
      "bench": "make_cam",
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "size": [w, h],
      "backbone": args.backbone,
      "method": args.method,
      "scales": list(c.cam.scales),
      "images": args.images,
      "compile_s": round(compile_s, 2),
      "s_per_image": round(run_s / args.images, 3),
      "images_per_s": round(args.images / run_s, 3),
  }
  print(f"make_cam {args.method} {args.backbone} {w}x{h}, scales {list(c.cam.scales)} + flip, "
        f"{jax.default_backend()}: {out['s_per_image']} s/image ({out['images_per_s']} images/s), "
        f"first image incl. compile {out['compile_s']} s")
  print(json.dumps(out))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
