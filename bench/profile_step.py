"""Where a train step's time goes: the JAX step's XLA ops next to the PyTorch reference's operators,
by class, at the bench's shape (issue 22's profile). --model cam: the CAM step of
bench/train_step_bench.py against bench/torch_ref.py; --model seg: DeepLab-v2's step of
bench/deeplab_step_bench.py against bench/torch_deeplab.py.

  python bench/profile_step.py --batch 4 --size 256 --steps 3 --threads 2 [--methods sipe,cpal] \
      [--json out.json]
  python bench/profile_step.py --model seg --batch 1 --size 321 --steps 2 --threads 2

JAX: jax.profiler records every XLA thunk; bench/hlo_profile.py names what each op does (convolution,
matmul, elementwise, transpose/copy, ...), whether it belongs to the forward pass, the backward pass
or neither (optimizer, and ops the compiler left without a source, such as most kernel-gradient
convolutions), and which module it came from. PyTorch: torch.profiler's self CPU time per aten
operator, grouped the same way, in a subprocess with the same threads. Both sum the time of every
thread that ran an op, so shares compare; wall seconds per step are printed beside them.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

import deeplab_step_bench  # bench/, beside this script
import hlo_profile
import train_step_bench
import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# aten operator (self time) -> class, first match; anything else is "elementwise / other". oneDNN's
# convolutions are aten::mkldnn_convolution(_backward...), the fallback ones aten::_slow_conv2d_*.
TORCH_CLASSES = (
    ("conv", "convolution"),
    ("upsample", "resize"),
    ("_adaptive_avg_pool", "pooling / resize windows"),
    ("max_pool", "pooling / resize windows"),
    ("addmm", "matmul"),
    ("bmm", "matmul"),
    ("aten::mm", "matmul"),
    ("matmul", "matmul"),
    ("sum", "reduction"),
    ("mean", "reduction"),
    ("amax", "reduction"),
    ("max", "reduction"),
    ("norm", "reduction"),
    ("copy_", "transpose / copy"),
    ("clone", "transpose / copy"),
    ("contiguous", "transpose / copy"),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="cam", choices=["cam", "seg"])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--backbone", default="resnet50")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--methods", default="sipe")
  p.add_argument("--torch-ref", default=None, help="the reference script (default: the model's); '' skips")
  p.add_argument("--top", type=int, default=12, help="slowest single ops to list")
  p.add_argument("--json", default=None)
  p.add_argument("--torch-child", default=None, help=argparse.SUPPRESS)  # internal: profile torch here
  return p.parse_args(argv)


def profile_jax(method: str, args) -> dict:
  if args.model == "cam":
    _, compiled, state, batch, key = train_step_bench.build_step(method, args)
    inputs = (batch, key)
  else:
    seg_args = deeplab_step_bench.parse_args(
        ["--batch", str(args.batch), "--size", str(args.size)]
        + ["--backbone", args.backbone, "--dtype", args.dtype]
    )
    compiled, state, batch, _, _ = deeplab_step_bench.build_step(seg_args)
    inputs = (batch,)
  carry = [state]

  def run():
    carry[0], metrics = compiled(carry[0], *inputs)
    return metrics

  for _ in range(args.warmup):
    run()
  op_times, wall = hlo_profile.trace_op_times(run, args.steps)
  text = compiled.as_text()
  out = hlo_profile.breakdown(text, op_times)
  info = hlo_profile.parse_hlo(text)
  out["wall_s"] = wall
  out["top_ops"] = [
      {"op": op, "s": us / 1e6, "kind": hlo_profile.kind(*info[op][:2]), "source": info[op][2]}
      for op, us in sorted(op_times.items(), key=lambda kv: -kv[1])[: args.top]
      if op in info
  ]
  return out


def torch_class(name: str) -> str:
  for needle, cls in TORCH_CLASSES:
    if needle in name:
      if cls == "convolution":
        return ("backward: " if "backward" in name else "forward: ") + cls
      return cls
  return "elementwise / other"


def profile_torch_child(args) -> None:
  """Runs in the subprocess: the reference step under torch.profiler, written to --torch-child."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(args.torch_ref)))
  import time

  import torch

  torch.set_num_threads(args.threads)
  shape = ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
  if args.model == "cam":
    import torch_ref

    ref_args = torch_ref.parse_args(shape)
    model, opt, img, label4, valid_lr = torch_ref.build(ref_args)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
      torch_ref.train_step(model, opt, params, img, label4, valid_lr, ref_args.clip)

  else:
    import torch_deeplab

    ref_args = torch_deeplab.parse_args(shape + ["--backbone", args.backbone])
    model, optimizer, scheduler, images, labels = torch_deeplab.build(ref_args)
    criterion = torch.nn.CrossEntropyLoss(ignore_index=torch_deeplab.deeplab_common.IGNORE)

    def step():
      torch_deeplab.train_step(model, optimizer, scheduler, criterion, images, labels, ref_args.iter_size)

  for _ in range(args.warmup):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t = time.perf_counter()
    for _ in range(args.steps):
      step()
    wall = (time.perf_counter() - t) / args.steps
  by_class, ops = collections.Counter(), []
  for e in prof.key_averages():
    s = e.self_cpu_time_total / 1e6 / args.steps
    by_class[torch_class(e.key)] += s
    ops.append((s, e.key))
  ops.sort(reverse=True)
  with open(args.torch_child, "w") as f:
    json.dump(
        {
            "wall_s": wall,
            "busy_s": sum(by_class.values()),
            "by_class": dict(by_class.most_common()),
            "top_ops": [{"op": k, "s": s} for s, k in ops[: args.top]],
        },
        f,
    )


def profile_torch(args) -> dict | None:
  if not args.torch_ref:
    return None
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "torch.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--torch-child", out, "--torch-ref", args.torch_ref]
    for flag in ("model", "batch", "size", "steps", "warmup", "threads", "top", "backbone"):
      cmd += [f"--{flag}", str(getattr(args, flag))]
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
      return json.load(f)


def show(title: str, wall: float, busy: float, classes: dict) -> None:
  print(f"\n{title}: {wall:.3f} s/step wall, {busy:.3f} s/step busy thread time")
  for name, s in classes.items():
    print(f"  {name:<48} {s:8.3f} s  {s / busy:6.1%}")


def main(argv=None):
  args = parse_args(argv)
  if args.torch_ref is None:
    script = "torch_ref.py" if args.model == "cam" else "torch_deeplab.py"
    args.torch_ref = os.path.join(REPO, "bench", script)
  if args.model == "seg" and args.backbone == "resnet50":
    args.backbone = "resnet101"  # DeepLab-v2's
  if args.torch_child:
    profile_torch_child(args)
    return
  xla_cpu.limit_threads(args.threads)
  results = {"args": vars(args), "jax": {}}
  for method in [m for m in args.methods.split(",") if m] if args.model == "cam" else ["deeplab-v2"]:
    r = profile_jax(method, args)
    results["jax"][method] = r
    show(f"JAX {method} by phase and op kind", r["wall_s"], r["busy_s"], r["by_phase_kind"])
    show(f"JAX {method} by module", r["wall_s"], r["busy_s"], r["by_region"])
    print("  slowest ops:")
    for o in r["top_ops"]:
      print(f"    {o['s'] * 1e3:7.1f} ms  {o['kind']:<24} {o['op']:<28} {o['source'][-70:]}")
  ref = profile_torch(args)
  if ref:
    results["torch"] = ref
    show("PyTorch reference by operator class", ref["wall_s"], ref["busy_s"], ref["by_class"])
    print("  slowest operators:")
    for o in ref["top_ops"]:
      print(f"    {o['s'] * 1e3:7.1f} ms  {o['op']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
