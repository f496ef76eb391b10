"""What one accelerator does with the VOC recipe, in one table: run by bench/accelerator_check.sh.

  python bench/accelerator_check.py [--steps 10] [--json out.json]

Rows (all on jax.devices()[0], compile excluded, median of --steps after --warmup):
  - the CAM train step at the recipe's shape (ResNet-50 OS16, batch 16, 512x512 crops) for SIPE and
    CPAL (its bank full and clustered, PACAM at full cost), model.compute_dtype float32 and
    bfloat16: bench/train_step_bench.py's step;
  - DeepLab-v2's train step (ResNet-101, batch 10, 321x321, MSC 1/0.75/0.5) in float32 and bfloat16;
  - make_cam on VOC-sized 500x375 images (scales 1/0.5/1.5/2 + flip, SIPE's read): bench/
    make_cam_bench.py, host-side fusion included;
  - a square matmul at the default precision of each dtype: the card's peak as this JAX reaches it.
Share of peak = XLA's FLOP count of the step / its time / that matmul peak of the same dtype (float32
matmuls run as TF32 on the tensor cores at JAX's default precision). Then the projected wall time
of the VOC stages these rates cover: train_cam (3305 steps: 10582 images, 5 epochs), make_cam
(10582 train_aug images), train_seg (20000 steps); refine (CRF, IRN, random walk) and the evaluations
are not measured here.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "configs"))
sys.path.insert(0, REPO)

import md_table  # noqa: E402  (bench/, beside this script)
import train_step_bench  # noqa: E402

# The VOC recipe's stage sizes (configs/voc.py, docs/method.md 1.2 and 1.7).
VOC_TRAIN_AUG = 10582
CAM_STEPS = VOC_TRAIN_AUG // 16 * 5
SEG_STEPS = 20000


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--cam-images", type=int, default=16, help="make_cam images timed")
  p.add_argument("--skip", default="", help="comma list of parts to leave out: cam,seg,make_cam")
  p.add_argument("--json", default=None)
  # The code path on tiny shapes (resnet_tiny, 64 px, batch 2): checks this script on a CPU, where
  # the recipe's shapes take minutes a step. Its figures mean nothing.
  p.add_argument("--smoke", action="store_true")
  return p.parse_args()


def matmul_peak(dtype: str, n: int = 8192, reps: int = 20) -> float:
  """FLOP/s of an n x n matmul at JAX's default precision for `dtype`."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def cam_step(method: str, dtype: str, args) -> dict:
  batch, size, backbone = (2, 64, "resnet_tiny") if args.smoke else (16, 512, "resnet50")
  ns = argparse.Namespace(batch=batch, size=size, backbone=backbone, steps=args.steps, warmup=args.warmup, dtype=dtype)
  r = train_step_bench.jax_step(method, ns)
  return {"what": f"CAM step {method}", "dtype": dtype, "batch": batch, **r}


def seg_step(dtype: str, args) -> dict:
  """DeepLab-v2's jitted train step at the recipe's shape, on random images and masks."""
  import jax
  import numpy as np
  import voc

  from cpal_jax.parallel import sharding
  from cpal_jax.train import seg as seg_stage

  c = voc.get_config()
  c.seg.compute_dtype = dtype
  if args.smoke:
    c.seg.backbone, c.seg.batch_size, c.seg.crop_size = "resnet_tiny", 2, 65
  s = c.seg
  mesh = sharding.make_mesh(1)
  setup = seg_stage.build(c, mesh, SEG_STEPS)
  state = setup.init_state()
  rng = np.random.default_rng(0)
  b, size = s.batch_size, s.crop_size
  batch = {
      "image": rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8),
      "valid": np.ones((b, size, size), np.uint8),
      "mask": rng.integers(0, c.data.num_classes, (b, size, size), dtype=np.uint8),
  }
  batch = sharding.global_batch(batch, mesh)
  t0 = time.perf_counter()
  compiled = setup.step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  for _ in range(args.warmup):
    state, m = setup.step_fn(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = setup.step_fn(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {
      "what": "DeepLab-v2 step",
      "dtype": dtype,
      "batch": b,
      "step_s": med,
      "images_per_s": b / med,
      "gflop_per_step": flops / 1e9,
      "gflops_per_s": flops / med / 1e9,
      "compile_s": compile_s,
  }


def make_cam(args) -> dict:
  """bench/make_cam_bench.py in its own process (its jit cache and memory are its own)."""
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "make_cam.json")
    cmd = [sys.executable, os.path.join(HERE, "make_cam_bench.py"), "--images", str(args.cam_images)]
    # The PyTorch reference is a CPU run of minutes per VOC image: not what this machine is lent for.
    cmd += ["--size", "500x375", "--method", "sipe", "--torch-ref", "", "--json", out]
    if args.smoke:
      cmd += ["--images", "1", "--size", "96x64", "--backbone", "resnet_tiny"]
    subprocess.run(cmd, check=True)
    with open(out) as f:
      r = json.load(f)
  return {
      "what": "make_cam (4 scales + flip)",
      "dtype": "float32",
      "batch": 1,
      "step_s": r["s_per_image"],
      "images_per_s": r["images_per_s"],
      "gflop_per_step": float("nan"),
      "gflops_per_s": float("nan"),
      "compile_s": r["compile_s"],
  }


def hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def main():
  args = parse_args()
  import jax

  skip = set(filter(None, args.skip.split(",")))
  dev = jax.devices()[0]
  card = getattr(dev, "device_kind", dev.platform)
  print(f"jax {jax.__version__}, {jax.device_count()} x {card} ({dev.platform}); timing device 0", flush=True)
  peaks = {dtype: matmul_peak(dtype, 256 if args.smoke else 8192) for dtype in ("float32", "bfloat16")}
  for dtype, p in peaks.items():
    print(f"matmul peak {dtype}: {p / 1e12:.1f} TFLOP/s", flush=True)

  rows = []
  if "cam" not in skip:
    for dtype in ("float32", "bfloat16"):
      for method in ("sipe", "cpal"):
        rows.append(cam_step(method, dtype, args))
        print(f"  {rows[-1]['what']} {dtype}: {rows[-1]['step_s']:.3f} s/step", flush=True)
  if "seg" not in skip:
    for dtype in ("float32", "bfloat16"):
      rows.append(seg_step(dtype, args))
      print(f"  {rows[-1]['what']} {dtype}: {rows[-1]['step_s']:.3f} s/step", flush=True)
  if "make_cam" not in skip:
    rows.append(make_cam(args))
    print(f"  {rows[-1]['what']}: {rows[-1]['images_per_s']:.2f} images/s", flush=True)

  def share(r):
    return r["gflops_per_s"] * 1e9 / peaks[r["dtype"]] if r["gflops_per_s"] == r["gflops_per_s"] else None

  table = [
      [
          r["what"],
          r["dtype"],
          f"{r['step_s']:.3f}",
          f"{r['images_per_s']:.1f}",
          "-" if share(r) is None else f"{share(r):.1%}",
          f"{r['compile_s']:.0f}",
      ]
      for r in rows
  ]
  print()
  md_table.emit(
      ["step", "dtype", "s/step (make_cam: s/image)", "images/s", "share of matmul peak", "compile s"],
      table,
      f", {card}",
  )

  by = {(r["what"], r["dtype"]): r for r in rows}
  projections = []
  for dtype in ("float32", "bfloat16"):
    for method in ("sipe", "cpal"):
      r = by.get((f"CAM step {method}", dtype))
      if r:
        projections.append([f"train_cam {method}", dtype, f"{CAM_STEPS} steps", hours(CAM_STEPS * r["step_s"])])
  r = by.get(("make_cam (4 scales + flip)", "float32"))
  if r:
    projections.append(["make_cam", "float32", f"{VOC_TRAIN_AUG} images", hours(VOC_TRAIN_AUG * r["step_s"])])
  for dtype in ("float32", "bfloat16"):
    r = by.get(("DeepLab-v2 step", dtype))
    if r:
      projections.append(["train_seg", dtype, f"{SEG_STEPS} steps", hours(SEG_STEPS * r["step_s"])])
  print()
  md_table.emit(["VOC stage", "dtype", "work", "projected wall time"], projections, f", {card}")
  print("(refine's CRF, IRN and random walk, and the evaluations, are not measured here)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"card": card, "jax": jax.__version__, "peaks_flops": peaks, "rows": rows, "projections": projections}, f, indent=1)


if __name__ == "__main__":
  main()
