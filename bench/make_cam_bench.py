"""make_cam throughput: multi-scale + flip seed maps per second on VOC-sized images, ours and SIPE's.

  python bench/make_cam_bench.py --images 8 --size 500x375 --backbone resnet50 --method sipe --threads 2 \
      [--torch-ref bench/torch_make_cam.py] [--json out.json]

Runs the jitted per-scale predictor of cpal_jax/infer/cam.py (randomly initialised network of the
VOC recipe: ResNet-50 at output stride 16) on random images of one size at the scales of the config
(1.0, 0.5, 1.5, 2.0), each with its flip, plus the host-side upsampling and fusion, and reports
images/s after one warm-up image per scale bucket (compile excluded). Weights do not change the
cost, so no checkpoint is needed.

Then, in a subprocess of the same run, the PyTorch reference of SIPE's make_cam.py
(bench/torch_make_cam.py, its docstring says what it computes and how it lines up with ours) on
as many images of the same size with the same threads, and the ratio PyTorch s/image over ours.
The reference exists for --method sipe on ResNet-50 only; --torch-ref "" skips it. --threads caps
XLA's CPU pool (bench/xla_cpu.py) and PyTorch's alike; on an accelerator only the host side of ours
uses them. Peak memory is each process's VmHWM.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import md_table  # bench/md_table.py, beside this script
import xla_cpu
from deeplab_common import proc_status_mb  # VmHWM, not ru_maxrss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(REPO, "bench", "torch_make_cam.py")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--size", default="500x375", help="W x H")
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--method", default="sipe", choices=["cam", "sipe"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for XLA and for PyTorch")
  p.add_argument("--torch-ref", default=TORCH_REF, help="path to torch_make_cam.py; empty to skip")
  p.add_argument(
      "--torch-work",
      default="same",
      choices=["same", "sipe"],
      help="torch_make_cam.py --work: the maps ours computes, or SIPE make_cam.py's own host work",
  )
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def ours(args) -> dict:
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
  fusion_s = []

  def one_image(image):
    per_scale = []
    for s in c.cam.scales:
      scaled = infer_cam.rescale(image, s)
      batch = infer_cam.padded_batch([scaled], np.repeat(label, 1, 0), c.cam.pad_multiple, args.batch)
      maps = np.asarray(predict(variables, None, batch))
      stride = batch["image"].shape[1] // maps.shape[1]
      hv, wv = -(-scaled.shape[0] // stride), -(-scaled.shape[1] // stride)
      per_scale.append(np.moveaxis(maps[0, :hv, :wv], -1, 0)[channels])
    t = time.perf_counter()
    infer_cam.normalise(infer_cam.fuse_scales(per_scale, (h, w)))
    infer_cam.normalise(infer_cam.fuse_scales(per_scale, (-(-h // 4), -(-w // 4))))
    fusion_s.append(time.perf_counter() - t)

  images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(args.images)]
  t0 = time.perf_counter()
  one_image(images[0])  # compiles every scale bucket
  compile_s = time.perf_counter() - t0
  fusion_s.clear()
  t0 = time.perf_counter()
  for im in images:
    one_image(im)
  run_s = time.perf_counter() - t0
  return {
      "bench": "make_cam",
      "backend": jax.default_backend(),
      "devices": jax.device_count(),
      "size": [w, h],
      "backbone": args.backbone,
      "method": args.method,
      "scales": list(c.cam.scales),
      "images": args.images,
      "threads": args.threads,
      "compile_s": round(compile_s, 2),
      "run_s": run_s,
      "s_per_image": round(run_s / args.images, 3),
      "images_per_s": round(args.images / run_s, 3),
      "fusion_s_per_image": round(sum(fusion_s) / len(fusion_s), 4),
      "peak_rss_mb": round(proc_status_mb("VmHWM")),
  }


def torch_reference(args) -> dict | None:
  if not args.torch_ref:
    return None
  if (args.method, args.backbone) != ("sipe", "resnet50"):
    print(f"(the PyTorch reference is SIPE on ResNet-50; skipped for {args.method} on {args.backbone})")
    return None
  if not os.path.exists(args.torch_ref):
    print(f"(PyTorch reference not found at {args.torch_ref}; skipped)")
    return None
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "ref.json")
    cmd = [sys.executable, args.torch_ref, "--images", str(args.images), "--size", args.size]
    cmd += ["--threads", str(args.threads), "--warmup", "1", "--work", args.torch_work, "--json", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      return json.load(f)


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.limit_threads(args.threads)
  out = ours(args)
  w, h = out["size"]
  print(
      f"make_cam {args.method} {args.backbone} {w}x{h}, scales {out['scales']} + flip, "
      f"{out['backend']}, {args.threads} threads: {out['s_per_image']} s/image "
      f"({out['images_per_s']} images/s, host fusion {out['fusion_s_per_image']} s), "
      f"first image incl. compile {out['compile_s']} s, "
      f"peak RSS {out['peak_rss_mb']} MB"
  )
  rows = [
      [
          "ours (JAX, `cpal_jax/infer/cam.py`)",
          f"{out['s_per_image']:.3f}",
          f"{out['images_per_s']:.3f}",
          f"{out['fusion_s_per_image']:.4f}",
          f"{out['peak_rss_mb']:.0f}",
      ]
  ]
  ref = torch_reference(args)
  out["torch"] = ref
  if ref:
    out["torch_over_jax"] = round(ref["s_per_image"] / (out["run_s"] / args.images), 3)
    print(
        f"PyTorch SIPE make_cam (torch {ref['torch']}, work={ref['work']}): {ref['s_per_image']:.3f} s/image "
        f"({ref['images_per_s']:.3f} images/s, host fusion {ref['fusion_s_per_image']:.4f} s), "
        f"peak RSS {ref['peak_rss_mb']:.0f} MB"
    )
    print(f"PyTorch s/image / ours: {out['torch_over_jax']:.3f}")
    rows.append(
        [
            f"PyTorch SIPE (`bench/torch_make_cam.py --work {ref['work']}`)",
            f"{ref['s_per_image']:.3f}",
            f"{ref['images_per_s']:.3f}",
            f"{ref['fusion_s_per_image']:.4f}",
            f"{ref['peak_rss_mb']:.0f}",
        ]
    )
  print(json.dumps(out))
  md_table.emit(
      ["implementation", "s/image", "images/s", "host fusion s/image", "peak RSS MB"],
      rows,
      f", {out['backend']}, {args.threads} threads, {args.images} images of {w}x{h}, scales "
      f"{'/'.join(str(s) for s in out['scales'])} + flip"
      + (f"; PyTorch / ours {out['torch_over_jax']:.2f}x" if ref else ""),
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
