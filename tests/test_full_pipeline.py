"""Every stage through `main.run` on a tiny synthetic workdir: all summary keys present and finite,
summary.md with a row per stage, the report's figures, and the PNG masks on disk."""

import math
import os

import pytest

from cpal_jax import paths
from cpal_jax import stages as cli
from cpal_jax.data import palette
from test_train import tiny_config


@pytest.mark.slow
def test_all_stages_fill_every_summary_key(tmp_path):
  config = tiny_config(
      **{
          "train.num_steps": 4,
          "stages": ",".join(cli.STAGES),
          "cam.scales": (1.0, 0.5),
          "refine.workers": 2,
          "refine.irn.crop_size": 64,
          "refine.irn.batch_size": 8,
          "refine.irn.num_steps": 3,
          "seg.crop_size": 64,
          "seg.batch_size": 8,
          "seg.num_steps": 3,
          "seg.eval.scales": (1.0,),
          "report.enabled": True,
      }
  )
  workdir = str(tmp_path)
  summary = cli.run(config, workdir)
  for key in ("seed_miou", "crf_miou", "mask_miou", "seg_val_miou"):
    assert summary[key] is not None and math.isfinite(summary[key]) and 0 <= summary[key] <= 100, key
  assert set(summary["stage_seconds"]) == set(cli.STAGES)
  # The synthetic default starts DeepLab from the committed pretrained backbone.
  assert summary["train_seg"]["init"] == summary["eval_seg"]["init"] == config.seg.pretrained
  assert config.seg.pretrained.endswith("procnet_resnet_tiny.npz")
  assert {"seed", "crf", "mask", "seg"} <= set(summary["per_class_iou"])
  with open(os.path.join(workdir, "summary.md")) as f:
    md = f.read()
  for stage in cli.STAGES:
    assert f"`{stage}`" in md
  assert "report/grid.png" in md and os.path.exists(os.path.join(workdir, "report", "grid.png"))
  masks = [f for f in os.listdir(paths.masks(workdir)) if f.endswith(".png")]
  assert len(masks) == config.data.num_train
  assert palette.load_label_png(os.path.join(paths.masks(workdir), masks[0])).shape == (64, 64)
