"""export: palette PNGs (indices, colours, size), the seed convention, scoring, and resume after a
crash mid-way to byte-identical files."""

import os

import numpy as np
import pytest
from PIL import Image

from cpal_jax import paths, run_record
from cpal_jax.data import palette, pipeline
from cpal_jax.infer import cam as infer_cam
from cpal_jax.infer import export
from test_train import tiny_config


def test_label_png_round_trip_keeps_indices_palette_and_size(tmp_path):
  labels = np.random.default_rng(0).integers(0, 21, (37, 53)).astype(np.uint8)
  labels[0, :5] = 255
  path = str(tmp_path / "a.png")
  palette.save_label_png(path, labels)
  with Image.open(path) as im:
    assert im.mode == "P" and im.size == (53, 37)
    pal = np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)
  np.testing.assert_array_equal(pal[:256], palette.voc_colormap())
  np.testing.assert_array_equal(palette.load_label_png(path), labels)
  assert tuple(pal[15]) == (192, 128, 128)  # VOC "person": not black in a viewer
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_unreadable_label_png_names_the_file(tmp_path):
  bad = tmp_path / "x.png"
  bad.write_bytes(b"\x89PNG broken")
  with pytest.raises(ValueError, match="x.png.*delete it"):
    palette.load_label_png(str(bad))


def test_seed_labels_follow_the_eval_convention():
  scores = np.array([[[0.1, 0.5]], [[0.3, 0.2]]], np.float32)  # 2 channels, 1x2 image
  fg = {"keys": np.array([3, 7]), "high_res": scores}
  np.testing.assert_array_equal(export.seed_labels(fg, 0.25), [[7, 3]])
  np.testing.assert_array_equal(export.seed_labels(fg, 0.4), [[0, 3]])
  with_bg = {"keys": np.array([0, 7]), "high_res": scores}
  np.testing.assert_array_equal(export.seed_labels(with_bg, 0.9), [[7, 0]])


def write_gt_maps(config, workdir, noise=0.0, seed=0):
  """make_cam files whose maps are the ground truth (plus noise): a stand-in for a trained net."""
  rng = np.random.default_rng(seed)
  source = pipeline.make_source(config, config.data.train_split, with_mask=True)
  os.makedirs(paths.cam_maps(workdir), exist_ok=True)
  for i in range(len(source)):
    el = source[i]
    keys = infer_cam.channel_keys(el["label"], True)
    hot = (el["mask"][None] == keys[:, None, None]).astype(np.float32)
    hot = np.clip(hot + noise * rng.random(hot.shape, np.float32), 0, None)
    h, w = el["mask"].shape
    small = hot[:, ::4, ::4][:, : -(-h // 4), : -(-w // 4)]
    infer_cam.write_maps(paths.cam_map(workdir, el["id"]), keys, hot, small, False)
  return source


def test_export_from_perfect_seeds_scores_100_and_resumes_identically(tmp_path, monkeypatch):
  config = tiny_config(**{"export.source": "seed"})
  straight, crashed = str(tmp_path / "a"), str(tmp_path / "b")
  source = write_gt_maps(config, straight)
  write_gt_maps(config, crashed)
  out = export.run(config, straight)
  assert out["mask_miou"] == 100.0 and out["export"]["written"] == len(source)
  assert run_record.read(straight)["mask_miou"] is None  # run() returns; main merges

  real_save, calls = palette.save_label_png, []

  def dying_save(path, labels, palette=True):
    if len(calls) == 5:
      raise KeyboardInterrupt  # a kill mid-export
    calls.append(path)
    real_save(path, labels, palette)

  monkeypatch.setattr(export.palette, "save_label_png", dying_save)
  with pytest.raises(KeyboardInterrupt):
    export.run(config, crashed)
  monkeypatch.setattr(export.palette, "save_label_png", real_save)
  assert len(os.listdir(paths.masks(crashed))) == 5
  again = export.run(config, crashed)
  assert again["export"]["written"] == len(source) - 5
  for image_id in source.ids():
    with open(os.path.join(paths.masks(straight), f"{image_id}.png"), "rb") as f1:
      with open(os.path.join(paths.masks(crashed), f"{image_id}.png"), "rb") as f2:
        assert f1.read() == f2.read()
  assert os.path.exists(os.path.join(paths.masks(crashed), "eval.json"))


def test_export_without_refined_masks_says_which_stage_to_run(tmp_path):
  config = tiny_config()
  write_gt_maps(config, str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run the refine stage first"):
    export.run(config, str(tmp_path))
