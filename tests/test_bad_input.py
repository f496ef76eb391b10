"""Bad VOC input: each case fails with one line naming the file and the fix (data.on_bad_input=strict)
or is dropped at construction, counted and logged (skip). Cases run on a copy of the real fixture."""

import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cpal_jax.data import pipeline, voc
from cpal_jax.data.voc import VOCSource
from test_voc import FIXTURE, TINY, multi_hot, tiny_voc, write_xml  # noqa: F401 (tiny_voc: fixture)

REPO = Path(__file__).resolve().parents[1]
MODES = ("strict", "skip")


@pytest.fixture
def real(tmp_path):
  """A writable copy of the 20-image fixture: cls_labels.json labels, SegmentationClassAug masks."""
  root = tmp_path / "VOC2012"
  shutil.copytree(FIXTURE, root)
  return root


def train_ids(root):
  return (root / "ImageSets/Segmentation/train.txt").read_text().split()


def one_line(e):
  msg = e.value.args[0] if isinstance(e.value, KeyError) else str(e.value)
  assert "\n" not in msg, msg
  return msg


def only_skipped(src, ids, pattern):
  """src dropped exactly `ids`, each for a reason matching `pattern`."""
  assert [i for i, _ in src.skipped] == list(ids), src.skipped
  for _, reason in src.skipped:
    assert re.search(pattern, reason), reason
    assert "\n" not in reason
  assert not set(ids) & set(src.ids())


# --- missing image -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_missing_image(real, mode, caplog):
  gone = train_ids(real)[3]
  (real / "JPEGImages" / f"{gone}.jpg").unlink()
  if mode == "strict":
    with pytest.raises(FileNotFoundError) as e:
      VOCSource(str(real), "train")
    msg = one_line(e)
    assert f"JPEGImages/{gone}.jpg" in msg and "ImageSets/Segmentation/train.txt" in msg
    assert "1 of 10" in msg and "data.on_bad_input=skip" in msg
    return
  with caplog.at_level(logging.WARNING, logger=voc.__name__):
    src = VOCSource(str(real), "train", on_bad_input="skip")
  assert len(src) == 9
  only_skipped(src, [gone], f"image missing: .*{gone}.jpg")
  warnings = [r for r in caplog.records if r.name == voc.__name__]
  assert (
      len(warnings) == 1
      and "skipped 1 of 10" in warnings[0].getMessage()
      and gone in warnings[0].getMessage()
  )
  src[8]  # everything left reads


# --- corrupt and truncated files ---------------------------------------------------------------


def corrupt(root):
  """Four broken images in train: JPEG cut in half, random bytes, PNG cut in half, empty file."""
  ids = train_ids(root)
  jpg = lambda i: root / "JPEGImages" / f"{ids[i]}.jpg"  # noqa: E731
  data = jpg(0).read_bytes()
  jpg(0).write_bytes(data[: len(data) // 2])
  jpg(1).write_bytes(np.random.default_rng(0).bytes(5000))
  png = root / "tmp.png"
  Image.open(jpg(2)).save(png)  # a PNG under the .jpg name: the loader goes by content
  data = png.read_bytes()
  jpg(2).write_bytes(data[: len(data) // 2])
  jpg(3).write_bytes(b"")
  return ids[:4]


def test_half_jpeg_is_really_truncated(real, monkeypatch, caplog):
  """The cut JPEG decodes 'fine' (grey filler) when PIL tolerates truncation: the check is not vacuous."""
  bad, *_ = corrupt(real)
  path = real / "JPEGImages" / f"{bad}.jpg"
  with pytest.raises(ValueError, match="truncated"):
    voc.load_image(path)
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  monkeypatch.setattr(voc, "_warned_truncated", False)
  with caplog.at_level(logging.WARNING, logger=voc.__name__):
    assert voc.load_image(path).shape[2] == 3
  assert "LOAD_TRUNCATED_IMAGES is True" in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_corrupt_and_truncated_images(real, mode):
  bad = corrupt(real)
  if mode == "strict":
    src = VOCSource(str(real), "train")  # cheap construction: nothing decoded yet
    assert len(src) == 10
    for k, image_id in enumerate(bad):
      with pytest.raises(ValueError) as e:
        src[k]
      msg = one_line(e)
      assert f"cannot be decoded: {real}/JPEGImages/{image_id}.jpg" in msg, msg
      assert "ImageSets/Segmentation/train.txt" in msg and "corrupt or truncated: replace it" in msg
    assert "truncated" in str(pytest.raises(ValueError, src.__getitem__, 0).value)
    src[4]
    return
  src = VOCSource(str(real), "train", on_bad_input="skip")
  only_skipped(src, bad, r"cannot be decoded: .*\.jpg")
  assert [src[k]["image"].shape[2] for k in range(len(src))] == [3] * 6


# --- image modes -------------------------------------------------------------------------------


def _save(tmp_path, arr_or_image, fmt, mode=None):
  im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image, mode)
  path = tmp_path / f"x_{im.mode.replace(';', '_')}_{fmt}.jpg"  # named .jpg as in JPEGImages/
  im.save(path, format=fmt)
  return path


def test_gray_palette_alpha_and_bilevel_to_rgb(tmp_path):
  g = np.array([[0, 77, 255]], np.uint8)
  for mode in ("L", "LA"):
    out = voc.load_image(_save(tmp_path, Image.fromarray(g).convert(mode), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))
  rgba = np.array([[[10, 20, 30, 0], [200, 100, 50, 128], [1, 2, 3, 255]]], np.uint8)
  np.testing.assert_array_equal(voc.load_image(_save(tmp_path, rgba, "PNG")), rgba[..., :3])  # alpha dropped
  p = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "L").convert("P")
  p.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 64] + [0] * 759)
  np.testing.assert_array_equal(
      voc.load_image(_save(tmp_path, p, "PNG")), [[[0, 0, 0], [128, 0, 0], [0, 128, 64]]]
  )
  bw = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
  np.testing.assert_array_equal(voc.load_image(_save(tmp_path, bw, "PNG")), [[[0, 0, 0], [255, 255, 255]]])


def test_cmyk_to_rgb(tmp_path):
  # C, M, Y, K: white, cyan, magenta + yellow (red), black.
  cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)
  out = voc.load_image(_save(tmp_path, Image.fromarray(cmyk, "CMYK"), "TIFF"))
  np.testing.assert_array_equal(out, [[[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0]]])
  assert out.dtype == np.uint8


def test_16bit_is_scaled_not_clipped(tmp_path):
  v = np.array([[0, 257, 32896, 65535, 1000]], np.uint16)
  want = np.array([0, 1, 128, 255, 4], np.uint8)  # round(v * 255 / 65535)
  path = _save(tmp_path, v, "PNG")
  assert Image.open(path).mode == "I;16"
  assert np.array(Image.open(path).convert("RGB"))[0, 3, 0] == 255  # PIL alone clips: 257 -> 255
  out = voc.load_image(path)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.repeat(want[None, :, None], 3, axis=2))
  # 32-bit "I" (16-bit PNGs open as I in older PIL; here a TIFF) holding 16-bit values: the same.
  path = _save(tmp_path, v.astype(np.int32), "TIFF")
  assert Image.open(path).mode == "I"
  np.testing.assert_array_equal(voc.load_image(path)[..., 1], want[None])
  # Values no 16-bit image has, and float images, fail with the fix.
  with pytest.raises(ValueError, match=r"values -1\.\.70000, outside the 16-bit range.*save it as 8-bit RGB"):
    voc.load_image(_save(tmp_path, np.array([[-1, 70000]], np.int32), "TIFF"))
  with pytest.raises(ValueError, match="mode 'F'.*save it as 8-bit RGB"):
    voc.load_image(_save(tmp_path, np.array([[0.5, 1.0]], np.float32), "TIFF"))


def test_odd_modes_through_the_source(real):
  ids = train_ids(real)
  jpg = lambda i: real / "JPEGImages" / f"{ids[i]}.jpg"  # noqa: E731
  rgb = [np.array(Image.open(jpg(i))) for i in range(3)]
  Image.fromarray(rgb[0]).convert("L").save(jpg(0), format="JPEG", quality=95)
  Image.fromarray(rgb[1]).convert("RGBA").save(jpg(1), format="PNG")
  Image.fromarray((rgb[2][..., 0].astype(np.uint16) * 257)).save(jpg(2), format="PNG")  # 16-bit gray
  src = VOCSource(str(real), "train", on_bad_input="skip", with_mask=True)
  assert src.skipped == [] and len(src) == 10
  els = [src[i] for i in range(3)]
  for el, ref in zip(els, rgb):
    assert (
        el["image"].dtype == np.uint8 and el["image"].shape == ref.shape and el["mask"].shape == ref.shape[:2]
    )
  np.testing.assert_array_equal(els[1]["image"], rgb[1])
  np.testing.assert_array_equal(els[2]["image"][..., 2], rgb[2][..., 0])  # v * 257 scales back to v


# --- masks -------------------------------------------------------------------------------------


def break_masks(root):
  ids = train_ids(root)
  mdir = root / "SegmentationClassAug"
  m = Image.open(mdir / f"{ids[0]}.png")
  m.resize((m.width // 2, m.height // 2), Image.NEAREST).save(mdir / f"{ids[0]}.png")  # wrong size
  a = np.array(Image.open(mdir / f"{ids[1]}.png"))
  a[:2, :2] = 30
  Image.fromarray(a).save(mdir / f"{ids[1]}.png")  # a value outside 0..20 and 255
  Image.open(mdir / f"{ids[2]}.png").convert("RGB").save(mdir / f"{ids[2]}.png")  # colour rendering
  return ids[:3]


@pytest.mark.parametrize("mode", MODES)
def test_bad_masks(real, mode):
  bad = break_masks(real)
  if mode == "strict":
    src = VOCSource(str(real), "train", with_mask=True)
    for k, pattern in enumerate(("but its image is", r"values \[30\] outside 0\.\.20 and 255", "mode 'RGB'")):
      with pytest.raises(ValueError) as e:
        src[k]
      msg = one_line(e)
      assert re.search(pattern, msg) and f"SegmentationClassAug/{bad[k]}.png" in msg, msg
    src[3]
    return
  src = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  only_skipped(src, bad, r"VOC mask .*SegmentationClassAug/.*\.png")
  assert "but its image is" in src.skipped[0][1] and "[30]" in src.skipped[1][1]
  # Without masks the same ids are fine.
  assert VOCSource(str(real), "train", on_bad_input="skip").skipped == []


def test_missing_mask_and_mask_folder(real):
  (real / "SegmentationClassAug" / f"{train_ids(real)[0]}.png").unlink()
  with pytest.raises(FileNotFoundError, match="mask missing for 1 of 10 .*data.mask_dir"):
    VOCSource(str(real), "train", with_mask=True)
  src = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  only_skipped(src, [train_ids(real)[0]], "mask missing")
  with pytest.raises(FileNotFoundError, match="mask folder missing: .*Nope; set data.mask_dir"):
    VOCSource(str(real), "train", with_mask=True, mask_dir="Nope")
  shutil.rmtree(real / "SegmentationClassAug")
  shutil.rmtree(real / "SegmentationClass")
  with pytest.raises(FileNotFoundError, match="neither SegmentationClassAug/ nor SegmentationClass/"):
    VOCSource(str(real), "train", with_mask=True)


# --- label tables ------------------------------------------------------------------------------


def write_tables(root, tmp_path, change):
  """The fixture's labels as JSON, .npz and pickled .npy, with `change(table)` applied."""
  table = {
      k: np.asarray(v, np.float32) for k, v in json.loads((root / "cls_labels.json").read_text()).items()
  }
  change(table)
  paths = {"json": tmp_path / "t.json", "npz": tmp_path / "t.npz", "npy": tmp_path / "t.npy"}
  paths["json"].write_text(json.dumps({k: v.tolist() for k, v in table.items()}))
  np.savez(paths["npz"], **table)
  np.save(paths["npy"], table)  # pickled, as IRN/SIPE's cls_labels.npy
  return paths


@pytest.mark.parametrize("fmt", ("json", "npz", "npy"))
@pytest.mark.parametrize("mode", MODES)
def test_label_vector_of_wrong_length(real, tmp_path, fmt, mode):
  bad = train_ids(real)[5]
  paths = write_tables(real, tmp_path, lambda t: t.update({bad: np.concatenate([[0.0], t[bad]])}))
  kw = dict(labels=str(paths[fmt]), allow_pickle=fmt == "npy", on_bad_input=mode)
  if mode == "strict":
    with pytest.raises(ValueError) as e:
      VOCSource(str(real), "train", **kw)
    msg = one_line(e)
    assert f"VOC label for '{bad}' in {paths[fmt]}" in msg and "length 20 (got length 21" in msg
    assert "drop the background entry" in msg
    with pytest.raises(ValueError, match="got length 21"):
      voc.load_label_table(paths[fmt], allow_pickle=fmt == "npy")
    return
  src = VOCSource(str(real), "train", **kw)
  only_skipped(src, [bad], "got length 21")
  # A bad entry for an id the split does not list is not this split's problem.
  assert VOCSource(str(real), "val", **kw).skipped == []


@pytest.mark.parametrize("mode", MODES)
def test_missing_and_non_binary_table_entries(real, tmp_path, mode):
  ids = train_ids(real)

  def change(t):
    del t[ids[0]]
    t[ids[1]] = t[ids[1]] * 0.5

  path = write_tables(real, tmp_path, change)["json"]
  if mode == "strict":
    with pytest.raises(
        ValueError, match=r"in .*t.json is not a 0/1 vector of length 20 \(got values \[0.5\]\)"
    ):
      VOCSource(str(real), "train", labels=str(path))
    change = lambda t: t.pop(ids[0])  # noqa: E731
    path = write_tables(real, tmp_path, change)["json"]
    with pytest.raises(KeyError) as e:
      VOCSource(str(real), "train", labels=str(path))
    assert f"VOC id {ids[0]} has no entry in {path}" in one_line(e)
    return
  src = VOCSource(str(real), "train", labels=str(path), on_bad_input="skip")
  only_skipped(src, ids[:2], "no entry|not a 0/1 vector")


def test_table_file_not_a_table(real, tmp_path):
  arr = tmp_path / "arr.npy"
  np.save(arr, np.zeros((10, 20), np.float32))  # plain numpy, but no ids
  with pytest.raises(ValueError, match=r"holds a \(10, 20\) float32 array, not an id -> vector table"):
    VOCSource(str(real), "train", labels=str(arr))
  broken = tmp_path / "broken.json"
  broken.write_text('{"2007_000032": [0, 1')
  with pytest.raises(ValueError, match="not valid JSON: .*broken.json"):
    VOCSource(str(real), "train", labels=str(broken))
  with pytest.raises(FileNotFoundError, match="label file missing: .*nope.json"):
    VOCSource(str(real), "train", labels=str(tmp_path / "nope.json"))
  (tmp_path / "labels.txt").write_text("x")
  with pytest.raises(ValueError, match="must end in .json, .npy or .npz"):
    voc.load_label_table(tmp_path / "labels.txt")


# --- images with no labelled class -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_no_labelled_class_in_table(real, tmp_path, mode):
  empty = train_ids(real)[2]
  path = write_tables(real, tmp_path, lambda t: t.update({empty: np.zeros(20, np.float32)}))["json"]
  if mode == "strict":
    with pytest.raises(ValueError) as e:
      VOCSource(str(real), "train", labels=str(path))
    assert f"VOC id {empty} has no foreground class in {path}" in one_line(e)
    return
  only_skipped(VOCSource(str(real), "train", labels=str(path), on_bad_input="skip"), [empty], "no foreground")


@pytest.mark.parametrize("mode", MODES)
def test_no_labelled_class_in_mask(real, mode):
  empty = train_ids(real)[4]
  mpath = real / "SegmentationClassAug" / f"{empty}.png"
  a = np.array(Image.open(mpath))
  Image.fromarray(np.where(a == 255, 255, 0).astype(np.uint8)).save(mpath)  # background and ignore only
  if mode == "strict":
    src = VOCSource(str(real), "train", labels="mask")
    with pytest.raises(ValueError) as e:
      src[4]
    assert f"VOC id {empty} has no foreground class in {mpath}" in one_line(e)
    return
  only_skipped(VOCSource(str(real), "train", labels="mask", on_bad_input="skip"), [empty], "no foreground")


def test_no_labelled_class_and_bad_xml_skipped(tiny_voc):
  write_xml(tiny_voc / "Annotations" / "2007_000001.xml", "x.jpg", (40, 60), [])
  (tiny_voc / "Annotations" / "2007_000002.xml").write_text("<annotation><object>")
  with pytest.raises(ValueError, match="all 2 listed entries are bad input"):
    VOCSource(str(tiny_voc), "train", on_bad_input="skip")
  src = VOCSource(str(tiny_voc), "train")  # strict: found when read (test_voc.test_xml_errors)
  with pytest.raises(ValueError, match="not valid XML: .*2007_000002.xml"):
    src[1]
  (tiny_voc / "Annotations" / "2008_000003.xml").unlink()
  with pytest.raises(FileNotFoundError, match="annotation missing for 1 of 1 .*2008_000003.xml"):
    VOCSource(str(tiny_voc), "val")


# --- split files -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_empty_and_missing_split_file(real, tmp_path, mode):
  for text in ("", "\n  \n\t\n"):
    (real / "ImageSets/Segmentation/train.txt").write_text(text)
    with pytest.raises(ValueError, match="split list is empty: .*train.txt; put one image id per line"):
      VOCSource(str(real), "train", on_bad_input=mode)
  with pytest.raises(
      FileNotFoundError, match=r"split list missing: .*trainval.txt; use one of \['train', 'val'\]"
  ):
    VOCSource(str(real), "trainval", on_bad_input=mode)
  with pytest.raises(FileNotFoundError, match="split list missing: .*train_aug.txt; check data.train_split"):
    VOCSource(str(real), str(tmp_path / "train_aug.txt"), on_bad_input=mode)


@pytest.mark.parametrize("mode", MODES)
def test_duplicate_ids_in_split(real, tmp_path, mode, caplog):
  ids = train_ids(real)
  lst = tmp_path / "train_aug.txt"
  lst.write_text(
      "\n".join(ids + [ids[3], f"JPEGImages/{ids[0]}.jpg SegmentationClassAug/{ids[0]}.png"]) + "\n"
  )
  if mode == "strict":
    with pytest.raises(ValueError) as e:
      VOCSource(str(real), str(lst))
    msg = one_line(e)
    assert f"{lst} lists 2 ids more than once: {sorted([ids[0], ids[3]])}" in msg
    assert "remove the repeated lines" in msg
    return
  with caplog.at_level(logging.WARNING, logger=voc.__name__):
    src = VOCSource(str(real), str(lst), on_bad_input="skip")
  assert src.ids() == ids  # the first of each kept, in order
  assert src.skipped == [(ids[3], f"listed again in {lst}"), (ids[0], f"listed again in {lst}")]
  assert "skipped 2 of 12" in caplog.text


# --- data root ---------------------------------------------------------------------------------


def test_bad_roots(real, tmp_path):
  with pytest.raises(FileNotFoundError, match="root does not exist: .*nowhere; set data.root"):
    VOCSource(str(tmp_path / "nowhere"), "train")
  (tmp_path / "afile").write_text("")
  with pytest.raises(FileNotFoundError, match="root is not a folder: .*afile"):
    VOCSource(str(tmp_path / "afile"), "train")
  # One level too high: the error says where the images are.
  with pytest.raises(FileNotFoundError, match=f"no JPEGImages/: {tmp_path}; .*did you mean {real}"):
    VOCSource(str(tmp_path), "train")
  with pytest.raises(
      FileNotFoundError, match="Annotations/ missing under .*; use labels='cls_labels' or 'mask'"
  ):
    VOCSource(str(real), "val", labels="xml")
  shutil.rmtree(real / "ImageSets")
  with pytest.raises(FileNotFoundError, match="has no ImageSets/Segmentation/ for split 'train'"):
    VOCSource(str(real), "train")


# --- safe loading of label tables --------------------------------------------------------------


def test_pickled_npy_needs_opt_in_and_the_fix_works(real, tmp_path):
  npy = real / "cls_labels.npy"  # SIPE's file: a pickled dict
  with pytest.raises(ValueError) as e:
    VOCSource(str(real), "train", labels=str(npy))
  msg = one_line(e)
  assert f"{npy} is a pickled numpy file" in msg and "data.allow_pickle=True" in msg
  with pytest.raises(ValueError, match="pickled"):
    voc.load_label_table(npy)
  # Run the command the message gives, exactly.
  cmd = re.search(r"with: (python -c .*?\)\") and pass labels='([^']+)'", msg)
  argv = shlex.split(cmd.group(1))
  subprocess.run([sys.executable] + argv[1:], cwd=REPO, check=True)
  as_json = Path(cmd.group(2))
  assert as_json == npy.with_suffix(".json") and as_json.is_file()
  opted_in = VOCSource(str(real), "train", labels=str(npy), allow_pickle=True)
  converted = VOCSource(str(real), "train", labels=str(as_json))
  for i in range(len(converted)):
    np.testing.assert_array_equal(converted[i]["label"], opted_in[i]["label"])
  # IRN's int ids come out as VOC ids.
  irn = tmp_path / "irn.npy"
  np.save(irn, {2007000032: multi_hot(["aeroplane"]), 2008000003: multi_hot(["cat"])})
  assert json.loads(voc.npy_to_json(irn).read_text()) == {
      "2007_000032": multi_hot(["aeroplane"]).tolist(),
      "2008_000003": multi_hot(["cat"]).tolist(),
  }


# --- skip mode bookkeeping and pipeline plumbing -----------------------------------------------


def test_skip_reports_several_problems_once(real, caplog):
  ids = train_ids(real)
  (real / "JPEGImages" / f"{ids[9]}.jpg").unlink()
  corrupt(real)
  break_masks(real)  # ids 0..2 again: each id is listed once, with its first problem
  with caplog.at_level(logging.WARNING, logger=voc.__name__):
    src = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  assert [i for i, _ in src.skipped] == ids[:4] + [ids[9]]
  assert len(src) == 5 and src.ids() == ids[4:9]
  records = [r for r in caplog.records if r.name == voc.__name__]
  assert len(records) == 1 and "skipped 5 of 10" in records[0].getMessage()
  assert VOCSource(str(real), "val", on_bad_input="skip").skipped == []  # strict mode has none either
  assert VOCSource(str(real), "val").skipped == []


def test_skip_checks_each_unchanged_file_once_per_process(real, monkeypatch):
  ids = train_ids(real)
  first = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  assert first.skipped == []
  loads = []
  original = VOCSource._load
  monkeypatch.setattr(
      VOCSource, "_load", lambda self, i, check_only=False: loads.append(i) or original(self, i, check_only)
  )
  again = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  assert loads == [] and again.ids() == first.ids()  # every stage's source: stat only
  break_masks(real)  # rewrites the masks of ids 0..2: their checks run again, the rest stay cached
  third = VOCSource(str(real), "train", with_mask=True, on_bad_input="skip")
  assert sorted(loads) == sorted(ids[:3]) and [i for i, _ in third.skipped] == ids[:3]


def voc_config(root, **data):
  import voc as voc_config_module  # configs/voc.py

  c = voc_config_module.get_config()
  c.data.root = str(root)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_pipeline_threads_on_bad_input_and_allow_pickle(real):
  with pytest.raises(
      ValueError, match=r"data.on_bad_input='lenient' not understood; choose 'strict'.*or 'skip'"
  ):
    pipeline.make_source(voc_config(real, on_bad_input="lenient"), "train")
  synthetic = voc_config(real, on_bad_input="Skip")
  synthetic.data.name = "synthetic"
  with pytest.raises(ValueError, match="data.on_bad_input"):
    pipeline.make_source(synthetic, "train")

  broken = corrupt(real)
  config = voc_config(real, mask_dir="auto")
  assert config.data.on_bad_input == "strict" and config.data.allow_pickle is False
  src = pipeline.make_source(config, "train", with_mask=True)
  assert len(src) == 10 and src.on_bad_input == "strict"
  src = pipeline.make_source(voc_config(real, on_bad_input="skip"), "train", with_mask=True)
  assert [i for i, _ in src.skipped] == broken

  npy = str(real / "cls_labels.npy")
  with pytest.raises(ValueError, match="data.allow_pickle=True"):
    pipeline.make_source(voc_config(real, labels=npy), "val")
  assert len(pipeline.make_source(voc_config(real, labels=npy, allow_pickle=True), "val")) == 10
