"""The second procedural world (cpal_jax/data/synthetic_everyday.py) on the shared renderer."""

import numpy as np
import pytest

from cpal_jax.data import pipeline, synthetic
from cpal_jax.data import synthetic_everyday as ev
from cpal_jax.data.synthetic import SyntheticSource

N = 400


@pytest.fixture(scope="module")
def items():
  src = SyntheticSource("train", num_images=N, world="everyday")
  return [src[i] for i in range(N)]


def _class_means(items, cls):
  return np.array([it["image"][it["mask"] == cls].astype(np.float64).mean(0) for it in items if (it["mask"] == cls).any()])


def _ring(it, cls, r=3):
  m = it["mask"] == cls
  h, w = m.shape
  p = np.pad(m, r)
  grown = np.zeros_like(m)
  for dy in range(2 * r + 1):
    for dx in range(2 * r + 1):
      grown |= p[dy : dy + h, dx : dx + w]
  return grown & (it["mask"] == 0)


def test_source_api_and_labels(items):
  src = SyntheticSource("val", num_images=5, world="everyday")
  assert src.num_classes == 10 and src.class_names == ev.CLASS_NAMES
  assert "everyday" in repr(src)
  for it in items:
    present = sorted(set(np.unique(it["mask"]).tolist()) - {0})
    assert present == (np.flatnonzero(it["label"]) + 1).tolist()
    assert it["mask"].max() < 10 and 1 <= it["label"].sum() <= 3
  freq = np.stack([it["label"] for it in items]).mean(0)
  assert (freq >= 0.05).all(), dict(zip(ev.CLASS_NAMES[1:], freq.round(3)))
  # No class of the default world's vocabulary: a different set, not a renaming.
  assert not set(ev.CLASS_NAMES[1:]) & set(synthetic.CLASS_NAMES[1:])


def test_own_seed_streams_and_determinism():
  a = SyntheticSource("train", seed=0, num_images=3, world="everyday")
  b = SyntheticSource("train", seed=0, num_images=3)
  for i in range(3):
    assert np.array_equal(a[i]["image"], SyntheticSource("train", seed=0, world="everyday")[i]["image"])
    assert not np.array_equal(a[i]["image"], b[i]["image"])


def test_subtypes_are_distinct(items):
  for cls in (ev.CAR, ev.HOUSE, ev.BOTTLE, ev.CUP, ev.FLOWER, ev.BIRD):
    x = _class_means(items, cls)
    c0 = x[np.argmax(((x - x.mean(0)) ** 2).sum(1))]
    c1 = x[np.argmax(((x - c0) ** 2).sum(1))]
    assert np.linalg.norm(c0 - c1) > 80, ev.CLASS_NAMES[cls]


def test_mushroom_and_umbrella_are_lookalikes(items):
  mush = _class_means(items, ev.MUSHROOM)

  def twin_rate(other):
    d = np.linalg.norm(mush[:, None] - _class_means(items, other)[None], axis=-1).min(1)
    return (d < 30).mean()

  others = [twin_rate(c) for c in range(1, 10) if c not in (ev.MUSHROOM, ev.UMBRELLA)]
  assert twin_rate(ev.UMBRELLA) > max(others) + 0.1, (twin_rate(ev.UMBRELLA), others)


def test_context_is_unlabelled_background(items):
  def green(it, ring):
    img = it["image"].astype(np.int32)
    return ((img[..., 1] - img[..., 0] > 40) & (img[..., 1] - img[..., 2] > 40))[ring].mean()

  def grey(it, ring):
    img = it["image"].astype(np.int32)
    return ((img.max(-1) - img.min(-1) < 30) & (img.mean(-1) < 110))[ring].mean()

  flower = [green(it, r) for it in items if (r := _ring(it, ev.FLOWER)).sum() >= 10]
  car = [grey(it, r) for it in items if (r := _ring(it, ev.CAR)).sum() >= 10]
  key = [green(it, r) for it in items if (r := _ring(it, ev.KEY)).sum() >= 10]
  assert len(flower) > 30 and np.mean(np.array(flower) > 0.15) > 0.6
  assert len(car) > 30 and np.mean(np.array(car) > 0.15) > 0.6
  assert np.mean(np.array(key) > 0.15) < 0.25  # other classes are not in grass


def test_config_selects_the_world():
  from ml_collections import config_dict

  c = config_dict.ConfigDict(
      {"seed": 0, "data": {"name": "synthetic", "num_classes": 10, "num_train": 4, "num_eval": 2,
                           "image_size": 64, "world": "everyday"}}
  )
  src = pipeline.make_source(c, "train")
  assert src.class_names == ev.CLASS_NAMES and len(src) == 4
  with c.unlocked():
    c.data.world = "space"
  with pytest.raises(ValueError, match="data.world='space'"):
    pipeline.make_source(c, "train")
