"""IRN's random walk per VOC-sized image: the sparse stencil walk against IRN's dense h·w × h·w matrix.

Each variant runs in its own subprocess, so the process peak RSS (resource.getrusage ru_maxrss) of one
cannot hide in the other's. A row reports that peak at the end, the peak right before compiling
(python, jax and the inputs) and right after compiling; ru_maxrss is a high-water mark, so when the
final peak equals the after-compile one, XLA's compiler, not the walk, set it. Next to it, the memory
the arrays need: a hand count of the dominant live float32 buffers (nbytes) and XLA's own buffer
assignment (memory_analysis: temporaries + arguments + outputs; for the dense walk, the larger of its
two programs). Times: compile (lower + compile), then the median of --repeats calls of the compiled
walk after a warm-up call (block_until_ready); a walk whose warm-up call takes over 10 s is timed by
that call alone.

The dense walk costs 2·(h·w)³·exp_times FLOP, ~26 TFLOP at 125x94 (about 10 minutes on two busy CPU
cores). By default it runs at a reduced size (the --size aspect ratio scaled to at most
--dense-max-pixels pixels, with the sparse walk repeated there for a like-for-like row) and its
full-size time is extrapolated by the cubic law from the largest dense size measured, its full-size
memory by the hand count. --dense-size WxH[,WxH...] picks the dense sizes, the full size included.

  python bench/random_walk_bench.py [--size 125x94 --classes 3 --exp-times 8 --radius 5 --beta 10
                                     --repeats 3 --dense-max-pixels 3000 --dense-size WxH,...
                                     --threads 2 --json out.json]

--size is W x H of the stride-4 map: 125x94 is a 500x375 VOC image (ceil(375/4) = 94 rows).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import md_table  # bench/md_table.py, beside this script
import xla_cpu


def parse_size(text: str) -> tuple[int, int]:
  w, h = (int(v) for v in text.lower().split("x"))
  return w, h


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", type=parse_size, default=(125, 94), help="W x H of the stride-4 map")
  p.add_argument("--classes", type=int, default=3, help="CAM channels walked (present classes)")
  p.add_argument("--exp-times", type=int, default=8)
  p.add_argument("--radius", type=int, default=5)
  p.add_argument("--beta", type=float, default=10.0)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dense-max-pixels", type=int, default=3000)
  p.add_argument("--dense-size", type=str, default=None, help="comma-separated WxH sizes for the dense walk")
  p.add_argument("--threads", type=int, default=2, help="XLA CPU threads")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", type=str, default=None, help="also write the results as JSON to this path")
  p.add_argument("--worker", choices=("sparse", "dense"), default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def hand_count(variant: str, w: int, h: int, classes: int, radius: int) -> dict[str, int]:
  """Bytes of the dominant float32 buffers that must be live at the peak of each variant."""
  from cpal_jax.refine import affinity

  px, f32 = w * h, 4
  n = len(affinity.offsets(radius))
  if variant == "dense":
    # IRN's squaring loop holds T and T·T at once (A and A^β are dead by then).
    return {"T": px * px * f32, "T@T": px * px * f32}
  pixels = len({(int(y), int(x)) for p in affinity.paths(radius) for y, x in p})
  r0 = radius - 1
  return {
      "shifted edge stack [U,h,w]": pixels * px * f32,
      "affinity both ways [2N,h,w]": 2 * n * px * f32,
      "weights [2N+1,h,w]": (2 * n + 1) * px * f32,
      "walk state + padded copy [K,h,w]": classes * (px + (h + 2 * r0) * (w + 2 * r0)) * f32,
  }


def worker(args) -> dict:
  import numpy as np

  import jax
  import jax.numpy as jnp

  from cpal_jax.refine import random_walk as rw

  w, h = args.size
  rng = np.random.default_rng(args.seed)
  # A plausible edge map: thin random straight boundaries (edge ~0.9) on a faint background; CAMs in
  # [0, 1]. The walk's cost does not depend on the values.
  yy, xx = np.mgrid[:h, :w]
  edge = 0.02 * rng.random((h, w))
  for _ in range(6):
    a, b, c = rng.normal(), rng.normal(), rng.uniform(-0.5, 0.5) * max(h, w)
    dist = np.abs(a * (xx - w / 2) + b * (yy - h / 2) - c) / math.hypot(a, b)
    edge = np.maximum(edge, 0.9 * (dist < 0.75))
  cams = rng.random((args.classes, h, w))
  cams, edge = jnp.asarray(cams, jnp.float32), jnp.asarray(edge, jnp.float32)
  jax.block_until_ready((cams, edge))
  baseline = rss_bytes()

  t = time.perf_counter()
  if args.worker == "sparse":
    walk = rw.random_walk.lower(cams, edge, beta=args.beta, exp_times=args.exp_times, radius=args.radius)
    walk = walk.compile()
    programs = [walk]
    run = lambda: walk(cams, edge, beta=args.beta)
  else:  # random_walk_dense's two programs
    trans = rw.dense_transition.lower(edge, args.beta, radius=args.radius).compile()
    px_sq = jax.ShapeDtypeStruct((h * w, h * w), jnp.float32)
    propagate = rw.dense_propagate.lower(cams, edge, px_sq, exp_times=args.exp_times).compile()
    programs = [trans, propagate]
    run = lambda: propagate(cams, edge, trans(edge, args.beta))
  compile_s = time.perf_counter() - t
  after_compile = rss_bytes()
  call = lambda: jax.block_until_ready(run())
  t = time.perf_counter()
  out = call()  # warm-up
  warmup_s = time.perf_counter() - t
  times = [warmup_s]
  if warmup_s < 10.0:  # a slow dense walk is timed by its single (warm-up) call
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      call()
      times.append(time.perf_counter() - t)
  xla_bytes = None  # the largest program's temporaries + arguments + outputs
  mems = [p.memory_analysis() for p in programs]
  if all(m is not None for m in mems):
    xla_bytes = max(
        int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) for m in mems
    )
  counted = hand_count(args.worker, w, h, args.classes, args.radius)
  return dict(
      variant=args.worker,
      size=f"{w}x{h}",
      pixels=w * h,
      compile_s=compile_s,
      run_s=statistics.median(times),
      run_s_all=times,
      rss_peak_bytes=rss_bytes(),
      rss_baseline_bytes=baseline,
      rss_after_compile_bytes=after_compile,
      hand_count_bytes=sum(counted.values()),
      hand_count=counted,
      xla_buffer_bytes=xla_bytes,
      checksum=float(jnp.sum(out)),
      backend=jax.default_backend(),
  )


def run_variant(args, variant: str, size: tuple[int, int]) -> dict:
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--size", f"{size[0]}x{size[1]}"]
  for flag in ("classes", "exp_times", "radius", "beta", "repeats", "threads", "seed"):
    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{variant} {size} failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_sizes(args) -> list[tuple[int, int]]:
  if args.dense_size:
    return [parse_size(s) for s in args.dense_size.split(",")]
  w, h = args.size
  if w * h <= args.dense_max_pixels:
    return [(w, h)]
  scale = math.sqrt(args.dense_max_pixels / (w * h))
  return [(max(int(w * scale), 1), max(int(h * scale), 1))]


def mb(x) -> str:
  return "-" if x is None else f"{x / 2**20:,.0f}"


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.limit_threads(args.threads)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if args.worker:
    print(json.dumps(worker(args)))
    return

  full = tuple(args.size)
  small = dense_sizes(args)
  plan = [("sparse", full)]
  plan += [("sparse", s) for s in small if s != full]
  plan += [("dense", s) for s in small]
  rows = []
  for variant, size in plan:
    print(f"running {variant} at {size[0]}x{size[1]} ...", file=sys.stderr, flush=True)
    rows.append(run_variant(args, variant, size))

  # Cubic extrapolation of the dense walk to the full size from the largest dense size measured.
  biggest = max((r for r in rows if r["variant"] == "dense"), key=lambda r: r["pixels"])
  ratio = (full[0] * full[1]) / biggest["pixels"]
  if ratio > 1:
    rows.append(
        dict(
            variant="dense (extrapolated)",
            size=f"{full[0]}x{full[1]}",
            pixels=full[0] * full[1],
            compile_s=None,
            run_s=biggest["run_s"] * ratio**3,
            rss_peak_bytes=None,
            rss_baseline_bytes=None,
            rss_after_compile_bytes=None,
            hand_count_bytes=sum(hand_count("dense", *full, args.classes, args.radius).values()),
            xla_buffer_bytes=None,
            extrapolated_from=biggest["size"],
        )
    )

  print(
      f"\nIRN random walk, {args.classes} classes, radius {args.radius}, beta {args.beta:g}, "
      f"exp_times {args.exp_times} ({2**args.exp_times} steps), {args.threads} XLA threads, backend {rows[0]['backend']}"
  )
  head = (
      f"{'variant':<22} {'size':>8} {'pixels':>7} {'compile s':>9} {'run s':>9} {'RSS peak MB':>11} "
      f"{'RSS base MB':>11} {'after compile':>13} {'arrays MB':>9} {'XLA MB':>8}"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
    print(
        f"{r['variant']:<22} {r['size']:>8} {r['pixels']:>7} {comp:>9} {r['run_s']:>9.3f} "
        f"{mb(r['rss_peak_bytes']):>11} {mb(r['rss_baseline_bytes']):>11} {mb(r['rss_after_compile_bytes']):>13} {mb(r['hand_count_bytes']):>9} {mb(r['xla_buffer_bytes']):>8}"
    )
  same = [r for r in rows if r["variant"] == "sparse" and r["size"] == biggest["size"]]
  if same:
    print(
        f"dense / sparse at {biggest['size']}: {biggest['run_s'] / same[0]['run_s']:.1f}x time, "
        f"{biggest['xla_buffer_bytes'] / same[0]['xla_buffer_bytes']:.1f}x XLA buffers; output sums "
        f"{same[0]['checksum']:.6g} (sparse) vs {biggest['checksum']:.6g} (dense)"
    )
  md_table.emit(
      ["variant", "map", "run s", "XLA buffers MB", "peak RSS MB"],
      [[r["variant"], r["size"], f"{r['run_s']:.3f}", mb(r["xla_buffer_bytes"]), mb(r["rss_peak_bytes"])] for r in rows],
  )
  result = dict(config={k: v for k, v in vars(args).items() if k != "worker"}, rows=rows)
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
