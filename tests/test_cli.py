"""The command line as users meet it: config errors, and the VOC path end to end."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import voc as voc_config
from cpal_jax import stages as cli
from cpal_jax.data.voc import VOC_CLASSES
from test_voc import FIXTURE, voc_palette, write_xml

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, "-m", "cpal_jax.main", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def test_unknown_config_key_is_an_error(tmp_path):
  r = run_cli(f"--workdir={tmp_path}", "--config.train.bogus_key=3")
  assert r.returncode != 0
  assert "bogus_key" in r.stderr
  assert not os.listdir(tmp_path)  # nothing was started


def test_config_variants_derive_from_their_file():
  """configs/<file>.py:<variant> as ml_collections passes it: the variant changes only its keys."""
  import coco as coco_config
  import synthetic as synthetic_config

  voc, voc_seg = voc_config.get_config(), voc_config.get_config("seg")
  assert voc_seg.stages == "train_seg,eval_seg" and voc.stages.startswith("train_cam")
  assert voc_seg.data == voc.data and voc_seg.seg.eval.pad_multiple == 513
  assert coco_config.get_config("seg").seg.num_steps == 100000
  scratch = synthetic_config.get_config("scratch")
  assert scratch.model.batch_norm == "train" and not scratch.model.pretrained
  assert synthetic_config.get_config().model.batch_norm == "frozen"
  for module, name in ((voc_config, "voc"), (synthetic_config, "synthetic")):
    with pytest.raises(ValueError, match=f"configs/{name}.py:bogus: no such variant"):
      module.get_config("bogus")


def test_wrong_type_is_an_error(tmp_path):
  r = run_cli(f"--workdir={tmp_path}", "--config.train.batch_size=sixteen")
  assert r.returncode != 0
  assert "batch_size" in r.stderr


def test_unknown_stage_is_an_error(tmp_path):
  r = run_cli(f"--workdir={tmp_path}", "--config.stages=train_cam,make_coffee")
  assert r.returncode != 0
  assert "make_coffee" in r.stderr


def small_voc_config(root, **overrides):
  c = voc_config.get_config()
  c.data.root = str(root)
  c.data.workers = 0
  c.model.backbone = "resnet_tiny"
  c.train.batch_size = 4
  c.train.num_steps = 2
  c.train.crop_size = 64
  c.train.resize_long = (48, 80)
  c.eval.batch_size = 4
  c.eval.pad_multiple = 32
  c.mesh.data = 1
  # The CAM stages and a seed export; refinement and segmentation have their own tests.
  c.stages = "train_cam,make_cam,eval_cam,export"
  c.cam.scales = (1.0, 0.5)
  c.export.source = "seed"
  c.report.enabled = False
  for k, v in overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  return c


def write_voc_tree(root: Path, n: int = 12):
  """A VOC2012-layout tree: JPEGs of coloured boxes, palette masks with the 255 band, XML, splits."""
  for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
    (root / d).mkdir(parents=True)
  rng = np.random.default_rng(0)
  ids = []
  for i in range(n):
    image_id = f"2007_{i:06d}"
    h, w = rng.integers(48, 90, size=2)
    img = np.full((h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), np.uint8)
    classes = rng.choice(np.arange(1, 21), size=rng.integers(1, 3), replace=False)
    for k, c in enumerate(classes):
      y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
      img[y : y + h // 2, x : x + w // 2] = (c * 12, 255 - c * 12, (c * 40) % 256)
      mask[y : y + h // 2, x : x + w // 2] = c
      mask[y, x : x + w // 2] = 255
    present = [int(c) for c in np.unique(mask) if c not in (0, 255)]
    Image.fromarray(img).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    png = Image.fromarray(mask)
    png.putpalette(voc_palette())
    png.save(root / "SegmentationClass" / f"{image_id}.png")
    write_xml(
        root / "Annotations" / f"{image_id}.xml",
        f"{image_id}.jpg",
        (h, w),
        [(VOC_CLASSES[c], 0) for c in present],
    )
    ids.append(image_id)
  (root / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:8]) + "\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[8:]) + "\n")
  # IRN-style list for the CAM training split (train_aug in the paper).
  (root / "train_aug.txt").write_text(
      "".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids)
  )
  return root


def test_voc_layout_end_to_end(tmp_path):
  root = write_voc_tree(tmp_path / "VOCdevkit" / "VOC2012")
  config = small_voc_config(root, **{"data.train_split": str(root / "train_aug.txt")})
  summary = cli.run(config, str(tmp_path / "run"))
  assert np.isfinite(summary["seed_miou"])
  assert summary["train_cam"]["steps"] == 2
  assert summary["eval_cam"]["images"] == 8 and summary["eval_cam"]["split"] == "train"
  assert set(summary["per_class_iou"]["seed"]) == set(VOC_CLASSES)
  assert np.isfinite(summary["mask_miou"]) and len(os.listdir(tmp_path / "run" / "masks")) == 12 + 1


def test_real_voc_sample_end_to_end(tmp_path):
  config = small_voc_config(
      FIXTURE, **{"data.train_split": "train", "data.eval_split": "val", "cam.split": "val"}
  )
  summary = cli.run(config, str(tmp_path / "run"))
  assert np.isfinite(summary["seed_miou"]) and summary["eval_cam"]["images"] == 10


def test_missing_voc_root_names_the_key(tmp_path):
  config = small_voc_config(tmp_path / "nowhere")
  with pytest.raises((FileNotFoundError, ValueError), match="nowhere"):
    cli.run(config, str(tmp_path / "run"))


def test_user_errors_are_one_line_without_traceback(tmp_path):
  r = run_cli(f"--workdir={tmp_path}", "--config.stages=train_cam,bogus")
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr
  (line,) = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert "config.stages" in line and "bogus" in line
  debug = run_cli(f"--workdir={tmp_path}", "--config.stages=bogus", "--config.debug=True")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_empty_workdir_flag_is_refused(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "cpal_jax.main", "--workdir="],
      cwd=tmp_path,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)},
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert r.returncode != 0 and "--workdir is empty" in r.stderr
  assert not os.listdir(tmp_path)


def test_config_file_and_variant_errors_are_one_line(tmp_path):
  for value, says in (("synthetic:bogus", "no variant 'bogus'; this file has :scratch, :smoke"),
                      ("nothere.py", "no such config file; a path, or one of coco, pretrain, synthetic, voc")):
    r = run_cli(f"--workdir={tmp_path}", f"--config={value}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert says in line
  assert not os.listdir(tmp_path)
