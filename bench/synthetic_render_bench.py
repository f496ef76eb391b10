"""Synthetic data rendering speed: ms per image of SyntheticSource.__getitem__ (image, mask, label)
for both worlds ("default" and "everyday"), in one process, after one warm-up render.

The target is ~2 ms/image at 96 px on one core: the input pipeline renders on the fly, so it must
stay well under a train step. This used to be a wall-clock assertion in tests/test_synthetic.py,
where a shared or loaded machine made it flaky; here it is a figure to read. `python -m
cpal_jax.data.synthetic --bench N` times one world and split the same way.

  python bench/synthetic_render_bench.py [--images 150 --split val --image-size 96
                                          --worlds default,everyday --repeats 3 --json out.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpal_jax.data import synthetic  # numpy only: no JAX


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=150, help="renders per repeat")
  p.add_argument("--split", default="val", choices=sorted(synthetic.SPLITS))
  p.add_argument("--image-size", type=int, default=96)
  p.add_argument("--worlds", default=",".join(synthetic.WORLDS), help="comma-separated world names")
  p.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="also write the results as JSON to this path")
  args = p.parse_args(argv)
  if args.images < 1 or args.repeats < 1:
    p.error("--images and --repeats must be >= 1")
  args.worlds = [w for w in args.worlds.split(",") if w]
  for w in args.worlds:
    if w not in synthetic.WORLDS:
      p.error(f"unknown world {w!r}; choose from {', '.join(synthetic.WORLDS)}")
  return args


def time_world(world: str, args) -> dict:
  src = synthetic.SyntheticSource(
      args.split, seed=args.seed, num_images=args.images, image_size=args.image_size, world=world
  )
  src[0]  # warm-up: imports, caches
  per_pass = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    for i in range(len(src)):
      src[i]
    per_pass.append((time.perf_counter() - t) / len(src) * 1e3)
  return {
      "world": world,
      "split": args.split,
      "image_size": args.image_size,
      "images": len(src),
      "repeats": args.repeats,
      "ms_per_image": round(statistics.median(per_pass), 3),
      "ms_per_image_min": round(min(per_pass), 3),
      "ms_per_image_max": round(max(per_pass), 3),
  }


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  rows = [time_world(w, args) for w in args.worlds]
  print(f"{'world':<10} {'ms/image':>9} {'min':>7} {'max':>7}   ({args.split}, {args.image_size}px, "
        f"{args.images} images x {args.repeats})")
  for r in rows:
    print(
        f"{r['world']:<10} {r['ms_per_image']:>9.3f} {r['ms_per_image_min']:>7.3f} "
        f"{r['ms_per_image_max']:>7.3f}"
    )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
