"""tfds_pack: a tiny real VOC tree packed into ArrayRecord shards reads back identical to VOCSource.

tensorflow-datasets is an optional extra for users (requirements-tfds.txt) and a dev dependency
(requirements-dev.txt includes it), so every test here runs in CI; the missing-import error is
tested by hiding the module.
"""

import importlib.util
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from cpal_jax.data import pipeline, tfds_pack, tfds_source
from cpal_jax.data.voc import VOC_CLASSES, VOCSource

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "data" / "voc2012_sample"  # 20 real VOC 2012 images
TRAIN = ["2007_004166", "2007_000648", "2007_009630"]
VAL = ["2007_004712", "2007_001763"]
GRAY = "2099_000001"  # a generated gray JPEG with a gray (mode L) mask, listed in train


def voc_config(root):
  spec = importlib.util.spec_from_file_location("voc_config_for_tfds_test", REPO / "configs" / "voc.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.root = str(root)
  c.data.workers = 0
  return c


def build_tree(root: Path) -> Path:
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    (root / d).mkdir(parents=True)
  for i in TRAIN + VAL:
    shutil.copy(FIXTURE / "JPEGImages" / f"{i}.jpg", root / "JPEGImages")
    shutil.copy(FIXTURE / "SegmentationClass" / f"{i}.png", root / "SegmentationClass")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (37, 53), dtype=np.uint8)).save(root / "JPEGImages" / f"{GRAY}.jpg")
  mask = np.zeros((37, 53), np.uint8)
  mask[10:20, 5:30] = VOC_CLASSES.index("cat")
  mask[3:5] = 255
  Image.fromarray(mask).save(root / "SegmentationClass" / f"{GRAY}.png")
  table = json.loads((FIXTURE / "cls_labels.json").read_text())
  labels = {i: table[i] for i in TRAIN + VAL}
  labels[GRAY] = [1.0 if c == "cat" else 0.0 for c in VOC_CLASSES[1:]]
  (root / "cls_labels.json").write_text(json.dumps(labels))
  lists = root / "ImageSets/Segmentation"
  (lists / "train.txt").write_text("\n".join(TRAIN + [GRAY]) + "\n")
  (lists / "val.txt").write_text("\n".join(VAL) + "\n")
  (lists / "train_aug.txt").write_text("\n".join(VAL + TRAIN + [GRAY]) + "\n")
  return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  """(config, out, stats): train_aug (no masks), train and val (masks) packed once."""
  base = tmp_path_factory.mktemp("tfds")
  config = voc_config(build_tree(base / "VOC2012"))
  out = base / "tfds"
  stats = tfds_pack.pack(config, ["train_aug", "train", "val"], str(out))
  return config, out, stats


def assert_same(ref, got, with_mask):
  assert len(got) == len(ref) and got.ids() == ref.ids()
  assert got.num_classes == ref.num_classes and tuple(got.class_names) == tuple(ref.class_names)
  for i in range(len(ref)):
    a, b = ref[i], got[i]
    assert set(b) == set(a) == ({"id", "image", "label", "mask"} if with_mask else {"id", "image", "label"})
    assert b["id"] == a["id"] and isinstance(b["id"], str)
    assert b["image"].dtype == np.uint8 and b["image"].shape == a["image"].shape
    np.testing.assert_array_equal(b["image"], a["image"])  # original JPEG bytes: pixel-identical
    assert b["label"].dtype == np.float32
    np.testing.assert_array_equal(b["label"], a["label"])
    if with_mask:
      assert b["mask"].dtype == np.uint8
      np.testing.assert_array_equal(b["mask"], a["mask"])


@pytest.mark.parametrize("split,with_mask", [("train_aug", False), ("train", True), ("val", True)])
def test_packed_split_equals_the_tree(packed, split, with_mask):
  config, out, stats = packed
  assert stats["splits"][split]["has_mask"] == with_mask
  assert stats["splits"][split]["original_images"] == stats["splits"][split]["num_examples"]
  ref = VOCSource(config.data.root, split, mask_dir="SegmentationClass", with_mask=with_mask)
  got = tfds_source.TFDSSource(str(out), "cpal_voc", split, with_mask=with_mask)
  assert_same(ref, got, with_mask)
  if with_mask:  # the mask-less reading of a split with masks
    assert_same(VOCSource(config.data.root, split), tfds_source.TFDSSource(str(out), "cpal_voc", split), False)


def test_make_source_reads_the_packed_dataset(packed):
  config, out, _ = packed
  c = config.copy_and_resolve_references()
  c.data.tfds_dir = str(out)
  c.data.root = "/nonexistent"  # the tree is not read
  src = pipeline.make_source(c, "val", with_mask=True)
  assert isinstance(src, tfds_source.TFDSSource)
  assert_same(pipeline.make_source(config, "val", with_mask=True), src, True)
  # A split given as a list path is found under the list's stem.
  by_path = pipeline.make_source(c, str(Path(config.data.root) / "ImageSets/Segmentation/train_aug.txt"))
  assert by_path.ids() == VAL + TRAIN + [GRAY]
  with pytest.raises(ValueError, match="packed without masks"):
    pipeline.make_source(c, "train_aug", with_mask=True)
  with pytest.raises(ValueError, match=r"holds \['train', 'train_aug', 'val'\]"):
    pipeline.make_source(c, "trainval")
  c.data.num_classes = 81
  with pytest.raises(ValueError, match="num_classes=21"):
    pipeline.make_source(c, "val")
  c.data.num_classes = 21
  c.data.tfds_name = "cpal_other"
  with pytest.raises(FileNotFoundError, match=r"no packed dataset cpal_other .*\['cpal_voc'\]"):
    pipeline.make_source(c, "val")


def test_grain_batches_and_pickle(packed):
  config, out, _ = packed
  src = tfds_source.TFDSSource(str(out), "cpal_voc", "train_aug")
  labels = list(grain.MapDataset.source(src).map(lambda e: e["label"]).batch(3))
  assert [b.shape for b in labels] == [(3, 20), (3, 20)]
  np.testing.assert_array_equal(np.concatenate(labels), np.stack([src[i]["label"] for i in range(6)]))
  # The training pipeline (shuffle, augment, batch) over it.
  c = config.copy_and_resolve_references()
  c.train.crop_size, c.train.resize_long, c.train.batch_size, c.train.epochs = 32, (40, 48), 2, 1
  schedule = pipeline.make_schedule(c.train, len(src))
  batches = list(pipeline.train_iterator(c, src, schedule))
  assert len(batches) == 3 and batches[0]["image"].shape == (2, 32, 32, 3)
  assert batches[0]["image"].dtype == np.uint8
  # Worker processes get a pickled copy that reopens the shards.
  again = pickle.loads(pickle.dumps(src))
  assert again._ds is None and again.ids() == src.ids()
  np.testing.assert_array_equal(again[-1]["image"], src[len(src) - 1]["image"])
  with pytest.raises(IndexError):
    src[len(src)]


def test_png_images_are_lossless_and_rebuild_needs_overwrite(packed, tmp_path):
  config, out, stats = packed
  with pytest.raises(FileExistsError, match="--overwrite"):
    tfds_pack.pack(config, ["val"], str(out))
  png = tfds_pack.pack(config, ["val"], str(tmp_path), image_format="png", workers=1)
  assert png["splits"]["val"]["original_images"] == 0
  assert_same(
      tfds_source.TFDSSource(str(out), "cpal_voc", "val", with_mask=True),
      tfds_source.TFDSSource(str(tmp_path), "cpal_voc", "val", with_mask=True),
      True,
  )
  assert png["bytes_per_image"] > stats["bytes_per_image"]  # PNG costs more than the JPEGs
  again = tfds_pack.pack(config, ["train"], str(tmp_path), overwrite=True)
  assert list(again["splits"]) == ["train"]


def test_cli(packed, tmp_path):
  config, _, _ = packed
  out = tmp_path / "cli"
  cmd = [
      sys.executable,
      "-m",
      "cpal_jax.data.tfds_pack",
      f"--config={REPO / 'configs' / 'voc.py'}",
      f"--config.data.root={config.data.root}",
      "--splits=val",
      f"--out={out}",
  ]
  res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "val: 2 images, masks=True" in res.stdout and f"--config.data.tfds_dir={out}" in res.stdout
  assert tfds_source.TFDSSource(str(out), "cpal_voc", "val", with_mask=True).ids() == VAL


def test_coco_tree_round_trip(tmp_path):
  from test_coco import TRAIN as COCO_TRAIN, VAL as COCO_VAL, write_split  # CMYK and gray JPEGs

  root = tmp_path / "coco"
  write_split(root, "train2014", COCO_TRAIN)
  write_split(root, "val2014", COCO_VAL)
  spec = importlib.util.spec_from_file_location("coco_config_for_tfds_test", REPO / "configs" / "coco.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.data.root, c.data.num_classes, c.data.workers = str(root), 4, 0
  stats = tfds_pack.pack(c, ["train2014", "val2014"], str(tmp_path / "tfds"))
  assert stats["name"] == "cpal_coco" and stats["splits"]["train2014"]["has_mask"]  # eval_split
  c2 = c.copy_and_resolve_references()
  c2.data.tfds_dir = str(tmp_path / "tfds")
  for split in ("train2014", "val2014"):
    got = pipeline.make_source(c2, split, with_mask=True)
    assert isinstance(got, tfds_source.TFDSSource)
    assert got.class_names == ("background", "person", "car", "toothbrush")
    assert_same(pipeline.make_source(c, split, with_mask=True), got, True)


def test_missing_tfds_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
  hint = r"pip install tensorflow-datasets==4\.9\.10 \(the optional extra; TensorFlow is not needed\)"
  with pytest.raises(ImportError, match=hint):
    tfds_source.TFDSSource(str(tmp_path), "cpal_voc", "val")
  config = voc_config(tmp_path)
  with pytest.raises(ImportError, match=hint):
    tfds_pack.pack(config, ["val"], str(tmp_path / "out"))
  config.data.tfds_dir = str(tmp_path)
  with pytest.raises(ImportError, match=hint):
    pipeline.make_source(config, "val")
