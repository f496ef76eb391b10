"""The path a user with VOCdevkit and a torchvision ResNet-50 checkpoint follows in README, on the
20 real VOC images: convert the checkpoint with the command line, then run configs/voc.py (the
paper's recipe, only shrunk in steps and crop size) with it as model.pretrained through
`python -m cpal_jax.main` -- CAM training from the converted weights, multi-scale CAMs, seed
scoring, the CRF refinement and palette-PNG export."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from test_convert_weights import TorchResNet
from test_voc import FIXTURE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, **kw):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  return subprocess.run(
      [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, **kw
  )


@pytest.mark.slow
def test_converted_resnet50_runs_the_voc_recipe_on_real_images(tmp_path):
  torch.manual_seed(0)
  torch.save(TorchResNet().state_dict(), tmp_path / "resnet50-0676ba61.pth")
  weights = tmp_path / "weights" / "resnet50.npz"
  r = run(["cpal_jax.convert_weights", f"--src={tmp_path / 'resnet50-0676ba61.pth'}", f"--dst={weights}"])
  assert r.returncode == 0, r.stderr[-3000:]

  workdir = tmp_path / "run"
  r = run(
      [
          "cpal_jax.main",
          "--config=configs/voc.py",
          f"--config.data.root={FIXTURE}",
          f"--config.model.pretrained={weights}",
          f"--workdir={workdir}",
          # The sample has no SBD: train on its train list, score seeds and masks on val.
          "--config.data.train_split=train",
          "--config.data.eval_split=val",
          "--config.cam.split=val",
          "--config.data.workers=0",
          "--config.train.batch_size=2",
          "--config.train.num_steps=2",
          "--config.train.crop_size=64",
          "--config.train.resize_long=(48,80)",
          "--config.cam.scales=(0.25,)",
          "--config.cam.batch_size=2",
          "--config.refine.mode=crf",
          "--config.refine.workers=1",
          "--config.mesh.data=1",
          "--config.report.enabled=False",
          "--config.stages=train_cam,make_cam,eval_cam,refine,export",
      ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(weights) as f:
    num_tensors = len(f.files)
  assert f"loaded {num_tensors} backbone tensors from {weights}" in r.stderr  # every converted tensor was used
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["train_cam"]["steps"] == 2
  for key in ("seed_miou", "crf_miou", "mask_miou"):
    assert np.isfinite(summary[key]) and 0 <= summary[key] <= 100, key
  masks = sorted(p for p in (workdir / "masks").iterdir() if p.suffix == ".png")
  assert len(masks) == 10
  with Image.open(masks[0]) as im:
    assert im.mode == "P"
    with Image.open(FIXTURE / "JPEGImages" / f"{masks[0].stem}.jpg") as src:
      assert im.size == src.size
