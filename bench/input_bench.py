"""Can the host's input pipeline keep a card busy? (issue 22, target 6)

  python bench/input_bench.py [--images 64 --workers 0,1,2 --batches 40 --json out.json]

Decode + augment rate of the CAM stage's real input pipeline (cpal_jax/data/pipeline.py
train_iterator over the VOC reader, configs/voc.py: batch 16, TrainAugment's random long side
320..640, flip, 512 px crop) on a generated VOC-layout tree (bench/voc_tree.py: VOC-sized JPEGs of
about VOC's file size and decode time, labels from cls_labels.json), for each data.workers in
--workers (0: grain's two reader threads in this process; n > 0: n grain worker processes).
Each rate is the difference of two whole runs of the iterator, over --warmup and over --warmup +
--batches batches (grain's workers read far ahead, so a window inside one run would count batches
made before it): images/s of wall time, and images per CPU-second of this process and all its
descendants (/proc/<pid>/stat utime + stime), which is the rate per core, whatever the number of
cores the run had. With too few batches for the difference to rise above the start-up's jitter the
row is the long run's, start-up included (`startup_included`). A single-thread row decodes and
augments element by element with no grain at all: the floor of the per-image cost.

Next to it, the rate at which an H100 would consume images in the CAM train step: the step's
FLOPs per image at the recipe's shape (ResNet-50 OS16, 512 px, method cpal) against 40% of the
H100 SXM's dense bfloat16 peak, 989 TFLOP/s (NVIDIA's datasheet; 756 for the PCIe card). The FLOPs
come from XLA's cost analysis of the lowered step at batch 16 x 512 px (--flops lowered, a few
seconds and no compile; the compiled count, --flops compiled, differs by under 1%), or from
scaling the 160.2 GFLOP XLA counts for the CPAL step at batch 4 x 256 px (docs/results.md) by
pixels (--flops scaled: SIPE's hw x hw correlation grows faster than the pixel count, so this
undercounts by a few percent). --accelerator-json takes the measured CAM step rate from
bench/accelerator_check.py on a lent card instead. Cores a GPU host needs per card = that rate /
images per CPU-second (the row of the most workers): the cores left to JAX's own host work come on
top.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import md_table  # bench/md_table.py, beside this script
import memory_bench
import voc_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "configs")]  # cpal_jax and configs/voc.py; no jax imported here
H100_BF16_TFLOPS = 989.0  # H100 SXM, dense (NVIDIA H100 datasheet)
# XLA's count of the CPAL train step at batch 4 x 256^2 px, ResNet-50 OS16 (docs/results.md).
KNOWN_GFLOP_STEP = (160.2, 4, 256)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=64, help="images in the generated tree")
  p.add_argument("--sizes", default="500x375,375x500", help="W x H, comma-separated, cycled over images")
  p.add_argument("--workers", default="0,1,2", help="data.workers values to time")
  p.add_argument("--batch", type=int, default=0, help="train.batch_size; 0: configs/voc.py's")
  p.add_argument("--crop", type=int, default=0, help="train.crop_size; 0: configs/voc.py's")
  p.add_argument("--batches", type=int, default=40, help="timed batches per workers value")
  p.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
  p.add_argument("--single", type=int, default=32, help="images of the single-thread row")
  p.add_argument("--flops", default="lowered", choices=["lowered", "compiled", "scaled"])
  p.add_argument("--flops-backbone", default="resnet50", help="model.backbone of the counted step")
  p.add_argument("--gflop-per-image", type=float, default=0.0, help="use this instead of counting")
  p.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="the card's bf16 peak")
  p.add_argument("--utilisation", type=float, default=0.4, help="share of that peak the step reaches")
  p.add_argument("--accelerator-json", default=None, help="bench/accelerator_check.py's output")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def voc_config(root: str, args, workers: int, batches: int):
  import voc

  c = voc.get_config()
  c.data.root = root
  c.data.train_split = "train"
  c.data.workers = workers
  c.seed = args.seed
  if args.batch:
    c.train.batch_size = args.batch
  if args.crop:
    c.train.crop_size = args.crop
  c.train.num_steps = batches
  return c


def cpu_seconds() -> dict[int, float]:
  """CPU seconds (user + system) of this process and of each live descendant, by pid."""
  tick = os.sysconf("SC_CLK_TCK")
  out = {}
  for pid in memory_bench.descendants(os.getpid()):
    try:
      with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    except OSError:
      continue  # exited since
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    out[pid] = (int(fields[11]) + int(fields[12])) / tick
  out[os.getpid()] = time.process_time()  # finer than clock ticks
  return out


def _whole_run(root: str, args, workers: int, batches: int) -> tuple[float, float, dict]:
  """Wall and CPU seconds (this process and every descendant) from creating the iterator to its last
  batch, for a schedule of exactly `batches` batches, and the last batch."""
  from cpal_jax.data import pipeline

  c = voc_config(root, args, workers, batches)
  source = pipeline.make_source(c, c.data.train_split)
  schedule = pipeline.make_schedule(c.train, len(source))
  cpu0, t0 = cpu_seconds(), time.perf_counter()
  it = pipeline.train_iterator(c, source, schedule)
  try:
    for _ in range(batches):
      batch = next(it)
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds()  # workers still alive: their time counts
  finally:
    if hasattr(it, "close"):
      it.close()
  return wall, sum(cpu1[p] - cpu0.get(p, 0.0) for p in cpu1), batch


def time_pipeline(root: str, args, workers: int) -> dict:
  """Steady-state rate as the difference of two whole runs, --warmup batches and --warmup + --batches:
  grain's workers read far ahead (their read buffers hold hundreds of elements), so a window timed
  inside one run counts batches made before it; a whole finite run counts every batch's work, and
  the difference takes out the start-up (worker processes, imports)."""
  short_wall, short_cpu, _ = _whole_run(root, args, workers, args.warmup)
  long_wall, long_cpu, batch = _whole_run(root, args, workers, args.warmup + args.batches)
  wall, cpu = long_wall - short_wall, long_cpu - short_cpu
  images = args.batches * batch["image"].shape[0]
  startup_included = wall <= 0 or cpu <= 0  # too few batches to rise above the start-up's jitter
  if startup_included:
    wall, cpu, images = long_wall, long_cpu, (args.warmup + args.batches) * batch["image"].shape[0]
  return {
      "workers": workers,
      "batch": int(batch["image"].shape[0]),
      "crop": int(batch["image"].shape[1]),
      "images": images,
      "startup_s": round(short_wall, 2),
      "wall_s": round(wall, 3),
      "images_per_s": round(images / wall, 2),
      "cpu_s": round(cpu, 3),
      "cores_busy": round(cpu / wall, 2),
      "images_per_cpu_s": round(images / cpu, 2),
      "batch_shape": list(batch["image"].shape),
      "startup_included": startup_included,
  }


def time_single_thread(root: str, args) -> dict:
  """Decode and augment one element at a time in this thread: no grain, no batching."""
  import numpy as np

  from cpal_jax.data import pipeline, transforms

  c = voc_config(root, args, 0, 1)
  source = pipeline.make_source(c, c.data.train_split)
  aug = transforms.TrainAugment(c.train.crop_size, tuple(c.train.resize_long) or None)
  rng = np.random.default_rng(args.seed)
  aug.random_map(source[0], rng)  # first-call costs (PIL plugins)
  decode, augment = [], []
  for i in range(args.single):
    t0 = time.process_time()
    el = source[i % len(source)]
    t1 = time.process_time()
    aug.random_map(el, rng)
    decode.append(t1 - t0)
    augment.append(time.process_time() - t1)
  per_image = statistics.mean(decode) + statistics.mean(augment)
  return {
      "images": args.single,
      "decode_ms": round(1e3 * statistics.mean(decode), 2),
      "augment_ms": round(1e3 * statistics.mean(augment), 2),
      "images_per_cpu_s": round(1 / per_image, 2),
  }


def gflop_per_image(args, crop: int, batch: int) -> tuple[float, str]:
  """(GFLOP per image of the recipe's CAM train step, how it was obtained)."""
  if args.gflop_per_image:
    return args.gflop_per_image, "given (--gflop-per-image)"
  if args.flops == "scaled":
    gflop, b, size = KNOWN_GFLOP_STEP
    return gflop / b * (crop / size) ** 2, f"{gflop} GFLOP at {b} x {size}^2 scaled by pixels"
  import jax
  import jax.numpy as jnp

  import voc
  from cpal_jax.parallel import sharding
  from cpal_jax.train import cam as cam_stage

  c = voc.get_config()  # method cpal, ResNet-50 OS16: the recipe's step
  c.model.backbone = args.flops_backbone
  c.train.batch_size, c.train.crop_size, c.train.num_steps = batch, crop, 3305
  mesh = sharding.make_mesh(1)
  setup = cam_stage.build(c, mesh, 10582)
  shard = sharding.batch_sharded(mesh)
  spec = {
      "image": jax.ShapeDtypeStruct((batch, crop, crop, 3), jnp.uint8, sharding=shard),
      "valid": jax.ShapeDtypeStruct((batch, crop, crop), jnp.uint8, sharding=shard),
      "label": jax.ShapeDtypeStruct((batch, c.data.num_classes - 1), jnp.float32, sharding=shard),
  }
  lowered = setup.step_fn.lower(setup.abstract_state, spec, jax.random.key(0))
  cost = lowered.compile().cost_analysis() if args.flops == "compiled" else lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  how = f"XLA's count, {args.flops} {c.method.name} step, {args.flops_backbone} {batch} x {crop}^2"
  return float(cost["flops"]) / 1e9 / batch, how


def card_rate(args, crop: int, batch: int) -> dict:
  if args.accelerator_json:
    with open(args.accelerator_json) as f:
      acc = json.load(f)
    rows = [r for r in acc["rows"] if r["what"].startswith("CAM step")]
    best = max(rows, key=lambda r: r["images_per_s"])
    return {
        "card": acc.get("card"),
        "images_per_s": best["images_per_s"],
        "source": f"measured by accelerator_check.py ({best['what']} {best['dtype']})",
    }
  gflop, how = gflop_per_image(args, crop, batch)
  rate = args.utilisation * args.peak_tflops * 1e3 / gflop
  return {
      "card": f"H100 at {args.utilisation:.0%} of {args.peak_tflops:g} TFLOP/s bf16",
      "gflop_per_image": round(gflop, 2),
      "flops_from": how,
      "images_per_s": round(rate, 1),
      "source": "from FLOPs",
  }


def main(argv=None):
  args = parse_args(argv)
  from absl import flags

  # grain's worker processes read absl flags, which must look parsed (cpal_jax.main parses them).
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  workers = [int(w) for w in args.workers.split(",") if w != ""]
  base = tempfile.mkdtemp(prefix="input_bench_")
  try:
    sizes = voc_tree.parse_sizes(args.sizes)
    tree = voc_tree.write_voc_tree(os.path.join(base, "VOC2012"), args.images, sizes, args.seed)
    single = time_single_thread(tree["root"], args)
    rows = []
    for w in workers:
      print(f"data.workers={w} ...", file=sys.stderr, flush=True)
      rows.append(time_pipeline(tree["root"], args, w))
  finally:
    shutil.rmtree(base, ignore_errors=True)
  batch, crop = rows[0]["batch"], rows[0]["crop"]
  card = card_rate(args, crop, batch)
  headline = max(rows, key=lambda r: (r["workers"], r["images_per_cpu_s"]))
  for r in rows:
    r["cores_needed"] = round(card["images_per_s"] / r["images_per_cpu_s"], 1)
  cores_needed = headline["cores_needed"]

  print(
      f"\nCAM input pipeline (configs/voc.py: batch {batch}, crop {crop}), {args.images} generated VOC "
      f"images ({args.sizes}, JPEG {tree['jpeg_kb_mean']} KB mean), {os.cpu_count()} cores here"
  )
  print(
      f"single thread, no grain: decode {single['decode_ms']} ms + augment {single['augment_ms']} ms "
      f"= {single['images_per_cpu_s']} images per CPU-second"
  )
  print(f"{'workers':>7} {'images/s':>9} {'cores busy':>10} {'img/CPU-s':>9} {'cores per card':>14}")
  for r in rows:
    print(
        f"{r['workers']:>7} {r['images_per_s']:>9.1f} {r['cores_busy']:>10.2f} "
        f"{r['images_per_cpu_s']:>9.1f} {r['cores_needed']:>14.1f}"
    )
  flops = ""
  if "gflop_per_image" in card:
    flops = f", {card['gflop_per_image']} GFLOP/image: {card['flops_from']}"
  print(f"{card['card']}: {card['images_per_s']:.0f} images/s ({card['source']}{flops})")
  print(
      f"at {headline['images_per_cpu_s']} images per CPU-second ({headline['workers']} workers) a host needs "
      f"{cores_needed:.0f} cores per card for decode + augment"
  )
  table = [
      ["single thread, no grain", "-", "1.00", f"{single['images_per_cpu_s']:.1f}",
       f"{card['images_per_s'] / single['images_per_cpu_s']:.1f}"]
  ]
  table += [
      [f"data.workers={r['workers']}", f"{r['images_per_s']:.1f}", f"{r['cores_busy']:.2f}",
       f"{r['images_per_cpu_s']:.1f}", f"{r['cores_needed']:.1f}"]
      for r in rows
  ]
  md_table.emit(
      ["pipeline", "images/s", "cores busy", "images per CPU-second", "cores per card"],
      table,
      f"; card: {card['card']}, {card['images_per_s']:.0f} images/s ({card['source']})",
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
          {
              "bench": "input",
              "config": vars(args),
              "jpeg_kb_mean": tree["jpeg_kb_mean"],
              "single_thread": single,
              "rows": rows,
              "card": card,
              "cores_needed": cores_needed,
              "cores_needed_from_workers": headline["workers"],
          },
          f,
          indent=1,
      )


if __name__ == "__main__":
  main()
