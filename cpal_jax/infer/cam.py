"""Stage make_cam: multi-scale + flip seed maps of every image, one compressed file each (docs/method.md 1.3).

For each scale s the image is PIL-bicubic rescaled to (round(H*s), round(W*s)) and run together with
its horizontal flip; the two maps are summed after flipping the second back. The per-scale maps are
upsampled (bilinear, align_corners=False) to the image size and to the stride-4 grid the random
walk runs on, summed over scales, restricted to the present classes and max-normalised per channel.
The image-size maps follow each reference's make_cam.py: SIPE's reads (IS-CAM, CPAL's PACAM) go
straight to the image size, IRN's plain CAM to the next multiple of the output stride, then cropped.

Which map is the seed depends on the method: SIPE's IS-CAM and CPAL's PACAM (or CAM + lambda*PACAM)
carry their own background channel and are summed over scales as the network returns them, then
max-normalised once, as SIPE's make_cam.py does (cam.scale_norm="per_scale" normalises each scale); the
plain CAM (cam, ppc, and cpal with seed_map=cam) is ReLU(classifier) without background and without
per-scale normalisation, as IRN.

Inputs are padded (bottom/right) to a multiple of cam.pad_multiple, so the jitted predictor compiles
once per size bucket instead of once per image; the maps are cropped back to the valid cells. The
padding is part of what the convolutions see near the bottom/right border, so it changes the maps
a little there; cam.pad_multiple=0 reads every image (and its flip) alone at its exact size, as
SIPE's and IRN's inference do (one compile per distinct size and scale). Files
are written atomically and existing ones are skipped, so an interrupted run resumes where it stopped;
`cam/maps_protocol.json` records the checkpoint step and read (scales, flip fusion, method flags) the
files were made with, and a run with another one is refused rather than mixing maps.
Each process labels its own share of the images with its local devices.
"""

import hashlib
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cpal_jax import checkpointing, diskspace, faults, image_ops, monitor, paths, provenance
from cpal_jax.data import pipeline
from cpal_jax.infer import network
from cpal_jax.method import cpal, sipe
from cpal_jax.models import cam_net
from cpal_jax.parallel import distributed, sharding
from cpal_jax.train import state as state_lib

log = logging.getLogger(__name__)


def has_background(config) -> bool:
  """Whether the seed map carries its own background channel (else a background threshold)."""
  m = config.method
  return m.name == "sipe" or (m.name == "cpal" and m.cpal.seed_map in ("pacam", "fused"))


def weights_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()[:16]


def protocol(config, step: int | None) -> dict:
  """What a map depends on besides its image: the checkpoint (or cam.weights) and the read."""
  record = {
      "checkpoint_step": step,
      "scales": list(config.cam.scales),
      "flip_fusion": flip_fusion(config),
      # None for the earlier per-scale read keeps records written before this key valid.
      "scale_norm": None if config.cam.get("scale_norm", "per_scale") == "per_scale" else config.cam.scale_norm,
      "pad_multiple": config.cam.pad_multiple,
      **provenance.flat("method", config.method),
  }
  if has_background(config) and config.method.name == "cpal" and config.method.cpal.infer_shift == "batch":
    record["batch_size"] = config.cam.batch_size  # the Eq. 12 shift is a mean over the batch
  if config.cam.get("weights"):
    record["weights"] = weights_digest(config.cam.weights)
  if high_res_multiple(config):
    record["high_res"] = f"up to a multiple of {high_res_multiple(config)}, cropped"
  return record


def high_res_multiple(config) -> int:
  """The image-size maps' protocol: SIPE's make_cam.py (IS-CAM, and CPAL's PACAM read the same way)
  enlarges each scale straight to the image size; IRN's, for the plain CAM, to the next multiple of
  the output stride, then crops (0 = straight)."""
  return 0 if has_background(config) else cam_net.output_stride(config)


def flip_fusion(config) -> str:
  """cam.flip_fusion for the reads with a background channel (SIPE's, CPAL's); the plain CAM is
  always IRN's: ReLU of each view's map, flipped back and summed (net/resnet50_cam.py class CAM)."""
  if config.cam.flip_fusion not in ("maps", "features"):
    raise ValueError(f"cam.flip_fusion={config.cam.flip_fusion!r}: choose maps or features")
  return config.cam.flip_fusion if has_background(config) else "maps"


def make_predict(model, config):
  """Jitted (variables, extra, batch) -> seed maps [B, h, w, K] at feature resolution, flip-summed
  (cam.flip_fusion: the two views' maps, or one map of their averaged outputs, doubled).

  K = C with background first, or the C-1 foreground channels; absent classes and padded cells are 0.
  """
  m = config.method
  with_bg = has_background(config)

  def maps_of(out, labels, valid_lo, extra):
    cam, hie = out["cam"], out["hie"]
    if m.name == "sipe":
      mask = sipe.label_mask(valid_lo, labels)
      return sipe.sipe_maps(cam, hie, hie, mask, mask_cam=False)["is_cam"] * mask
    if with_bg:  # cpal with seed_map pacam | fused
      feats = cam_net.projected_features(config, out)
      r = cpal.cpal_maps(
          cam, feats, labels, valid_lo, extra, m.cpal, bg_feature=hie, shift_scope=m.cpal.infer_shift
      )
      if m.cpal.seed_map == "pacam":
        return r["pacam"]
      return sipe.max_normalize(r["norm_cam"] + m.cpal.fused_lambda * r["pacam"])
    return jax.nn.relu(cam) * labels[:, None, None, :] * valid_lo[..., None]

  read_features = flip_fusion(config) == "features"
  scale_norm = config.cam.get("scale_norm", "per_scale")
  if scale_norm not in ("per_scale", "once"):
    raise ValueError(f"cam.scale_norm={scale_norm!r}: choose per_scale or once")
  per_scale_norm = scale_norm == "per_scale"

  def predict(variables, extra, batch):
    b = batch["image"].shape[0]
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    out = model.apply(variables, both)
    h, w = out["cam"].shape[1:3]
    valid = batch["valid"].astype(jnp.float32)[..., None]
    labels = batch["label"].astype(jnp.float32)
    if read_features:
      out = {k: (v[:b] + v[b:, :, ::-1]) / 2 for k, v in out.items() if v.ndim == 4}
    else:
      valid = jnp.concatenate([valid, valid[:, :, ::-1]], axis=0)
      labels = jnp.concatenate([labels, labels], axis=0)
    valid_lo = image_ops.resize_nearest(valid, (h, w))[..., 0]
    maps = maps_of(out, labels, valid_lo, extra)
    if with_bg and per_scale_norm:
      maps = sipe.max_normalize(maps)  # per view and scale
    if read_features:
      return 2 * maps
    return maps[:b] + maps[b:, :, ::-1]

  return jax.jit(predict)


def refresh_bank(config, model, variables, extra, mesh):
  """[I] The bank as the final weights see it (method.cpal.refresh_bank): training leaves centres
  and mu_c from the start of the last epoch, built from prototypes of weights that kept moving. One
  pass over the whole training split (each image whole at scale 1, running BatchNorm statistics,
  Eq. 4 as in training, the push gate included) refills the emptied banks in the split's order
  (FIFO: a class keeps its last `capacity` entries), then k-means and mu_c run as at an epoch start.
  Every process makes the same pass, so all of them read with the same centres."""
  p = config.method.cpal
  source = pipeline.make_source(config, config.data.train_split)

  def entries(variables, batch):
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    out = model.apply(variables, images)
    valid = image_ops.resize_nearest(batch["valid"].astype(jnp.float32)[..., None], out["cam"].shape[1:3])[..., 0]
    feats = cam_net.projected_features(config, out)
    *_, protos, proto_valid = cpal.bank_entries(out["cam"], feats, batch["label"], valid, p, bg_feature=out["x4"])
    keep = batch["keep"][:, None]
    return protos, cpal.push_gate(proto_valid, out["score"], p.push_min_prob) & keep

  entries = jax.jit(entries)
  push = jax.jit(lambda st, pr, ok: cpal.push_prototypes(st, pr, ok))
  state = cpal.empty_bank(extra)
  batch_size = device_batch(config, mesh, exact=False)
  batch_sharding = sharding.batch_sharded(mesh)
  for _, batch in pipeline.eval_batches(source, batch_size, config.cam.pad_multiple or 1):
    batch = {k: jax.device_put(v, batch_sharding) for k, v in batch.items() if k != "size"}
    state = push(state, *entries(variables, batch))
  state = jax.jit(lambda st, key: cpal.recluster(st, key, p))(state, jax.random.key(config.seed + 3))
  fill = jax.device_get(state.bank.count)[: config.data.num_classes - 1]
  log.info("make_cam: bank refreshed from %d training images (entries per class %d..%d)", len(source), fill.min(), fill.max())
  return state


def device_batch(config, mesh, exact: bool) -> int:
  """Images per predict call: cam.batch_size rounded up to the data devices; with exact sizes one
  image per call (the other devices' entries are copies of it, dropped)."""
  n_dev = mesh.shape[sharding.DATA]
  return n_dev if exact else -(-config.cam.batch_size // n_dev) * n_dev


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
  """PIL bicubic rescale to (round(H*s), round(W*s)), as IRN's pil_rescale(order=3)."""
  if scale == 1.0:
    return image
  h, w = image.shape[:2]
  size = (int(np.round(w * scale)), int(np.round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def padded_size(images: list[np.ndarray], multiple: int) -> tuple[int, int]:
  """The common size images are padded to: the largest height and width, each rounded up."""
  hmax = max(im.shape[0] for im in images)
  wmax = max(im.shape[1] for im in images)
  return -(-hmax // multiple) * multiple, -(-wmax // multiple) * multiple


def call_batch(config, batch_size: int, pixels: int, n_dev: int) -> int:
  """Images per predict call for images padded to `pixels`: batch_size, or fewer (a multiple of the
  devices, at least one per device) where cam.max_batch_pixels would be exceeded. Not when CPAL's
  Eq. 12 shift is a mean over the batch, which splitting would change."""
  cap = config.cam.get("max_batch_pixels", 0)
  m = config.method
  if not cap or (m.name == "cpal" and m.cpal.infer_shift == "batch"):
    return batch_size
  return min(batch_size, max(n_dev, cap // pixels // n_dev * n_dev))


def padded_batch(
    images: list[np.ndarray], labels: np.ndarray, multiple: int, batch_size: int, size: tuple | None = None
) -> dict:
  """Images padded bottom/right to a common multiple of `multiple` (or to `size`), the batch filled to
  batch_size with copies of the last image (callers keep only the real entries)."""
  hp, wp = size or padded_size(images, multiple)
  img = np.zeros((batch_size, hp, wp, 3), np.uint8)
  valid = np.zeros((batch_size, hp, wp), np.uint8)
  lab = np.zeros((batch_size, labels.shape[1]), np.float32)
  for i in range(batch_size):
    src = images[min(i, len(images) - 1)]
    img[i, : src.shape[0], : src.shape[1]] = src
    valid[i, : src.shape[0], : src.shape[1]] = 1
    lab[i] = labels[min(i, len(images) - 1)]
  return {"image": img, "valid": valid, "label": lab}


def fuse_scales(per_scale: list[np.ndarray], size: tuple[int, int], up_multiple: int = 0) -> np.ndarray:
  """Sum of per-scale maps [K, h_s, w_s] upsampled to `size` (bilinear, align_corners=False).

  up_multiple > 0: IRN's make_cam.py enlarges to the size rounded up to that multiple (its
  strided_up_size, the output stride) and crops `size` from the top left, so the cells keep their
  stride instead of being stretched over the image (about 9 px at OS16 on a 375 px side)."""
  if up_multiple:
    h, w = size
    up = (-(-h // up_multiple) * up_multiple, -(-w // up_multiple) * up_multiple)
    return sum(image_ops.resize_bilinear_host(m, up) for m in per_scale)[:, :h, :w]
  return sum(image_ops.resize_bilinear_host(m, size) for m in per_scale)


def normalise(maps: np.ndarray) -> np.ndarray:
  """Per-channel max normalisation, as the reference code: x / (max + 1e-5)."""
  return maps / (maps.reshape(maps.shape[0], -1).max(1)[:, None, None] + 1e-5)


def channel_keys(label: np.ndarray, with_bg: bool) -> np.ndarray:
  """Class ids of the stored channels: present classes, background (0) first where it has one."""
  present = np.flatnonzero(label > 0) + 1
  return np.concatenate([[0], present]) if with_bg else present


def write_maps(path: str, keys: np.ndarray, high_res: np.ndarray, cam: np.ndarray, npy_layout: bool) -> None:
  """Atomic compressed write: keys (class ids), high_res [K, H, W], cam [K, ceil(H/4), ceil(W/4)]."""
  with paths.atomic(path) as tmp:
    np.savez_compressed(
        tmp, keys=keys.astype(np.int16), high_res=high_res.astype(np.float16), cam=cam.astype(np.float16)
    )
  if npy_layout:
    # IRN/SIPE's pickled dict: IRN keys are 0-based foreground indices, SIPE's keep 0 = background.
    with_bg = bool(len(keys)) and keys[0] == 0
    irn_keys = keys if with_bg else keys - 1
    layout = {"keys": irn_keys, "cam": cam.astype(np.float32), "high_res": high_res.astype(np.float32)}
    if with_bg:  # SIPE's make_cam.py saves {"keys", "IS_CAM"}: the same image-size maps
      layout["IS_CAM"] = layout["high_res"]
    with paths.atomic(os.path.splitext(path)[0] + ".npy") as tmp:
      np.save(tmp, layout)


def load_maps(path: str) -> dict:
  """keys, high_res and cam (float32) of one make_cam file."""
  try:
    with np.load(path) as f:
      return {
          "keys": f["keys"].astype(np.int64),
          "high_res": f["high_res"].astype(np.float32),
          "cam": f["cam"].astype(np.float32),
      }
  except FileNotFoundError:
    raise FileNotFoundError(
        f"no CAM file {path}: run the make_cam stage first (--config.stages=make_cam,...)"
    )
  except Exception as e:  # a truncated or foreign file
    raise ValueError(f"CAM file {path} is unreadable ({e}); delete it and re-run the make_cam stage") from e


def protocol_record(config, workdir: str) -> tuple | None:
  """provenance.check's arguments for the maps of this workdir and this config's network and read;
  None when there is no network to read yet."""
  weights = config.cam.get("weights", "")
  if weights and not os.path.isfile(weights):
    raise FileNotFoundError(f"cam.weights={weights}: no such file (a network converted by cpal_jax.convert_weights)")
  step = None if weights else checkpointing.latest_step(paths.cam_ckpt(workdir))
  if step is None and not weights:
    return None
  maps = paths.cam_maps(workdir)
  made = os.path.isdir(maps) and any(f.endswith(".npz") for f in os.listdir(maps))
  fix = (
      f"delete {maps} and {paths.cam_protocol(workdir)} to make them again (and the refine/ and masks/ made "
      "from them), or give this read its own --workdir"
  )
  return paths.cam_protocol(workdir), protocol(config, step), made, f"the CAM files in {maps}", fix


def run(config, workdir: str) -> dict:
  """Writes workdir/cam/maps/<id>.npz for every image of config.cam.split (default
  data.train_split) not written yet; returns summary updates."""
  t0 = time.time()
  if config.cam.pad_multiple < 0:
    raise ValueError(f"cam.pad_multiple={config.cam.pad_multiple}: a positive multiple, or 0 for exact sizes")
  split = config.cam.split or config.data.train_split
  source = pipeline.make_source(config, split)
  ids = source.ids()
  mine = list(range(jax.process_index(), len(source), jax.process_count()))
  os.makedirs(paths.cam_maps(workdir), exist_ok=True)
  record = protocol_record(config, workdir)
  if record is not None:  # without a network, network.load below names the missing stage
    provenance.check_or_record(*record)
  todo = [i for i in mine if not os.path.exists(paths.cam_map(workdir, ids[i]))]
  # Counted here, where every process is, not at the end, which a process with nothing to do skips.
  written = int(distributed.sum_over_processes(np.array([len(todo)]))[0])
  summary = {"make_cam": {"split": split, "images": len(source), "scales": list(config.cam.scales)}}
  if not todo:
    log.info("make_cam: all %d maps of %s exist in %s", len(mine), split, paths.cam_maps(workdir))
    return summary

  mesh = sharding.local_mesh(config.mesh.data)
  model, variables, extra, step = network.load(config, workdir, mesh)
  if config.method.name == "cpal" and config.method.cpal.refresh_bank:
    extra = refresh_bank(config, model, variables, extra, mesh)
  predict = make_predict(model, config)
  with_bg = has_background(config)
  up_multiple = high_res_multiple(config)
  exact = config.cam.pad_multiple == 0
  batch_size = device_batch(config, mesh, exact)
  per_step = 1 if exact else batch_size
  batch_sharding = sharding.batch_sharded(mesh)
  multiple = config.cam.pad_multiple or 1

  bar = monitor.progress(len(mine), "make_cam", initial=len(mine) - len(todo))
  for start in range(0, len(todo), per_step):
    chunk = [source[i] for i in todo[start : start + per_step]]
    labels = np.stack([el["label"] for el in chunk]).astype(np.float32)
    per_scale: list[list[np.ndarray]] = [[] for _ in chunk]
    for s in config.cam.scales:
      scaled = [rescale(el["image"], s) for el in chunk]
      size = padded_size(scaled, multiple)
      n = call_batch(config, batch_size, size[0] * size[1], mesh.shape[sharding.DATA])
      for k in range(0, len(scaled), n):
        batch = padded_batch(scaled[k : k + n], labels[k : k + n], multiple, n, size)
        batch = {key: jax.device_put(v, batch_sharding) for key, v in batch.items()}
        maps = np.asarray(jax.device_get(predict(variables, extra, batch)))  # [n, hf, wf, K]
        stride = batch["image"].shape[1] // maps.shape[1]
        for j, im in enumerate(scaled[k : k + n]):
          hv, wv = -(-im.shape[0] // stride), -(-im.shape[1] // stride)
          per_scale[k + j].append(np.moveaxis(maps[j, :hv, :wv], -1, 0))
    for j, el in enumerate(chunk):
      h, w = el["image"].shape[:2]
      keys = channel_keys(el["label"], with_bg)
      channels = keys if with_bg else keys - 1
      high_res = normalise(fuse_scales([m[channels] for m in per_scale[j]], (h, w), up_multiple))
      strided = normalise(fuse_scales([m[channels] for m in per_scale[j]], (-(-h // 4), -(-w // 4))))
      write_maps(paths.cam_map(workdir, el["id"]), keys, high_res, strided, config.cam.write_npy)
      faults.point(f"make_cam/image/{start + j + 1}")
    if start == 0:
      diskspace.require_like(
          [paths.cam_map(workdir, el["id"]) for el in chunk], len(todo) - len(chunk), f"{len(todo)} CAM files"
      )
    bar.update(len(chunk))
  bar.close()
  summary["make_cam"].update(checkpoint_step=step, written=written, seconds=round(time.time() - t0, 1))
  return summary
