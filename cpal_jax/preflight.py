"""Preflight: before any stage runs, every config value the requested stages read is checked for its
type, range and choices, the stage order against what the workdir holds, and the files the config
names; all problems are reported together, one line each naming the key or file and the fix.

The data tree is checked by building each split's source (lists, label tables, files present) and,
for VOC, comparing mask and image sizes from the file headers; weight files by comparing the shapes
in their headers with the model's; the disk by an estimate of what the stages write.
"""

import os

import jax

from cpal_jax import paths


class PreflightError(ValueError):
  """All problems of one config, one per line."""

  def __init__(self, problems: list[str]):
    super().__init__("\n".join(problems))
    self.problems = problems


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _choices(config) -> dict:
  from cpal_jax.data import synthetic
  from cpal_jax.method import objectives
  from cpal_jax.models import deeplab, resnet
  from cpal_jax.refine import stage as refine

  archs = tuple(resnet.ARCHS)
  return {
      "data.name": ("synthetic", "voc", "coco"),
      "data.on_bad_input": ("strict", "skip"),
      "data.world": synthetic.WORLDS,
      "model.backbone": archs,
      "model.batch_norm": ("frozen", "train"),
      "model.compute_dtype": ("float32", "bfloat16"),
      "method.name": objectives.METHODS,
      "method.cpal.proj_head": ("sipe_hie", "conv256"),
      "method.cpal.mask_mode": ("sipe_seed", "thresh", "thresh_and_argmax"),
      "method.cpal.kmeans_init": ("kmeans++", "random"),
      "method.cpal.kmeans_metric": ("euclidean", "cosine"),
      "method.cpal.cold_start": ("epoch", "steps"),
      "method.cpal.positiveness_metric": ("dot", "cos", "l1", "l2"),
      "method.cpal.fda_target": ("pixels", "region", "anchor", "both"),
      "method.cpal.infer_shift": ("image", "batch"),
      "method.cpal.bg_mode": ("sipe_bg", "one_minus_max", "bank_bg"),
      "method.cpal.seed_map": ("pacam", "cam", "fused"),
      "method.ppc.er_size": ("image", "map"),
      "train.nonfinite": ("stop", "skip"),
      "cam.flip_fusion": ("features", "maps"),
      "cam.scale_norm": ("once", "per_scale"),
      "refine.mode": refine.MODES,
      "refine.irn.backbone": archs,
      "refine.irn.nonfinite": ("stop", "skip"),
      "export.source": ("refine", "seed"),
      "seg.backbone": archs,
      "seg.layout": deeplab.LAYOUTS,
      "seg.batch_norm": ("frozen", "train"),
      "seg.compute_dtype": ("float32", "bfloat16"),
      "seg.nonfinite": ("stop", "skip"),
  }


# Counts and sizes that must be > 0, and those that may be 0 but not negative.
_POSITIVE = (
    "data.num_classes",
    "train.batch_size",
    "train.crop_size",
    "train.lr",
    "train.log_every",
    "train.ckpt_every",
    "train.ckpt_keep",
    "eval.batch_size",
    "cam.batch_size",
    "refine.irn.batch_size",
    "refine.irn.crop_size",
    "refine.irn.lr",
    "refine.irn.radius",
    "refine.irn.log_every",
    "refine.irn.ckpt_every",
    "refine.irn.pad_multiple",
    "refine.walk.radius",
    "refine.walk.pad_multiple",
    "seg.batch_size",
    "seg.crop_size",
    "seg.lr",
    "seg.log_every",
    "seg.ckpt_every",
    "seg.eval.batch_size",
    "seg.eval.pad_multiple",
)
_NON_NEGATIVE = (
    "train.epochs",
    "train.num_steps",
    "train.stop_at_step",
    "train.weight_decay",
    "train.clip_norm",
    "eval.pad_multiple",
    "cam.pad_multiple",
    "cam.max_batch_pixels",
    "refine.workers",
    "refine.irn.epochs",
    "refine.irn.num_steps",
    "refine.irn.stop_at_step",
    "refine.walk.exp_times",
    "seg.epochs",
    "seg.num_steps",
    "seg.stop_at_step",
    "data.workers",
    "data.num_train",
    "data.num_eval",
)
_SCALES = ("cam.scales", "seg.msc_scales", "seg.rescale", "seg.eval.scales", "train.resize_long")
# Batches split over the data axis of the mesh: (key, stage that runs it).
_SHARDED_BATCHES = (
    ("train.batch_size", "train_cam"),
    ("refine.irn.batch_size", "refine"),
    ("seg.batch_size", "train_seg"),
)


def problems(config, stages: list[str], workdir: str) -> list[str]:
  """Every problem found, one line each; [] when the run can start."""
  out = []
  for key, allowed in _choices(config).items():
    value = _get(config, key)
    if value not in allowed:
      out.append(f"{key}={value!r}: choose one of {', '.join(map(str, allowed))}")
  for key in _POSITIVE + _NON_NEGATIVE:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      out.append(f"{key}={value!r}: a number")
    elif key in _POSITIVE and value <= 0:
      out.append(f"{key}={value}: must be positive")
    elif value < 0:
      out.append(f"{key}={value}: must be 0 or more")
  for key in _SCALES:
    value = tuple(_get(config, key))
    if key == "train.resize_long" and not value:
      continue  # empty: no resize
    if not value or any(not isinstance(v, (int, float)) or v <= 0 for v in value):
      out.append(f"{key}={value}: one or more positive numbers")
  out += _structure(config)
  out += _schedules(config, stages)
  out += _devices(config, stages)
  out += _files(config, stages)
  if not out:
    out += _weights(config, stages)
  if not out:  # the workdir's layout and the sources depend on sane values
    out += _stage_order(config, stages, workdir)
    found, sources = _data(config, stages)
    out += found
    split = config.cam.split or config.data.train_split
    if not found and split in sources:
      out += _disk(config, stages, workdir, len(sources[split]))
  return out


def _data(config, stages) -> tuple[list[str], dict]:
  """The splits the stages read: listed files present (each source checks that as it is built),
  and, for VOC, every mask the size of its image from the file headers. Returns (problems,
  {split: source})."""
  from cpal_jax import command
  from cpal_jax.data import pipeline

  train = config.cam.split or config.data.train_split
  wanted = {}
  if "train_cam" in stages:
    wanted[(config.data.train_split, False)] = True
  if {"make_cam", "refine", "export"} & set(stages):
    wanted[(train, False)] = True
  if {"eval_cam", "refine", "export"} & set(stages):
    wanted[(config.data.eval_split, True)] = True
  if "eval_seg" in stages:
    wanted[(config.data.val_split, True)] = True
  out, sources = [], {}
  for split, with_mask in wanted:
    try:
      source = pipeline.make_source(config, split, with_mask=with_mask)
    except command.USER_ERRORS as e:
      out.append(" ".join(str(e).split()))
      continue
    sources[split] = source
    if with_mask and hasattr(source, "size_mismatches") and config.data.on_bad_input == "strict":
      out += source.size_mismatches()
  return out, sources


def _structure(config) -> list[str]:
  out = []
  for key, first in (("model.strides", None), ("refine.irn.strides", 2)):
    s = tuple(_get(config, key))
    if len(s) != 4 or any(v not in (1, 2) for v in s) or (first is not None and s[0] != first):
      start = f", starting with {first}" if first else ""
      out.append(f"{key}={s}: 4 strides of 1 or 2 (conv1, layer2, layer3, layer4){start}")
  for key in ("model.dilations", "seg.dilations"):
    d = tuple(_get(config, key))
    if len(d) != 4 or any(not isinstance(v, int) or v < 1 for v in d):
      out.append(f"{key}={d}: 4 positive ints, layer1..layer4")
  if config.refine.irn.crop_size % 4:
    out.append(f"refine.irn.crop_size={config.refine.irn.crop_size}: a multiple of 4 (the stride-4 label grid)")
  return out


def _schedules(config, stages) -> list[str]:
  out = []
  for prefix, stage in (("train", "train_cam"), ("refine.irn", "refine"), ("seg", "train_seg")):
    section = _get(config, prefix)
    if stage in stages and section.num_steps == 0 and section.epochs == 0:
      out.append(f"{prefix}.num_steps and {prefix}.epochs are both 0: set one of them")
  return out


def _devices(config, stages) -> list[str]:
  n = config.mesh.data if config.mesh.data > 0 else jax.device_count()
  if config.mesh.data > jax.device_count():
    return [f"mesh.data={config.mesh.data}: only {jax.device_count()} devices; -1 uses all of them"]
  out = []
  for key, stage in _SHARDED_BATCHES:
    b = _get(config, key)
    if key.startswith("refine.") and config.refine.mode != "irn":
      continue  # only IRN's boundary net trains in refine
    if stage in stages and isinstance(b, int) and b > 0 and b % n:
      out.append(f"{key}={b}: must be divisible by the {n} devices of the data axis (mesh.data)")
  return out


def _files(config, stages) -> list[str]:
  out = []
  uses = {
      "model.pretrained": "train_cam",
      "refine.irn.pretrained": "refine",
      "seg.pretrained": "train_seg",
      "cam.weights": "make_cam",
  }
  for key, stage in uses.items():
    path = _get(config, key)
    if path and stage in stages and not os.path.isfile(path):
      out.append(f"{key}={path}: no such file (a weight file converted by python -m cpal_jax.convert_weights)")
  if config.data.name in ("voc", "coco") and not config.data.tfds_dir:
    root = config.data.root
    if not root:
      out.append(f"data.root is empty: set --config.data.root to the {config.data.name.upper()} folder")
    elif not os.path.isdir(root):
      out.append(f"data.root={root}: no such folder")
  if config.data.tfds_dir and not os.path.isdir(config.data.tfds_dir):
    out.append(f"data.tfds_dir={config.data.tfds_dir}: no such folder (python -m cpal_jax.data.tfds_pack writes it)")
  return out


def _abstract(make, config, side: int):
  """A model's variables as shapes (jax.eval_shape of its init: nothing computed)."""
  dummy = jax.ShapeDtypeStruct((1, side, side, 3), jax.numpy.float32)
  return jax.eval_shape(make(config).init, jax.random.key(0), dummy)


def _weights(config, stages) -> list[str]:
  """Each weight file the stages load against the model it loads into, from the files' headers and
  the model's abstract init (no weights read, nothing compiled)."""
  from cpal_jax.models import cam_net, deeplab, irn, pretrained

  uses = [  # key, stage, model, input side, prefix, whole network
      ("model.pretrained", "train_cam", cam_net.from_config, config.train.crop_size, "backbone", False),
      ("cam.weights", "make_cam", cam_net.from_config, config.train.crop_size, "", True),
  ]
  if config.refine.mode == "irn":
    uses.append(("refine.irn.pretrained", "refine", irn.from_config, config.refine.irn.crop_size, "backbone", False))
  if not config.seg.init_from_cam:
    uses.append(("seg.pretrained", "train_seg", deeplab.from_config, config.seg.crop_size, "backbone", False))
  out = []
  for key, stage, make, side, prefix, whole in uses:
    path = _get(config, key)
    if not path or stage not in stages:
      continue
    try:
      found = pretrained.mismatches(_abstract(make, config, side), path, prefix, whole)
    except Exception as e:  # pylint: disable=broad-except
      found = [f"{path}: not a readable weight file ({type(e).__name__}: {e})"]
    out += [f"{key}={m}" for m in found[:3]]
    if len(found) > 3:
      out.append(f"{key}={path}: and {len(found) - 3} more tensors that do not fit")
  return out


# Bytes per image pixel of what the per-image stages write, measured on the synthetic default (1,600
# images of 96x96, seed 0): make_cam's compressed float16 maps 3.8 (about 2.5 channels), each set of
# PNG labels 0.5 (refine writes up to three: CRF labels, IR labels, masks).
_MAP_BYTES_PER_PIXEL = 4.0
_NPY_BYTES_PER_PIXEL = 20.0  # cam.write_npy: float32 high_res and IS_CAM, about 2.5 channels each
_PNG_BYTES_PER_PIXEL = 0.5
_IMAGE_PIXELS = {"voc": 500 * 375, "coco": 640 * 480}  # the datasets' usual (largest common) image


def _disk(config, stages, workdir: str, num_images: int) -> list[str]:
  """The run's outputs against the free space of the workdir's volume: maps and labels of every
  image of the CAM split, and the checkpoints of each stage that trains (each stage checks its own
  share again when it starts)."""
  from cpal_jax import diskspace
  from cpal_jax.models import cam_net, deeplab, irn

  pixels = num_images * _IMAGE_PIXELS.get(config.data.name, config.data.get("image_size", 0) ** 2)
  need = 0.0
  if "make_cam" in stages and not paths.populated(paths.cam_maps(workdir)):
    need += pixels * (_MAP_BYTES_PER_PIXEL + (_NPY_BYTES_PER_PIXEL if config.cam.write_npy else 0))
  if "refine" in stages:
    need += pixels * _PNG_BYTES_PER_PIXEL * {"irn": 3, "ir_label": 2}.get(config.refine.mode, 1)
  if "export" in stages:
    need += pixels * _PNG_BYTES_PER_PIXEL
  trainers = [("train_cam", cam_net.from_config, config.train), ("train_seg", deeplab.from_config, config.seg)]
  if config.refine.mode == "irn":
    trainers.append(("refine", irn.from_config, config.refine.irn))
  for stage, make, section in trainers:
    if stage in stages:
      params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(_abstract(make, config, 64)))
      need += 2 * params * (section.get("ckpt_keep", 2) + 1)  # parameters and SGD's momentum
  free = diskspace.free_bytes(os.path.abspath(workdir))
  if need * diskspace.MARGIN <= free:
    return []
  return [
      f"--workdir={workdir}: the run writes about {diskspace.human(need * diskspace.MARGIN)} "
      f"({num_images} images' maps and labels, checkpoints), {diskspace.human(free)} free there; "
      "free some space or point --workdir at a larger volume"
  ]


def _stage_order(config, stages, workdir) -> list[str]:
  """A stage whose input neither exists in the workdir nor is made by an earlier requested stage."""

  def ckpt(d: str) -> bool:
    return os.path.isdir(d) and any(f.isdigit() for f in os.listdir(d))

  made = set()
  out = []
  needs = {
      "make_cam": ("train_cam", lambda: ckpt(paths.cam_ckpt(workdir)) or bool(config.cam.get("weights"))),
      "eval_cam": ("make_cam", lambda: paths.populated(paths.cam_maps(workdir))),
      "refine": ("make_cam", lambda: paths.populated(paths.cam_maps(workdir))),
      "export": (
          "refine" if config.export.source == "refine" else "make_cam",
          lambda: paths.populated(paths.refined(config, workdir))
          if config.export.source == "refine"
          else paths.populated(paths.cam_maps(workdir)),
      ),
      "train_seg": ("export", lambda: paths.populated(paths.masks(workdir))),
      "eval_seg": ("train_seg", lambda: ckpt(paths.seg_ckpt(workdir))),
  }
  for stage in stages:
    if stage in needs:
      before, present = needs[stage]
      if before not in made and not present():
        out.append(
            f"config.stages: {stage} reads what {before} writes, and {workdir} has none of it; "
            f"add {before} before it (or run it first)"
        )
    made.add(stage)
  return out


def check(config, stages: list[str], workdir: str) -> None:
  found = problems(config, stages, workdir)
  if found:
    raise PreflightError(found)
