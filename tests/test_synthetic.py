"""Tests for the procedural VOC stand-in (cpal_jax.data.synthetic)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cpal_jax.data import palette, synthetic
from cpal_jax.data.synthetic import SPLITS, SyntheticSource

ROOT = Path(__file__).resolve().parents[1]
N_STATS = 400


@pytest.fixture(scope="module")
def train_items():
  src = SyntheticSource("train", num_images=N_STATS)
  return [src[i] for i in range(N_STATS)]


def _dilate(m, r):
  """Binary dilation with a (2r+1)^2 square, separable and loop-free per pixel."""
  h, w = m.shape
  p = np.pad(m, r)
  rows = np.zeros((h + 2 * r, w), bool)
  for d in range(2 * r + 1):
    rows |= p[:, d : d + w]
  out = np.zeros((h, w), bool)
  for d in range(2 * r + 1):
    out |= rows[d : d + h]
  return out


def _rings(items, cls, r=3):
  """(item, ring) for images with `cls`: background pixels within r px of it."""
  for it in items:
    m = it["mask"] == cls
    if m.any():
      ring = _dilate(m, r) & (it["mask"] == 0)
      if ring.sum() >= 10:
        yield it, ring


def _two_means(x, iters=25):
  c0 = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))]
  c1 = x[np.argmax(((x - c0) ** 2).sum(1))]
  cent = np.stack([c0, c1])
  for _ in range(iters):
    assign = ((x[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
    cent = np.stack([x[assign == k].mean(0) if (assign == k).any() else cent[k] for k in range(2)])
  return cent, assign


def _class_mean_colours(items, cls):
  return np.array(
      [it["image"][it["mask"] == cls].astype(np.float64).mean(0) for it in items if (it["mask"] == cls).any()]
  )


# ----------------------------------------------------------------- API


def test_api_constants():
  src = SyntheticSource("train")
  assert SPLITS == {"train": 1600, "train_eval": 200, "val": 200}
  assert len(src) == 1600
  assert len(SyntheticSource("train_eval")) == 200 and len(SyntheticSource("val")) == 200
  assert len(SyntheticSource("val", num_images=7)) == 7
  assert src.num_classes == len(src.class_names) <= 11
  assert 8 <= src.num_classes - 1 <= 10
  assert src.class_names[0] == "background"
  assert len(set(src.class_names)) == src.num_classes
  assert src.ids()[:2] == ["train_000000", "train_000001"]
  with pytest.raises(ValueError):
    SyntheticSource("test")
  with pytest.raises(IndexError):
    SyntheticSource("val", num_images=3)[3]


def test_item_types_and_label_consistency(train_items):
  k = synthetic.NUM_CLASSES
  for i, it in enumerate(train_items):
    assert set(it) == {"id", "image", "label", "mask"}
    assert it["id"] == f"train_{i:06d}"
    img, lab, msk = it["image"], it["label"], it["mask"]
    assert img.dtype == np.uint8 and img.shape == (96, 96, 3)
    assert lab.dtype == np.float32 and lab.shape == (k - 1,)
    assert msk.dtype == np.uint8 and msk.shape == (96, 96)
    assert msk.max() < k  # no 255 ignore band by design
    assert set(np.unique(lab)) <= {0.0, 1.0}
    present = sorted(set(np.unique(msk).tolist()) - {0})
    assert present == (np.flatnonzero(lab) + 1).tolist()
    assert 1 <= lab.sum() <= 3
  # Images use the whole range and are not trivially flat.
  assert np.mean([it["image"].std() for it in train_items]) > 25


def test_objects_and_background_both_substantial(train_items):
  fg = np.array([(it["mask"] > 0).mean() for it in train_items])
  assert 0.08 < fg.mean() < 0.5
  n_inst_classes = np.array([it["label"].sum() for it in train_items])
  assert (n_inst_classes >= 2).mean() > 0.3


def test_image_size_override():
  it = SyntheticSource("val", num_images=2, image_size=64)[1]
  assert it["image"].shape == (64, 64, 3) and it["mask"].shape == (64, 64)


# ------------------------------------------------------- determinism/splits


def test_determinism_same_and_fresh_source():
  a = SyntheticSource("train", seed=3)
  b = SyntheticSource("train", seed=3)
  for idx in (0, 5, 1599):
    x, y, z = a[idx], a[idx], b[idx]
    for key in ("image", "mask", "label"):
      assert np.array_equal(x[key], y[key]) and np.array_equal(x[key], z[key])
    assert x["id"] == z["id"]
  assert np.array_equal(a[np.int64(5)]["image"], a[5]["image"])
  assert np.array_equal(a[-1]["image"], a[1599]["image"])
  # A different seed is a different dataset.
  assert not np.array_equal(a[0]["image"], SyntheticSource("train", seed=4)[0]["image"])


def test_determinism_across_processes():
  code = (
      "import hashlib;from cpal_jax.data.synthetic import SyntheticSource as S;"
      "it=S('val',seed=1)[17];print(hashlib.sha1(it['image'].tobytes()+it['mask'].tobytes()).hexdigest())"
  )
  out = subprocess.run(
      [sys.executable, "-c", code],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
      env={"PYTHONHASHSEED": "123", "PATH": ""},
  ).stdout.strip()
  import hashlib

  it = SyntheticSource("val", seed=1)[17]
  assert out == hashlib.sha1(it["image"].tobytes() + it["mask"].tobytes()).hexdigest()


def test_train_eval_is_train_prefix():
  tr, te = SyntheticSource("train"), SyntheticSource("train_eval")
  assert te.ids() == tr.ids()[: len(te)]
  for idx in (0, 1, 99, len(te) - 1):
    a, b = tr[idx], te[idx]
    assert a["id"] == b["id"]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])


def test_val_disjoint_from_train():
  val = SyntheticSource("val")
  assert val.ids()[7] == "val_000007"
  assert not set(val.ids()) & set(SyntheticSource("train").ids())
  train_hashes = {SyntheticSource("train")[i]["image"].tobytes() for i in range(60)}
  for i in range(60):
    assert val[i]["image"].tobytes() not in train_hashes


# ------------------------------------------------------ dataset properties


def test_every_class_frequent_enough(train_items):
  freq = np.stack([it["label"] for it in train_items]).mean(0)
  assert (freq >= 0.05).all(), dict(zip(synthetic.CLASS_NAMES[1:], freq.round(3)))


def test_object_scale_range(train_items):
  # Bounding-box extent (max side / image side) spans small to large objects.
  ext = []
  for it in train_items:
    for c in np.flatnonzero(it["label"]) + 1:
      ys, xs = np.nonzero(it["mask"] == c)
      ext.append(max(np.ptp(ys), np.ptp(xs)) / 96)
  ext = np.array(ext)
  assert np.quantile(ext, 0.1) < 0.2 and np.quantile(ext, 0.9) > 0.4


def test_subtypes_have_distinct_appearances(train_items):
  # Per-image mean colour of a class splits into two far-apart groups; a
  # single appearance (even with colour jitter) leaves them < ~50 apart.
  for cls in (
      synthetic.TRAIN,
      synthetic.BALL,
      synthetic.CRATE,
      synthetic.STAR,
      synthetic.RING,
      synthetic.CROSS,
      synthetic.TREE,
      synthetic.FISH,
  ):
    x = _class_mean_colours(train_items, cls)
    cent, assign = _two_means(x)
    dist = np.linalg.norm(cent[0] - cent[1])
    minority = min(assign.mean(), 1 - assign.mean())
    name = synthetic.CLASS_NAMES[cls]
    assert dist > 80, (name, dist)
    assert minority > 0.1, (name, minority)


def test_single_appearance_would_fail_subtype_check():
  # Guard for the test above: jitter alone must not look like sub-types.
  rng = np.random.default_rng(0)
  pal = synthetic._PALETTES[synthetic.STAR][0]
  x = np.stack([synthetic._jitter(rng, pal)[0] for _ in range(200)]).astype(np.float64)
  cent, _ = _two_means(x)
  assert np.linalg.norm(cent[0] - cent[1]) < 80


def test_lookalike_pair_shares_appearance(train_items):
  # ball and crate use the same textures: almost every ball's mean colour has a
  # crate twin (and vice versa), far more often than for any other class pair.
  means = {c: _class_mean_colours(train_items, c) for c in range(1, synthetic.NUM_CLASSES)}

  def twin_rate(a, b):
    d = np.linalg.norm(means[a][:, None] - means[b][None], axis=-1).min(1)
    return (d < 25).mean()

  for a, b in ((synthetic.BALL, synthetic.CRATE), (synthetic.CRATE, synthetic.BALL)):
    assert twin_rate(a, b) > 0.9
    others = [twin_rate(a, c) for c in means if c not in (a, b)]
    assert max(others) < 0.8, others


def _water_fraction(it, ring):
  img = it["image"].astype(np.int32)
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  return ((b - r > 70) & (b > g + 15))[ring].mean()


def _roughness(it, ring):
  y = it["image"].astype(np.float32).mean(-1)
  pair = ring[:, 1:] & ring[:, :-1]
  return np.abs(y[:, 1:] - y[:, :-1])[pair].mean() if pair.sum() >= 10 else 0.0


def test_boat_context_is_water_in_background(train_items):
  watery = [_water_fraction(it, ring) > 0.5 for it, ring in _rings(train_items, synthetic.BOAT)]
  assert len(watery) > 30 and np.mean(watery) > 0.7, np.mean(watery)
  # Other classes are not on water (so the test really measures context).
  other = [
      _water_fraction(it, ring) > 0.5
      for cls in (synthetic.BALL, synthetic.STAR, synthetic.TREE)
      for it, ring in _rings(train_items, cls)
  ]
  assert np.mean(other) < 0.15, np.mean(other)
  # ... and the water itself is labelled background: no water pixels carry the boat class.
  for it, _ in _rings(train_items, synthetic.BOAT):
    boat = it["mask"] == synthetic.BOAT
    assert _water_fraction(it, boat) < 0.5


def test_train_context_is_rough_track(train_items):
  rough = [_roughness(it, ring) > 18 for it, ring in _rings(train_items, synthetic.TRAIN)]
  assert len(rough) > 30 and np.mean(rough) > 0.7, np.mean(rough)
  other = [
      _roughness(it, ring) > 18
      for cls in (synthetic.BALL, synthetic.STAR, synthetic.TREE)
      for it, ring in _rings(train_items, cls)
  ]
  assert np.mean(other) < 0.15, np.mean(other)


# --------------------------------------------------------------------- CLI


def test_voc_colormap():
  cmap = palette.voc_colormap()
  assert cmap.shape == (256, 3)
  assert cmap[0].tolist() == [0, 0, 0] and cmap[1].tolist() == [128, 0, 0]
  assert cmap[15].tolist() == [192, 128, 128] and cmap[255].tolist() == [224, 224, 192]


def test_grid_cli_writes_png(tmp_path):
  out = tmp_path / "grid.png"
  subprocess.run(
      [sys.executable, "-m", "cpal_jax.data.synthetic", "--grid", str(out), "--n", "4", "--seed", "1"],
      cwd=ROOT,
      check=True,
      capture_output=True,
  )
  from PIL import Image

  with Image.open(out) as im:
    im.verify()
  with Image.open(out) as im:
    assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
