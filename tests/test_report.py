"""The visual report: figures from a tiny CPAL workdir, columns and figures skipped when their inputs
are missing, and a workdir with only summary.json."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from cpal_jax import paths, report, run_record
from cpal_jax.data import palette, pipeline
from cpal_jax.eval import seed as seed_eval
from cpal_jax.infer import cam as infer_cam
from cpal_jax.infer import export
from cpal_jax.train import cam as cam_stage
from test_train import tiny_config

NUM_IMAGES = 4


def report_config(**overrides):
  # Four steps of 8 images; k-means after step 2 (cold start "steps") gives the classes seen in
  # steps 1-2 context prototypes, so the prototype figure has something to show.
  cpal = {
      "method.name": "cpal",
      "method.cpal.capacity": 16,
      "method.cpal.num_clusters": 4,
      "method.cpal.top_k": 2,
      "method.cpal.cold_start": "steps",
      "method.cpal.recluster_steps": 2,
      "train.num_steps": 4,
      # Maps of the scored images only, at one scale: the report needs no more.
      "cam.scales": (1.0,),
      "cam.split": "train_eval",
      "export.source": "seed",
  }
  c = tiny_config(**{**cpal, **overrides})
  c.report.num_images = NUM_IMAGES
  return c


@pytest.fixture(scope="module")
def cpal_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("report_cpal"))
  config = report_config()
  # What main.run does for stages "train_cam,make_cam,eval_cam,export", stage by stage: the report's
  # test need not depend on the imports of stages it does not use (refine).
  for stage in (cam_stage.train, infer_cam.run, seed_eval.evaluate, export.run):
    run_record.update(workdir, **stage(config, workdir))
  return config, workdir


def png_size(workdir, rel):
  path = os.path.join(workdir, rel)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(path) as im:
    pixels = np.asarray(im.convert("RGB"))
  assert pixels.std() > 5, f"{rel} is blank"
  return im.size  # (width, height)


def test_cpal_workdir_gives_grid_bars_and_prototypes(cpal_workdir):
  config, workdir = cpal_workdir
  ready = run_record.read(workdir)["train_cam"]["bank/ready_classes"]
  assert ready > 0, "the fixture needs classes with context prototypes"

  figures = report.write_report(config, workdir)
  # PACAM seeds carry their own background: no threshold sweep.
  assert set(figures) == {"grid", "per_class_iou", "prototypes"}
  for name, rel in figures.items():
    assert rel == os.path.join("report", f"{name}.png")
  assert not [f for f in os.listdir(paths.report(workdir)) if f.startswith(".tmp")]

  # input | CAM | PACAM | pseudo mask | ground truth (no seg/pred in this workdir): 5 columns of
  # about CELL_INCHES * DPI pixels, one row per image.
  w, h = png_size(workdir, figures["grid"])
  cell = report.CELL_INCHES * report.DPI
  assert 4.5 * cell < w < 5.5 * cell and NUM_IMAGES * cell < h < (NUM_IMAGES + 2) * cell
  w, h = png_size(workdir, figures["prototypes"])
  assert w > 4 * cell and h > cell
  w, h = png_size(workdir, figures["per_class_iou"])
  assert w > 400 and h > 300


def column_titles(fig, views):
  cols = len(fig.axes) // len(views)
  return [ax.get_title() for ax in fig.axes[:cols]]


def test_segmentation_column_once_predictions_exist(cpal_workdir):
  config, workdir = cpal_workdir
  seg = paths.seg_pred(workdir)
  source = pipeline.make_source(config, config.data.eval_split, with_mask=True)
  os.makedirs(seg)
  try:
    for i in range(NUM_IMAGES - 1):  # one image without a prediction: a "missing" cell
      el = source[i]
      palette.save_label_png(os.path.join(seg, f"{el['id']}.png"), el["mask"])
    views, net = report._load_views(config, workdir, config.data.eval_split, with_net=True)
  finally:
    shutil.rmtree(seg)
  assert [v.seg is not None for v in views] == [True] * (NUM_IMAGES - 1) + [False]
  np.testing.assert_array_equal(views[0].seg, source[0]["mask"])
  with_seg = report._grid_figure(config, views)
  assert column_titles(with_seg, views) == [
      "input",
      "CAM (1 scale)",
      "PACAM seed",
      "pseudo mask",
      "segmentation",
      "ground truth",
  ]
  for v in views:
    v.seg = None
  assert "segmentation" not in column_titles(report._grid_figure(config, views), views)

  # The prototype maps of the same images.
  assert all(v.cam is not None and v.seed is not None and v.mask is not None for v in views)
  rows = report._prototype_rows(config, views, net)
  assert rows
  for row in rows:
    valid = np.flatnonzero(net.center_valid[row.cls - 1])
    assert net.ready[row.cls - 1] and row.view.label[row.cls - 1]
    inside = row.nearest[row.region]
    assert set(np.unique(inside)) <= set(valid.tolist())  # every region pixel gets a real prototype
    assert (row.nearest[~row.region] == -1).all()
    assert 1 <= len(row.top) <= min(report.PROTO_TOP, len(valid))
    cos = [c for _, c, _ in row.top]
    assert cos == sorted(cos, reverse=True)  # Eq. 6's ranking
    for _, _, response in row.top:
      assert response.shape == row.view.image.shape[:2] and response.min() >= 0 and response.max() <= 1 + 1e-5


def test_summary_only_workdir_gives_bars(tmp_path):
  workdir = str(tmp_path)
  summary = {
      "seed_miou": 40.0,
      "mask_miou": 50.0,
      "per_class_iou": {
          "seed": {"background": 70.0, "boat": 30.0, "train": None},
          "mask": {"background": 75.0, "boat": 35.0, "train": 20.0},
      },
  }
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  config = report_config()
  assert report.write_report(config, workdir) == {
      "per_class_iou": os.path.join("report", "per_class_iou.png")
  }
  png_size(workdir, "report/per_class_iou.png")

  # A foreground-only seed map's threshold sweep is drawn where eval_cam recorded one.
  summary.update(
      seed_sweep=list(np.linspace(10, 40, 60) - np.linspace(0, 20, 60) ** 1.5 / 5),
      thresholds={"seed": 0.3},
      baselines={"all_background": 12.0, "label_fill": 18.0},
  )
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  figures = report.write_report(config, workdir)
  assert set(figures) == {"per_class_iou", "threshold_sweep"}
  png_size(workdir, figures["threshold_sweep"])

  # eval_seg's predictions of data.val_split get their own grid: input | segmentation | ground truth.
  source = pipeline.make_source(config, config.data.val_split, with_mask=True)
  os.makedirs(paths.seg_pred(workdir))
  for i in range(2):
    el = source[i]
    palette.save_label_png(os.path.join(paths.seg_pred(workdir), f"{el['id']}.png"), el["mask"])
  figures = report.write_report(config, workdir)
  assert set(figures) == {"per_class_iou", "threshold_sweep", "seg_grid"}
  w, h = png_size(workdir, figures["seg_grid"])
  cell = report.CELL_INCHES * report.DPI
  assert 2.5 * cell < w < 3.5 * cell and NUM_IMAGES * cell < h  # rows without a prediction say "missing"


def test_empty_workdir_writes_nothing(tmp_path):
  assert report.write_report(report_config(), str(tmp_path)) == {}
  assert not os.path.exists(paths.report(str(tmp_path)))


def test_summary_rows_show_the_seg_crf_figure_with_the_stage_time_once():
  summary = {
      "seed_miou": 48.7,
      "mask_miou": 55.2,
      "seg_val_miou": 45.9,
      "seg_val_miou_crf": 51.8,
      "stage_seconds": {"eval_cam": 1.5, "export": 6.7, "eval_seg": 36.0},
  }
  md = run_record.markdown(summary)
  assert "| `eval_seg` | Segmentation (val) | 45.90 | 36.0 |" in md
  assert "| `eval_seg` | Segmentation (val) w/ CRF | 51.80 | - |" in md
  assert "`refine`" not in md and "`train_seg`" not in md  # stages that did not run
  assert "    w/ CRF       51.80" in run_record.digest(summary)
  del summary["seg_val_miou_crf"]
  assert "w/ CRF" not in run_record.markdown(summary) and "w/ CRF" not in run_record.digest(summary)
