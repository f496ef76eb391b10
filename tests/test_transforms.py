"""TrainAugment / EvalPrepare: geometry, determinism and the valid mask."""

import grain
import numpy as np
import pytest
from PIL import Image

from cpal_jax.data.transforms import EvalPrepare, TrainAugment
from cpal_jax.models.resnet import IMAGENET_MEAN, IMAGENET_STD


def make_element(h, w, seed=0, with_mask=True):
  rng = np.random.default_rng(seed)
  # Values in [50, 200]: bicubic overshoot cannot reach 0 and the mask never hits 255,
  # so "nonzero pixel" and "mask != 255" both mark exactly the placed image.
  el = {
      "id": f"img{seed}",
      "image": rng.integers(50, 201, (h, w, 3), dtype=np.uint8),
      "label": np.eye(20, dtype=np.float32)[seed % 20],
  }
  if with_mask:
    el["mask"] = rng.integers(1, 21, (h, w), dtype=np.uint8)
  return el


def run(t, el, seed):
  return t.random_map(el, np.random.default_rng(seed))


def expected_size(h, w, long_side):
  # IRN pil_rescale: int(np.round(side * scale)) (round half to even).
  scale = long_side / max(h, w)
  return int(np.round(h * scale)), int(np.round(w * scale))


def test_constants():
  assert IMAGENET_MEAN == (0.485, 0.456, 0.406) and IMAGENET_STD == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("h,w", [(300, 400), (40, 30), (128, 128)])
def test_shapes_dtypes_and_keys(h, w):
  t = TrainAugment(96, resize_long=(64, 160))
  for seed in range(4):
    out = run(t, make_element(h, w), seed)
    assert set(out) == {"image", "valid", "label", "mask"}
    assert out["image"].shape == (96, 96, 3) and out["image"].dtype == np.uint8
    assert out["valid"].shape == (96, 96) and out["valid"].dtype == np.uint8
    assert out["mask"].shape == (96, 96) and out["mask"].dtype == np.uint8
    assert out["label"].dtype == np.float32 and out["label"].shape == (20,)
  assert "mask" not in run(t, make_element(h, w, with_mask=False), 0)
  assert run(TrainAugment(96, keep_id=True), make_element(h, w), 0)["id"] == "img0"


def test_deterministic_for_seed():
  t = TrainAugment(64, resize_long=(40, 120))
  el = make_element(70, 90)
  a, b = run(t, el, 7), run(t, el, 7)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  outs = [run(t, el, s)["image"] for s in range(6)]
  assert any(not np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("long_side,h,w", [(50, 70, 90), (200, 70, 90), (100, 90, 40), (80, 30, 200)])
def test_valid_covers_exactly_the_placed_image(long_side, h, w):
  crop = 64
  t = TrainAugment(crop, resize_long=(long_side, long_side))
  nh, nw = expected_size(h, w, long_side)
  for seed in range(5):
    out = run(t, make_element(h, w, seed), seed)
    valid = out["valid"].astype(bool)
    assert valid.sum() == min(crop, nh) * min(crop, nw)
    rows, cols = np.nonzero(valid)  # a single axis-aligned rectangle
    assert valid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    np.testing.assert_array_equal(out["image"].any(-1), valid)
    assert (out["image"][~valid] == 0).all()
    np.testing.assert_array_equal(out["mask"] != 255, valid)


def test_resize_rounding_matches_pil_bicubic():
  h, w, long_side = 25, 50, 33  # 25 * 33/50 = 16.5 -> np.round gives 16, not 17
  el = make_element(h, w)
  t = TrainAugment(64, resize_long=(long_side, long_side), flip=False)
  out = run(t, el, 3)
  assert expected_size(h, w, long_side) == (16, 33)
  valid = out["valid"].astype(bool)
  rows, cols = np.nonzero(valid)
  box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
  ref = np.asarray(Image.fromarray(el["image"]).resize((33, 16), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(out["image"][box], ref)
  ref_mask = np.asarray(Image.fromarray(el["mask"]).resize((33, 16), Image.Resampling.NEAREST))
  np.testing.assert_array_equal(out["mask"][box], ref_mask)


def find_window(big, small):
  s = small.shape[0]
  ys, xs = np.nonzero((big[: -s + 1 or None, : -s + 1 or None] == small[0, 0]).all(-1))
  return [(y, x) for y, x in zip(ys, xs) if np.array_equal(big[y : y + s, x : x + s], small)]


def test_crop_of_large_image_is_a_subwindow():
  h, w, long_side, crop = 120, 160, 200, 64
  el = make_element(h, w)
  nh, nw = expected_size(h, w, long_side)
  resized = np.asarray(Image.fromarray(el["image"]).resize((nw, nh), Image.Resampling.BICUBIC))
  t = TrainAugment(crop, resize_long=(long_side, long_side), flip=False)
  offsets = set()
  for seed in range(4):
    out = run(t, el, seed)
    assert out["valid"].all()
    hits = find_window(resized, out["image"])
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) > 1  # the offset is actually random


def test_flip_mirrors_image_and_mask_together():
  # Crop == image size and no resize: the only randomness left is the flip.
  el = make_element(48, 48)
  el["mask"] = el["image"][..., 0].copy()
  t = TrainAugment(48, resize_long=None)
  flipped = 0
  for seed in range(16):
    out = run(t, el, seed)
    np.testing.assert_array_equal(out["mask"], out["image"][..., 0])
    if np.array_equal(out["image"], el["image"][:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out["image"], el["image"])
  assert 0 < flipped < 16
  no_flip = TrainAugment(48, resize_long=(0, 0), flip=False)
  assert all(np.array_equal(run(no_flip, el, s)["image"], el["image"]) for s in range(8))


def test_mask_follows_image_geometry_when_cropping():
  el = make_element(90, 70)
  el["mask"] = el["image"][..., 1].copy()
  t = TrainAugment(64, resize_long=None)
  for seed in range(6):
    out = run(t, el, seed)
    valid = out["valid"].astype(bool)
    np.testing.assert_array_equal(out["mask"][valid], out["image"][..., 1][valid])


def test_resized_mask_is_nearest():
  el = make_element(50, 80)
  out = run(TrainAugment(64, resize_long=(150, 150)), el, 0)
  inside = out["mask"][out["valid"].astype(bool)]
  assert set(np.unique(inside)) <= set(np.unique(el["mask"]))


def test_bad_arguments():
  with pytest.raises(ValueError, match="crop_size"):
    TrainAugment(0)
  with pytest.raises(ValueError, match="resize_long"):
    TrainAugment(64, resize_long=(640, 320))
  with pytest.raises(ValueError, match=r"uint8\[H,W,3\]"):
    run(TrainAugment(64), {"id": "x", "image": np.zeros((8, 8), np.float32), "label": np.zeros(20)}, 0)


def test_grain_pipeline_is_reproducible():
  source = [make_element(60 + 7 * i, 80 - 5 * i, seed=i) for i in range(5)]

  def materialise():
    ds = grain.MapDataset.source(source).random_map(TrainAugment(48, resize_long=(40, 100)), seed=123)
    return [ds[i] for i in range(len(ds))]

  a, b = materialise(), materialise()
  for x, y in zip(a, b):
    assert set(x) == {"image", "valid", "label", "mask"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_eval_prepare_pads_bottom_right():
  el = make_element(30, 45)
  out = EvalPrepare(pad_to=64).map(el)
  assert set(out) == {"image", "valid", "size", "label", "mask"}
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
  np.testing.assert_array_equal(out["image"][:30, :45], el["image"])
  assert (out["image"][30:] == 0).all() and (out["image"][:, 45:] == 0).all()
  assert out["valid"].dtype == np.uint8 and out["valid"].sum() == 30 * 45 and out["valid"][:30, :45].all()
  np.testing.assert_array_equal(out["mask"][:30, :45], el["mask"])
  assert (out["mask"][30:] == 255).all() and (out["mask"][:, 45:] == 255).all()
  assert out["size"].dtype == np.int32 and out["size"].tolist() == [30, 45]
  np.testing.assert_array_equal(out["label"], el["label"])


def test_eval_prepare_without_padding_and_errors():
  el = make_element(30, 45)
  out = EvalPrepare().map(el)
  np.testing.assert_array_equal(out["image"], el["image"])
  assert out["valid"].shape == (30, 45) and out["valid"].all() and "id" not in out
  assert EvalPrepare(keep_id=True).map(el)["id"] == "img0"
  with pytest.raises(ValueError, match="img0.*larger than EvalPrepare pad_to=40"):
    EvalPrepare(pad_to=40).map(el)
