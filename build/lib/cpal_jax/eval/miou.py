"""Confusion-matrix mIoU exactly as the WSSS papers score (docs/method.md section 5).

One matrix accumulated over all pixels of all images (never a mean of per-image IoUs), ground
truth 255 ignored, background included, nan-mean over classes that occur in GT or predictions.
"""

import numpy as np

IGNORE = 255


def confusion(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, num_classes] counts, rows = ground truth, columns = prediction."""
  gt = np.asarray(gt).ravel().astype(np.int64)
  pred = np.asarray(pred).ravel().astype(np.int64)
  keep = gt != IGNORE
  gt, pred = gt[keep], pred[keep]
  if gt.size and (gt.max() >= num_classes or gt.min() < 0):
    raise ValueError(f"ground-truth value {gt.max()} outside 0..{num_classes - 1} and 255")
  if pred.size and (pred.max() >= num_classes or pred.min() < 0):
    raise ValueError(f"predicted value {pred.max()} outside 0..{num_classes - 1}")
  return np.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
  """IoU_c = TP / (GT_c + Pred_c - TP); nan for a class absent from both."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  denom = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)


def miou(conf: np.ndarray) -> float:
  return float(np.nanmean(iou_per_class(conf)))


def report(conf: np.ndarray, class_names) -> dict:
  """mIoU and per-class IoU (in %) for summary.json."""
  ious = iou_per_class(conf)
  return {
      "miou": round(100 * float(np.nanmean(ious)), 3),
      "per_class_iou": {
          n: (None if np.isnan(v) else round(100 * float(v), 3)) for n, v in zip(class_names, ious)
      },
  }
