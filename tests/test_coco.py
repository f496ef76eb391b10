"""COCOSource on generated COCO-layout trees: labels, category mapping, mask rasterisation (polygons,
uncompressed and compressed RLE, crowd, paint order), precomputed PNG masks, id lists, errors, and
the source through pipeline.make_source / eval_batches."""

import json
import logging
import pickle

import numpy as np
import pytest
from PIL import Image

import coco as coco_config  # configs/coco.py (conftest puts configs/ on sys.path)
from cpal_jax.data import coco, pipeline
from cpal_jax.data.coco import COCOSource

PERSON, CAR, BRUSH = 1, 2, 3  # class indices of category ids 1, 3 and 90


# --------------------------------------------------------------------------- test-side encoders
def rle_encode(mask) -> list[int]:
  """Run lengths of a bool mask in column-major order, zeros first (COCO's uncompressed RLE)."""
  flat = np.asarray(mask, bool).T.reshape(-1)
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  runs = np.diff(bounds).tolist()
  return ([0] + runs) if flat.size and flat[0] else runs


def rle_string(counts) -> str:
  """COCO's compressed form of run lengths (pycocotools' rleToString, written from its spec)."""
  out = []
  for i, c in enumerate(counts):
    x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
    more = True
    while more:
      ch = x & 0x1F
      x >>= 5
      more = (x != -1) if ch & 0x10 else (x != 0)
      out.append(chr((ch | 0x20 if more else ch) + 48))
  return "".join(out)


def rect(x0, y0, x1, y1):
  return [x0, y0, x1, y0, x1, y1, x0, y1]


def disc(h, w, cy, cx, r):
  yy, xx = np.mgrid[:h, :w]
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# --------------------------------------------------------------------------- the tiny tree
DISC = disc(32, 32, 14, 15, 9)
TOP = np.zeros((20, 20), bool)
TOP[:10] = True
CROWD = np.zeros((30, 50), bool)
CROWD[5:25, 10:40] = True

# image id -> (h, w, PIL mode, [(category id, iscrowd, area, segmentation)])
TRAIN = {
    77: (20, 20, "RGB", [(3, 1, 200.0, {"size": [20, 20], "counts": rle_string(rle_encode(TOP))})]),
    9: (40, 60, "RGB", [(1, 0, 100.0, [rect(20, 10, 30, 20)]), (3, 0, 1200.0, [rect(5, 4, 45, 34)])]),
    42: (16, 16, "RGB", []),
    30: (
        32,
        32,
        "CMYK",
        [
            (1, 0, 32.0, [rect(2, 2, 6, 6), rect(25, 25, 29, 29)]),
            (3, 0, float(DISC.sum()), {"size": [32, 32], "counts": rle_string(rle_encode(DISC))}),
        ],
    ),
    25: (
        30,
        50,
        "L",
        [
            (90, 1, 600.0, {"size": [30, 50], "counts": rle_encode(CROWD)}),
            (1, 0, 100.0, [rect(15, 8, 25, 18)]),
        ],
    ),
}
VAL = {5: (24, 24, "RGB", [(1, 0, 64.0, [rect(4, 4, 12, 12)])]), 6: (24, 24, "RGB", [])}


def expected_mask(image_id):
  if image_id == 9:
    m = np.zeros((40, 60), np.uint8)
    m[4:34, 5:45] = CAR
    m[10:20, 20:30] = PERSON  # the smaller person is painted last although listed first
    return m
  if image_id == 25:
    m = np.zeros((30, 50), np.uint8)
    m[CROWD] = 255
    m[8:18, 15:25] = PERSON  # a known instance inside a crowd region keeps its class
    return m
  if image_id == 30:
    m = np.zeros((32, 32), np.uint8)
    m[DISC] = CAR
    m[2:6, 2:6] = m[25:29, 25:29] = PERSON
    return m
  if image_id == 77:
    return np.where(TOP, 255, 0).astype(np.uint8)
  raise KeyError(image_id)


def stem(subset, image_id):
  return f"COCO_{subset}_{image_id:012d}"


def write_split(root, subset, images, categories=None):
  (root / subset).mkdir(parents=True)
  rng = np.random.default_rng(0)
  entries, anns = [], []
  for image_id, (h, w, mode, objects) in images.items():
    name = f"{stem(subset, image_id)}.jpg"
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(root / subset / name)
    entries.append(
        {"id": image_id, "file_name": name, "height": h, "width": w, "license": 1, "coco_url": "x"}
    )
    for cat, crowd, area, seg in objects:
      anns.append(
          {
              "id": 1000 + len(anns),
              "image_id": image_id,
              "category_id": cat,
              "iscrowd": crowd,
              "area": area,
              "bbox": [0, 0, 1, 1],
              "segmentation": seg,
          }
      )
  if categories is None:
    categories = [
        {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 3, "name": "car", "supercategory": "vehicle"},
    ]
  doc = {
      "info": {"year": 2014},
      "licenses": [],
      "images": entries,
      "annotations": anns,
      "categories": categories,
  }
  (root / "annotations").mkdir(exist_ok=True)
  (root / "annotations" / f"instances_{subset}.json").write_text(json.dumps(doc))


@pytest.fixture
def tiny_coco(tmp_path):
  root = tmp_path / "coco"
  write_split(root, "train2014", TRAIN)
  write_split(root, "val2014", VAL)
  return root


def multi_hot(*classes):
  v = np.zeros(3, np.float32)
  for c in classes:
    v[c - 1] = 1
  return v


# --------------------------------------------------------------------------- decoding
def test_compressed_rle_matches_pycocotools_strings():
  # Produced by pycocotools 2.0 (mask.encode) on a 7x5 mask; a vector independent of this file's encoder.
  m = np.zeros((7, 5), bool)
  m[1:4, 1:3] = True
  m[5, 4] = True
  assert rle_string(rle_encode(m)) == "8340;NB"
  np.testing.assert_array_equal(coco.segmentation_to_mask({"size": [7, 5], "counts": "8340;NB"}, 7, 5), m)
  np.testing.assert_array_equal(coco.segmentation_to_mask({"size": [7, 5], "counts": b"8340;NB"}, 7, 5), m)


def test_rle_round_trip_on_random_masks():
  rng = np.random.default_rng(1)
  for k in range(60):
    h, w = int(rng.integers(1, 70)), int(rng.integers(1, 90))
    if k % 3 == 0:
      m = rng.random((h, w)) < rng.uniform(0.05, 0.95)  # short runs
    else:  # long runs: multi-character counts and negative deltas
      m = np.zeros((h, w), bool)
      m[rng.integers(0, h) :, rng.integers(0, w) :] = True
      m[: rng.integers(0, h + 1), : rng.integers(0, w + 1)] ^= True
    counts = rle_encode(m)
    assert sum(counts) == h * w
    np.testing.assert_array_equal(coco.rle_counts_from_string(rle_string(counts)), counts)
    np.testing.assert_array_equal(coco.segmentation_to_mask({"size": [h, w], "counts": counts}, h, w), m)
    np.testing.assert_array_equal(
        coco.segmentation_to_mask({"size": [h, w], "counts": rle_string(counts)}, h, w), m
    )


def test_rle_errors():
  with pytest.raises(ValueError, match="sum to 5"):
    coco.rle_to_mask([2, 3], 2, 3)
  with pytest.raises(ValueError, match="differs from the image size"):
    coco.segmentation_to_mask({"size": [3, 2], "counts": [6]}, 2, 3)
  with pytest.raises(ValueError, match="ends inside a count"):
    coco.rle_counts_from_string("k")  # 'k' - 48 = 59 has the "more" bit set


def test_polygons_rasterise_like_pycocotools():
  # Integer boxes cover exactly [y0, y1) x [x0, x1) (pycocotools gives area w*h for them).
  for x0, y0, x1, y1, h, w in ((10, 5, 20, 15, 30, 40), (3, 2, 8, 7, 12, 12), (0, 0, 7, 5, 5, 7)):
    expected = np.zeros((h, w), bool)
    expected[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(coco.polygons_to_mask([rect(x0, y0, x1, y1)], h, w), expected)
  # Boxes reaching past the image are clipped; several polygons are a union.
  m = coco.polygons_to_mask([rect(-5, -5, 3, 4), rect(8, 6, 20, 30)], 10, 10)
  expected = np.zeros((10, 10), bool)
  expected[:4, :3] = expected[6:, 8:] = True
  np.testing.assert_array_equal(m, expected)
  # Fractional vertices: pycocotools 2.0's frPyObjects + merge + decode output.
  poly = [2.3, 1.7, 9.61, 3.05, 6.5, 8.92, 1.04, 6.2]
  rows = [
      "000000000000",
      "000000000000",
      "001111100000",
      "001111111000",
      "001111111000",
      "011111110000",
      "001111110000",
      "000011100000",
      "000000100000",
      "000000000000",
  ]
  expected = np.array([[c == "1" for c in r] for r in rows])
  np.testing.assert_array_equal(coco.polygons_to_mask([poly], 10, 12), expected)
  half = [0.5, 0.5, 4.5, 0.5, 4.5, 3.5, 0.5, 3.5]
  expected = np.zeros((5, 6), bool)
  expected[1:4, 1:5] = True
  np.testing.assert_array_equal(coco.polygons_to_mask([half], 5, 6), expected)
  # Degenerate input: no points, a repeated vertex, an odd trailing coordinate.
  assert not coco.polygons_to_mask([[]], 4, 4).any()
  np.testing.assert_array_equal(
      coco.polygons_to_mask([[10, 5, 10, 5, 20, 5, 20, 15, 10, 15, 7]], 30, 40),
      coco.polygons_to_mask([rect(10, 5, 20, 15)], 30, 40),
  )


# --------------------------------------------------------------------------- the source
def test_labels_categories_and_schema(tiny_coco, caplog):
  with caplog.at_level(logging.INFO, logger="cpal_jax.data.coco"):
    src = COCOSource(str(tiny_coco), "train2014")
  assert "1 of 5 images have no annotation" in caplog.text
  assert src.dropped == 1 and len(src) == 4
  assert src.num_classes == 4 and src.class_names == ("background", "person", "car", "toothbrush")
  assert src.ids() == [stem("train2014", i) for i in (9, 25, 30, 77)]  # by image id; 42 dropped
  assert src._segments is None  # without masks, segmentations are not kept
  el = src[0]
  assert set(el) == {"id", "image", "label"} and el["id"] == "COCO_train2014_000000000009"
  assert el["image"].dtype == np.uint8 and el["image"].shape == (40, 60, 3)
  assert el["label"].dtype == np.float32 and el["label"].shape == (3,)
  np.testing.assert_array_equal(el["label"], multi_hot(PERSON, CAR))
  np.testing.assert_array_equal(src[1]["label"], multi_hot(PERSON, BRUSH))  # crowd toothbrush counts
  np.testing.assert_array_equal(src[2]["label"], multi_hot(PERSON, CAR))
  np.testing.assert_array_equal(src[-1]["label"], multi_hot(CAR))  # only a crowd annotation
  assert src[1]["image"].shape == (30, 50, 3) and src[2]["image"].shape == (32, 32, 3)  # gray, CMYK
  assert "n=4" in repr(src) and "annotations/instances_train2014.json" in repr(src)
  with pytest.raises(IndexError):
    src[4]
  # Picklable for grain worker processes.
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[2]["image"], src[2]["image"])


def test_rasterised_masks(tiny_coco):
  src = COCOSource(str(tiny_coco), "train2014", with_mask=True)
  assert src.mask_dir is None and "masks='json'" in repr(src)
  for i, image_id in enumerate((9, 25, 30, 77)):
    el = src[i]
    assert el["mask"].dtype == np.uint8 and el["mask"].shape == el["image"].shape[:2]
    np.testing.assert_array_equal(el["mask"], expected_mask(image_id), err_msg=str(image_id))
  val = COCOSource(str(tiny_coco), "val2014", with_mask=True)
  assert val.ids() == [stem("val2014", 5)] and val.dropped == 1
  expected = np.zeros((24, 24), np.uint8)
  expected[4:12, 4:12] = PERSON
  np.testing.assert_array_equal(val[0]["mask"], expected)


def test_png_masks_take_precedence(tiny_coco):
  mdir = tiny_coco / "mask" / "train2014"
  mdir.mkdir(parents=True)
  pngs = {}
  for image_id, (h, w, _, _) in TRAIN.items():
    m = np.full((h, w), (image_id % 3) + 1, np.uint8)
    m[0, 0] = 255
    pngs[image_id] = m
    Image.fromarray(m).save(mdir / f"{stem('train2014', image_id)}.png")
  src = COCOSource(str(tiny_coco), "train2014", with_mask=True)  # mask_dir="auto"
  assert src.mask_dir == mdir and src._segments is None and "masks='png'" in repr(src)
  np.testing.assert_array_equal(src[0]["mask"], pngs[9])
  # Palette PNGs read as indices too; an explicit folder (relative to root) works.
  other = tiny_coco / "gt"
  other.mkdir()
  for image_id, m in pngs.items():
    png = Image.fromarray(m)
    png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
    png.save(other / f"{stem('train2014', image_id)}.png")
  np.testing.assert_array_equal(
      COCOSource(str(tiny_coco), "train2014", mask_dir="gt", with_mask=True)[1]["mask"], pngs[25]
  )
  # "none" rasterises even with the folder present.
  none = COCOSource(str(tiny_coco), "train2014", mask_dir="none", with_mask=True)
  np.testing.assert_array_equal(none[0]["mask"], expected_mask(9))
  # Bad PNGs are named.
  (mdir / f"{stem('train2014', 9)}.png").unlink()
  Image.fromarray(np.full((20, 20), 4, np.uint8)).save(mdir / f"{stem('train2014', 77)}.png")
  Image.fromarray(np.zeros((5, 5), np.uint8)).save(mdir / f"{stem('train2014', 30)}.png")
  Image.new("RGB", (50, 30)).save(mdir / f"{stem('train2014', 25)}.png")
  src = COCOSource(str(tiny_coco), "train2014", with_mask=True)
  with pytest.raises(FileNotFoundError, match=r"COCO mask missing: .*000000000009\.png.*mask_dir='none'"):
    src[0]
  with pytest.raises(ValueError, match="mode 'RGB'"):
    src[1]
  with pytest.raises(ValueError, match="5x5 but its image is 32x32"):
    src[2]
  with pytest.raises(ValueError, match=r"values \[4\] outside 0..3"):
    src[3]
  with pytest.raises(FileNotFoundError, match="COCO mask folder missing"):
    COCOSource(str(tiny_coco), "train2014", mask_dir="nope", with_mask=True)


def test_id_lists(tiny_coco, tmp_path):
  stems = tmp_path / "stems.txt"
  stems.write_text(f"{stem('train2014', 30)}\n\ntrain2014/{stem('train2014', 9)}.jpg extra\n")
  src = COCOSource(str(tiny_coco), str(stems), with_mask=True)
  assert src.subset == "train2014" and src.ids() == [stem("train2014", 30), stem("train2014", 9)]
  np.testing.assert_array_equal(src[1]["mask"], expected_mask(9))
  assert "stems.txt" in repr(src)
  ints = tmp_path / "ints.txt"
  ints.write_text("25\n000000000077\n")
  src = COCOSource(str(tiny_coco), str(ints), subset="train2014")
  assert src.ids() == [stem("train2014", 25), stem("train2014", 77)]
  np.testing.assert_array_equal(src[0]["label"], multi_hot(PERSON, BRUSH))
  vals = tmp_path / "val.txt"
  vals.write_text(f"{stem('val2014', 5)}\n")
  assert COCOSource(str(tiny_coco), str(vals)).ids() == [stem("val2014", 5)]

  cases = [
      ("25\n", {}, ValueError, "plain integer ids.*set data.coco_subset"),
      (f"{stem('train2014', 9)}\n{stem('val2014', 5)}\n", {}, ValueError, "mixes subsets"),
      (f"{stem('train2014', 9)}\n25\n", {}, ValueError, "mixes file stems and plain integer ids"),
      (f"{stem('train2014', 9)}\n", {"subset": "val2014"}, ValueError, "holds train2014 ids but"),
      (
          "9\n123\n456\n",
          {"subset": "train2014"},
          KeyError,
          r"2 ids are not in .*instances_train2014.json.*\[123, 456\]",
      ),
      ("9\n42\n", {"subset": "train2014"}, ValueError, r"1 ids have no annotation.*\[42\]"),
      ("9\nbanana\n", {"subset": "train2014"}, ValueError, "line 2: 'banana' is neither"),
      ("\n\n", {}, ValueError, "id list is empty"),
  ]
  for k, (text, kw, err, pattern) in enumerate(cases):
    path = tmp_path / f"bad{k}.txt"
    path.write_text(text)
    with pytest.raises(err, match=pattern):
      COCOSource(str(tiny_coco), str(path), **kw)
  path = tmp_path / "other.txt"
  path.write_text("COCO_train2017_000000000009\n")
  with pytest.raises(FileNotFoundError, match=r"annotations missing: .*instances_train2017.json.*found \["):
    COCOSource(str(tiny_coco), str(path))
  with pytest.raises(FileNotFoundError, match="COCO id list missing"):
    COCOSource(str(tiny_coco), str(tmp_path / "absent.txt"))


def test_errors_name_the_file_and_the_fix(tiny_coco, tmp_path):
  with pytest.raises(FileNotFoundError, match="COCO root missing: .*set data.root"):
    COCOSource(str(tmp_path / "nope"), "train2014")
  bare = tmp_path / "bare"
  bare.mkdir()
  with pytest.raises(FileNotFoundError, match="no annotations/ folder.*instances_train2014.json"):
    COCOSource(str(bare), "train2014")
  with pytest.raises(FileNotFoundError, match=r"use one of \['train2014', 'val2014'\]"):
    COCOSource(str(tiny_coco), "train2017")

  ann = tiny_coco / "annotations" / "instances_train2014.json"
  good = ann.read_text()
  ann.write_text(good[:-10])
  with pytest.raises(ValueError, match="COCO annotations cannot be parsed: .*instances_train2014.json"):
    COCOSource(str(tiny_coco), "train2014")
  ann.write_text(json.dumps({"images": [], "annotations": []}))
  with pytest.raises(ValueError, match="not an instances file"):
    COCOSource(str(tiny_coco), "train2014")
  doc = json.loads(good)
  doc["annotations"][0]["category_id"] = 2
  ann.write_text(json.dumps(doc))
  with pytest.raises(ValueError, match="unknown category_id 2"):
    COCOSource(str(tiny_coco), "train2014")
  ann.write_text(good)

  (tiny_coco / "train2014" / f"{stem('train2014', 25)}.jpg").unlink()
  (tiny_coco / "train2014" / f"{stem('train2014', 30)}.jpg").write_bytes(b"not a jpeg")
  Image.new("RGB", (10, 10)).save(tiny_coco / "train2014" / f"{stem('train2014', 77)}.jpg")
  src = COCOSource(str(tiny_coco), "train2014", with_mask=True)
  with pytest.raises(FileNotFoundError) as e:
    src[1]
  msg = str(e.value)
  assert "COCO image missing" in msg and "000000000025.jpg" in msg and "instances_train2014.json" in msg
  assert "\n" not in msg
  with pytest.raises(ValueError, match=r"cannot be decoded: .*000000000030\.jpg"):
    src[2]
  with pytest.raises(ValueError, match="is 10x10 but .*says 20x20"):
    src[3]
  assert COCOSource(str(tiny_coco), "train2014")[3]["image"].shape == (10, 10, 3)  # labels need no size

  import shutil

  shutil.rmtree(tiny_coco / "val2014")
  with pytest.raises(FileNotFoundError, match="COCO image folder missing: .*val2014; unzip val2014.zip"):
    COCOSource(str(tiny_coco), "val2014")


def test_bad_segmentation_is_named(tiny_coco):
  ann = tiny_coco / "annotations" / "instances_train2014.json"
  doc = json.loads(ann.read_text())
  for a in doc["annotations"]:
    if a["image_id"] == 30 and isinstance(a["segmentation"], dict):
      a["segmentation"]["counts"] = rle_string([5, 5])
  ann.write_text(json.dumps(doc))
  src = COCOSource(str(tiny_coco), "train2014", with_mask=True)
  with pytest.raises(ValueError, match="segmentation of COCO_train2014_000000000030 cannot be decoded"):
    src[2]


# --------------------------------------------------------------------------- through the pipeline
def test_config_and_make_source(tiny_coco, tmp_path):
  c = coco_config.get_config()
  assert (c.data.name, c.data.train_split, c.data.eval_split, c.data.val_split) == (
      "coco",
      "train2014",
      "train2014",
      "val2014",
  )
  assert c.data.num_classes == 81 and c.refine.mode == "ir_label" and c.data.mask_dir == "auto"
  assert c.train.num_steps == 0 and 82081 // c.train.batch_size * c.train.epochs == 25650
  with pytest.raises(ValueError, match="data.root is empty"):
    pipeline.make_source(c, "train2014")
  c.data.root = str(tiny_coco)
  with pytest.raises(ValueError, match="num_classes=4"):  # the tiny json has 3 categories
    pipeline.make_source(c, "train2014")
  c.data.num_classes = 4
  src = pipeline.make_source(c, c.data.eval_split, with_mask=True)
  assert isinstance(src, COCOSource) and src.with_mask and len(src) == 4
  ints = tmp_path / "ints.txt"
  ints.write_text("77\n9\n")
  c.data.coco_subset = "train2014"
  assert pipeline.make_source(c, str(ints)).ids() == [stem("train2014", 77), stem("train2014", 9)]

  seen = []
  for ids, batch in pipeline.eval_batches(src, batch_size=2, pad_multiple=16):
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[0] == 2
    assert batch["label"].shape == (2, 3) and batch["mask"].shape == batch["image"].shape[:3]
    for j, image_id in enumerate(ids):
      h, w = batch["size"][j]
      np.testing.assert_array_equal(batch["mask"][j, :h, :w], expected_mask(int(image_id[-12:])))
      assert (batch["mask"][j, h:] == 255).all() and (batch["mask"][j, :, w:] == 255).all()
    seen += ids
  assert sorted(seen) == src.ids()
