"""Stage train_seg: DeepLab-v2 trained on the exported pseudo masks (docs/method.md 1.7).

The recipe is kazuto1011/deeplab-pytorch's `voc12.yaml`, which the WSSS papers use for their
segmentation numbers:
  - data: the images of `cam.split or data.train_split` with `{workdir}/masks/<id>.png` (the export
    stage's output); a random scale from a fixed list (bilinear image, nearest mask), bottom/right
    padding up to the crop (mask 255, image 0 after normalisation = the mean the reference pads
    with), a random crop, a random flip;
  - MSC training: the crop at scales 1.0/0.75/0.5 through the same network, plus the element-wise
    max of the three logits (upsampled to the 1.0 logits); one cross-entropy (255 ignored) on each
    of the four against the mask shrunk to that logit size with PIL's nearest, summed;
  - SGD, momentum 0.9, poly 0.9, weight decay 5e-4; ASPP weights at 10x the backbone lr, ASPP biases
    at 20x without weight decay; frozen BatchNorm whose affine parameters do not train either
    (the reference gives the optimiser only conv parameters).
Batch 10 stands for the reference's batch 5 x iter_size 2; the reference's lr steps every 10
iterations, here it decays every step.

The loop has the CAM stage's shape: one jitted step with explicit shardings and a donated state,
a resumable grain iterator, orbax checkpoints (state + iterator position) under
`{workdir}/seg/ckpt` with auto-resume and `seg.stop_at_step`, a stop with the step range on a
non-finite loss, TensorBoard scalars and a progress bar.
"""

import logging

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from PIL import Image

from cpal_jax import checkpointing, paths
from cpal_jax.data import label_png, pipeline, transforms
from cpal_jax.models import deeplab, pretrained
from cpal_jax.parallel import sharding
from cpal_jax.train import loop, optim, state as state_lib, trainer

log = logging.getLogger(__name__)

IGNORE = transforms.IGNORE_INDEX


def train_split(config) -> str:
  """The images that have pseudo masks: the ones make_cam labelled and export wrote."""
  return config.cam.split or config.data.train_split


def check(config) -> None:
  s = config.seg
  deeplab.check_layout(s.layout)
  loop.check_nonfinite_policy(s.nonfinite, "seg.nonfinite")
  if s.batch_norm not in ("frozen", "train"):
    raise ValueError(f"seg.batch_norm={s.batch_norm!r}: choose frozen or train")
  if len(s.dilations) != 4 or min(s.dilations) < 1:
    raise ValueError(f"seg.dilations={tuple(s.dilations)}: four positive ints, layer1..layer4")
  if not s.msc_scales or min(s.msc_scales) <= 0:
    raise ValueError(f"seg.msc_scales={tuple(s.msc_scales)} must be positive scale factors (1.0 first)")
  if not s.rescale or min(s.rescale) <= 0:
    raise ValueError(f"seg.rescale={tuple(s.rescale)} must be positive scale factors")
  if s.crop_size * min(s.msc_scales) < deeplab.OUTPUT_STRIDE:
    raise ValueError(
        f"seg.crop_size={s.crop_size} at scale {min(s.msc_scales)} is smaller than one logit cell"
    )


# ------------------------------------------------------------------------------------------ data
def PseudoMaskSource(source, mask_dir: str, num_classes: int) -> label_png.LabelPNGSource:
  """The images of a split with their exported pseudo masks under "mask"."""
  missing = "the export stage writes them; run it first (--config.stages=...,export,train_seg)"
  where = {"key": "mask", "kind": "pseudo mask", "stage": "export"}
  return label_png.LabelPNGSource(source, mask_dir, num_classes, hint=missing, **where)


def _linear_taps(n_in: int, n_out: int):
  """Source rows and weights of a bilinear resize n_in -> n_out (half-pixel centres, edges clamped:
  cv2.INTER_LINEAR's and F.interpolate(align_corners=False)'s grid)."""
  src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear_u8(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, 3] -> [h, w, 3] by bilinear interpolation without antialiasing, as the reference's
  cv2.resize (PIL's bilinear would low-pass the downscaled images); two gathers, O(output)."""
  h, w = size
  if (h, w) == image.shape[:2]:
    return image
  lo, hi, f = _linear_taps(image.shape[0], h)
  x = image.astype(np.float32)
  x = x[lo] * (1 - f)[:, None, None] + x[hi] * f[:, None, None]
  lo, hi, f = _linear_taps(image.shape[1], w)
  x = x[:, lo] * (1 - f)[None, :, None] + x[:, hi] * f[None, :, None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class SegAugment(grain.transforms.RandomMap):
  """kazuto1011's training augmentation: random scale (one of `scales`; size floor(side * s)),
  bottom/right padding up to the crop, a random crop, a random flip.

  Output: "image" uint8 [S,S,3] (0 in the padding), "valid" uint8 [S,S] (1 = image pixel; the device
  zeroes the normalised image outside it), "mask" uint8 [S,S] (255 in the padding).
  """

  def __init__(self, crop_size: int, scales, flip: bool = True):
    self.crop_size = int(crop_size)
    self.scales = tuple(float(s) for s in scales)
    self.flip = flip
    if self.crop_size <= 0:
      raise ValueError(f"seg.crop_size={crop_size} must be positive")

  def random_map(self, element, rng: np.random.Generator):
    image, mask = element["image"], element["mask"]
    s = self.scales[int(rng.integers(len(self.scales)))]
    h, w = max(1, int(image.shape[0] * s)), max(1, int(image.shape[1] * s))
    image = resize_bilinear_u8(image, (h, w))
    mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))
    c = self.crop_size
    hp, wp = max(h, c), max(w, c)
    top, left = int(rng.integers(0, hp - c + 1)), int(rng.integers(0, wp - c + 1))
    out_image = np.zeros((hp, wp, 3), np.uint8)
    out_image[:h, :w] = image
    valid = np.zeros((hp, wp), np.uint8)
    valid[:h, :w] = 1
    out_mask = np.full((hp, wp), IGNORE, np.uint8)
    out_mask[:h, :w] = mask
    crop = (slice(top, top + c), slice(left, left + c))
    out = {"image": out_image[crop], "valid": valid[crop], "mask": out_mask[crop]}
    if self.flip and rng.random() < 0.5:
      out = {k: v[:, ::-1] for k, v in out.items()}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def make_schedule(config, num_images: int) -> pipeline.Schedule:
  return pipeline.make_schedule(config.seg, num_images, "seg")


def train_iterator(
    config, source, schedule: pipeline.Schedule, process_index: int = 0, process_count: int = 1
):
  """Shuffled anew each epoch, cut to whole batches, augmented with DeepLab's crop/scale/flip; this
  process's share of each global batch, dealt as the CAM stage's."""
  s = config.seg
  augment = SegAugment(s.crop_size, tuple(s.rescale), s.flip)
  return pipeline.train_iterator(
      config, source, schedule, process_index, process_count, augment, batch_key="seg.batch_size"
  )


# ------------------------------------------------------------------------------------------- loss
def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel in PIL's nearest resize, which the reference shrinks its
  masks with (not torch's nearest): PIL steps a float64 position from in/out * 0.5 by in/out and
  truncates, so its rounding, not the exact floor((dst + 0.5) * in / out), decides the ties."""
  step = n_in / n_out
  pos, out = step * 0.5, []
  for _ in range(n_out):
    out.append(min(int(pos), n_in - 1))
    pos += step
  return np.asarray(out, np.int32)


def resize_labels(labels: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """[N, H, W] class indices -> [N, h, w] with PIL's nearest sampling."""
  h, w = labels.shape[1:3]
  if (h, w) == tuple(size):
    return labels
  return labels[:, pil_nearest_index(h, size[0])][:, :, pil_nearest_index(w, size[1])]


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, balanced: bool = False) -> jnp.ndarray:
  """Mean CE over the pixels whose label is not 255 (nn.CrossEntropyLoss(ignore_index=255)), 0 if
  there are none. balanced: mean over background pixels + mean over foreground pixels (DSRG)."""
  labels = labels.astype(jnp.int32)
  keep = labels != IGNORE
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]

  def mean_over(m):
    return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1)

  if balanced:
    return mean_over(keep & (labels == 0)) + mean_over(keep & (labels > 0))
  return mean_over(keep)


def multiscale_loss(per_scale: list, labels: jnp.ndarray, scales, balanced: bool = False) -> tuple:
  """MSC loss: one CE per scale's logits and, with several scales, one on their max fusion, each
  against the labels shrunk to its size; returns (sum, {name: term})."""
  outputs = [(f"s{s:g}", lg) for s, lg in zip(scales, per_scale)]
  if len(per_scale) > 1:
    outputs.append(("max", deeplab.fuse_max(per_scale)))
  terms = {name: cross_entropy(lg, resize_labels(labels, lg.shape[1:3]), balanced) for name, lg in outputs}
  return sum(terms.values()), terms


# ------------------------------------------------------------------------------------- optimiser
FROZEN, BACKBONE, HEAD, HEAD_BIAS = optim.FROZEN, optim.BACKBONE, optim.HEAD, "head_bias"


def param_label(path: tuple[str, ...], bn_train: bool) -> str:
  """Group of one DeepLab parameter: backbone convs 1x, ASPP weights 10x, ASPP biases 20x; the
  BatchNorm affine parameters train only with batch statistics."""
  if path[0] == "aspp":
    return HEAD_BIAS if path[-1] == "bias" else HEAD
  if path[0] != "backbone":
    raise ValueError(f"parameter {'/'.join(path)} belongs to no optimiser group")
  if path[-1] == "kernel":
    return BACKBONE
  return BACKBONE if bn_train else FROZEN


def make_optimizer(seg_cfg, num_steps: int, params) -> optax.GradientTransformation:

  def sgd(mult: float, weight_decay: float):
    lr = optim.poly(seg_cfg.lr * mult, num_steps, seg_cfg.poly_power)
    return optim.torch_sgd(lr, seg_cfg.momentum, weight_decay)

  bn_train = seg_cfg.batch_norm == "train"
  flat = traverse_util.flatten_dict(params)
  labels = traverse_util.unflatten_dict({k: param_label(k, bn_train) for k in flat})
  groups = {
      BACKBONE: sgd(1.0, seg_cfg.weight_decay),
      HEAD: sgd(seg_cfg.head_lr_mult, seg_cfg.weight_decay),
      HEAD_BIAS: sgd(seg_cfg.head_bias_lr_mult, 0.0),
  }
  return optim.grouped(groups, labels, seg_cfg.clip_norm)


def frozen_as_constants(params, bn_train: bool):
  """params with the FROZEN group (param_label) behind stop_gradient: the optimiser never moves them,
  so their gradients (a reduction over every activation per BatchNorm) are not computed at all, and
  grad_norm counts what PyTorch's clip and optimiser see."""
  flat = traverse_util.flatten_dict(params)
  frozen = lambda k: param_label(k, bn_train) == FROZEN  # noqa: E731
  constants = {k: jax.lax.stop_gradient(v) if frozen(k) else v for k, v in flat.items()}
  return traverse_util.unflatten_dict(constants)


# ------------------------------------------------------------------------------------ model/step
def make_train_step(model, tx: optax.GradientTransformation, seg_cfg):
  scales = tuple(seg_cfg.msc_scales)
  bn_train = seg_cfg.batch_norm == "train"

  def train_step(state: state_lib.TrainState, batch: dict):
    x = deeplab.normalize(batch["image"], batch["valid"], seg_cfg.layout)

    def loss_fn(params):
      params = frozen_as_constants(params, bn_train)
      # Batch statistics (bn_train) chain through the scales as the reference's successive
      # forward calls update them; frozen statistics come back unchanged.
      stats, per_scale = state.batch_stats, []
      for s in scales:
        out, new_vars = model.apply(
            {"params": params, "batch_stats": stats},
            deeplab.resize_by_factor(x, s),
            train=True,
            mutable=["batch_stats"],
        )
        stats = new_vars["batch_stats"]
        per_scale.append(out)
      total, terms = multiscale_loss(per_scale, batch["mask"], scales, seg_cfg.balanced_ce)
      return total, (terms, stats)

    (total, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss/total": total, **{f"loss/{k}": v for k, v in terms.items()}}
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=stats)
    return new_state, metrics

  return train_step


def cam_backbone(config, workdir: str) -> dict[str, np.ndarray]:
  """The trained CAM network's backbone parameters and BN statistics as '/'-joined keys
  (`params/layer1_0/conv1/kernel`), ready for pretrained.load_flat_into(prefix='backbone')."""
  from cpal_jax.train import cam as cam_stage

  s = config.seg
  if s.backbone != config.model.backbone or s.layout != "torchvision":
    raise ValueError(
        f"seg.init_from_cam needs seg.backbone == model.backbone and seg.layout=torchvision "
        f"(got {s.backbone!r}/{s.layout!r} vs the CAM network's {config.model.backbone!r})"
    )
  directory = paths.cam_ckpt(workdir)
  if not checkpointing.has_checkpoint(directory):
    raise FileNotFoundError(
        f"seg.init_from_cam: no CAM checkpoint in {directory}; run train_cam first or set seg.init_from_cam=False"
    )
  want = deeplab.matching_dilations(config.model.strides)
  if tuple(s.dilations) != want:
    log.warning(
        "seg.init_from_cam: the CAM network (model.strides=%s) computes its features as this network "
        "does with seg.dilations=%s, not %s: its weights start from other receptive fields",
        tuple(config.model.strides),
        want,
        tuple(s.dilations),
    )
  state = checkpointing.restore_raw_state(directory)
  flat = {}
  for col in ("params", "batch_stats"):
    for path, x in traverse_util.flatten_dict(state[col]["backbone"]).items():
      flat["/".join((col, *path))] = np.asarray(x)
  return flat


def build(config, mesh, num_steps: int, backbone: dict | None = None) -> trainer.Setup:
  """The model, its jitted step over `mesh` and its state (abstract and fresh).

  backbone: '/'-joined backbone tensors to start from (cam_backbone), instead of seg.pretrained."""
  check(config)
  s = config.seg
  model = deeplab.from_config(config)

  def from_cam(variables):
    variables, n = pretrained.load_flat_into(variables, backbone, "the CAM checkpoint", prefix="backbone")
    log.info("seg: started %d backbone tensors from the CAM network", n)
    return variables

  return trainer.build(
      model,
      mesh,
      seed=config.seed,
      crop_size=s.crop_size,
      make_tx=lambda v: make_optimizer(s, num_steps, v["params"]),
      make_step=lambda tx: make_train_step(model, tx, s),
      nonfinite=s.nonfinite,
      load=from_cam if backbone is not None else trainer.backbone_loader(s.pretrained, "train_seg"),
  )


def fingerprint(config, num_steps: int) -> dict:
  """The config keys a resumed run must share with its checkpoint."""
  keys = ["data.name", "data.num_classes", "seg.backbone", "seg.layout", "seg.batch_norm"]
  keys += ["seg.atrous_rates", "seg.batch_size", "seed"]
  dilations = tuple(config.seg.dilations)
  extra = {
      # DeepLab's own dilations record None, so checkpoints written before this key stay resumable.
      "seg.dilations": None if dilations == deeplab.DILATIONS else list(dilations),
      "seg.num_steps": num_steps,
  }
  return trainer.fingerprint(config, keys, extra)


# ------------------------------------------------------------------------------------------ train
def check_resume(config, workdir: str, num_images: int) -> None:
  trainer.check_resume(paths.seg_ckpt(workdir), fingerprint(config, make_schedule(config, num_images).num_steps))


def train(config, workdir: str) -> dict:
  """Trains (or resumes) DeepLab-v2 on {workdir}/masks; returns the stage's summary entries."""
  s = config.seg
  mesh = sharding.make_mesh(config.mesh.data)
  split = train_split(config)
  source = PseudoMaskSource(
      pipeline.make_source(config, split), paths.masks(workdir), config.data.num_classes
  )
  schedule = make_schedule(config, len(source))
  sharding.check_batch(s.batch_size, mesh)
  resuming = checkpointing.has_checkpoint(paths.seg_ckpt(workdir))
  setup = build(
      config,
      mesh,
      schedule.num_steps,
      cam_backbone(config, workdir) if s.init_from_cam and not resuming else None,
  )
  data_iter = train_iterator(config, source, schedule, jax.process_index(), jax.process_count())

  dirs = (paths.seg_ckpt(workdir), paths.seg_tb(workdir))
  hint = " (a lower seg.lr or seg.balanced_ce=True may help)"
  meta = fingerprint(config, schedule.num_steps)
  spec = trainer.loop_spec("train_seg", s, schedule, *dirs, meta, hint=hint)
  if not (s.pretrained or s.init_from_cam) and s.batch_norm == "frozen" and not resuming:
    log.warning(
        "seg: frozen BatchNorm with random init normalises nothing (identity statistics); "
        "set seg.pretrained to converted ImageNet weights, or seg.batch_norm=train"
    )
  res = trainer.fit(
      spec, setup, data_iter, mesh, s.stop_at_step, lambda state, batch, step: setup.step_fn(state, batch)
  )
  return {
      "train_seg": trainer.summary(
          res,
          schedule,
          split=split,
          images=len(source),
          first_loss=res.first.get("loss/total"),  # this invocation's first log window
          init=deeplab.init_name(s),
          layout=s.layout,
      )
  }
