"""VOCSource on a generated VOC-layout tree and on the 20-image real fixture."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal_jax.data import palette
from cpal_jax.data.voc import VOC_CLASSES, VOCSource

FIXTURE = Path(__file__).resolve().parent / "data" / "voc2012_sample"  # 20 real VOC 2012 images


def voc_palette():
  return palette.putpalette_list()


def write_xml(path, filename, size, objects):
  h, w = size
  objs = []
  for name, difficult in objects:
    objs.append(f"""
\t<object>
\t\t<name>{name}</name>
\t\t<pose>Unspecified</pose>
\t\t<truncated>0</truncated>
\t\t<difficult>{difficult}</difficult>
\t\t<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>{w}</xmax><ymax>{h}</ymax></bndbox>
\t\t{'<part><name>head</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax><ymax>2</ymax></bndbox></part>' if name == 'person' else ''}
\t</object>""")
  path.write_text(f"""<annotation>
\t<folder>VOC2012</folder>
\t<filename>{filename}</filename>
\t<source><database>The VOC2007 Database</database><annotation>PASCAL VOC2007</annotation><image>flickr</image></source>
\t<owner><flickrid>someone</flickrid><name>horse</name></owner>
\t<size><width>{w}</width><height>{h}</height><depth>3</depth></size>
\t<segmented>1</segmented>{''.join(objs)}
</annotation>
""")


# id -> (h, w, image mode, [(class, difficult)], classes painted in the mask)
TINY = {
    "2007_000001": (40, 60, "RGB", [("dog", 0), ("person", 0)], [12, 15]),
    "2007_000002": (50, 30, "L", [("cat", 0), ("bottle", 1)], [8]),
    "2008_000003": (33, 47, "CMYK", [("aeroplane", 0)], [1]),
}


@pytest.fixture
def tiny_voc(tmp_path):
  root = tmp_path / "VOCdevkit" / "VOC2012"
  for d in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
    (root / d).mkdir(parents=True)
  rng = np.random.default_rng(0)
  pal = voc_palette()
  for image_id, (h, w, mode, objects, mask_classes) in TINY.items():
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    mask = np.zeros((h, w), np.uint8)
    for k, c in enumerate(mask_classes):
      mask[5 + 10 * k : 12 + 10 * k, 4:20] = c
    mask[3:5, :] = 255  # the VOC boundary band
    png = Image.fromarray(mask)
    png.putpalette(pal)  # turns the L image into P with the VOC colours
    png.save(root / "SegmentationClass" / f"{image_id}.png")
    write_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", (h, w), objects)
  (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n\n")
  (root / "ImageSets/Segmentation/val.txt").write_text("2008_000003\n")
  return root


def multi_hot(names):
  v = np.zeros(20, np.float32)
  for n in names:
    v[VOC_CLASSES.index(n) - 1] = 1
  return v


def test_class_list():
  assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[-1] == "tvmonitor"
  assert VOCSource.num_classes == 21 and VOCSource.class_names == VOC_CLASSES


def test_xml_labels_include_difficult_and_ignore_parts_and_owner(tiny_voc):
  src = VOCSource(str(tiny_voc), "train")  # auto -> xml since Annotations/ exists
  assert src.labels_mode == "xml" and len(src) == 2 and src.ids() == ["2007_000001", "2007_000002"]
  el = src[0]
  assert set(el) == {"id", "image", "label"}
  # <owner><name>horse</name> and <part><name>head</name> are not objects and must not leak in.
  np.testing.assert_array_equal(el["label"], multi_hot(["dog", "person"]))
  np.testing.assert_array_equal(src[1]["label"], multi_hot(["cat", "bottle"]))  # bottle is difficult
  assert el["label"].dtype == np.float32


def test_images_become_rgb_uint8(tiny_voc):
  src = VOCSource(str(tiny_voc), "train")
  val = VOCSource(str(tiny_voc), "val")
  for el, (h, w) in ((src[0], (40, 60)), (src[1], (50, 30)), (val[0], (33, 47))):
    assert el["image"].dtype == np.uint8 and el["image"].shape == (h, w, 3)
  gray = src[1]["image"].astype(int)
  assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 2  # a gray JPEG is replicated to RGB


def test_masks_palette_and_gray(tiny_voc):
  src = VOCSource(str(tiny_voc), "train", with_mask=True)
  assert src.mask_dir.name == "SegmentationClass"
  assert Image.open(src.mask_dir / "2007_000001.png").mode == "P"
  m = src[0]["mask"]
  assert m.dtype == np.uint8 and m.shape == (40, 60)
  assert set(np.unique(m).tolist()) == {0, 12, 15, 255}
  # The same indices saved as a gray PNG under a custom folder read identically.
  (tiny_voc / "GrayMasks").mkdir()
  for image_id in TINY:
    arr = np.array(Image.open(tiny_voc / "SegmentationClass" / f"{image_id}.png"))
    Image.fromarray(arr).save(tiny_voc / "GrayMasks" / f"{image_id}.png")
  gray = VOCSource(str(tiny_voc), "train", mask_dir="GrayMasks", with_mask=True)
  assert Image.open(gray.mask_dir / "2007_000001.png").mode == "L"
  np.testing.assert_array_equal(gray[0]["mask"], m)


def test_mask_dir_auto_prefers_aug(tiny_voc):
  import shutil

  shutil.copytree(tiny_voc / "SegmentationClass", tiny_voc / "SegmentationClassAug")
  assert VOCSource(str(tiny_voc), "train", with_mask=True).mask_dir.name == "SegmentationClassAug"


def test_mask_labels(tiny_voc):
  src = VOCSource(str(tiny_voc), "train", labels="mask")
  assert "mask" not in src[0]
  np.testing.assert_array_equal(src[0]["label"], multi_hot(["dog", "person"]))
  np.testing.assert_array_equal(src[1]["label"], multi_hot(["cat"]))  # the difficult bottle is unpainted


def test_split_file_irn_style(tiny_voc, tmp_path):
  lst = tmp_path / "train_aug.txt"
  lst.write_text(
      "JPEGImages/2008_000003.jpg SegmentationClassAug/2008_000003.png\n/JPEGImages/2007_000001.jpg x\n"
  )
  src = VOCSource(str(tiny_voc), str(lst))
  assert src.ids() == ["2008_000003", "2007_000001"]


def test_json_and_npy_tables(tiny_voc, tmp_path):
  table = {"2007_000001": multi_hot(["bus"]).tolist(), "2007_000002": multi_hot(["cow", "sofa"]).tolist()}
  (tiny_voc / "cls_labels.json").write_text(json.dumps(table))
  src = VOCSource(str(tiny_voc), "train", labels="cls_labels")
  np.testing.assert_array_equal(src[1]["label"], multi_hot(["cow", "sofa"]))
  # IRN's own cls_labels.npy is a pickled dict with int ids (2007000001): read only with
  # allow_pickle, and both key styles must work.
  npy = tmp_path / "irn.npy"
  np.save(npy, {int(k.replace("_", "")): np.asarray(v, np.float32) for k, v in table.items()})
  np.testing.assert_array_equal(
      VOCSource(str(tiny_voc), "train", labels=str(npy), allow_pickle=True)[0]["label"], multi_hot(["bus"])
  )
  # A .npz of id -> vector is plain numpy: no pickle needed.
  npz = tmp_path / "labels.npz"
  np.savez(npz, **{k: np.asarray(v, np.float32) for k, v in table.items()})
  np.testing.assert_array_equal(
      VOCSource(str(tiny_voc), "train", labels=str(npz))[1]["label"], multi_hot(["cow", "sofa"])
  )


def test_auto_without_annotations_prefers_json_then_mask(tiny_voc):
  import shutil

  shutil.rmtree(tiny_voc / "Annotations")
  assert VOCSource(str(tiny_voc), "train").labels_mode == "mask"
  (tiny_voc / "cls_labels.json").write_text(json.dumps({k: multi_hot(["car"]).tolist() for k in TINY}))
  assert VOCSource(str(tiny_voc), "train").labels_mode == "table"


def test_npy_is_not_unpickled_implicitly(tiny_voc):
  np.save(tiny_voc / "cls_labels.npy", {k: multi_hot(["car"]) for k in TINY})
  with pytest.raises(FileNotFoundError, match="is a pickle: convert it once to JSON"):
    VOCSource(str(tiny_voc), "train", labels="cls_labels")
  # Opting in reads it.
  src = VOCSource(str(tiny_voc), "train", labels="cls_labels", allow_pickle=True)
  assert src.labels_path.name == "cls_labels.npy"


def test_errors_are_one_line_and_name_the_file(tiny_voc):
  src = VOCSource(str(tiny_voc), "train")
  (tiny_voc / "JPEGImages" / "2007_000002.jpg").unlink()
  with pytest.raises(FileNotFoundError) as e:
    src[1]  # deleted after construction: found when read
  msg = str(e.value)
  assert "2007_000002.jpg" in msg and "ImageSets/Segmentation/train.txt" in msg and "\n" not in msg
  with pytest.raises(FileNotFoundError) as e:
    VOCSource(str(tiny_voc), "train")  # missing at construction: found by one folder listing
  msg = str(e.value)
  assert "2007_000002.jpg" in msg and "ImageSets/Segmentation/train.txt" in msg and "\n" not in msg

  with pytest.raises(FileNotFoundError, match="root does not exist: .*nope"):
    VOCSource(str(tiny_voc / "nope"), "train")
  with pytest.raises(FileNotFoundError, match="no JPEGImages/"):
    VOCSource(str(tiny_voc / "Annotations"), "train")
  with pytest.raises(FileNotFoundError, match="use one of"):
    VOCSource(str(tiny_voc), "trainval")
  with pytest.raises(ValueError, match="not understood"):
    VOCSource(str(tiny_voc), "train", labels="bogus")
  with pytest.raises(IndexError):
    src[5]


def test_label_table_errors(tiny_voc):
  path = tiny_voc / "cls_labels.json"
  path.write_text(json.dumps({"2007_000001": multi_hot(["bus"]).tolist()}))
  with pytest.raises(KeyError, match="2007_000002 has no entry"):
    VOCSource(str(tiny_voc), "train", labels="cls_labels")
  path.write_text(json.dumps({k: [0.0] * 20 for k in TINY}))
  with pytest.raises(ValueError, match="no foreground class"):
    VOCSource(str(tiny_voc), "train", labels="cls_labels")
  path.write_text(json.dumps({k: [1.0] * 21 for k in TINY}))
  with pytest.raises(ValueError, match="length 20"):
    VOCSource(str(tiny_voc), "train", labels="cls_labels")


def test_xml_errors(tiny_voc):
  write_xml(tiny_voc / "Annotations" / "2007_000001.xml", "x.jpg", (40, 60), [])
  write_xml(tiny_voc / "Annotations" / "2007_000002.xml", "x.jpg", (50, 30), [("unicorn", 0)])
  src = VOCSource(str(tiny_voc), "train")
  with pytest.raises(ValueError, match="no foreground class"):
    src[0]
  with pytest.raises(ValueError, match="unknown object class 'unicorn'"):
    src[1]


def test_bad_masks_rejected(tiny_voc):
  mdir = tiny_voc / "SegmentationClass"
  Image.new("RGB", (60, 40), (128, 0, 0)).save(mdir / "2007_000001.png")
  Image.fromarray(np.full((50, 30), 21, np.uint8)).save(mdir / "2007_000002.png")
  Image.fromarray(np.zeros((10, 10), np.uint8)).save(mdir / "2008_000003.png")
  with pytest.raises(ValueError, match="mode 'RGB'"):
    VOCSource(str(tiny_voc), "train", with_mask=True)[0]
  with pytest.raises(ValueError, match=r"values \[21\]"):
    VOCSource(str(tiny_voc), "train", with_mask=True)[1]
  with pytest.raises(ValueError, match="10x10 but its image is 33x47"):
    VOCSource(str(tiny_voc), "val", with_mask=True)[0]


def test_corrupt_image(tiny_voc):
  (tiny_voc / "JPEGImages" / "2007_000001.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match="cannot be decoded: .*2007_000001.jpg"):
    VOCSource(str(tiny_voc), "train")[0]


# --- the real 20-image fixture -------------------------------------------------------------


@pytest.fixture
def fixture_root():
  return FIXTURE


def test_fixture_json_labels_match_masks(fixture_root):
  for split in ("train", "val"):
    by_json = VOCSource(str(fixture_root), split, with_mask=True, mask_dir="SegmentationClass")
    assert by_json.labels_mode == "table" and len(by_json) == 10
    by_mask = VOCSource(str(fixture_root), split, labels="mask", mask_dir="SegmentationClass")
    for i in range(len(by_json)):
      a, b = by_json[i], by_mask[i]
      assert a["id"] == b["id"]
      np.testing.assert_array_equal(a["label"], b["label"], err_msg=a["id"])
      assert a["image"].shape[:2] == a["mask"].shape and a["image"].dtype == np.uint8
      assert 255 in a["mask"]  # the fine-annotation boundary band


def test_fixture_npy_equals_json_and_aug_masks(fixture_root):
  npy = str(fixture_root / "cls_labels.npy")  # SIPE's pickled dict: read only when allowed
  src = VOCSource(str(fixture_root), "val", labels=npy, with_mask=True, allow_pickle=True)
  ref = VOCSource(str(fixture_root), "val", mask_dir="SegmentationClass", with_mask=True)
  assert src.mask_dir.name == "SegmentationClassAug"
  for i in (0, len(src) - 1):
    np.testing.assert_array_equal(src[i]["label"], ref[i]["label"])
    np.testing.assert_array_equal(src[i]["mask"], ref[i]["mask"])
