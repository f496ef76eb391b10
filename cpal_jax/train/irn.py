"""Trainer of IRN's boundary network (docs/method.md 1.5 D3) on the IR labels.

Training reads `{workdir}/irn/ir_label/<id>.png` (uint8: 0 background, class ids, 255 unsure), made
by the refine stage from the CAM maps, for every image of its split (`cam.split or
data.train_split`). Augmentation, labels
and loss follow IRN's VOC12AffinityDataset and train_irn.py; only the edge heads train (the
backbone is frozen, `models/irn.py`), with IRN's SGD: poly 0.9, weight decay, momentum quirk.

Devices: IRN trains on one GPU because multi-GPU DataParallel broke its results (IRN issue #13).
The step here is jitted over global arrays: each loss term sums its pairs over the whole global
batch and divides by the global pair count, which is the single-device loss, and the network has no
per-replica state (frozen BatchNorm, per-sample GroupNorm). So any number of devices computes the
same step, up to float rounding.
"""


import grain
import jax
import numpy as np
import optax
from PIL import Image

from cpal_jax import paths
from cpal_jax.data import label_png, pipeline, transforms
from cpal_jax.models import irn as irn_model
from cpal_jax.parallel import sharding
from cpal_jax.refine import affinity
from cpal_jax.train import loop, optim, state as state_lib, trainer

IGNORE = transforms.IGNORE_INDEX
POLY_POWER = 0.9  # IRN's PolyOptimizer exponent (the constructor argument it calls `momentum`)


# ------------------------------------------------------------------------------------------ data
def IRLabelSource(source, label_dir: str, num_classes: int) -> label_png.LabelPNGSource:
  """The images of a split with their IR labels under "ir_label" (255 = unsure)."""
  missing = "the refine stage makes them from the CAM maps before it trains IRN; run it first (make_cam,refine)"
  where = {"key": "ir_label", "kind": "IR label", "stage": "refine"}
  return label_png.LabelPNGSource(source, label_dir, num_classes, hint=missing, **where)


class IRNAugment(grain.transforms.RandomMap):
  """IRN's VOC12AffinityDataset: random rescale (bicubic image, nearest label), flip, random crop,
  then the label reduced x0.25 (PIL nearest) to the edge map's stride-4 grid.

  Output: "image" uint8 [S,S,3] (0 outside the image), "valid" uint8 [S,S] (the device zeroes the
  normalised image outside it, as IRN pads the normalised crop with 0), "ir_label" uint8 [S/4,S/4]
  (255 outside the image).
  """

  def __init__(self, crop_size: int, rescale: tuple[float, float]):
    self.crop_size = int(crop_size)
    self.rescale = (float(rescale[0]), float(rescale[1]))
    if self.crop_size <= 0 or self.crop_size % 4:
      raise ValueError(
          f"refine.irn.crop_size={crop_size} must be a positive multiple of 4 (labels live on the stride-4 grid)"
      )
    if not 0 < self.rescale[0] <= self.rescale[1]:
      raise ValueError(f"refine.irn.rescale={tuple(rescale)} must be (lo, hi) with 0 < lo <= hi")

  def random_map(self, element, rng: np.random.Generator):
    image, label = element["image"], element["ir_label"]
    lo, hi = self.rescale
    scale = lo + rng.random() * (hi - lo)
    image = transforms.pil_rescale(image, scale, Image.Resampling.BICUBIC)
    label = transforms.pil_rescale(label, scale, Image.Resampling.NEAREST)
    if rng.random() < 0.5:
      image, label = image[:, ::-1], label[:, ::-1]
    s = self.crop_size
    cont, src = transforms.random_crop_box(image.shape[:2], s, rng)
    out_image = np.zeros((s, s, 3), np.uint8)
    out_image[cont] = image[src]
    valid = np.zeros((s, s), np.uint8)
    valid[cont] = 1
    out_label = np.full((s, s), IGNORE, np.uint8)
    out_label[cont] = label[src]
    reduced = transforms.pil_rescale(out_label, 0.25, Image.Resampling.NEAREST)
    return {"image": out_image, "valid": valid, "ir_label": reduced}


def make_schedule(config, num_images: int) -> pipeline.Schedule:
  return pipeline.make_schedule(config.refine.irn, num_images, "refine.irn")


def train_iterator(
    config, source, schedule: pipeline.Schedule, process_index: int = 0, process_count: int = 1
):
  """Shuffled anew each epoch, cut to whole batches (drop_last), augmented as IRN; this process's
  share of each global batch, dealt as the CAM stage's."""
  irn = config.refine.irn
  augment = IRNAugment(irn.crop_size, tuple(irn.rescale))
  return pipeline.train_iterator(
      config, source, schedule, process_index, process_count, augment, batch_key="refine.irn.batch_size"
  )


# ------------------------------------------------------------------------------------- model/step
def _heads(params: dict) -> dict:
  return {k: v for k, v in params.items() if k in irn_model.HEAD_MODULES}


def make_optimizer(irn_cfg, num_steps: int) -> optax.GradientTransformation:
  """torch.optim.SGD as IRN's PolyOptimizer drives it: d = g + wd * p; buf = momentum * buf + d;
  p -= lr_t * buf, lr_t poly-decayed. It sees only the edge heads (IRN's edge parameter group,
  1x the base lr); the frozen backbone has no optimiser state, so no weight decay either."""
  return optim.torch_sgd(
      optim.poly(irn_cfg.lr, num_steps, POLY_POWER), irn_cfg.momentum, irn_cfg.weight_decay
  )


def make_train_step(model, tx: optax.GradientTransformation, radius: int, irn_window: bool):

  def train_step(state: state_lib.TrainState, batch: dict):
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    heads = _heads(state.params)

    def loss_fn(heads):
      variables = {"params": {**state.params, **heads}, "batch_stats": state.batch_stats}
      logits = model.apply(variables, images)
      return affinity.affinity_loss(logits, batch["ir_label"], radius, irn_window=irn_window)

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(heads)
    updates, opt_state = tx.update(grads, state.opt_state, heads)
    heads = optax.apply_updates(heads, updates)
    metrics = {"loss/total": loss, **{f"loss/{k}": v for k, v in terms.items()}}
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params={**state.params, **heads}, opt_state=opt_state)
    return new_state, metrics

  return train_step


def _check(config) -> None:
  irn = config.refine.irn
  if len(irn.strides) != 4 or irn.strides[0] != 2:
    raise ValueError(
        f"refine.irn.strides={tuple(irn.strides)} must be 4 values starting with 2: the IR labels are "
        "reduced x0.25 to the stem's stride-4 grid"
    )
  loop.check_nonfinite_policy(irn.nonfinite, "refine.irn.nonfinite")


def build(config, mesh, num_steps: int) -> trainer.Setup:
  """The model, its jitted step over `mesh` and its state (abstract and fresh)."""
  _check(config)
  irn = config.refine.irn
  n = mesh.shape[sharding.DATA]
  if irn.batch_size % n:
    raise ValueError(
        f"refine.irn.batch_size={irn.batch_size} must be divisible by the {n} devices of the data axis"
    )
  model = irn_model.from_config(config)

  return trainer.build(
      model,
      mesh,
      seed=config.seed,
      crop_size=irn.crop_size,
      make_tx=lambda _: make_optimizer(irn, num_steps),
      make_step=lambda tx: make_train_step(model, tx, irn.radius, irn.irn_window),
      nonfinite=irn.nonfinite,
      load=trainer.backbone_loader(irn.pretrained, "train_irn"),
      trainable=_heads,
  )


def fingerprint(config, num_steps: int) -> dict:
  """The config keys a resumed IRN run must share with its checkpoint."""
  keys = ["data.name", "data.num_classes", "refine.irn.backbone", "refine.irn.strides"]
  keys += ["refine.irn.batch_size", "seed"]
  return trainer.fingerprint(config, keys, {"refine.irn.num_steps": num_steps})


# ------------------------------------------------------------------------------------------ train
def check_resume(config, workdir: str, num_images: int) -> None:
  trainer.check_resume(paths.irn_ckpt(workdir), fingerprint(config, make_schedule(config, num_images).num_steps))


def train(config, workdir: str, images=None) -> dict:
  """Trains (or resumes) the boundary network on `images` (the source of data.train_split when
  None) with their IR labels; returns the stage's summary entries."""
  irn = config.refine.irn
  mesh = sharding.make_mesh(config.mesh.data)
  if images is None:
    images = pipeline.make_source(config, config.data.train_split)
  source = IRLabelSource(images, paths.ir_labels(workdir), config.data.num_classes)
  schedule = make_schedule(config, len(source))
  setup = build(config, mesh, schedule.num_steps)
  data_iter = train_iterator(config, source, schedule, jax.process_index(), jax.process_count())

  spec = trainer.loop_spec(
      "train_irn",
      irn,
      schedule,
      paths.irn_ckpt(workdir),
      paths.irn_tb(workdir),
      fingerprint(config, schedule.num_steps),
      ckpt_keep=config.train.ckpt_keep,
      summary_line=lambda step, m: (
          f"irn step {step}/{schedule.num_steps}  loss {m['loss/total']:.4f} (bg {m['loss/bg_pos']:.4f} "
          f"fg {m['loss/fg_pos']:.4f} neg {m['loss/neg']:.4f})  lr {m['lr']:.4g}"
      ),
  )
  res = trainer.fit(
      spec, setup, data_iter, mesh, irn.stop_at_step, lambda state, batch, step: setup.step_fn(state, batch)
  )
  return {"irn": trainer.summary(res, schedule, images=len(source))}
