"""Stage export: one palette PNG of class indices per image -> workdir/masks/<id>.png, and mask_miou.

The masks come from `export.source`: the refine stage's output (random walk, or CRF in the CRF-only
mode), or the seed itself (argmax of the make_cam maps with the background convention of eval_cam)
for users who skip refinement. 255 (unsure) becomes background as IRN does before scoring, so the
PNGs hold 0..C-1 only, with the VOC colours so they are not black in viewers (docs/method.md 1.6).

Writes are atomic and existing PNGs are kept, so a killed export resumes; each process writes its
own share of the images. The masks of data.eval_split are scored (confusion-matrix mIoU) into
workdir/masks/eval.json and the summary.
"""

import json
import os
import time

import jax
import numpy as np

from cpal_jax import diskspace, faults, monitor, paths, run_record
from cpal_jax.data import palette, pipeline
from cpal_jax.eval import miou
from cpal_jax.infer import cam as infer_cam
from cpal_jax.parallel import distributed

SOURCES = ("refine", "seed")


def keeps_unsure(config) -> bool:
  """SIPE's COCO pseudo masks (refine.mode=ir_label) keep 255 where the two label CRFs disagree,
  which the segmentation loss ignores; every other mask is exported with 255 as background."""
  return config.export.source == "refine" and config.refine.mode == "ir_label"


def seed_threshold(config, workdir: str) -> float:
  """The background plane of foreground-only seeds: eval_cam's chosen t, else IRN's fixed one."""
  t = (run_record.read(workdir).get("thresholds") or {}).get("seed")
  return config.eval.cam_threshold if t is None else float(t)


def seed_labels(maps: dict, threshold: float) -> np.ndarray:
  """Class ids of a make_cam file by eval_cam's convention (argmax, with a plane t if no background)."""
  scores, keys = maps["high_res"], maps["keys"]
  if len(keys) and keys[0] == 0:
    return keys[np.argmax(scores, axis=0)]
  stacked = np.concatenate([np.full((1, *scores.shape[1:]), threshold, scores.dtype), scores], axis=0)
  return np.concatenate([[0], keys])[np.argmax(stacked, axis=0)]


def _mask_of(config, workdir: str, image_id: str, threshold: float) -> np.ndarray:
  if config.export.source == "seed":
    return seed_labels(infer_cam.load_maps(paths.cam_map(workdir, image_id)), threshold)
  path = os.path.join(paths.refined(config, workdir), f"{image_id}.png")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"no refined mask {path}: run the refine stage first (--config.stages=refine,export), "
        "or export the seeds with --config.export.source=seed"
    )
  return palette.load_label_png(path)


def run(config, workdir: str) -> dict:
  t0 = time.time()
  if config.export.source not in SOURCES:
    raise ValueError(f"export.source={config.export.source!r}: choose one of {SOURCES}")
  split = config.cam.split or config.data.train_split
  ids = pipeline.make_source(config, split).ids()
  out_dir = paths.masks(workdir)
  os.makedirs(out_dir, exist_ok=True)
  threshold = seed_threshold(config, workdir)
  mine = ids[jax.process_index() :: jax.process_count()]
  todo = [i for i in mine if not os.path.exists(os.path.join(out_dir, f"{i}.png"))]
  bar = monitor.progress(len(mine), "export", initial=len(mine) - len(todo))
  for n, image_id in enumerate(todo, 1):
    mask = _mask_of(config, workdir, image_id, threshold)
    if not keeps_unsure(config):
      mask = np.where(mask == miou.IGNORE, 0, mask)
    palette.save_label_png(os.path.join(out_dir, f"{image_id}.png"), mask)
    faults.point(f"export/image/{n}")
    if n == min(8, len(todo)):
      written = [os.path.join(out_dir, f"{i}.png") for i in todo[:n]]
      diskspace.require_like(written, len(todo) - n, f"{len(todo)} pseudo masks")
    bar.update(1)
  bar.close()
  distributed.barrier("export: masks written")  # scored by whichever process holds the image
  result = score(config, workdir)
  result["export"] = {
      "split": split,
      "images": len(ids),
      "written": int(distributed.sum_over_processes(np.array([len(todo)]))[0]),  # every process's
      "source": config.export.source,
      "seconds": round(time.time() - t0, 1),
  }
  return result


def score(config, workdir: str) -> dict:
  """mask_miou of the exported PNGs of data.eval_split (only where the split has ground truth); each
  process scores its share of the images, the matrices are summed."""
  source = pipeline.make_source(config, config.data.eval_split, with_mask=True)
  conf = np.zeros((config.data.num_classes,) * 2, np.int64)
  for i in range(jax.process_index(), len(source), jax.process_count()):
    el = source[i]
    path = os.path.join(paths.masks(workdir), f"{el['id']}.png")
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"no exported mask {path} for {config.data.eval_split} image {el['id']}: data.eval_split must be "
          f"part of the exported split ({config.cam.split or config.data.train_split})"
      )
    pred = palette.load_label_png(path)
    pred = np.where(pred == miou.IGNORE, 0, pred)  # unsure pixels count as background here
    if pred.shape != el["mask"].shape:
      raise ValueError(
          f"{path} is {pred.shape} but the image is {el['mask'].shape}; delete it and re-run export"
      )
    conf += miou.confusion(el["mask"], pred, config.data.num_classes)
  rep = miou.report(distributed.sum_over_processes(conf), source.class_names)
  if jax.process_index() == 0:
    paths.write_text(
        os.path.join(paths.masks(workdir), "eval.json"),
        json.dumps({"split": config.data.eval_split, "images": len(source), **rep}, indent=2) + "\n",
    )
  return {"mask_miou": rep["miou"], "per_class_iou": {"mask": rep["per_class_iou"]}}
