"""The benches' PyTorch references run and report what their callers read (timings are not checked
against anything: only that they are there, finite and positive)."""

import json
import math
import os
import subprocess
import sys

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
