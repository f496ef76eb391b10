"""Stage eval_cam: the seed maps make_cam wrote, scored by mIoU on data.eval_split.

Maps with their own background channel (SIPE's IS-CAM) are scored by argmax; foreground-only maps
(plain CAM) by a background threshold t swept over 0.00..0.59 (oracle: it uses GT, so the chosen t
is recorded) with IRN's fixed t=0.15 reported beside it (docs/method.md 1.4, 5). Two trivial predictors
are scored on the same pixels so the figure has a floor to be read against.
"""

import time

import jax
import numpy as np

from cpal_jax import monitor, paths
from cpal_jax.data import pipeline
from cpal_jax.eval import miou
from cpal_jax.infer import cam as infer_cam
from cpal_jax.parallel import distributed


class SeedScorer:
  """Accumulates the confusion matrices of one split (argmax, or every threshold at once)."""

  def __init__(self, num_classes: int, has_background: bool, threshold_max: float = 0.59):
    self.c = num_classes
    self.has_bg = has_background
    self.thresholds = np.round(np.arange(0, threshold_max + 1e-9, 0.01), 2)
    nt = len(self.thresholds)
    # hist[b, g, p]: pixels whose max foreground score exceeds exactly b thresholds.
    self.hist = np.zeros((nt + 1, num_classes, num_classes), np.int64)
    self.conf = np.zeros((num_classes, num_classes), np.int64)
    self.trivial = {"all_background": np.zeros_like(self.conf), "label_fill": np.zeros_like(self.conf)}

  def add(self, scores: np.ndarray, keys: np.ndarray, gt: np.ndarray) -> None:
    """One image: scores [K, H, W] of the channels `keys` (class ids; background 0 first where the
    map has it, else the present foreground classes); gt [H, W]."""
    keys = np.asarray(keys, np.int64)
    fg_keys = keys[keys > 0]
    if self.has_bg:
      pred = keys[np.argmax(scores, axis=0)]
      self.conf += miou.confusion(gt, pred, self.c)
    else:
      cls = fg_keys[np.argmax(scores, axis=0)] if len(fg_keys) else np.zeros(gt.shape, np.int64)
      top = scores.max(0) if len(fg_keys) else np.zeros(gt.shape)
      bins = np.searchsorted(self.thresholds, top, side="left")  # thresholds strictly below top
      keep = gt != miou.IGNORE
      idx = (bins[keep] * self.c + gt[keep]) * self.c + cls[keep]
      self.hist += np.bincount(idx, minlength=self.hist.size).reshape(self.hist.shape)
    self.trivial["all_background"] += miou.confusion(gt, np.zeros_like(gt), self.c)
    fill = fg_keys[0] if len(fg_keys) else 0
    self.trivial["label_fill"] += miou.confusion(gt, np.full_like(gt, fill), self.c)

  def merge_processes(self) -> None:
    """Every process's matrices summed, on every process (each scored its share of the images)."""
    self.hist = distributed.sum_over_processes(self.hist)
    self.conf = distributed.sum_over_processes(self.conf)
    self.trivial = {k: distributed.sum_over_processes(v) for k, v in self.trivial.items()}

  def sweep(self) -> list[np.ndarray]:
    """Confusion matrix at each threshold: foreground where the top score > t, else background."""
    above = np.cumsum(self.hist[::-1], axis=0)[::-1]  # above[b] = pixels in bins >= b
    out = []
    for k in range(len(self.thresholds)):
      conf = above[k + 1].copy() if k + 1 < len(above) else np.zeros_like(self.conf)
      below = self.hist[: k + 1].sum(0)
      conf[:, 0] += below.sum(1)
      out.append(conf)
    return out

  def result(self, class_names, fixed_threshold: float) -> dict:
    out = {"baselines": {k: miou.report(v, class_names)["miou"] for k, v in self.trivial.items()}}
    if self.has_bg:
      rep = miou.report(self.conf, class_names)
      out.update(
          seed_miou=rep["miou"], per_class_iou={"seed": rep["per_class_iou"]}, thresholds={"seed": None}
      )
      return out
    confs = self.sweep()
    scores = [miou.miou(c) for c in confs]
    best = int(np.nanargmax(scores))
    rep = miou.report(confs[best], class_names)
    fixed = int(np.argmin(np.abs(self.thresholds - fixed_threshold)))
    out.update(
        seed_miou=rep["miou"],
        per_class_iou={"seed": rep["per_class_iou"]},
        thresholds={"seed": float(self.thresholds[best])},
        seed_miou_fixed_threshold={"t": float(self.thresholds[fixed]), "miou": round(100 * scores[fixed], 3)},
        seed_sweep=[round(100 * s, 3) for s in scores],
    )
    return out


def evaluate(config, workdir: str) -> dict:
  """Scores the make_cam maps (high_res) of data.eval_split; every id there needs its map file."""
  t0 = time.time()
  source = pipeline.make_source(config, config.data.eval_split, with_mask=True)
  scorer = SeedScorer(config.data.num_classes, infer_cam.has_background(config), config.eval.threshold_max)
  mine = range(jax.process_index(), len(source), jax.process_count())
  bar = monitor.progress(len(mine), "eval_cam")
  for i in mine:
    el = source[i]
    maps = infer_cam.load_maps(paths.cam_map(workdir, el["id"]))
    if maps["high_res"].shape[1:] != el["mask"].shape:
      raise ValueError(
          f"CAM file {paths.cam_map(workdir, el['id'])} is {maps['high_res'].shape[1:]} but the image is "
          f"{el['mask'].shape}: it comes from other data; delete {paths.cam_maps(workdir)} and re-run make_cam"
      )
    scorer.add(maps["high_res"], maps["keys"], el["mask"])
    bar.update(1)
  bar.close()
  scorer.merge_processes()
  result = scorer.result(source.class_names, config.eval.cam_threshold)
  result["eval_cam"] = {
      "images": len(source),
      "split": config.data.eval_split,
      "protocol": f"scales {list(config.cam.scales)} + flip"
      + ("" if infer_cam.flip_fusion(config) == "maps" else f" ({config.cam.flip_fusion} fused)"),
      "seconds": round(time.time() - t0, 1),
  }
  return result
