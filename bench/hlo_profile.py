"""Per-op times of a jitted JAX function from a profiler trace, grouped by what each XLA op does.

XLA's CPU runtime records every thunk it runs (event args `hlo_op`); the optimized HLO text says what
each op is (its opcode, what a fusion contains) and, in its metadata, which JAX operation it came
from (`jvp(...)` for the forward pass, `transpose(jvp(...))` for the backward pass, the Flax module
path). Times are summed over the threads that ran them: XLA runs independent thunks concurrently, so
the shares are of busy thread time, not of wall time.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

_INSTR = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def parse_hlo(text: str) -> dict:
  """{instruction name: (opcode, opcodes inside if it calls a computation, op_name)}."""
  bodies, comp = collections.defaultdict(set), None
  body_names = {}  # a fused computation's first op_name: fusions themselves often carry none
  instrs = {}
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      comp = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    bodies[comp].add(opcode)
    calls = _CALLS.search(rest)
    op_name = _OP_NAME.search(rest)
    op_name = op_name.group(1) if op_name else ""
    if op_name and opcode not in ("parameter", "constant"):
      body_names.setdefault(comp, op_name)
    instrs[name] = (opcode, calls.group(1) if calls else None, op_name)
  out = {}
  for name, (opcode, calls, op_name) in instrs.items():
    inside = frozenset(bodies.get(calls, ())) if calls else frozenset()
    out[name] = (opcode, inside, op_name or body_names.get(calls, ""))
  return out


def kind(opcode: str, inside: frozenset) -> str:
  ops = inside | {opcode}
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "matmul (dot)"
  if ops & {"reduce-window", "select-and-scatter"}:
    return "pooling / resize windows"
  if ops & {"gather", "scatter", "dynamic-slice", "dynamic-update-slice"}:
    return "gather / scatter"
  if "sort" in ops:
    return "sort"
  if opcode in ("while", "conditional", "call"):
    return "control flow"
  if opcode == "custom-call":
    return "custom call"
  if "reduce" in ops:
    return "reduction"
  if ops - {"transpose", "copy", "bitcast", "parameter", "reshape", "broadcast", "fusion"} == set():
    return "transpose / copy"
  return "elementwise"


def phase(op_name: str) -> str:
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "optimizer / other"


def region(op_name: str) -> str:
  """The Flax module an op belongs to (backbone stage, side head, classifier) or the method code."""
  m = re.search(r"/backbone/(layer\d|conv1|bn1)", op_name)
  if m:
    return "backbone " + ("stem" if m.group(1) in ("conv1", "bn1") else m.group(1))
  m = re.search(r"/(side\d|classifier|proj)/", op_name + "/")
  if m:
    return "head " + m.group(1)
  if "resize" in op_name:
    return "resizes"
  return "method / loss / optimizer"


def trace_op_times(run, steps: int) -> tuple[dict, float]:
  """Runs `run()` `steps` times under jax.profiler; {hlo op name: total us per step}, wall s per step."""
  import time

  import jax

  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    t = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(run())
    wall = (time.perf_counter() - t) / steps
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(files[-1]) as f:
      events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    op = (e.get("args") or {}).get("hlo_op")
    if e.get("ph") == "X" and op:
      times[op] += e["dur"] / steps
  return times, wall


def breakdown(hlo_text: str, op_times: dict) -> dict:
  """Busy thread time (s per step) by kind, by phase x kind and by region."""
  info = parse_hlo(hlo_text)
  by_kind, by_phase_kind, by_region = collections.Counter(), collections.Counter(), collections.Counter()
  unknown = 0.0
  for op, us in op_times.items():
    if op not in info:
      unknown += us
      continue
    opcode, inside, op_name = info[op]
    k = kind(opcode, inside)
    by_kind[k] += us / 1e6
    by_phase_kind[f"{phase(op_name)}: {k}"] += us / 1e6
    by_region[region(op_name)] += us / 1e6
  return {
      "by_kind": dict(by_kind.most_common()),
      "by_phase_kind": dict(by_phase_kind.most_common()),
      "by_region": dict(by_region.most_common()),
      "unmatched_s": unknown / 1e6,
      "busy_s": sum(op_times.values()) / 1e6,
  }
