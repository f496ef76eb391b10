"""Dense CRF throughput: prob_crf (PSA parameters, 10 iterations) on VOC-sized images with 21-channel
probability maps, in one process and over a spawned pool of all cores (cpal_jax.refine.crf).

pydensecrf is single-threaded, so the pool should scale with physical cores until memory bandwidth
or hyper-threads stop it. Images are random but structured (Voronoi regions of flat colour plus
noise; the maps favour each region's class with label noise), so mean-field converges as on real
seeds rather than on white noise. Each job builds its own image from a seed inside the worker, so
no arrays cross the process boundary; the build is timed apart and left out of "crf s/img".
Wall-clock images/s includes spawning the pool (the cost a real run pays once per split). "crf cpu
s" is the CPU time of the CRF alone: where it stays flat while "crf s/img" grows with the pool,
the workers are waiting for cores (other load, or more workers than cores), not doing more work.

  python bench/crf_bench.py [--images 16 --size 500x375 --workers 0 --classes 21 --iters 10
                             --json out.json]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpal_jax.refine import crf  # numpy only: no JAX in this process or its workers


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--size", type=str, default="500x375", help="WIDTHxHEIGHT")
  p.add_argument("--workers", type=int, default=0, help="pool size for the parallel row; 0 = all cores")
  p.add_argument("--classes", type=int, default=21, help="channels of the probability map")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="also write the results as JSON to this path")
  args = p.parse_args(argv)
  try:
    w, h = (int(v) for v in args.size.lower().split("x"))
  except ValueError:
    p.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
  args.width, args.height = w, h
  return args


def make_example(seed, width, height, classes):
  """uint8 [H, W, 3] image of ~12 flat-coloured Voronoi regions plus noise, and a [K, H, W]
  probability map: softmax of a one-hot score for each region's class plus blurred noise."""
  import numpy as np

  rng = np.random.default_rng(seed)
  n_regions = 12
  centres = rng.uniform([0, 0], [height, width], (n_regions, 2))
  yy, xx = np.mgrid[:height, :width]
  d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
  region = np.argmin(d2, axis=0)
  colours = rng.integers(0, 256, (n_regions, 3))
  image = colours[region] + rng.normal(0, 8, (height, width, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)
  # Background plus a few classes, as on a VOC image; regions draw their class from those.
  present = np.concatenate([[0], rng.choice(np.arange(1, classes), 3, replace=False)])
  cls = present[rng.integers(0, len(present), n_regions)][region]
  noise = rng.normal(0, 1.5, (classes, height // 8 + 1, width // 8 + 1)).astype(np.float32)
  noise = noise.repeat(8, 1).repeat(8, 2)[:, :height, :width]  # blocky, like an upsampled CAM
  logits = 3.0 * (np.arange(classes)[:, None, None] == cls[None]) + noise
  probs = np.exp(logits - logits.max(0))
  probs /= probs.sum(0)
  return image, probs.astype(np.float32)


def job(item):
  """Top-level so the spawned pool can pickle it: (seed, width, height, classes, iters) ->
  (build seconds, CRF seconds, CRF CPU seconds of this process, argmax checksum)."""
  import numpy as np

  seed, width, height, classes, iters = item
  t0 = time.perf_counter()
  image, probs = make_example(seed, width, height, classes)
  t1, c1 = time.perf_counter(), time.process_time()
  q = crf.prob_crf(image, probs, iters=iters)
  t2, c2 = time.perf_counter(), time.process_time()
  return t1 - t0, t2 - t1, c2 - c1, int(np.argmax(q, 0).sum())


def run(items, workers):
  t = time.perf_counter()
  out = list(crf.map_images(job, items, workers))
  wall = time.perf_counter() - t
  return {
      "workers": workers,
      "images": len(items),
      "wall_s": round(wall, 3),
      "images_per_s": round(len(items) / wall, 3),
      "crf_s_per_image": round(sum(o[1] for o in out) / len(out), 3),
      "crf_cpu_s_per_image": round(sum(o[2] for o in out) / len(out), 3),
      "build_s_per_image": round(sum(o[0] for o in out) / len(out), 3),
      "checksum": sum(o[3] for o in out),
  }


def main(argv=None):
  args = parse_args(argv)
  items = [(args.seed + i, args.width, args.height, args.classes, args.iters) for i in range(args.images)]
  parallel = min(args.workers or crf.available_cores(), args.images)
  rows = [run(items, 1)]
  if parallel > 1:
    rows.append(run(items, parallel))
    if rows[1]["checksum"] != rows[0]["checksum"]:
      raise SystemExit("pool and in-process results differ")
  base = rows[0]["images_per_s"]
  print(
      f"prob_crf {args.width}x{args.height}, {args.classes} labels, {args.iters} iters, "
      f"{args.images} images, {crf.available_cores()} cores available"
  )
  print(
      f"{'workers':>8} {'wall s':>8} {'img/s':>8} {'speedup':>8} {'crf s/img':>10} {'crf cpu s':>10}"
      f" {'build s/img':>12}"
  )
  for r in rows:
    print(
        f"{r['workers']:>8} {r['wall_s']:>8.2f} {r['images_per_s']:>8.2f} {r['images_per_s'] / base:>8.2f}"
        f" {r['crf_s_per_image']:>10.3f} {r['crf_cpu_s_per_image']:>10.3f} {r['build_s_per_image']:>12.3f}"
    )
  result = {
      "bench": "crf",
      "size": [args.width, args.height],
      "classes": args.classes,
      "iters": args.iters,
      "cores": crf.available_cores(),
      "rows": rows,
  }
  line = json.dumps(result)
  print(line)
  if args.json:
    with open(args.json, "w") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
