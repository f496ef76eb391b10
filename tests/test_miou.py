import numpy as np
import pytest

from cpal_jax.eval import miou


def test_confusion_counts_and_ignore():
  gt = np.array([[0, 0, 1], [1, 2, 255]])
  pred = np.array([[0, 1, 1], [2, 2, 0]])
  conf = miou.confusion(gt, pred, 3)
  expected = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
  np.testing.assert_array_equal(conf, expected)


def test_iou_hand_computed():
  conf = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
  # class 0: tp 1, gt 2, pred 1 -> 1/2; class 1: tp 1, gt 2, pred 2 -> 1/3; class 2: tp 1, gt 1, pred 2 -> 1/2
  np.testing.assert_allclose(miou.iou_per_class(conf), [1 / 2, 1 / 3, 1 / 2])
  assert miou.miou(conf) == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)


def test_absent_class_is_nan_and_skipped():
  conf = np.array([[3, 0, 0], [0, 0, 0], [0, 0, 2]])
  ious = miou.iou_per_class(conf)
  assert np.isnan(ious[1])
  assert miou.miou(conf) == 1.0
  rep = miou.report(conf, ["bg", "a", "b"])
  assert rep["per_class_iou"]["a"] is None and rep["miou"] == 100.0


def test_accumulated_not_averaged_per_image():
  # Image 1: perfect on a tiny object; image 2: a large object half missed. Per-image averaging
  # would give a different figure than the pooled matrix the papers use.
  gt1, pr1 = np.array([1, 0, 0, 0]), np.array([1, 0, 0, 0])
  gt2, pr2 = np.array([1] * 8 + [0] * 8), np.array([1] * 4 + [0] * 12)
  pooled = miou.confusion(gt1, pr1, 2) + miou.confusion(gt2, pr2, 2)
  tp1 = 5 / 9  # class 1: tp 5, gt 9, pred 5
  tp0 = 11 / 15  # class 0: tp 11, gt 11, pred 15
  assert miou.miou(pooled) == pytest.approx((tp1 + tp0) / 2)


def test_out_of_range_values_raise():
  with pytest.raises(ValueError, match="ground-truth"):
    miou.confusion(np.array([5]), np.array([0]), 3)
  with pytest.raises(ValueError, match="predicted"):
    miou.confusion(np.array([0]), np.array([3]), 3)
