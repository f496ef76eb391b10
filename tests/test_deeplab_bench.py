"""bench/deeplab_step_bench.py and its PyTorch reference bench/torch_deeplab.py: the reference is our
DeepLab-v2 (its weights, converted with kazuto1011's names, give our MSC logits and loss), and the
bench runs both steps end to end at a tiny size and writes the JSON the docs' tables come from."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cpal_jax.models import deeplab, pretrained
from cpal_jax.train import seg

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"


def _torch_deeplab():
  pytest.importorskip("torch")
  sys.path.insert(0, str(BENCH))
  try:
    import torch_deeplab
  finally:
    sys.path.remove(str(BENCH))
  return torch_deeplab


def test_torch_reference_is_our_model(fast_compiles):
  import torch

  td = _torch_deeplab()
  args = td.parse_args(["--batch", "2", "--size", "65", "--backbone", "resnet_tiny"])
  ref, optimizer, _, images, labels = td.build(args)
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  flat = deeplab.convert_torch_state(state, "caffe")  # kazuto1011's names, "base." prefix and all

  model = deeplab.DeepLabV2(args.num_classes, "resnet_tiny", "caffe")
  batch = td.deeplab_common.synthetic_batch(args.batch, args.size, args.num_classes, args.seed)
  x = deeplab.normalize(jnp.asarray(batch["image"]), jnp.asarray(batch["valid"]), "caffe")
  np.testing.assert_allclose(np.asarray(x), images.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  variables = jax.jit(model.init)(jax.random.key(0), x)
  variables, n = pretrained.load_flat_into(variables, flat, "torch_deeplab", prefix="backbone")
  leaves = jax.tree.leaves({k: v["backbone"] for k, v in variables.items()})
  assert n == len(leaves)  # every backbone tensor and BN statistic came from the reference
  for i in range(4):
    variables["params"]["aspp"][f"c{i}"] = {
        "kernel": state[f"base.aspp.c{i}.weight"].transpose(2, 3, 1, 0),
        "bias": state[f"base.aspp.c{i}.bias"],
    }

  scales = (1.0, 0.75, 0.5)
  apply = jax.jit(model.apply)
  per_scale = [apply(variables, deeplab.resize_by_factor(x, s)) for s in scales]
  total, _ = seg.multiscale_loss(per_scale, jnp.asarray(batch["mask"]), scales)
  with torch.no_grad():
    outs = [o.numpy().transpose(0, 2, 3, 1) for o in ref(images)]  # 1.0, 0.5, 0.75, max
    expected = float(td.losses(ref, torch.nn.CrossEntropyLoss(ignore_index=255), images, labels))
  ours = [per_scale[0], per_scale[2], per_scale[1], deeplab.fuse_max(per_scale)]
  for a, b in zip(ours, outs):
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
  np.testing.assert_allclose(float(total), expected, rtol=1e-4)

  # The optimiser sees what ours trains: every backbone conv at 1x, ASPP weights 10x, biases 20x.
  groups = [seg.param_label(k, False) for k in traverse_util.flatten_dict(variables["params"])]
  sizes = [len(g["params"]) for g in optimizer.param_groups]
  assert sizes == [groups.count(seg.BACKBONE), groups.count(seg.HEAD), groups.count(seg.HEAD_BIAS)]
  assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 5e-4, 0.0]


def test_bench_runs_both_steps_at_a_tiny_size(tmp_path):
  _torch_deeplab()
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # not the tests' 8 fake devices
  cmd = [sys.executable, str(BENCH / "deeplab_step_bench.py"), "--batch", "1", "--size", "65"]
  cmd += ["--steps", "1", "--warmup", "0", "--threads", "1", "--backbone", "resnet_tiny", "--json", str(out)]
  run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "PyTorch step / JAX step" in run.stdout and "| implementation |" in run.stdout

  res = json.loads(out.read_text())
  assert set(res) >= {"args", "rows", "ratios", "peak_gflops", "torch_ref"}
  jax_row, torch_row = res["rows"]
  assert jax_row["impl"].startswith("jax") and torch_row["impl"].startswith("torch")
  for row in res["rows"]:
    for key in ("step_s", "images_per_s", "gflop_per_step", "peak_rss_mb"):
      assert math.isfinite(row[key]) and row[key] > 0, (row["impl"], key, row[key])
    assert all(math.isfinite(v) for v in row["losses_first_last"])
  assert jax_row["compile_s"] > 0
  ratio = res["ratios"]["torch_over_jax_step_time"]
  assert ratio == pytest.approx(torch_row["step_s"] / jax_row["step_s"])
  ref = res["torch_ref"]
  assert ref["threads"] == 1 and ref["args"]["batch"] == 1 and ref["args"]["size"] == 65
  assert sorted(ref["logit_sizes"]) == sorted(jax_row["logit_sizes"] + [jax_row["logit_sizes"][0]])
