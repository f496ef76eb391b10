"""Every bench of issue 22 in one run, in a fixed order, each in its own process: one JSON, and the
generated block of docs/results.md's "Speed on this CPU" section.

  python bench/run_all.py [--threads N] [--only kmeans,memory] [--quick] [--json runs/bench/run_all.json]
                          [--docs docs/results.md | --no-docs]

Order: matmul_peak (the machine's matmul peak, which the train-step and DeepLab tables divide by),
train_step_bench (JAX SIPE and CPAL against the PyTorch SIPE step), make_cam_bench (against SIPE's
PyTorch make_cam), kmeans_bench (against scikit-learn), deeplab_step_bench (against the PyTorch
DeepLab-v2 step; batch 2 at 321 px, 3 steps: the recipe's batch of 10 is ~100 s a step per side
on two cores), memory_bench, input_bench, random_walk_bench (IRN's dense walk at 88x66 only: at
125x94 it alone takes 10 minutes), crf_bench. Each gets --json to a file of this run; its output
goes to <json stem>_logs/<bench>.log. A bench that fails is recorded with its exit status and the
tail of its log, and the others still run; the exit status is then 1.

The JSON holds the machine (platform, CPU model, cores, package versions, threads, load average at
the start and the end, git commit with "+dirty" when `git status --porcelain` lists anything, date)
and each bench's own JSON with the command that made it. The docs block, between
`<!-- speed:begin -->` and `<!-- speed:end -->` (added after the section's heading the first time;
text outside the markers is left as it is), holds the command, the machine line, a table of the
issue's targets against the measured ratios, and one table per bench. A full run rewrites
docs/results.md unless --no-docs; a --quick or --only run writes only to an explicit --docs path,
so tiny figures or a partial run never replace the real table by accident.

--quick runs every bench at tiny sizes (resnet_tiny, a few pixels, one step; the PyTorch references
only where they take the tiny model): it checks the plumbing, its figures mean nothing. JAX runs
on the CPU (JAX_PLATFORMS=cpu) unless --platform says otherwise.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DOCS = os.path.join(REPO, "docs", "results.md")
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
SECTION = "## Speed on this CPU"
ORDER = ("matmul", "train_step", "make_cam", "kmeans", "deeplab", "memory", "input", "random_walk", "crf")
SCRIPTS = {
    "matmul": "matmul_peak.py",
    "train_step": "train_step_bench.py",
    "make_cam": "make_cam_bench.py",
    "kmeans": "kmeans_bench.py",
    "deeplab": "deeplab_step_bench.py",
    "memory": "memory_bench.py",
    "input": "input_bench.py",
    "random_walk": "random_walk_bench.py",
    "crf": "crf_bench.py",
}
PACKAGES = ("jax", "jaxlib", "torch", "scikit-learn", "numpy", "grain", "pydensecrf2")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU threads per bench")
  p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ORDER)}")
  p.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing only")
  p.add_argument("--json", default=os.path.join(REPO, "runs", "bench", "run_all.json"))
  p.add_argument("--docs", default=None, help=f"markdown file to regenerate (a full run: {DOCS})")
  p.add_argument("--no-docs", action="store_true")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS for the benches; empty: jax's choice")
  p.add_argument("--timeout", type=float, default=0, help="seconds per bench; 0: none")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ORDER)
  unknown = [n for n in names if n not in ORDER]
  if unknown:
    p.error(f"--only: unknown bench(es) {unknown}; choose from {', '.join(ORDER)}")
  args.names = [n for n in ORDER if n in names]
  if args.no_docs:
    args.docs = None
  elif args.docs is None and not args.quick and not args.only:
    args.docs = DOCS
  return args


def bench_args(name: str, quick: bool, threads: int, peak_json: str | None) -> list[str]:
  """The flags run_all gives a bench (besides --json)."""
  t = ["--threads", str(threads)]
  peak = ["--peak-json", peak_json] if peak_json else []
  if name == "matmul":
    return t + (["--sizes", "128", "256", "--warmup", "1", "--repeats", "2"] if quick else [])
  if name == "train_step":
    if quick:
      tiny = ["--batch", "1", "--size", "64", "--steps", "1", "--warmup", "1", "--backbone", "resnet_tiny"]
      return t + tiny + ["--torch-ref", ""] + peak  # torch_ref.py is ResNet-50 only
    return t + ["--batch", "4", "--size", "256", "--steps", "15", "--warmup", "2"] + peak
  if name == "make_cam":
    if quick:
      return t + ["--images", "1", "--size", "64x48", "--backbone", "resnet_tiny"]
    return t + ["--images", "4", "--size", "500x375", "--method", "sipe"]
  if name == "kmeans":
    if quick:
      return t + ["--classes", "2", "--capacity", "64", "--dim", "16", "--clusters", "4", "--iters", "5",
                  "--repeats", "1"]
    return t
  if name == "deeplab":
    if quick:
      return t + ["--batch", "1", "--size", "65", "--steps", "1", "--warmup", "1", "--backbone",
                  "resnet_tiny"]
    return t + ["--batch", "2", "--size", "321", "--steps", "3", "--warmup", "1"] + peak
  if name == "memory":
    if quick:
      return t + ["--images", "2", "--sizes", "64x48,48x64", "--backbone", "resnet_tiny", "--irn-crop", "64"]
    return t + ["--images", "8"]
  if name == "input":  # decode + augment: no XLA threads to set
    if quick:
      return ["--images", "4", "--sizes", "64x48,48x64", "--batch", "2", "--crop", "64", "--batches", "2",
              "--warmup", "1", "--workers", "0,1", "--single", "2", "--flops", "scaled"]
    return ["--images", "64", "--workers", "0,1,2"]
  if name == "random_walk":
    if quick:
      return t + ["--size", "20x15", "--dense-size", "20x15", "--repeats", "1"]
    return t + ["--size", "125x94", "--classes", "3", "--dense-size", "88x66"]
  if name == "crf":  # one process per core: no thread flag
    if quick:
      return ["--images", "2", "--size", "64x48", "--iters", "2"]
    return ["--images", "8", "--size", "500x375", "--workers", "0"]
  raise KeyError(name)


# --- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def git_commit() -> str:
  def git(*a):
    return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True)

  try:
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
      return "unknown"
    return head.stdout.strip() + ("+dirty" if git("status", "--porcelain").stdout.strip() else "")
  except OSError:
    return "unknown"


def machine(threads: int) -> dict:
  versions = {}
  for pkg in PACKAGES:
    try:
      versions[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      versions[pkg] = None
  return {
      "platform": platform.platform(),
      "python": platform.python_version(),
      "cpu_model": cpu_model(),
      "cores": os.cpu_count(),
      "cores_available": len(os.sched_getaffinity(0)),
      "threads": threads,
      "versions": versions,
      "loadavg_start": [round(v, 2) for v in os.getloadavg()],
      "commit": git_commit(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


# --- running -------------------------------------------------------------------------------------


def shown(cmd: list[str], peak_json: str | None) -> str:
  """The command as a reader would type it in the repository root: no --json path, and matmul_peak's
  output as the peak.json the train-step and DeepLab benches read."""
  parts = ["python", os.path.relpath(cmd[1], REPO)] + ["peak.json" if a == peak_json else a for a in cmd[2:]]
  if cmd[1].endswith(SCRIPTS["matmul"]):
    parts += ["--json", "peak.json"]
  return " ".join(shlex.quote(p) for p in parts)


def run_bench(name: str, args, out_dir: str, log_dir: str, peak_json: str | None) -> dict:
  out = os.path.join(out_dir, f"{name}.json")
  flags = bench_args(name, args.quick, args.threads, peak_json)
  cmd = [sys.executable, os.path.join(HERE, SCRIPTS[name]), *flags]
  env = dict(os.environ)
  if args.platform:
    env["JAX_PLATFORMS"] = args.platform
  log_path = os.path.join(log_dir, f"{name}.log")
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    # Its own process group, so a timeout or Ctrl-C also ends what the bench started (PyTorch
    # references, stage processes, CRF pools), not only the bench.
    proc = subprocess.Popen(
        [*cmd, "--json", out], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, process_group=0
    )
    try:
      rc = proc.wait(timeout=args.timeout or None)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      rc = "timeout"
    except KeyboardInterrupt:
      os.killpg(proc.pid, signal.SIGINT)
      proc.wait()
      raise
  seconds = round(time.perf_counter() - t0, 1)
  entry = {"command": shown(cmd, peak_json), "seconds": seconds, "returncode": rc, "log": log_path}
  entry["result"] = None
  if os.path.exists(out):  # memory_bench writes what it measured before a stage failed
    with open(out) as f:
      entry["result"] = json.load(f)
  if rc != 0:
    with open(log_path, errors="replace") as f:
      entry["error"] = f.read()[-3000:]
  return entry


# --- the docs block ------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt(v, spec: str = ".3f", none: str = "-") -> str:
  return none if v is None else format(v, spec)


def _get(results: dict, name: str):
  entry = results.get(name)
  return entry["result"] if entry and entry.get("result") else None


def targets(results: dict) -> list[list]:
  """Rows of (target, measured, met) for the issue's targets."""

  def ratio_row(target, value, ok, missing, unit="x"):
    if value is None:
      return [target, missing, "-"]
    return [target, f"{value:.2f}{unit}", "yes" if ok(value) else "**no**"]

  def status(name):
    if name not in results:
      return "not run"
    return "failed" if results[name]["returncode"] != 0 else "no reference in this run"

  rows = []
  ts = _get(results, "train_step") or {}
  ratios = ts.get("ratios", {})
  rows.append(ratio_row("CAM train step >= 1.2x the PyTorch SIPE step (torch s / JAX s)",
                        ratios.get("torch_over_jax_sipe_step_time"), lambda v: v >= 1.2,
                        status("train_step")))
  rows.append(ratio_row("CPAL step <= 1.05x SIPE's", ratios.get("cpal_over_sipe_step_time"),
                        lambda v: v <= 1.05, status("train_step")))
  mc = _get(results, "make_cam") or {}
  rows.append(ratio_row("make_cam >= 1.5x SIPE's PyTorch make_cam (torch s/image / ours)",
                        mc.get("torch_over_jax"), lambda v: v >= 1.5, status("make_cam")))
  km = _get(results, "kmeans") or {}
  rows.append(ratio_row("k-means >= 10x scikit-learn (sklearn s / ours, converged)", km.get("speedup"),
                        lambda v: v >= 10, status("kmeans")))
  dl = _get(results, "deeplab") or {}
  rows.append(ratio_row("DeepLab-v2 train step >= 1.0x PyTorch's (torch s / JAX s)",
                        (dl.get("ratios") or {}).get("torch_over_jax_step_time"), lambda v: v >= 1.0,
                        status("deeplab")))
  mem = _get(results, "memory")
  if mem and mem.get("max_peak_mb") is not None:
    failed = f"; {mem['failed_stage']} failed" if mem.get("failed_stage") else ""
    rows.append([
        "peak RSS of make_cam, refine, export < 4 GB per process",
        f"{mem['max_peak_mb']} MB (largest stage process or CRF worker{failed})",
        "yes" if mem["all_under_4gb"] else "**no**",
    ])
  else:
    rows.append(["peak RSS of make_cam, refine, export < 4 GB per process", status("memory"), "-"])
  inp = _get(results, "input")
  if inp:
    card = inp["card"]
    rows.append([
        "input pipeline: cores a GPU host needs per card",
        f"{inp['cores_needed']:.0f} cores ({card['images_per_s']:.0f} images/s for {card['card']})",
        "-",
    ])
  else:
    rows.append(["input pipeline: cores a GPU host needs per card", status("input"), "-"])
  return rows


def render_matmul(r: dict) -> str:
  rows = []
  for lib, res in r["results"].items():
    for row in res["rows"]:
      rows.append(
          [f"{lib} {res['version']}", row["n"], f"{row['gflops_median']:.1f}", f"{row['gflops_best']:.1f}"]
      )
  peak = ", ".join(f"{k} {v:.1f}" for k, v in r["peak_gflops"].items())
  return table(["library", "n", "GFLOP/s (median)", "GFLOP/s (best)"], rows) + f"\n\nPeak GFLOP/s: {peak}."


def render_train_step(r: dict) -> str:
  peak = r.get("peak_gflops")
  rows = [
      [x["impl"], f"{x['step_s']:.3f}", f"{x['images_per_s']:.2f}", f"{x['gflop_per_step']:.1f}"]
      + ([f"{x['gflops_per_s'] / peak:.1%}"] if peak else [])
      for x in r["rows"]
  ]
  head = ["implementation", "s/step", "images/s", "GFLOP/step"] + (["share of matmul peak"] if peak else [])
  ratios = r.get("ratios", {})
  notes = []
  if "torch_over_jax_sipe_step_time" in ratios:
    ratio = ratios["torch_over_jax_sipe_step_time"]
    notes.append(f"PyTorch SIPE / JAX SIPE step time {ratio:.3f} (target >= 1.2)")
  if "cpal_over_sipe_step_time" in ratios:
    notes.append(f"CPAL / SIPE step time {ratios['cpal_over_sipe_step_time']:.3f} (target <= 1.05)")
  return table(head, rows) + ("\n\n" + "; ".join(notes) + "." if notes else "")


def render_make_cam(r: dict) -> str:
  def row(name, x):
    return [name, f"{x['s_per_image']:.3f}", f"{x['images_per_s']:.3f}", f"{x['fusion_s_per_image']:.4f}",
            f"{x['peak_rss_mb']:.0f}"]

  rows = [row("ours (JAX)", r)]
  ref = r.get("torch")
  if ref:
    rows.append(row(f"PyTorch SIPE (`--work {ref['work']}`)", ref))
  w, h = r["size"]
  text = table(["implementation", "s/image", "images/s", "host fusion s/image", "peak RSS MB"], rows)
  n = r["images"]
  text += f"\n\n{n} image{'s' * (n != 1)} of {w}x{h}, {r['backbone']} {r['method']}, scales {r['scales']}"
  text += " + flip"
  if "torch_over_jax" in r:
    text += f"; PyTorch s/image / ours {r['torch_over_jax']:.3f} (target >= 1.5)"
  return text + "."


def render_kmeans(r: dict) -> str:
  rows = [
      [x["name"], f"{x['run_s']:.4f}", f"{x['iters_mean']:.2f}, {x['iters_max']}", f"{x['ms_per_iter']:.1f}"]
      for x in r["rows"]
  ]
  c = r["config"]
  return (
      table(["implementation", "run s", "iterations (mean, max)", "ms/iteration"], rows)
      + f"\n\nBank {c['classes']} x {c['capacity']} x {c['dim']}, {c['clusters']} clusters; scikit-learn / "
      f"ours {r['speedup']:.2f}x converged (target >= 10), {r['speedup_fixed']:.2f}x against our "
      f"fixed-length loop; classes ending with an empty cluster {r['classes_with_empty_cluster']}/"
      f"{c['classes']}, iteration counts equal in {r['iters_agree']}/{c['classes']}."
  )


def render_deeplab(r: dict) -> str:
  peak = r.get("peak_gflops")
  rows = [
      [x["impl"], f"{x['step_s']:.3f}", f"{x['images_per_s']:.2f}", f"{x['gflop_per_step']:.1f}",
       f"{x['peak_rss_mb']:.0f}", f"{x['cpu_util_cores']:.2f}"]
      + ([f"{x['gflops_per_s'] / peak:.1%}"] if peak else [])
      for x in r["rows"]
  ]
  head = ["implementation", "s/step", "images/s", "GFLOP/step", "peak RSS MiB", "cores busy"]
  text = table(head + (["share of matmul peak"] if peak else []), rows)
  a = r["args"]
  text += f"\n\nBatch {a['batch']} x {a['size']}^2, {a['backbone']}, median of {a['steps']} steps"
  ratio = (r.get("ratios") or {}).get("torch_over_jax_step_time")
  return text + (f"; PyTorch / JAX step time {ratio:.3f} (target >= 1.0)." if ratio else ".")


def render_memory(r: dict) -> str:
  rows = []
  for x in r["rows"]:
    measured = x["stage"] != "train_cam"
    peak = str(x["main_peak_mb"]) if x["target_peak_from"].startswith("VmHWM") else (
        f"{x['target_peak_mb']} sampled ({x['main_peak_mb']} in {x['main_peak_phase']})")
    rows.append([
        x["stage"] + ("" if measured else " (setup, not a target)"),
        x["images"], f"{x['wall_s']:.1f}", f"{x['s_per_image']:.2f}", peak,
        "-" if x["worker_peak_mb"] is None else x["worker_peak_mb"],
        fmt(x["rss_growth_mb_per_image"], "+.1f"),
        ("yes" if x["under_4gb"] else "**no**") if measured else "-",
    ])
    if "returncode" in x:
      rows[-1][-1] = ("**no**, " if x["under_4gb"] is False else "") + f"failed (status {x['returncode']})"
  head = ["stage", "images", "s", "s/image", "stage process peak RSS MB", "largest CRF worker MB",
          "RSS growth MB/image", "< 4 GB"]
  sizes = ", ".join(f"{w}x{h}" for w, h in r["sizes"])
  c = r["config"]
  return table(head, rows) + (
      f"\n\nconfigs/voc.py ({c['backbone']}), {c['images']} generated images of {sizes}, one process per "
      f"stage; refine's boundary net trained {c['irn_batch']} x {c['irn_crop']} px for one step."
  )


def render_input(r: dict) -> str:
  s, card = r["single_thread"], r["card"]
  rows = [["single thread, no grain", "-", "1.00", f"{s['images_per_cpu_s']:.1f}",
           f"{card['images_per_s'] / s['images_per_cpu_s']:.1f}"]]
  rows += [[f"data.workers={x['workers']}", f"{x['images_per_s']:.1f}", f"{x['cores_busy']:.2f}",
            f"{x['images_per_cpu_s']:.1f}", f"{x['cores_needed']:.1f}"] for x in r["rows"]]
  text = table(["pipeline", "images/s", "cores busy", "images per CPU-second", "cores per card"], rows)
  flops = ""
  if "gflop_per_image" in card:
    flops = f", {card['gflop_per_image']} GFLOP/image from {card['flops_from']}"
  x = r["rows"][0]
  return text + (
      f"\n\nBatch {x['batch']}, crop {x['crop']}; decode {s['decode_ms']} ms + augment {s['augment_ms']} ms "
      f"per image on one thread. Card: {card['card']}, {card['images_per_s']:.0f} images/s ({card['source']}"
      f"{flops}): {r['cores_needed']:.0f} cores per card at the rate of "
      f"data.workers={r['cores_needed_from_workers']}."
  )


def render_random_walk(r: dict) -> str:
  def mb(v):
    return "-" if v is None else f"{v / 2**20:,.0f}"

  rows = [
      [x["variant"], x["size"], f"{x['run_s']:.3f}", mb(x.get("xla_buffer_bytes")),
       mb(x.get("rss_peak_bytes"))]
      for x in r["rows"]
  ]
  text = table(["variant", "map", "run s", "XLA buffers MB", "peak RSS MB (ru_maxrss)"], rows)
  by = {(x["variant"], x["size"]): x for x in r["rows"]}
  notes = []
  for (variant, size), x in by.items():
    sparse = by.get(("sparse", size))
    if variant.startswith("dense") and sparse:
      notes.append(f"dense / sparse at {size}: {x['run_s'] / sparse['run_s']:,.0f}x")
  return text + ("\n\n" + "; ".join(notes) + "." if notes else "")


def render_crf(r: dict) -> str:
  base = r["rows"][0]["images_per_s"]
  rows = [
      [x["workers"], f"{x['images_per_s']:.2f}", f"{x['images_per_s'] / base:.2f}",
       f"{x['crf_s_per_image']:.3f}", f"{x['crf_cpu_s_per_image']:.3f}"]
      for x in r["rows"]
  ]
  w, h = r["size"]
  return table(["workers", "images/s", "speed-up", "crf s/image", "crf CPU s/image"], rows) + (
      f"\n\n{w}x{h}, {r['classes']} labels, {r['iters']} mean-field iterations, {r['cores']} cores available."
  )


TITLES = {
    "matmul": ("float32 matmul peak", render_matmul),
    "train_step": ("CAM train step, ResNet-50 OS16", render_train_step),
    "make_cam": ("make_cam, 4 scales + flip", render_make_cam),
    "kmeans": ("k-means on the support bank", render_kmeans),
    "deeplab": ("DeepLab-v2 train step", render_deeplab),
    "memory": ("Peak memory per stage process", render_memory),
    "input": ("Input pipeline against an H100", render_input),
    "random_walk": ("IRN random walk per VOC image", render_random_walk),
    "crf": ("Dense CRF", render_crf),
}


def duration(seconds: float) -> str:
  return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def machine_line(m: dict) -> str:
  v = m["versions"]
  pkgs = ", ".join(f"{k} {v[k]}" for k in ("jax", "jaxlib", "torch", "scikit-learn") if v.get(k))
  start = " / ".join(f"{x:.2f}" for x in m["loadavg_start"])
  end = " / ".join(f"{x:.2f}" for x in m.get("loadavg_end") or [])
  return (
      f"{m['platform']}, {m['cpu_model']}, {m['cores']} cores ({m['cores_available']} available), "
      f"{m['threads']} threads; {pkgs}; load average at start {start}"
      + (f", at the end {end}" if end else "")
      + f"; commit {m['commit']}; {m['date']}"
  )


def render_block(report: dict) -> str:
  m, results = report["machine"], report["benches"]
  lines = [
      BEGIN,
      "<!-- Written by bench/run_all.py: rerun it rather than edit this block. -->",
      "",
      f"`{report['command']}`"
      + (" (--quick: tiny sizes, the figures mean nothing)" if report["quick"] else "")
      + f", each bench in its own process, {duration(report['seconds'])} in all.",
      "",
      f"Machine: {machine_line(m)}.",
      "",
      table(["target (issue 22)", "measured", "met"], targets(results)),
  ]
  for name in ORDER:
    if name not in results:
      continue
    title, render = TITLES[name]
    entry = results[name]
    lines += ["", f"**{title}** (`{entry['command']}`, {duration(entry['seconds'])}):", ""]
    if entry.get("result"):
      try:
        lines.append(render(entry["result"]))
      except (KeyError, TypeError, ZeroDivisionError, IndexError, ValueError) as e:
        lines.append(f"(its JSON did not have what the table reads: {type(e).__name__}: {e})")
    if entry["returncode"] != 0:
      log = os.path.relpath(entry["log"], REPO)
      log = f"`{log}`" if not log.startswith("..") else f"{name}.log in the run's logs folder"
      lines += [""] * bool(entry.get("result")) + [f"Failed (exit status {entry['returncode']}); log: {log}."]
  lines.append(END)
  return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
  """text with the marked block replaced; the first time, placed right after the section's heading
  (or as a new section at the end)."""
  if BEGIN in text and END in text:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[:start] + block + text[end:]
  lines = text.split("\n")
  for i, line in enumerate(lines):
    if line.strip() == SECTION:
      return "\n".join(lines[: i + 1] + ["", block] + lines[i + 1 :])
  return text.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"


def main(argv=None):
  args = parse_args(argv)
  given = argv if argv is not None else sys.argv[1:]
  command = " ".join(["python bench/run_all.py", *(shlex.quote(a) for a in given)])
  report = {"command": command, "quick": args.quick, "machine": machine(args.threads), "benches": {}}
  load = report["machine"]["loadavg_start"][0]
  if load > 0.5 * report["machine"]["cores_available"]:
    print(f"load average {load:.2f} at the start: other work is running, and the figures will show it")
  json_path = os.path.abspath(args.json)
  os.makedirs(os.path.dirname(json_path), exist_ok=True)
  log_dir = os.path.splitext(json_path)[0] + "_logs"
  os.makedirs(log_dir, exist_ok=True)
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="run_all_") as out_dir:
    for k, name in enumerate(args.names, 1):
      peak = report["benches"].get("matmul", {})
      peak_json = os.path.join(out_dir, "matmul.json") if peak.get("returncode") == 0 else None
      print(f"[{k}/{len(args.names)}] {name} ...", end=" ", flush=True)
      entry = run_bench(name, args, out_dir, log_dir, peak_json)
      report["benches"][name] = entry
      failed = "" if entry["returncode"] == 0 else f", FAILED ({entry['returncode']})"
      print(f"{entry['seconds']:.0f} s{failed}", flush=True)
  report["seconds"] = round(time.perf_counter() - t0, 1)
  report["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
  with open(json_path, "w") as f:
    json.dump(report, f, indent=1)
  print(f"wrote {json_path}; logs in {log_dir}")
  block = render_block(report)
  if args.docs:
    with open(args.docs) as f:
      text = f.read()
    with open(args.docs, "w") as f:
      f.write(replace_block(text, block))
    print(f"regenerated the speed block of {args.docs}")
  else:
    print("\n" + block)
  failed = [n for n, e in report["benches"].items() if e["returncode"] != 0]
  if failed:
    print(f"failed: {', '.join(failed)} (see their logs)")
    sys.exit(1)


if __name__ == "__main__":
  main()
