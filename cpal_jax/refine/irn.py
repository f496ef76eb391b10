"""IRN's boundary network: trained on the IR labels (docs/method.md 1.5 D3), and its edge maps for the
random walk (D4 step 1).

Training reads `{workdir}/irn/ir_label/<id>.png` (uint8: 0 background, class ids, 255 unsure), made
by the refine stage from the CAM maps, for every image of `data.train_split`. Augmentation, labels
and loss follow IRN's VOC12AffinityDataset and train_irn.py; only the edge heads train (the
backbone is frozen, `models/irn.py`), with IRN's SGD: poly 0.9, weight decay, momentum quirk.

Devices: IRN trains on one GPU because multi-GPU DataParallel broke its results (IRN issue #13).
The step here is jitted over global arrays: each loss term sums its pairs over the whole global
batch and divides by the global pair count, which is the single-device loss, and the network has no
per-replica state (frozen BatchNorm, per-sample GroupNorm). So any number of devices computes the
same step, up to float rounding.

The loop has the CAM stage's shape: a resumable grain iterator, orbax checkpoints (state + iterator
position) under `{workdir}/irn/ckpt` with auto-resume, a progress bar, TensorBoard scalars.
"""

import dataclasses
import json
import logging
import os
from typing import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from cpal_jax import checkpointing, paths
from cpal_jax.data import label_png, pipeline, transforms
from cpal_jax.models import irn as irn_model
from cpal_jax.models import pretrained
from cpal_jax.parallel import sharding
from cpal_jax.refine import affinity
from cpal_jax.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)

IGNORE = transforms.IGNORE_INDEX
POLY_POWER = 0.9  # IRN's PolyOptimizer exponent (the constructor argument it calls `momentum`)


# ------------------------------------------------------------------------------------------ data
def IRLabelSource(source, label_dir: str, num_classes: int) -> label_png.LabelPNGSource:
  """The images of a split with their IR labels under "ir_label" (255 = unsure)."""
  return label_png.LabelPNGSource(
      source,
      label_dir,
      num_classes,
      key="ir_label",
      kind="IR label",
      stage="refine",
      hint="the refine stage makes the IR labels from the CAM maps before it trains IRN; run it first "
      "(--config.stages=...,make_cam,refine)",
  )


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
  irn = config.refine.irn
  per_epoch = num_images // irn.batch_size
  if per_epoch < 1:
    raise ValueError(
        f"refine.irn.batch_size={irn.batch_size} is larger than the {num_images} training images"
    )
  return pipeline.Schedule(per_epoch, irn.num_steps or per_epoch * irn.epochs, irn.batch_size)


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


@dataclasses.dataclass(frozen=True)
class Setup:
  model: irn_model.EdgeNet
  step_fn: Callable  # jitted (state, batch) -> (state, metrics)
  abstract_state: state_lib.TrainState  # shapes, dtypes and shardings: enough to restore
  init_state: Callable[[], state_lib.TrainState]  # a fresh (or ImageNet-initialised) sharded state


def _check(config) -> None:
  irn = config.refine.irn
  if len(irn.strides) != 4 or irn.strides[0] != 2:
    raise ValueError(
        f"refine.irn.strides={tuple(irn.strides)} must be 4 values starting with 2: the IR labels are "
        "reduced x0.25 to the stem's stride-4 grid"
    )
  loop.check_nonfinite_policy(irn.nonfinite, "refine.irn.nonfinite")


def build(config, mesh, num_steps: int) -> Setup:
  """The model, its jitted step over `mesh` and its state (abstract and fresh)."""
  _check(config)
  irn = config.refine.irn
  n = mesh.shape[sharding.DATA]
  if irn.batch_size % n:
    raise ValueError(
        f"refine.irn.batch_size={irn.batch_size} must be divisible by the {n} devices of the data axis"
    )
  model = irn_model.from_config(config)
  repl = sharding.replicated(mesh)
  dummy = jnp.zeros((1, irn.crop_size, irn.crop_size, 3), jnp.float32)
  key = jax.random.key(config.seed)
  tx = make_optimizer(irn, num_steps)

  def fresh(variables):
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(_heads(variables["params"])),
        extra={},
    )

  abstract = jax.eval_shape(lambda: fresh(jax.eval_shape(model.init, key, dummy)))
  shardings = jax.tree.map(lambda _: repl, abstract)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)

  def init_state():
    variables = jax.jit(model.init, out_shardings=repl)(key, dummy)
    if irn.pretrained:
      variables, loaded = pretrained.load_into(variables, irn.pretrained, prefix="backbone")
      log.info("irn: loaded %d tensors from %s", loaded, irn.pretrained)
    return jax.jit(fresh, out_shardings=shardings)(variables)

  train_step = make_train_step(model, tx, irn.radius, irn.irn_window)
  if irn.nonfinite == "skip":
    train_step = loop.skip_nonfinite(train_step)
  step_fn = jax.jit(
      train_step,
      in_shardings=(shardings, sharding.batch_sharded(mesh)),
      out_shardings=(shardings, repl),
      donate_argnums=(0,),
  )
  return Setup(model, step_fn, abstract, init_state)


def fingerprint(config, num_steps: int) -> dict:
  """The config keys a resumed IRN run must share with its checkpoint."""
  irn = config.refine.irn
  fp = {
      "data.name": config.data.name,
      "data.num_classes": config.data.num_classes,
      "refine.irn.backbone": irn.backbone,
      "refine.irn.strides": list(irn.strides),
      "refine.irn.batch_size": irn.batch_size,
      "refine.irn.num_steps": num_steps,
      "seed": config.seed,
  }
  return json.loads(json.dumps(fp))


# ------------------------------------------------------------------------------------------ train
def train(config, workdir: str) -> dict:
  """Trains (or resumes) the boundary network; returns the stage's summary entries."""
  irn = config.refine.irn
  mesh = sharding.make_mesh(config.mesh.data)
  source = IRLabelSource(
      pipeline.make_source(config, config.data.train_split), paths.ir_labels(workdir), config.data.num_classes
  )
  schedule = make_schedule(config, len(source))
  setup = build(config, mesh, schedule.num_steps)
  data_iter = train_iterator(config, source, schedule, jax.process_index(), jax.process_count())

  spec = loop.Loop(
      name="train_irn",
      ckpt_dir=paths.irn_ckpt(workdir),
      tb_dir=paths.irn_tb(workdir),
      meta=fingerprint(config, schedule.num_steps),
      schedule=schedule,
      lr=optim.poly(irn.lr, schedule.num_steps, POLY_POWER),
      log_every=irn.log_every,
      ckpt_every=irn.ckpt_every,
      ckpt_keep=config.train.ckpt_keep,
      nonfinite=irn.nonfinite,
      summary_line=lambda step, m: (
          f"irn step {step}/{schedule.num_steps}  loss {m['loss/total']:.4f} (bg {m['loss/bg_pos']:.4f} "
          f"fg {m['loss/fg_pos']:.4f} neg {m['loss/neg']:.4f})  lr {m['lr']:.4g}"
      ),
  )
  ckpt, state, start = loop.restore_or_init(spec, setup.abstract_state, setup.init_state, data_iter)
  stop = min(irn.stop_at_step or schedule.num_steps, schedule.num_steps)
  res = loop.run(
      spec, ckpt, state, data_iter, mesh, start, stop, lambda state, batch, step: setup.step_fn(state, batch)
  )
  return {
      "irn": {
          "steps": stop,
          "num_steps": schedule.num_steps,
          "epochs": stop / schedule.steps_per_epoch,
          "images": len(source),
          "final_loss": res.last.get("loss/total"),
          "images_per_second": res.images_per_second(schedule.global_batch),
          "skipped_steps": res.skipped_steps,
      }
  }


# -------------------------------------------------------------------------------------- inference
class EdgePredictor:
  """The trained network's edge map as IRN's EdgeDisplacement computes it for the random walk.

  Each image and its flip are padded (bottom/right, zero after normalisation) to a multiple of
  `pad_multiple`, run as one batch, the logits cropped to the stride-4 size ceil(H/4) x ceil(W/4),
  the flip's flipped back, the two averaged and passed through a sigmoid. Padding to size buckets
  means one compile per bucket (and batch size).

  `predictor(image)` maps one uint8 [H, W, 3] image to float32 [ceil(H/4), ceil(W/4)];
  `predictor.batch(images)` maps a list, `batch_size` images per call.
  """

  def __init__(self, model, variables, pad_multiple: int, batch_size: int = 8):
    self._variables = variables
    self.pad_multiple = int(pad_multiple)
    self.batch_size = int(batch_size)
    if self.pad_multiple <= 0:
      raise ValueError(f"refine.irn.pad_multiple={pad_multiple} must be positive")

    def logits(variables, image_u8, valid):
      return model.apply(variables, state_lib.normalize_images(image_u8, valid))

    self._logits = jax.jit(logits)

  def _bucket(self, image: np.ndarray) -> tuple[int, int]:
    m = self.pad_multiple
    h, w = image.shape[:2]
    return -(-h // m) * m, -(-w // m) * m

  def _run(self, images: Sequence[np.ndarray], size: tuple[int, int], count: int) -> list[np.ndarray]:
    """Edge maps of up to `count` images of one bucket, the batch filled to `count` with copies."""
    padded = list(images) + [images[-1]] * (count - len(images))
    batch = np.zeros((2 * count, *size, 3), np.uint8)
    valid = np.zeros((2 * count, *size), np.uint8)
    for i, im in enumerate(padded):
      h, w = im.shape[:2]
      batch[2 * i, :h, :w] = im
      batch[2 * i + 1, :h, :w] = im[:, ::-1]
      valid[2 * i : 2 * i + 2, :h, :w] = 1
    out = np.asarray(self._logits(self._variables, batch, valid), np.float32)
    maps = []
    for i, im in enumerate(images):
      fh, fw = -(-im.shape[0] // 4), -(-im.shape[1] // 4)
      avg = out[2 * i, :fh, :fw] / 2 + out[2 * i + 1, :fh, :fw][:, ::-1] / 2
      maps.append((1.0 / (1.0 + np.exp(-avg))).astype(np.float32))
    return maps

  def __call__(self, image: np.ndarray) -> np.ndarray:
    _check_image(image)
    return self._run([image], self._bucket(image), 1)[0]

  def batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
      _check_image(im)
      buckets.setdefault(self._bucket(im), []).append(i)
    maps: list = [None] * len(images)
    for size, idx in buckets.items():
      for k in range(0, len(idx), self.batch_size):
        chunk = idx[k : k + self.batch_size]
        for i, m in zip(chunk, self._run([images[i] for i in chunk], size, self.batch_size)):
          maps[i] = m
    return maps


def _check_image(image) -> None:
  if not (
      isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  ):
    desc = f"{getattr(image, 'dtype', type(image))}{getattr(image, 'shape', '')}"
    raise ValueError(f"edge maps take uint8 [H, W, 3] RGB images, got {desc}")


def load_edge_fn(config, workdir: str, batch_size: int = 8) -> EdgePredictor:
  """The edge map of the trained boundary network in `{workdir}/irn/ckpt` (its latest step)."""
  directory = paths.irn_ckpt(workdir)
  ckpt = checkpointing.Checkpointer(directory, async_save=False) if os.path.isdir(directory) else None
  step = ckpt.latest_step() if ckpt else None
  if step is None:
    if ckpt:
      ckpt.close()
    raise FileNotFoundError(
        f"no IRN checkpoint in {os.path.abspath(directory)}: the refine stage trains the boundary "
        "network before the random walk; run it first"
    )
  # Optimiser shapes do not depend on the schedule length; the step count is a placeholder.
  setup = build(config, sharding.make_mesh(1), num_steps=1)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), setup.abstract_state
  )
  state, _ = ckpt.restore(step, abstract)
  ckpt.close()
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return EdgePredictor(setup.model, variables, config.refine.irn.pad_multiple, batch_size)
