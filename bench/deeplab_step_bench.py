"""Train-step throughput of our DeepLab-v2 (train_seg) against the PyTorch one of torch_deeplab.py.

  python bench/deeplab_step_bench.py --batch 10 --size 321 --steps 10 --warmup 2 --threads 2 \
      [--backbone resnet101] [--dtype float32] [--peak-json peak.json] [--json out.json]

Our step is the one train_seg runs: configs/voc.py:seg's seg section at --batch/--size (ResNet-101
caffe layout, ASPP 6/12/18/24, frozen BN, MSC at 1.0/0.75/0.5 + max with its four CEs, SGD with the
ASPP 10x/20x groups and poly lr), built by train/seg.py's `build` over the same mesh, jitted with
its shardings and donated state. It is timed compiled (lower + compile first, excluded) as the
median of --steps calls after --warmup, and XLA's cost analysis counts its FLOPs. Then
torch_deeplab.py runs the same step in PyTorch (kazuto1011/deeplab-pytorch's model and loss) in a
subprocess of this run with the same batch, size, steps, threads and synthetic batch
(deeplab_common.py). The figure to compare across machines is the ratio PyTorch s/step / JAX
s/step (>= 1: ours is at least as fast).

Both start from a random init whose frozen BN statistics are set by one forward of the first image
(calibrated_stats here, calibrate_bn there), and both train at --lr 1e-7 instead of the recipe's
2.5e-4, which a random network does not survive (torch_deeplab.py's docstring): the work per step is
the same, and neither side times steps on overflowed values. Peak memory is each process's VmHWM
(/proc/self/status); ours includes XLA's compiler, so XLA's own buffer assignment (arguments +
temporaries) is reported beside it. XLA runs on --threads threads (xla_cpu.limit_threads) and on
the CPU unless --platform says otherwise; PyTorch on --threads intra-op threads. "cores" is CPU
time over wall time in the timed steps: under --threads, the cores were shared with something else
or the pool was smaller than asked, and the ratio is not the one to report.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import deeplab_common  # bench/deeplab_common.py, beside this script
import md_table
import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_REF = os.path.join(REPO, "bench", "torch_deeplab.py")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=10, help="seg.batch_size (the voc recipe's 10)")
  p.add_argument("--size", type=int, default=321, help="seg.crop_size (the voc recipe's 321)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="XLA CPU threads and PyTorch intra-op threads")
  p.add_argument("--backbone", default="resnet101", choices=sorted(deeplab_common.ARCHS), help="seg.backbone")
  p.add_argument(
      "--dtype", default="float32", choices=["float32", "bfloat16"], help="ours: seg.compute_dtype"
  )
  p.add_argument("--lr", type=float, default=1e-7, help="seg.lr on both sides (module docstring)")
  p.add_argument("--seed", type=int, default=0, help="the synthetic batch's")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for our step; empty = jax's choice")
  p.add_argument("--torch-ref", default=TORCH_REF, help="path to torch_deeplab.py; empty to skip")
  p.add_argument("--torch-args", default="", help="more torch_deeplab.py flags, e.g. '--iter-size 2'")
  p.add_argument("--peak-json", default=None, help="matmul_peak.py's output, for the share of peak")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def calibrated_stats(model, variables, x):
  """The frozen BN statistics that normalise x's activations: one forward with batch statistics (as
  torch_deeplab.calibrate_bn, each layer normalised by its own before the next layer's are taken),
  read back from the running averages it updated."""
  import jax

  from cpal_jax.models import resnet

  momentum = resnet.batch_norm("probe").momentum
  fwd = jax.jit(lambda v, x: model.clone(bn_train=True).apply(v, x, train=True, mutable=["batch_stats"]))
  _, new = fwd(variables, x)

  def batch_value(path, old, updated):
    # running = momentum * old + (1 - momentum) * batch, solved for batch.
    value = (updated - momentum * old) / (1 - momentum)
    return jax.numpy.maximum(value, 0.0) if path[-1].key == "var" else value

  return jax.tree_util.tree_map_with_path(batch_value, variables["batch_stats"], new["batch_stats"])


def build_step(args):
  """Our compiled seg train step at the bench's shape: (compiled, state, batch, logit sizes, compile s)."""
  import jax

  sys.path.insert(0, os.path.join(REPO, "configs"))
  sys.path.insert(0, REPO)
  import voc
  from cpal_jax.models import deeplab
  from cpal_jax.parallel import sharding
  from cpal_jax.train import seg as seg_stage

  c = voc.get_config("seg")
  s = c.seg
  s.batch_size = args.batch
  s.crop_size = args.size
  s.backbone = args.backbone
  s.compute_dtype = args.dtype
  s.lr = args.lr
  mesh = sharding.make_mesh(c.mesh.data)
  sharding.check_batch(s.batch_size, mesh)
  setup = seg_stage.build(c, mesh, s.num_steps)
  state = setup.init_state()
  local = deeplab_common.synthetic_batch(args.batch, args.size, c.data.num_classes, args.seed)
  first = deeplab.normalize(local["image"][:1], local["valid"][:1], s.layout)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logit_sizes = [
      list(jax.eval_shape(setup.model.apply, variables, deeplab.resize_by_factor(first, f)).shape[1:3])
      for f in s.msc_scales
  ]
  stats = calibrated_stats(setup.model, variables, first)
  state = state.replace(batch_stats=jax.device_put(stats, setup.shardings.batch_stats))
  batch = sharding.global_batch(local, mesh)

  t0 = time.perf_counter()
  compiled = setup.step_fn.lower(state, batch).compile()
  return compiled, state, batch, logit_sizes, time.perf_counter() - t0


def jax_step(args) -> dict:
  """Median step time, XLA's FLOP count and the peak memory of our jitted seg train step."""
  import jax
  import numpy as np

  compiled, state, batch, logit_sizes, compile_s = build_step(args)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  try:
    mem = compiled.memory_analysis()
    xla_mb = (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**20
  except Exception:  # not every backend reports it
    xla_mb = None

  losses = []
  for _ in range(args.warmup):
    state, m = compiled(state, batch)
    losses.append(float(m["loss/total"]))
  times = []
  c0, w0 = time.process_time(), time.perf_counter()
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
    losses.append(float(m["loss/total"]))
  cpu_util = (time.process_time() - c0) / (time.perf_counter() - w0)
  med = statistics.median(times)
  if not all(np.isfinite(losses)):
    raise FloatingPointError(f"our step's loss went non-finite ({losses}): not the step to time")
  return {
      "impl": "jax deeplab-v2" + ("" if args.dtype == "float32" else f" {args.dtype}"),
      "step_s": med,
      "step_s_all": times,
      "images_per_s": args.batch / med,
      "gflop_per_step": flops / 1e9,
      "gflops_per_s": flops / med / 1e9,
      "compile_s": compile_s,
      "cpu_util_cores": cpu_util,
      "peak_rss_mb": deeplab_common.proc_status_mb("VmHWM"),
      "xla_buffers_mb": xla_mb,
      "losses_first_last": [losses[0], losses[-1]],
      "logit_sizes": logit_sizes,  # per seg.msc_scales
      "device": str(jax.devices()[0].platform),
  }


def torch_step(args) -> tuple[dict, dict] | None:
  """(row, torch_deeplab.py's whole JSON), or None when there is no reference to run."""
  if not args.torch_ref or not os.path.exists(args.torch_ref):
    print(f"(PyTorch reference not found at {args.torch_ref!r}; skipped)")
    return None
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "ref.json")
    cmd = [sys.executable, args.torch_ref]
    for flag in ("batch", "size", "steps", "warmup", "threads", "backbone", "lr", "seed"):
      cmd += [f"--{flag}", str(getattr(args, flag))]
    cmd += ["--json", out, *shlex.split(args.torch_args)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
      sys.stderr.write(run.stdout + run.stderr)
      raise RuntimeError(f"{' '.join(cmd)} exited with status {run.returncode}")
    with open(out) as f:
      raw = json.load(f)
  med = raw["step_s"]["median"]
  fl = raw.get("flops", {}).get("executed_total", float("nan"))
  row = {
      "impl": "torch deeplab-v2 (reference)",
      "step_s": med,
      "step_s_all": raw["step_s"]["all"],
      "images_per_s": raw["images_per_s"],
      "gflop_per_step": fl / 1e9,
      "gflops_per_s": fl / med / 1e9,
      "compile_s": 0.0,
      "cpu_util_cores": raw["cpu_util_cores"],
      "peak_rss_mb": raw["peak_rss_mb"],
      "xla_buffers_mb": None,
      "losses_first_last": raw["losses_first_last"],
  }
  return row, raw


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.limit_threads(args.threads)
  if args.platform:
    os.environ["JAX_PLATFORMS"] = args.platform
  rows = [jax_step(args)]
  ref = torch_step(args)
  if ref:
    rows.append(ref[0])
  peak = None
  if args.peak_json:
    with open(args.peak_json) as f:
      peak = max(json.load(f)["peak_gflops"].values())

  print(
      f"DeepLab-v2 MSC train step, B={args.batch} {args.size}x{args.size} {args.backbone}, "
      f"{args.threads} threads, median of {args.steps}"
  )
  print(
      f"{'implementation':30s} {'step s':>8s} {'img/s':>7s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} "
      f"{'peak MiB':>9s} {'compile s':>9s} {'cores':>5s}" + (f" {'of peak':>8s}" if peak else "")
  )
  for r in rows:
    line = (
        f"{r['impl']:30s} {r['step_s']:8.3f} {r['images_per_s']:7.2f} {r['gflop_per_step']:11.1f} "
        f"{r['gflops_per_s']:8.1f} {r['peak_rss_mb']:9.0f} {r['compile_s']:9.1f} {r['cpu_util_cores']:5.2f}"
    )
    print(line + (f" {r['gflops_per_s'] / peak:8.1%}" if peak else ""))
  for r in rows:
    if r["cpu_util_cores"] < 0.8 * args.threads:
      # Two OpenMP threads on one free core wait at every barrier: steps ran 10-20x slower here.
      print(
          f"CONTENDED? {r['impl']} used {r['cpu_util_cores']:.2f} of {args.threads} cores in its timed steps"
      )
  if rows[0]["xla_buffers_mb"] is not None:
    xla_mb = rows[0]["xla_buffers_mb"]
    print(f"(XLA's buffer assignment for our step: {xla_mb:.0f} MiB of arguments + temporaries)")
  ratios = {}
  if ref:
    ratios["torch_over_jax_step_time"] = ref[0]["step_s"] / rows[0]["step_s"]
    ratio = ratios["torch_over_jax_step_time"]
    print(f"PyTorch step / JAX step: {ratio:.3f} (>= 1: ours is as fast or faster)")
  md_table.emit(
      ["implementation", "s/step", "images/s", "GFLOP/step", "peak RSS MiB"]
      + (["share of matmul peak"] if peak else []),
      [
          [
              r["impl"],
              f"{r['step_s']:.3f}",
              f"{r['images_per_s']:.2f}",
              f"{r['gflop_per_step']:.1f}",
              f"{r['peak_rss_mb']:.0f}",
          ]
          + ([f"{r['gflops_per_s'] / peak:.1%}"] if peak else [])
          for r in rows
      ],
      f", {args.threads} threads"
      + (f", PyTorch / JAX s/step {ratios['torch_over_jax_step_time']:.3f}" if ratios else ""),
  )
  if args.json:
    with open(args.json, "w") as f:
      out = {"args": vars(args), "rows": rows, "ratios": ratios, "peak_gflops": peak}
      json.dump({**out, "torch_ref": ref[1] if ref else None}, f, indent=1)


if __name__ == "__main__":
  main()
