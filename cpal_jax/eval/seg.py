"""Stage eval_seg: the trained DeepLab-v2 scored on data.val_split (docs/method.md 1.7 "Testing", 5).

Prediction, per image: MSC at `seg.eval.scales` (the input resized by each factor, the logits
upsampled to those of the first scale and max-fused, as the network was trained), with
`seg.eval.flip` the flipped image's fused logits (flipped back) joining the max; then the logits
upsampled (bilinear) to the image and argmax'd -> `{workdir}/seg/pred/<id>.png`. With
`seg.eval.crf`, the softmax of the same upsampled logits also goes through the dense CRF
(kazuto1011's parameters) in a process pool -> `{workdir}/seg/pred_crf/<id>.png`. The papers'
figure is the multi-scale + flip + CRF one (IRN #26); both are reported, with the protocol.

Images are padded (bottom/right) to a multiple of `seg.eval.pad_multiple` and grouped by padded
size, so the jitted predictor compiles once per bucket; the logits of the padded input are
upsampled to the padded size and cropped, as DeepLab's caffe test crops its 513x513 output.

Resumable: PNGs are written atomically and existing ones are skipped; `seg/pred_protocol.json`
records the checkpoint step and protocol the PNGs were made with, and a run with another one is
refused rather than mixing predictions. mIoU is one confusion matrix over every pixel of the split
(GT 255 ignored), computed from the PNGs so a resumed run scores exactly what an uninterrupted one
does.
"""

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import checkpointing, image_ops, monitor, paths, provenance
from cpal_jax.data import palette, pipeline
from cpal_jax.eval import miou
from cpal_jax.models import deeplab
from cpal_jax.parallel import distributed, sharding
from cpal_jax.refine import crf

log = logging.getLogger(__name__)

# Images whose logits wait for the CRF pool at once: bounds host memory (COCO's 81-class logits
# are ~1.4 MB an image) while each pool start is amortised over many ~1 s CRF jobs.
CRF_CHUNK = 256



def load_model(config, workdir: str, mesh):
  """(model, variables replicated over `mesh`, step) of the latest train_seg checkpoint: the
  parameters and BatchNorm statistics only, without the optimiser state training kept."""
  model = deeplab.from_config(config)
  dummy = jnp.zeros((1, config.seg.crop_size, config.seg.crop_size, 3), jnp.float32)
  variables, step = checkpointing.restore_latest_parts(
      paths.seg_ckpt(workdir),
      jax.eval_shape(model.init, jax.random.key(0), dummy),
      sharding.replicated(mesh),
      "run the train_seg stage first (--config.stages=train_seg,eval_seg)",
  )
  return model, variables, step


def make_predict(model, seg_cfg):
  """Jitted (variables, image uint8 [B, Hp, Wp, 3], valid [B, Hp, Wp]) -> (argmax uint8 [B, Hp, Wp],
  fused logits float32 [B, hp, wp, C] at the first scale's resolution). `model` is anything with
  Flax's `apply(variables, x) -> logits [B, h, w, C]`."""
  ev = seg_cfg.eval
  scales, flip, layout = tuple(ev.scales), bool(ev.flip), seg_cfg.layout

  def predict(variables, image_u8, valid):
    b = image_u8.shape[0]
    x = deeplab.normalize(image_u8, valid, layout)
    if flip:
      x = jnp.concatenate([x, x[:, :, ::-1]], axis=0)
    fused = deeplab.fuse_max(deeplab.msc_logits(lambda v: model.apply(variables, v), x, scales))
    if flip:
      fused = jnp.maximum(fused[:b], fused[b:, :, ::-1])
    up = image_ops.resize_bilinear(fused, image_u8.shape[1:3])
    return jnp.argmax(up, axis=-1).astype(jnp.uint8), fused

  return jax.jit(predict)


def _crf_job(job) -> str:
  """Dense CRF of one image's softmax -> class-index PNG (a pool worker: top-level, picklable).

  The low-resolution logits are upsampled to the padded input and cropped, as on the device."""
  image, logits, padded, params, out = job
  h, w = image.shape[:2]
  up = image_ops.resize_bilinear_host(logits, padded)[:, :h, :w]
  up = up - up.max(0, keepdims=True)
  probs = np.exp(up)
  probs /= probs.sum(0, keepdims=True)
  q = crf.prob_crf(image, probs.astype(np.float32), **params)
  palette.save_label_png(out, np.argmax(q, axis=0))
  return out


class _Subset:
  """The images `indices` of a source, in that order (the ones still to predict)."""

  def __init__(self, source, indices):
    self._source, self._indices = source, list(indices)
    ids = source.ids()
    self._ids = [ids[i] for i in self._indices]

  def __len__(self) -> int:
    return len(self._indices)

  def ids(self) -> list[str]:
    return list(self._ids)

  def __getitem__(self, i: int) -> dict:
    return self._source[self._indices[i]]


def protocol_record(config, workdir: str) -> tuple | None:
  """provenance.check's arguments for this workdir's predictions and this config's network and read;
  None without a DeepLab checkpoint."""
  step = checkpointing.latest_step(paths.seg_ckpt(workdir))
  if step is None:
    return None
  pred, pred_crf, record = paths.seg_pred(workdir), paths.seg_pred_crf(workdir), paths.seg_protocol(workdir)
  made = any(os.path.isdir(d) and os.listdir(d) for d in (pred, pred_crf))
  fix = f"delete {pred}, {pred_crf} and {record} to predict again"
  return record, protocol(config, step), made, f"the predictions in {pred}", fix


def protocol(config, step: int) -> dict:
  ev = config.seg.eval
  return {
      "checkpoint_step": step,
      "split": config.data.val_split,
      "scales": list(ev.scales),
      "flip": bool(ev.flip),
      "pad_multiple": ev.pad_multiple,
      "crf_params": ev.crf_params.to_dict(),
  }


def _predict(config, workdir: str, source, todo: list[int], out_dirs: list[str]) -> None:
  """Writes the missing PNGs of the images `todo` of `source`."""
  ev = config.seg.eval
  mesh = sharding.local_mesh(config.mesh.data)
  model, variables, _ = load_model(config, workdir, mesh)
  predict = make_predict(model, config.seg)
  n_dev = mesh.shape[sharding.DATA]
  batch_size = -(-ev.batch_size // n_dev) * n_dev
  batch_sharding = sharding.batch_sharded(mesh)
  params = ev.crf_params.to_dict()
  jobs: list = []

  def flush():
    for _ in crf.map_images(_crf_job, jobs, ev.crf_workers):
      bar.update(1)
    jobs.clear()

  subset = _Subset(source, todo)
  bar = monitor.progress(len(todo) * len(out_dirs), "eval_seg")
  for ids, batch in pipeline.eval_batches(subset, batch_size, ev.pad_multiple):
    image = jax.device_put(batch["image"], batch_sharding)
    valid = jax.device_put(batch["valid"], batch_sharding)
    pred, fused = jax.device_get(predict(variables, image, valid))
    padded = batch["image"].shape[1:3]
    for j, image_id in enumerate(ids):
      h, w = batch["size"][j]
      path = os.path.join(out_dirs[0], f"{image_id}.png")
      if not os.path.exists(path):
        palette.save_label_png(path, pred[j, :h, :w])
      bar.update(1)
      if len(out_dirs) > 1:
        path = os.path.join(out_dirs[1], f"{image_id}.png")
        if os.path.exists(path):
          bar.update(1)
        else:
          logits = np.moveaxis(np.asarray(fused[j], np.float32), -1, 0)
          jobs.append((batch["image"][j, :h, :w].copy(), logits, padded, params, path))
    if len(jobs) >= CRF_CHUNK:
      flush()
  flush()
  bar.close()


def _score(config, source, out_dirs: list[str]) -> list[np.ndarray]:
  """One confusion matrix per prediction folder, over every image of the split (each process scores
  its share; the matrices are summed)."""
  c = config.data.num_classes
  confs = [np.zeros((c, c), np.int64) for _ in out_dirs]
  mine = range(jax.process_index(), len(source), jax.process_count())
  bar = monitor.progress(len(mine), "eval_seg/score")
  for i in mine:
    el = source[i]
    for conf, d in zip(confs, out_dirs):
      path = os.path.join(d, f"{el['id']}.png")
      if not os.path.exists(path):
        raise FileNotFoundError(
            f"no prediction {path}: a process of eval_seg did not finish; re-run eval_seg"
        )
      pred = palette.load_label_png(path)
      if pred.shape != el["mask"].shape:
        raise ValueError(
            f"{path} is {pred.shape} but the image is {el['mask'].shape}; delete it and re-run eval_seg"
        )
      conf += miou.confusion(el["mask"], pred, c)
    bar.update(1)
  bar.close()
  return [distributed.sum_over_processes(conf) for conf in confs]


def evaluate(config, workdir: str) -> dict:
  """Predicts (or resumes predicting) data.val_split with the trained DeepLab and scores it."""
  t0 = time.time()
  ev = config.seg.eval
  split = config.data.val_split
  source = pipeline.make_source(config, split, with_mask=True)
  record = protocol_record(config, workdir)
  if record is None:
    raise FileNotFoundError(
        f"no DeepLab checkpoint in {paths.seg_ckpt(workdir)}: run the train_seg stage first "
        "(--config.stages=train_seg,eval_seg)"
    )
  provenance.check_or_record(*record)
  proto = record[1]
  step = proto["checkpoint_step"]
  out_dirs = [paths.seg_pred(workdir)] + ([paths.seg_pred_crf(workdir)] if ev.crf else [])
  for d in out_dirs:
    os.makedirs(d, exist_ok=True)
  ids = source.ids()
  mine = range(jax.process_index(), len(source), jax.process_count())
  todo = [i for i in mine if not all(os.path.exists(os.path.join(d, f"{ids[i]}.png")) for d in out_dirs)]
  t_pred = time.time()
  if todo:
    _predict(config, workdir, source, todo, out_dirs)
  t_pred = time.time() - t_pred
  distributed.barrier("eval_seg predictions written")

  confs = _score(config, source, out_dirs)
  reps = [miou.report(conf, source.class_names) for conf in confs]
  info = {
      "split": split,
      "images": len(source),
      "predicted": int(distributed.sum_over_processes(np.array([len(todo)]))[0]),  # every process's
      "checkpoint_step": step,
      "scales": list(ev.scales),
      "flip": bool(ev.flip),
      "crf": bool(ev.crf),
      "init": deeplab.init_name(config.seg),
      "predict_seconds": round(t_pred, 1),
      "seconds": round(time.time() - t0, 1),
  }
  result = {
      "seg_val_miou": reps[0]["miou"],
      "per_class_iou": {"seg": reps[0]["per_class_iou"]},
      "eval_seg": info,
  }
  record = {**info, "protocol": proto, "miou": reps[0]["miou"], "per_class_iou": reps[0]["per_class_iou"]}
  if ev.crf:
    result["seg_val_miou_crf"] = reps[1]["miou"]
    result["per_class_iou"]["seg_crf"] = reps[1]["per_class_iou"]
    record.update(miou_crf=reps[1]["miou"], per_class_iou_crf=reps[1]["per_class_iou"])
  if jax.process_index() == 0:
    paths.write_text(
        paths.seg_eval_json(workdir), json.dumps(record, indent=2) + "\n"
    )
  log.info(
      "eval_seg: mIoU %.2f%s on %s", reps[0]["miou"], f" (CRF {reps[1]['miou']:.2f})" if ev.crf else "", split
  )
  return result
