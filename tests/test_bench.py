"""The benches' PyTorch references run and report what their callers read (timings are not checked
against anything: only that they are there, finite and positive)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("work", ["same", "sipe"])
def test_torch_make_cam_reports_its_keys(work, tmp_path):
  pytest.importorskip("torch")
  out = tmp_path / "ref.json"
  cmd = [sys.executable, os.path.join(REPO, "bench", "torch_make_cam.py"), "--images", "1", "--size", "64x48"]
  cmd += ["--threads", "1", "--warmup", "1", "--work", work, "--json", str(out)]
  subprocess.run(cmd, check=True, capture_output=True, timeout=120)
  r = json.loads(out.read_text())
  timings = [
      "s_per_image",
      "s_per_image_median",
      "images_per_s",
      "preprocess_s_per_image",
      "network_s_per_image",
      "fusion_s_per_image",
      "peak_rss_mb",
      "rss_after_build_mb",
      "cpu_util_cores",
  ]
  for key in timings:
    assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
  assert r["size"] == [64, 48] and r["scales"] == [1.0, 0.5, 1.5, 2.0]
  assert (r["threads"], r["work"], r["images"], r["warmup"]) == (1, work, 1, 1)
  assert r["present_classes"] == [0, 1, 15]  # background and the classes make_cam_bench.py labels
  assert r["images_per_s"] == pytest.approx(1 / r["s_per_image"])
  assert r["peak_rss_mb"] >= r["rss_after_build_mb"]


# --- bench/run_all.py, memory_bench.py, input_bench.py, voc_tree.py ------------------------------

BENCH = os.path.join(REPO, "bench")


def bench_module(name):
  if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
  return __import__(name)


def plain_env():
  """This environment without conftest's eight fake devices, which a stage process would shard over."""
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def outside(text, begin="<!-- speed:begin -->", end="<!-- speed:end -->"):
  return text[: text.index(begin)], text[text.index(end) + len(end) :]


def test_run_all_quick_writes_the_json_and_only_the_marked_block(tmp_path):
  docs = tmp_path / "results.md"
  docs.write_text((pathlib.Path(REPO) / "docs" / "results.md").read_text())
  before = docs.read_text()
  out = tmp_path / "all.json"
  cmd = [sys.executable, os.path.join(BENCH, "run_all.py"), "--quick", "--only", "kmeans"]
  cmd += ["--json", str(out), "--docs", str(docs)]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stdout + r.stderr
  report = json.loads(out.read_text())
  m = report["machine"]
  for key in ("platform", "cpu_model", "cores", "threads", "loadavg_start", "loadavg_end", "commit", "date"):
    assert m[key] not in (None, ""), key
  assert set(m["versions"]) >= {"jax", "jaxlib", "torch", "scikit-learn"} and m["versions"]["jax"]
  assert len(m["loadavg_start"]) == 3 and len(m["commit"].split("+")[0]) == 40
  assert list(report["benches"]) == ["kmeans"] and report["quick"]
  kmeans = report["benches"]["kmeans"]
  assert kmeans["returncode"] == 0 and kmeans["result"]["speedup"] > 0
  assert kmeans["command"].startswith("python bench/kmeans_bench.py --threads")
  after = docs.read_text()
  assert outside(after) == outside(before)  # the hand-written text is kept as it was
  assert after.count("<!-- speed:begin -->") == after.count("<!-- speed:end -->") == 1
  block = after[after.index("<!-- speed:begin -->") : after.index("<!-- speed:end -->")]
  assert "python bench/run_all.py --quick --only kmeans" in block and m["commit"] in block
  assert "| k-means >= 10x scikit-learn" in block and "**k-means on the support bank**" in block
  assert "| memory" not in block and "not run" in block


def test_run_all_block_goes_after_the_speed_heading_once(tmp_path):
  run_all = bench_module("run_all")
  text = "# Results\n\n## Speed on this CPU\n\nhand-written\n\n## Next\n\nmore\n"
  first = run_all.replace_block(text, "<!-- speed:begin -->\nA\n<!-- speed:end -->")
  assert first == (
      "# Results\n\n## Speed on this CPU\n\n<!-- speed:begin -->\nA\n<!-- speed:end -->\n\nhand-written\n\n"
      "## Next\n\nmore\n"
  )
  second = run_all.replace_block(first, "<!-- speed:begin -->\nB\n<!-- speed:end -->")
  assert second == first.replace("\nA\n", "\nB\n")
  appended = run_all.replace_block("# Results\n", "<!-- speed:begin -->\nA\n<!-- speed:end -->")
  assert appended.endswith("## Speed on this CPU\n\n<!-- speed:begin -->\nA\n<!-- speed:end -->\n")


def test_run_all_writes_docs_by_default_only_for_a_full_run():
  run_all = bench_module("run_all")
  assert run_all.parse_args([]).docs == run_all.DOCS
  assert run_all.parse_args(["--no-docs"]).docs is None
  assert run_all.parse_args(["--quick"]).docs is None
  assert run_all.parse_args(["--only", "crf"]).docs is None
  assert run_all.parse_args(["--only", "crf,kmeans"]).names == ["kmeans", "crf"]  # the fixed order
  with pytest.raises(SystemExit):
    run_all.parse_args(["--only", "bogus"])
  for name in run_all.ORDER:  # every bench has its flags, full and quick
    for quick in (False, True):
      assert isinstance(run_all.bench_args(name, quick, 2, None), list)


def test_voc_tree_reads_through_the_voc_reader(tmp_path):
  voc_tree = bench_module("voc_tree")
  from cpal_jax.data import voc

  tree = voc_tree.write_voc_tree(str(tmp_path / "VOC2012"), 3, sizes=[(80, 60), (60, 80)])
  train = voc.VOCSource(tree["root"], "train")
  assert train.labels_mode == "table" and train.mask_dir is None and len(train) == 3
  shapes = [train[i]["image"].shape for i in range(3)]
  assert shapes == [(60, 80, 3), (80, 60, 3), (60, 80, 3)]
  scored = voc.VOCSource(tree["root"], "train", mask_dir="SegmentationClass", with_mask=True)
  for i in range(3):
    el = scored[i]
    present = sorted(set(np.unique(el["mask"]).tolist()) - {0, 255})
    assert present and np.flatnonzero(el["label"]).tolist() == [c - 1 for c in present]
    assert (el["mask"] == 255).any()  # VOC's void band


_CHILD = r"""
import subprocess, sys, time
import numpy as np

def bar(desc, n, total):
  sys.stderr.write(f"\r{desc}: {100 * n // total:3d}%|#| {n}/{total} [00:00<00:00, 1.00it/s]")
  sys.stderr.flush()

bar("phase_a", 0, 2)
time.sleep(0.4)
bar("phase_a", 2, 2)
time.sleep(0.4)
bar("phase_b", 0, 1)
a = np.ones(200 * 2**20 // 8)  # 200 MB in this process, in phase_b
time.sleep(0.6)
grandchild = "import numpy as np, time; b = np.ones(300 * 2**20 // 8); time.sleep(1.0)"
subprocess.run([sys.executable, "-c", grandchild], check=True)
bar("phase_b", 1, 1)
time.sleep(0.3)
"""


def test_memory_monitor_reads_each_process_alone(tmp_path):
  memory_bench = bench_module("memory_bench")
  cmd = [sys.executable, "-c", memory_bench._WRAPPER.replace("cpal_jax.main", "child_module"), "x"]
  (tmp_path / "child_module.py").write_text(_CHILD)
  env = {**plain_env(), "PYTHONPATH": str(tmp_path)}
  r = memory_bench.run_monitored(cmd, env, str(tmp_path / "log"), 0.02)
  assert r["returncode"] == 0, (tmp_path / "log").read_text()
  assert r["main_hwm_exact"]  # the process's own VmHWM line at exit
  main_mb, worker_mb = r["main_hwm_kb"] / 1024, r["worker_hwm_kb"] / 1024
  # Each process's own peak: the parent's 200 MB is not in its child's figure, nor the child's 300 in it.
  assert 200 < main_mb < 300 + 100, main_mb
  assert 300 < worker_mb < 300 + 200 + 100, worker_mb
  names = [p["phase"] for p in r["phases"]]
  assert names[0] == "startup" and "phase_b" in names and names[-1] == "wrap-up", names
  assert [p["phase"] for p in r["phases"] if p["hwm_set"]] == ["phase_b"]


def test_memory_bench_records_a_failed_stage_and_stops(tmp_path):
  out = tmp_path / "mem.json"
  cmd = [sys.executable, os.path.join(BENCH, "memory_bench.py"), "--images", "1", "--sizes", "64x48"]
  cmd += ["--backbone", "resnet_tiny", "--set", "train.no_such_key=1", "--json", str(out)]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=plain_env())
  assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
  res = json.loads(out.read_text())
  assert res["failed_stage"] == "train_cam" and not res["all_under_4gb"] and res["max_peak_mb"] is None
  (row,) = res["rows"]
  assert row["returncode"] != 0 and "no_such_key" in row["error"] and row["main_peak_mb"] > 0


@pytest.mark.slow
def test_memory_bench_runs_every_stage_in_its_own_process(tmp_path):
  out = tmp_path / "mem.json"
  cmd = [sys.executable, os.path.join(BENCH, "memory_bench.py"), "--images", "2", "--sizes", "64x48,48x64"]
  cmd += ["--backbone", "resnet_tiny", "--irn-crop", "64", "--json", str(out)]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=plain_env())
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.loads(out.read_text())
  rows = {row["stage"]: row for row in res["rows"]}
  assert list(rows) == ["train_cam", "make_cam", "refine", "export"]
  for stage in ("make_cam", "refine", "export"):
    row = rows[stage]
    assert 100 < row["main_peak_mb"] < 4096 and row["under_4gb"] and row["images"] == 2, row
    assert row["target_peak_from"].startswith("VmHWM") or "sampled" in row["target_peak_from"]
  phases = [p["phase"] for p in rows["refine"]["phases"]]
  assert {"refine/crf", "refine/ir_label", "train_irn", "refine/random_walk"} <= set(phases), phases
  assert rows["refine"]["worker_peak_mb"] > 0  # the CRF pool's spawned workers were seen
  measured = [rows[s]["target_peak_mb"] for s in ("make_cam", "refine", "export")]
  assert res["all_under_4gb"] and res["max_peak_mb"] == max(measured)


def test_input_bench_reports_rates_and_cores(tmp_path):
  out = tmp_path / "input.json"
  cmd = [sys.executable, os.path.join(BENCH, "input_bench.py"), "--images", "4", "--sizes", "64x48,48x64"]
  cmd += ["--batch", "2", "--crop", "64", "--batches", "2", "--warmup", "1", "--workers", "0,1"]
  cmd += ["--single", "2", "--flops", "scaled", "--json", str(out)]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=plain_env())
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  res = json.loads(out.read_text())
  assert [row["workers"] for row in res["rows"]] == [0, 1]
  for row in res["rows"]:
    assert row["images"] == (6 if row["startup_included"] else 4) and row["batch_shape"] == [2, 64, 64, 3]
    for key in ("images_per_s", "images_per_cpu_s", "cores_busy", "cores_needed"):
      assert math.isfinite(row[key]) and row[key] > 0, (key, row)
  card = res["card"]
  gflop = 160.2 / 4 * (64 / 256) ** 2  # the known step, scaled to this crop
  assert card["gflop_per_image"] == pytest.approx(gflop, abs=0.01)
  assert card["images_per_s"] == pytest.approx(0.4 * 989e3 / gflop, rel=0.01)
  assert res["cores_needed"] == res["rows"][1]["cores_needed"]  # the most workers
