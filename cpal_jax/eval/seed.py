"""Stage eval_cam (single scale): seed masks from the trained CAM network, scored by mIoU.

Maps with their own background channel (SIPE's IS-CAM) are scored by argmax; foreground-only maps
(plain CAM) by a background threshold t swept over 0.00..0.59 (oracle: it uses GT, so the chosen t
is recorded) with IRN's fixed t=0.15 reported beside it (METHOD.md 1.4, 5). Two trivial predictors
are scored on the same pixels so the figure has a floor to be read against.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import image_ops, reporting
from cpal_jax.data import pipeline
from cpal_jax.eval import miou
from cpal_jax.method import cpal, sipe
from cpal_jax.models import cam_net
from cpal_jax.parallel import sharding
from cpal_jax.train import cam as cam_stage
from cpal_jax.train import state as state_lib


def has_background(config) -> bool:
  """Whether the scored map carries its own background channel (else a threshold sweep)."""
  m = config.method
  return m.name == "sipe" or (m.name == "cpal" and m.cpal.seed_map in ("pacam", "fused"))


def make_predict(model, config, flip: bool):
  """Jitted (variables, extra, batch) -> seed maps [B, H, W, K] at the padded input size,
  max-normalised over the valid region: K = C with background, or C-1 foreground channels."""
  m = config.method

  def forward(variables, images):
    out = model.apply(variables, images)
    if flip:
      o2 = model.apply(variables, images[:, :, ::-1])
      out = {k: v + o2[k][:, :, ::-1] if v.ndim == 4 else v for k, v in out.items()}
    return out

  def predict(variables, extra, batch):
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    out = forward(variables, images)
    cam, hie = out["cam"], out["hie"]
    labels = batch["label"].astype(jnp.float32)
    h, w = cam.shape[1:3]
    valid_lo = image_ops.resize_nearest(batch["valid"].astype(jnp.float32)[..., None], (h, w))[..., 0]
    if m.name == "sipe":
      mask = sipe.label_mask(valid_lo, labels)
      maps = sipe.sipe_maps(cam, hie, hie, mask, mask_cam=False)["is_cam"]
    elif m.name == "cpal" and m.cpal.seed_map in ("pacam", "fused"):
      feats = cam_net.projected_features(config, out)
      r = cpal.cpal_maps(cam, feats, labels, valid_lo, extra, m.cpal, bg_feature=hie)
      maps = r["pacam"] if m.cpal.seed_map == "pacam" else r["norm_cam"] + m.cpal.fused_lambda * r["pacam"]
    else:
      maps = jax.nn.relu(cam) * labels[:, None, None, :]
    maps = image_ops.resize_bilinear(maps, batch["image"].shape[1:3])
    maps = maps * batch["valid"][..., None].astype(maps.dtype)
    return sipe.max_normalize(maps)

  return jax.jit(predict)


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

  def add(self, maps: np.ndarray, gt: np.ndarray, label: np.ndarray) -> None:
    """maps [H, W, K] for one image (cropped to its size); gt [H, W]; label [C-1] multi-hot."""
    present = np.flatnonzero(label > 0) + 1
    if self.has_bg:
      keys = np.concatenate([[0], present])
      pred = keys[np.argmax(maps[..., keys], axis=-1)]
      self.conf += miou.confusion(gt, pred, self.c)
    else:
      fg = maps[..., present - 1]
      cls = present[np.argmax(fg, axis=-1)] if len(present) else np.zeros(gt.shape, np.int64)
      top = fg.max(-1) if len(present) else np.zeros(gt.shape)
      bins = np.searchsorted(self.thresholds, top, side="left")  # thresholds strictly below top
      keep = gt != miou.IGNORE
      idx = (bins[keep] * self.c + gt[keep]) * self.c + cls[keep]
      self.hist += np.bincount(idx, minlength=self.hist.size).reshape(self.hist.shape)
    self.trivial["all_background"] += miou.confusion(gt, np.zeros_like(gt), self.c)
    fill = present[0] if len(present) else 0
    self.trivial["label_fill"] += miou.confusion(gt, np.full_like(gt, fill), self.c)

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
  """Scores single-scale seeds of the final CAM checkpoint on data.eval_split."""
  t0 = time.time()
  mesh = sharding.make_mesh(config.mesh.data)
  model, variables, extra, step = cam_stage.load_params(config, workdir, mesh)
  predict = make_predict(model, config, config.eval.flip)
  source = pipeline.make_source(config, config.data.eval_split, with_mask=True)
  scorer = SeedScorer(config.data.num_classes, has_background(config), config.eval.threshold_max)

  bar = reporting.progress(len(source), "eval_cam")
  for _, batch in pipeline.eval_batches(source, config.eval.batch_size, config.eval.pad_multiple):
    keep = batch.pop("keep")
    inputs = {k: batch[k] for k in ("image", "valid", "label")}
    maps = np.asarray(jax.device_get(predict(variables, extra, inputs)))
    for i in np.flatnonzero(keep):
      h, w = batch["size"][i]
      scorer.add(maps[i, :h, :w], batch["mask"][i, :h, :w], batch["label"][i])
    bar.update(int(keep.sum()))
  bar.close()
  result = scorer.result(source.class_names, config.eval.cam_threshold)
  result["eval_cam"] = {
      "checkpoint_step": step,
      "images": len(source),
      "split": config.data.eval_split,
      "protocol": "single-scale" + (" + flip" if config.eval.flip else ""),
  }
  result["_seconds"] = time.time() - t0
  return result
