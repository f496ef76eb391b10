"""Train-step throughput of the CAM network: SIPE, CPAL, and the PyTorch reference, in one run.

  python bench/train_step_bench.py --batch 4 --size 256 --steps 15 --threads 2 \
      [--peak-json peak.json] [--json out.json]

Times the jitted step (median of --steps after --warmup, compile excluded) for each method on
ResNet-50 at output stride 16 with the paper's bank (1,000 x 50 centres, top-20, the bank full and
clustered so PACAM runs at full cost), counts its FLOPs from XLA's cost analysis, and runs the
PyTorch SIPE step of bench/torch_ref.py with the same batch, size and threads in a
subprocess of the same run. Ratios are the figures to compare across machines: CPAL over SIPE
(what the regulariser adds) and JAX SIPE over PyTorch SIPE (same model). --peak-json is
matmul_peak.py's output, for FLOP/s as a fraction of the machine's matmul peak.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import md_table  # bench/md_table.py, beside this script
import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(REPO, "bench", "torch_ref.py")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model.compute_dtype")
  p.add_argument("--methods", default="sipe,cpal")
  p.add_argument("--torch-ref", default=TORCH_REF, help="path to torch_ref.py; empty to skip")
  p.add_argument("--peak-json", default=None)
  p.add_argument("--json", default=None)
  return p.parse_args()


def build_step(method: str, args):
  """The compiled train step of one method at the bench's shape, with its state, batch and key."""
  import jax
  import numpy as np

  sys.path.insert(0, os.path.join(REPO, "configs"))
  sys.path.insert(0, REPO)
  import voc
  from cpal_jax.method import cpal
  from cpal_jax.parallel import sharding
  from cpal_jax.train import cam as cam_stage

  c = voc.get_config()
  c.method.name = method
  c.model.backbone = args.backbone
  c.model.compute_dtype = getattr(args, "dtype", "float32")
  c.train.batch_size = args.batch
  c.train.crop_size = args.size
  c.train.num_steps = 3305
  mesh = sharding.make_mesh(1)
  setup = cam_stage.build(c, mesh, 10582)
  state = setup.init_state()
  if method == "cpal":
    # A full, clustered bank: the steady state after epoch 1.
    bank = state.extra.bank
    feats = jax.random.normal(jax.random.key(3), bank.feats.shape)
    full = bank.replace(feats=feats, count=bank.count * 0 + bank.feats.shape[1])
    state = state.replace(extra=state.extra.replace(bank=full))
    state = state.replace(extra=setup.recluster(state.extra, jax.random.key(4)))
  rng = np.random.default_rng(0)
  labels = np.zeros((args.batch, c.data.num_classes - 1), np.float32)
  labels[np.arange(args.batch), rng.integers(0, c.data.num_classes - 1, args.batch)] = 1
  batch = {
      "image": rng.integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8),
      "valid": np.ones((args.batch, args.size, args.size), np.uint8),
      "label": labels,
  }
  batch = sharding.global_batch(batch, mesh)
  key = jax.random.key(0)
  return c, setup.step_fn.lower(state, batch, key).compile(), state, batch, key


def jax_step(method: str, args) -> dict:
  """Median step time and XLA's FLOP count of one method's jitted train step."""
  import jax

  t0 = time.perf_counter()
  c, compiled, state, batch, key = build_step(method, args)
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  for _ in range(args.warmup):
    state, m = compiled(state, batch, key)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch, key)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {
      "impl": f"jax {method}" + ("" if c.model.compute_dtype == "float32" else f" {c.model.compute_dtype}"),
      "step_s": med,
      "images_per_s": args.batch / med,
      "gflop_per_step": flops / 1e9,
      "gflops_per_s": flops / med / 1e9,
      "compile_s": compile_s,
      "loss": float(m["loss/total"]),
  }


def torch_step(args) -> dict | None:
  if not args.torch_ref or not os.path.exists(args.torch_ref):
    print(f"(PyTorch reference not found at {args.torch_ref}; skipped)")
    return None
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "ref.json")
    cmd = [
        sys.executable,
        args.torch_ref,
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--json",
        out,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out) as f:
      r = json.load(f)
  fl = r.get("flops", {}).get("executed_total", float("nan"))
  return {
      "impl": "torch sipe (reference)",
      "step_s": r["step_s"]["median"],
      "images_per_s": r["images_per_s"],
      "gflop_per_step": fl / 1e9,
      "gflops_per_s": fl / r["step_s"]["median"] / 1e9,
      "compile_s": 0.0,
  }


def main():
  args = parse_args()
  xla_cpu.limit_threads(args.threads)  # the PyTorch subprocess inherits the same CPUs
  rows = [jax_step(m, args) for m in args.methods.split(",") if m]
  ref = torch_step(args)
  if ref:
    rows.append(ref)
  peak = None
  if args.peak_json:
    with open(args.peak_json) as f:
      peak = max(json.load(f)["peak_gflops"].values())
  print(
      f"B={args.batch} {args.size}x{args.size} {args.backbone} OS16, {args.threads} threads, median of {args.steps}"
  )
  print(
      f"{'implementation':26s} {'step s':>8s} {'img/s':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>8s}"
      + (f" {'of peak':>8s}" if peak else "")
  )
  for r in rows:
    line = f"{r['impl']:26s} {r['step_s']:8.3f} {r['images_per_s']:8.2f} {r['gflop_per_step']:11.1f} {r['gflops_per_s']:8.1f}"
    print(line + (f" {r['gflops_per_s'] / peak:8.1%}" if peak else ""))
  by = {r["impl"]: r for r in rows}
  ratios = {}
  if "jax sipe" in by and "jax cpal" in by:
    ratios["cpal_over_sipe_step_time"] = by["jax cpal"]["step_s"] / by["jax sipe"]["step_s"]
    print(f"CPAL step / SIPE step: {ratios['cpal_over_sipe_step_time']:.3f}")
  if ref and "jax sipe" in by:
    ratios["torch_over_jax_sipe_step_time"] = ref["step_s"] / by["jax sipe"]["step_s"]
    print(f"PyTorch SIPE step / JAX SIPE step: {ratios['torch_over_jax_sipe_step_time']:.3f}")
  md_table.emit(
      ["implementation", "s/step", "images/s", "GFLOP/step"] + (["share of matmul peak"] if peak else []),
      [
          [r["impl"], f"{r['step_s']:.3f}", f"{r['images_per_s']:.2f}", f"{r['gflop_per_step']:.1f}"]
          + ([f"{r['gflops_per_s'] / peak:.1%}"] if peak else [])
          for r in rows
      ],
      f", {args.threads} threads",
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows, "ratios": ratios, "peak_gflops": peak}, f, indent=1)


if __name__ == "__main__":
  main()
