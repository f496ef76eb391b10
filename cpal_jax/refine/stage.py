"""Stage refine: from the make_cam maps to refined class-index masks (docs/method.md 1.5).

refine.mode = "irn" (the papers' pipeline):
  1. "w/ CRF": PSA's probability CRF on the seeds of data.eval_split -> crf_miou.
  2. IR labels: IRN's (or SIPE's, for maps with a background channel) label CRF on every image of
     the labelled split -> workdir/irn/ir_label/<id>.png (255 = unsure).
  3. The boundary network trained on them (cpal_jax.train.irn, orbax checkpoints, resumable).
  4. The random walk of each image's stride-4 map over its edge map's affinities
     -> workdir/refine/rw/<id>.png.
refine.mode = "ir_label" (SIPE's COCO path, run_coco.sh: "for MS COCO dataset, we replace IRN with
  denseCRF"): steps 1 and 2 only; the IR labels of cam2ir.py are the pseudo masks, their unsure
  pixels (255) ignored by the segmentation loss.
refine.mode = "crf": the probability CRF on every image of the labelled split
  -> workdir/refine/crf/<id>.png; crf_miou from the eval_split subset.

The CRFs run in a process pool over all cores (pydensecrf is single-threaded); the random walk runs
jitted on the devices, padded to size buckets so it compiles once per bucket. Every per-image
output is written atomically and skipped when it exists, so a killed stage resumes where it stopped.
The stage builds each split's source once and hands it down; the pool workers, other processes,
build their own once each.
"""

import logging
import os
import time

import jax
import numpy as np

from cpal_jax import faults, image_ops, monitor, paths
from cpal_jax.data import palette, pipeline
from cpal_jax.eval import miou
from cpal_jax.infer import cam as infer_cam
from cpal_jax.infer import export
from cpal_jax.parallel import distributed
from cpal_jax.refine import crf, irn, random_walk
from cpal_jax.train import irn as train_irn

log = logging.getLogger(__name__)
MODES = ("irn", "ir_label", "crf")


# Per-process source cache of the CRF workers: a VOC source reads its split and label files once.
_SOURCES: dict = {}


def _image(config, split: str, index: int) -> dict:
  key = (split, config.data.to_json(), config.seed)
  if key not in _SOURCES:
    _SOURCES.clear()
    _SOURCES[key] = pipeline.make_source(config, split)
  return _SOURCES[key][index]


def _crf_job(job) -> str:
  """Probability CRF of one seed -> class-index PNG (a pool worker: top-level and picklable)."""
  config, workdir, split, index, threshold, out = job
  el = _image(config, split, index)
  maps = infer_cam.load_maps(paths.cam_map(workdir, el["id"]))
  with_bg = bool(len(maps["keys"]) and maps["keys"][0] == 0)
  probs = crf.seed_probs(maps["high_res"], with_bg, threshold)
  keys = maps["keys"] if with_bg else np.concatenate([[0], maps["keys"]])
  refined = crf.prob_crf(el["image"], probs, **config.refine.crf)
  palette.save_label_png(out, keys[np.argmax(refined, axis=0)])
  return el["id"]


def _ir_label_job(job) -> str:
  """cam_to_ir_label of one image -> PNG of class ids with 255 = unsure (a pool worker)."""
  config, workdir, split, index, out = job
  el = _image(config, split, index)
  maps = infer_cam.load_maps(paths.cam_map(workdir, el["id"]))
  with_bg = bool(len(maps["keys"]) and maps["keys"][0] == 0)
  idx = crf.ir_label(el["image"], maps["high_res"], with_bg, **config.refine.ir_label)
  keys = maps["keys"] if with_bg else np.concatenate([[0], maps["keys"]])
  palette.save_label_png(out, crf.to_class_ids(idx, keys))
  return el["id"]


def _pending(source, out_dir: str, indices) -> list[int]:
  ids = source.ids()
  return [i for i in indices if not os.path.exists(os.path.join(out_dir, f"{ids[i]}.png"))]


def _run_pool(config, fn, jobs, desc: str, total: int) -> None:
  bar = monitor.progress(total, desc, initial=total - len(jobs))
  for _ in crf.map_images(fn, jobs, config.refine.workers):
    bar.update(1)
  bar.close()


def _score_dir(config, out_dir: str, source) -> dict:
  """mIoU of the PNGs in out_dir against `source`'s masks (each process scores its share; the
  matrices are summed)."""
  conf = np.zeros((config.data.num_classes,) * 2, np.int64)
  for i in range(jax.process_index(), len(source), jax.process_count()):
    el = source[i]
    pred = palette.load_label_png(os.path.join(out_dir, f"{el['id']}.png"))
    conf += miou.confusion(el["mask"], np.where(pred == miou.IGNORE, 0, pred), config.data.num_classes)
  return miou.report(distributed.sum_over_processes(conf), source.class_names)


def run_crf(config, workdir: str, split: str, source, scored) -> dict:
  """PSA's probability CRF on the seeds of `split` (its `source`) -> refine/crf/<id>.png; crf_miou
  on `scored`, the eval split with its masks."""
  out_dir = paths.crf_masks(workdir)
  os.makedirs(out_dir, exist_ok=True)
  threshold = export.seed_threshold(config, workdir)
  mine = range(jax.process_index(), len(source), jax.process_count())
  todo = _pending(source, out_dir, mine)
  ids = source.ids()
  jobs = [(config, workdir, split, i, threshold, os.path.join(out_dir, f"{ids[i]}.png")) for i in todo]
  _run_pool(config, _crf_job, jobs, "refine/crf", len(mine))
  distributed.barrier("refine: CRF masks written")  # scored here by whichever process holds the image
  rep = _score_dir(config, out_dir, scored)
  return {
      "crf_miou": rep["miou"],
      "per_class_iou": {"crf": rep["per_class_iou"]},
      "thresholds": {"crf": None if infer_cam.has_background(config) else threshold},
  }


def make_ir_labels(config, workdir: str, split: str, source) -> None:
  out_dir = paths.ir_labels(workdir)
  os.makedirs(out_dir, exist_ok=True)
  mine = range(jax.process_index(), len(source), jax.process_count())
  ids = source.ids()
  jobs = [
      (config, workdir, split, i, os.path.join(out_dir, f"{ids[i]}.png"))
      for i in _pending(source, out_dir, mine)
  ]
  _run_pool(config, _ir_label_job, jobs, "refine/ir_label", len(mine))
  distributed.barrier("refine: IR labels written")  # every process trains IRN on all of them


def walk_labels(config, maps: dict, edge: np.ndarray, size: tuple[int, int], bucket: int) -> np.ndarray:
  """Class ids of one image after the random walk (docs/method.md 1.5 D4 steps 2-6)."""
  w = config.refine.walk
  cams, keys = maps["cam"], maps["keys"]
  with_bg = bool(len(keys) and keys[0] == 0)
  if cams.shape[1:] != edge.shape:
    raise ValueError(f"stride-4 map {cams.shape[1:]} and edge map {edge.shape} differ: re-run make_cam")
  if with_bg:
    cams = cams**w.bg_power  # SIPE: its own background channel, sharpened, and no constant
  # Fixed shapes per bucket: zero channels stay zero, and edge 1 in the padding cuts every
  # affinity into it, so the walk inside the image is unchanged.
  h, w_ = edge.shape
  hp, wp = -(-h // bucket) * bucket, -(-w_ // bucket) * bucket
  c_pad = np.zeros((config.data.num_classes, hp, wp), np.float32)
  c_pad[: len(cams), :h, :w_] = cams
  e_pad = np.ones((hp, wp), np.float32)
  e_pad[:h, :w_] = edge
  rw = random_walk.random_walk(c_pad, e_pad, beta=w.beta, exp_times=w.exp_times, radius=w.radius)
  rw = np.asarray(rw)[: len(cams), :h, :w_]
  # IRN's post-processing (random_walk.to_mask_scores) on the host: image sizes vary on real data.
  scores = image_ops.resize_bilinear_host(rw, (4 * h, 4 * w_))[:, : size[0], : size[1]]
  scores = scores / scores.max()
  if not with_bg:
    scores = np.concatenate([np.full((1, *size), w.bg_threshold, scores.dtype), scores], axis=0)
    keys = np.concatenate([[0], keys])
  return keys[np.argmax(scores, axis=0)]


def run_walk(config, workdir: str, source) -> None:
  out_dir = paths.rw_masks(workdir)
  os.makedirs(out_dir, exist_ok=True)
  mine = range(jax.process_index(), len(source), jax.process_count())
  todo = _pending(source, out_dir, mine)
  if not todo:
    return
  edge_fn = irn.load_edge_fn(config, workdir)
  bar = monitor.progress(len(mine), "refine/random_walk", initial=len(mine) - len(todo))
  for n, i in enumerate(todo, 1):
    el = source[i]
    maps = infer_cam.load_maps(paths.cam_map(workdir, el["id"]))
    labels = walk_labels(
        config, maps, edge_fn(el["image"]), el["image"].shape[:2], config.refine.walk.pad_multiple
    )
    palette.save_label_png(os.path.join(out_dir, f"{el['id']}.png"), labels)
    faults.point(f"random_walk/image/{n}")
    bar.update(1)
  bar.close()


def run(config, workdir: str) -> dict:
  t0 = time.time()
  mode = config.refine.mode
  if mode not in MODES:
    raise ValueError(f"refine.mode={mode!r}: choose one of {MODES}")
  split = config.cam.split or config.data.train_split
  out = {"refine": {"mode": mode, "split": split}}
  eval_split = config.data.eval_split
  scored = pipeline.make_source(config, eval_split, with_mask=True)
  source = scored if split == eval_split else pipeline.make_source(config, split)
  if mode == "crf":
    out.update(run_crf(config, workdir, split, source, scored))
  else:  # irn and ir_label share the "w/ CRF" figure and the IR labels
    out.update(run_crf(config, workdir, eval_split, scored, scored))
    make_ir_labels(config, workdir, split, source)
    if mode == "irn":
      out.update(train_irn.train(config, workdir, source))
      run_walk(config, workdir, source)
  out["refine"]["seconds"] = round(time.time() - t0, 1)
  return out
