"""Peak memory per process of make_cam, refine and export on VOC-sized images (issue 22, target 5:
under 4 GB per process at any dataset size and image size).

  python bench/memory_bench.py [--images 8 --sizes 500x375,375x500 --threads 2 --json out.json]

Writes a VOC2012-layout tree of --images generated images (bench/voc_tree.py: JPEG, palette mask
PNG, cls_labels.json), then runs `python -m cpal_jax.main --config=configs/voc.py` (the recipe:
ResNet-50 OS16, cam.batch_size 8, scales 1/0.5/1.5/2 + flip, refine.mode irn, refine.workers 0 =
one CRF process per core) on it, one stage per process on one workdir: train_cam (a 2-step,
64 px setup so the later stages have a checkpoint; not measured against the target), make_cam,
refine, export.

Each stage's process and its descendants (the CRF pool's spawned workers) are polled every
--poll seconds: VmHWM and VmRSS from /proc/<pid>/status. VmHWM is the kernel's high-water mark of
that process alone; getrusage's ru_maxrss is not used, because Linux carries it over from the
parent across fork and exec. The stage process also writes its own VmHWM to stderr at exit, so
its figure is exact, not sampled; a pool worker's is its last VmHWM read before it exited (within
--poll seconds of its end).

Phases are told apart by the progress bars a stage prints (refine/crf, refine/ir_label, train_irn,
refine/random_walk; make_cam; export): a bar's own time, the gap before a bar as its "setup" (the
boundary net's build before train_irn, the edge network's load before the walk), the rest as
"wrap-up". The target covers the CRF pool and the walk (edge-map inference included), not the
boundary network's training (train_irn and its setup), which here runs --irn-batch images of
--irn-crop px for one step (the recipe trains 32 x 512 px for 3 epochs: a training job sized by
its batch, as train_cam is). When the stage process's VmHWM was set in train_irn, refine's
target figure is the largest VmRSS sampled in its other phases, marked "sampled".

"RSS growth MB/image" is the stage process's VmRSS change per image from the first image done to
the last (as sampled): about 0 where memory does not grow with the dataset. make_cam counts its
images a batch (cam.batch_size) at a time, so it shows one only with more images than that; a
new size bucket's compile on the way (VOC's two orientations) adds a little that is not a leak.

--sizes cycles through W x H sizes (VOC's 500x375 and 375x500 by default); --set passes any
other config key (`--set cam.batch_size=1`). --backbone and --irn-crop shrink the run for tests.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import md_table  # bench/md_table.py, beside this script
import voc_tree
import xla_cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_MB = 4096
STAGES = ("train_cam", "make_cam", "refine", "export")
MEASURED = ("make_cam", "refine", "export")
# Phases of refine not under the target (module docstring).
TRAINING_PHASES = ("train_irn setup", "train_irn")
# tqdm's line: "refine/crf:  50%|#####     | 1/2 [00:03<00:03, ...]".
# A bar's line ends at the next one's "\r", so the unfinished last line is read too: the space after
# the total keeps a line cut inside a number from matching.
_PROGRESS = re.compile(r"^\s*(?P<desc>[A-Za-z_][\w/]*):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s")
_EXIT_HWM = re.compile(r"^memory_bench VmHWM:\s+(?P<kb>\d+) kB")

# The stage process: cpal_jax.main as `python -m` runs it, plus its own VmHWM on stderr at exit.
_WRAPPER = """
import atexit, runpy, sys

def _peak():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        sys.stderr.write("\\nmemory_bench " + line)
        sys.stderr.flush()

atexit.register(_peak)
sys.argv = ["cpal_jax.main"] + sys.argv[1:]
runpy.run_module("cpal_jax.main", run_name="__main__", alter_sys=True)
"""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--sizes", default="500x375,375x500", help="W x H, comma-separated, cycled over images")
  p.add_argument("--threads", type=int, default=2, help="XLA CPU threads of each stage process")
  p.add_argument("--backbone", default="resnet50", help="model.backbone and refine.irn.backbone")
  p.add_argument("--irn-batch", type=int, default=2, help="refine.irn.batch_size (one step)")
  p.add_argument("--irn-crop", type=int, default=512, help="refine.irn.crop_size")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
  p.add_argument("--poll", type=float, default=0.05, help="seconds between /proc reads")
  p.add_argument("--workdir", default=None, help="keep the tree and the run here (default: a temp dir)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def proc_status(pid: int) -> dict[str, int]:
  """VmHWM and VmRSS of pid in kB ({} once it has exited, or for a zombie)."""
  out = {}
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(("VmHWM:", "VmRSS:")):
          key, value = line.split()[:2]
          out[key[:-1]] = int(value)
  except (OSError, ValueError):
    pass
  return out


def descendants(pid: int) -> list[int]:
  """Every live process below pid, from /proc/*/stat's parent ids."""
  parent = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    # Field 4 (ppid) follows the command name, which may hold spaces: split after its ")".
    parent[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
  found, frontier = [], [pid]
  while frontier:
    p = frontier.pop()
    kids = [c for c, pp in parent.items() if pp == p]
    found += kids
    frontier += kids
  return found


def run_monitored(cmd: list[str], env: dict, log_path: str, poll: float) -> dict:
  """Runs cmd, polling its memory and its descendants'; its output goes to log_path. Phases come
  from its progress bars: a bar's own time, then the gap before the next bar as that bar's
  "setup", the time after the last one as "wrap-up"."""
  events = [(0.0, "startup")]  # (seconds, phase) at each change, stamped when the line arrives
  progress = {"n": 0, "exit_hwm_kb": None}
  log = open(log_path, "wb")
  t_start = time.perf_counter()
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  def read_output():
    buf = b""
    while chunk := os.read(proc.stdout.fileno(), 65536):
      log.write(chunk)
      *lines, buf = re.split(rb"[\r\n]", buf + chunk)
      for raw in lines + [buf]:
        line = raw.decode("utf-8", "replace")
        if m := _PROGRESS.match(line):
          n, total = int(m["n"]), int(m["total"])
          phase = "between" if n >= total else m["desc"]
          progress["n"] = n
          if phase != events[-1][1]:
            events.append((time.perf_counter() - t_start, phase))
        elif m := _EXIT_HWM.match(line):
          progress["exit_hwm_kb"] = int(m["kb"])

  reader = threading.Thread(target=read_output, daemon=True)
  reader.start()
  samples = []  # (seconds, VmRSS kB, VmHWM kB, images done) of the stage process
  workers: dict[int, int] = {}  # pid -> last VmHWM kB read
  last_scan = -1.0
  while proc.poll() is None:
    now = time.perf_counter() - t_start
    status = proc_status(proc.pid)
    if status:
      samples.append((now, status.get("VmRSS", 0), status.get("VmHWM", 0), progress["n"]))
    if now - last_scan > 0.5:
      for pid in descendants(proc.pid):
        workers.setdefault(pid, 0)
      last_scan = now
    for pid in workers:
      workers[pid] = max(workers[pid], proc_status(pid).get("VmHWM", 0))
    time.sleep(poll)
  wall = time.perf_counter() - t_start
  reader.join(timeout=10)
  proc.stdout.close()
  log.close()
  exact = progress["exit_hwm_kb"]
  return {
      "returncode": proc.returncode,
      "wall_s": wall,
      "main_hwm_kb": exact if exact is not None else max((s[2] for s in samples), default=0),
      "main_hwm_exact": exact is not None,
      "worker_hwm_kb": max(workers.values(), default=0),
      "descendants": len([w for w in workers.values() if w > 0]),
      "phases": split_phases(events, samples, wall),
  }


def split_phases(events: list, samples: list, wall: float) -> list[dict]:
  """Per phase: seconds, the largest VmRSS sampled, whether the stage process's VmHWM reached its
  peak in it, and its (images done, VmRSS) at the first and last sample with an image done."""
  spans = []
  for k, (t0, name) in enumerate(events):
    t1 = events[k + 1][0] if k + 1 < len(events) else wall
    if name == "between":
      name = f"{events[k + 1][1]} setup" if k + 1 < len(events) else "wrap-up"
    # A bar redrawn from 0 (the train loops restart its clock after the first step) flickers
    # through a few ms of "setup": such slivers join the phase before them.
    if spans and (spans[-1]["phase"] == name or t1 - t0 < 0.01):
      spans[-1]["t1"] = t1
    else:
      spans.append({"phase": name, "t0": t0, "t1": t1})
  # The peak belongs to the phase that first came near it: the interpreter's last few kB at exit
  # also raise VmHWM, and would otherwise take it.
  final = max((s[2] for s in samples), default=0)
  near = final - max(16 * 1024, final // 50)
  reached = next((s[0] for s in samples if s[2] >= near), None)
  for sp in spans:
    inside = [s for s in samples if sp["t0"] <= s[0] < sp["t1"]]
    done = [(s[3], s[1]) for s in inside if s[3] >= 1]
    sp.update(s=sp["t1"] - sp["t0"], rss_max_kb=max((s[1] for s in inside), default=0))
    sp.update(first=done[0] if done else None, last=done[-1] if done else None)
    sp["hwm_set"] = reached is not None and sp["t0"] <= reached < sp["t1"]
  return spans


def growth_mb_per_image(phases: list[dict]) -> float | None:
  """The largest VmRSS change per image (first image done -> last) of the phases that count
  images; training steps are not images."""
  slopes = []
  for ph in phases:
    if ph["phase"] not in TRAINING_PHASES and ph["first"] and ph["last"] and ph["last"][0] > ph["first"][0]:
      (n0, r0), (n1, r1) = ph["first"], ph["last"]
      slopes.append((r1 - r0) / 1024 / (n1 - n0))
  return round(max(slopes), 2) if slopes else None


def config_flags(args, root: str, workdir: str) -> list[str]:
  flags = [
      f"--config={os.path.join(REPO, 'configs', 'voc.py')}",
      f"--workdir={workdir}",
      f"--config.data.root={root}",
      "--config.data.train_split=train",
      "--config.data.eval_split=train",
      "--config.data.workers=0",
      f"--config.model.backbone={args.backbone}",
      f"--config.refine.irn.backbone={args.backbone}",
      # train_cam only has to leave a checkpoint: its memory is a training job's, sized by its batch.
      "--config.train.batch_size=2",
      "--config.train.num_steps=2",
      "--config.train.crop_size=64",
      "--config.train.resize_long=(48,80)",
      f"--config.refine.irn.batch_size={args.irn_batch}",
      "--config.refine.irn.num_steps=1",
      f"--config.refine.irn.crop_size={args.irn_crop}",
      "--config.report.enabled=False",
  ]
  return flags + [f"--config.{kv}" for kv in args.set]


def summary_seconds(workdir: str, stage: str) -> float | None:
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      s = json.load(f)
  except (OSError, ValueError):
    return None
  return (s.get(stage) or {}).get("seconds")


def stage_row(stage: str, r: dict, images: int, stage_s) -> dict:
  main_mb, worker_mb = r["main_hwm_kb"] / 1024, r["worker_hwm_kb"] / 1024
  phases = [
      {"phase": ph["phase"], "s": round(ph["s"], 1), "rss_max_mb": round(ph["rss_max_kb"] / 1024)}
      for ph in r["phases"]
  ]
  target_mb, how = max(main_mb, worker_mb), "VmHWM" if r["main_hwm_exact"] else "VmHWM (polled)"
  hwm_phase = next((ph["phase"] for ph in r["phases"] if ph["hwm_set"]), None)
  if hwm_phase in TRAINING_PHASES:
    others = [ph["rss_max_kb"] / 1024 for ph in r["phases"] if ph["phase"] not in TRAINING_PHASES]
    target_mb, how = max([worker_mb, *others]), f"VmRSS sampled outside {hwm_phase}"
  return {
      "stage": stage,
      "images": images,
      "wall_s": round(r["wall_s"], 1),
      "stage_s": stage_s,
      "s_per_image": round(r["wall_s"] / images, 2),
      "main_peak_mb": round(main_mb),
      "main_peak_phase": hwm_phase,
      "worker_peak_mb": round(worker_mb) if r["descendants"] else None,
      "descendants": r["descendants"],
      "target_peak_mb": round(target_mb),
      "target_peak_from": how,
      "under_4gb": bool(target_mb < TARGET_MB),
      "rss_growth_mb_per_image": growth_mb_per_image(r["phases"]),
      "phases": phases,
  }


def verdict(r: dict) -> str:
  """The "< 4 GB" cell of a measured stage's row."""
  if "returncode" in r:
    return ("**no**, " if r["under_4gb"] is False else "") + f"failed (status {r['returncode']})"
  return "yes" if r["under_4gb"] else "**no**"


def peak_text(r: dict) -> str:
  """The stage process's figure for the target, saying where a sampled one comes from."""
  if r["target_peak_from"].startswith("VmHWM"):
    return str(r["main_peak_mb"])
  return f"{r['target_peak_mb']} sampled ({r['main_peak_mb']} in {r['main_peak_phase']})"


def main(argv=None):
  args = parse_args(argv)
  xla_cpu.limit_threads(args.threads)  # the stage processes inherit XLA_FLAGS
  sizes = voc_tree.parse_sizes(args.sizes)
  base = args.workdir or tempfile.mkdtemp(prefix="memory_bench_")
  os.makedirs(base, exist_ok=True)
  root, workdir = os.path.join(base, "VOC2012"), os.path.join(base, "run")
  if os.path.exists(workdir):
    shutil.rmtree(workdir)  # every stage runs from scratch
  tree = voc_tree.write_voc_tree(root, args.images, sizes, args.seed)
  path = [REPO] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
  flags = config_flags(args, root, workdir)
  rows = []
  try:
    for stage in STAGES:
      print(f"{stage} ...", file=sys.stderr, flush=True)
      cmd = [sys.executable, "-c", _WRAPPER, *flags, f"--config.stages={stage}"]
      r = run_monitored(cmd, env, os.path.join(base, f"{stage}.log"), args.poll)
      rows.append(stage_row(stage, r, args.images, summary_seconds(workdir, stage)))
      if r["returncode"] != 0:
        # Recorded with the peak seen so far (a kernel OOM kill is status -9): later stages need it.
        with open(os.path.join(base, f"{stage}.log"), errors="replace") as f:
          tail = f.read()[-4000:]
        sys.stderr.write(tail + f"\nstage {stage} exited with status {r['returncode']}\n")
        rows[-1].update(returncode=r["returncode"], error=tail)
        if rows[-1]["under_4gb"]:
          rows[-1]["under_4gb"] = None  # it failed below the target: no verdict
        break
  finally:
    if not args.workdir:
      shutil.rmtree(base, ignore_errors=True)

  measured = [r for r in rows if r["stage"] in MEASURED]
  size_text = ", ".join(f"{w}x{h}" for w, h in sizes)
  print(
      f"\nconfigs/voc.py ({args.backbone}), {args.images} images of {size_text} "
      f"(JPEG {tree['jpeg_kb_mean']} KB mean), {args.threads} XLA threads, one process per stage"
  )
  print(
      f"{'stage':<10} {'wall s':>7} {'s/image':>8} {'main MB':>8} {'(phase)':<18} {'worker MB':>9} "
      f"{'target MB':>9} {'< 4 GB':>6} {'MB/image':>8}"
  )
  for r in rows:
    worker = "-" if r["worker_peak_mb"] is None else str(r["worker_peak_mb"])
    grow = "-" if r["rss_growth_mb_per_image"] is None else f"{r['rss_growth_mb_per_image']:+.1f}"
    under = str(r["under_4gb"]) if r["stage"] in MEASURED else "(setup)"
    if "returncode" in r:
      under = f"failed ({r['returncode']})"
    print(
        f"{r['stage']:<10} {r['wall_s']:>7.1f} {r['s_per_image']:>8.2f} {r['main_peak_mb']:>8} "
        f"{str(r['main_peak_phase']):<18} {worker:>9} {r['target_peak_mb']:>9} {under:>6} {grow:>8}"
    )
    phases = ", ".join(f"{p['phase']} {p['s']} s {p['rss_max_mb']} MB" for p in r["phases"])
    print(f"           phases (s, largest VmRSS sampled): {phases}")
  worst = max(measured, key=lambda r: r["target_peak_mb"], default=None)
  if worst:
    print(f"largest per-process peak of the measured stages: {worst['target_peak_mb']} MB ({worst['stage']})")
  md_table.emit(
      ["stage", "images", "s", "s/image", "stage process peak RSS MB", "largest CRF worker MB", "< 4 GB"],
      [
          [
              r["stage"],
              r["images"],
              f"{r['wall_s']:.1f}",
              f"{r['s_per_image']:.2f}",
              peak_text(r),
              "-" if r["worker_peak_mb"] is None else r["worker_peak_mb"],
              verdict(r),
          ]
          for r in measured
      ],
      f", {args.threads} XLA threads, {args.images} images of {size_text}",
  )
  out = {
      "bench": "memory",
      "config": vars(args),
      "sizes": [list(s) for s in sizes],
      "jpeg_kb_mean": tree["jpeg_kb_mean"],
      "target_mb": TARGET_MB,
      "rows": rows,
      "max_peak_mb": worst["target_peak_mb"] if worst else None,
      "all_under_4gb": len(measured) == len(MEASURED) and all(r["under_4gb"] is True for r in measured),
      "failed_stage": next((r["stage"] for r in rows if "returncode" in r), None),
  }
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  if out["failed_stage"]:
    sys.exit(1)


if __name__ == "__main__":
  main()
