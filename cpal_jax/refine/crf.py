"""Dense CRF on seed maps (docs/method.md 1.5 D1, D2): PSA's probability CRF for the "w/ CRF" column and
IRN's label CRF for cam_to_ir_label, with a process pool to run them over a split.

pydensecrf (the pydensecrf2 fork) is single-threaded C++ at about 1.5 s per VOC image with 21
labels, so a split is parallelised over images with processes. The pool is spawned, not forked:
the parent has usually imported JAX, whose threads make fork unsafe. Everything here is numpy; the
module must not import JAX, since every spawned worker imports it.

Channel indices, not class ids: ir_label and the argmax of seed_probs index the stacked volume
(0 = background, i = the i-th map channel). The caller holds the `keys` array that maps them to
class ids (to_class_ids), as IRN's `keys = pad(keys + 1, (1, 0))` does.
"""

import contextlib
import os

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

IGNORE = 255
# unary_from_softmax's default: -log(1e-5) = 11.5 caps the unary where a map is exactly 0.
PROB_CLIP = 1e-5


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"image must be [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    # pydensecrf's bilateral kernel reads unsigned char; a normalised float image would need a
    # silent rescale whose scale changes what srgb means.
    raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
  return np.ascontiguousarray(image)


def _check_volume(name: str, vol: np.ndarray, image: np.ndarray) -> np.ndarray:
  vol = np.asarray(vol)
  if vol.ndim != 3:
    raise ValueError(f"{name} must be [K, H, W], got shape {vol.shape}")
  if vol.shape[1:] != image.shape[:2]:
    raise ValueError(f"{name} spatial shape {vol.shape[1:]} does not match image shape {image.shape[:2]}")
  if not np.issubdtype(vol.dtype, np.floating):
    raise ValueError(f"{name} must be floating point, got dtype {vol.dtype}")
  if not np.all(np.isfinite(vol)):
    # -log(nan) passes the clip and turns the whole mean-field result into nan.
    raise ValueError(f"{name} contains nan or inf")
  return vol


def _pairwise(d, image, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat):
  d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
  d.addPairwiseBilateral(sxy=bi_sxy, srgb=bi_srgb, rgbim=image, compat=bi_compat)


def prob_crf(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 80,
    bi_srgb: float = 13,
    bi_compat: float = 10,
) -> np.ndarray:
  """PSA's crf_inference: unary -log(clip(p, 1e-5, 1)), Gaussian + bilateral pairwise, `iters`
  mean-field steps. image uint8 [H, W, 3]; probs [K, H, W] (not renormalised, as in PSA: the
  background plane of a thresholded CAM makes them no distribution anyway). Returns the
  marginals Q, float32 [K, H, W]; their argmax is the "w/ CRF" prediction."""
  image = _check_image(image)
  probs = _check_volume("probs", probs, image)
  k = probs.shape[0]
  if k < 1:
    raise ValueError("probs has no channels")
  h, w = image.shape[:2]
  d = dcrf.DenseCRF2D(w, h, k)
  d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs, clip=PROB_CLIP)))
  _pairwise(d, image, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
  return np.asarray(d.inference(iters), np.float32).reshape(k, h, w)


def label_crf(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    *,
    gt_prob: float = 0.7,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bi_sxy: float = 50,
    bi_srgb: float = 5,
    bi_compat: float = 10,
) -> np.ndarray:
  """IRN's crf_inference_label: a hard label map (values 0..n_labels-1, 0 an ordinary label:
  zero_unsure=False) as the unary with confidence gt_prob, then the argmax of Q, int [H, W]."""
  image = _check_image(image)
  labels = np.asarray(labels)
  if labels.shape != image.shape[:2]:
    raise ValueError(f"labels shape {labels.shape} does not match image shape {image.shape[:2]}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if n_labels < 1:
    raise ValueError(f"n_labels must be >= 1, got {n_labels}")
  if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
    raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{n_labels - 1}")
  if n_labels == 1:
    # unary_from_labels divides (1 - gt_prob) by n_labels - 1; with one label the answer is fixed.
    return np.zeros(labels.shape, np.intp)
  h, w = image.shape[:2]
  d = dcrf.DenseCRF2D(w, h, n_labels)
  d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
  _pairwise(d, image, gauss_sxy, gauss_compat, bi_sxy, bi_srgb, bi_compat)
  return np.argmax(np.asarray(d.inference(iters)).reshape(n_labels, h, w), axis=0)


def seed_probs(maps: np.ndarray, has_background: bool, threshold: float) -> np.ndarray:
  """The volume the "w/ CRF" column feeds to prob_crf, built as the seed is (docs/method.md 1.4, 5).

  maps [K, H, W] in [0, 1]. Foreground-only maps get a constant background plane `threshold`
  prepended ([K+1, H, W]) with IRN's np.pad, so the plane has the maps' dtype; maps whose channel
  0 is already background are returned as they are and `threshold` is unused. argmax over axis 0
  of the result is the seed prediction in channel indices: foreground where the top score > t,
  and background on an exact tie, since argmax takes the first channel."""
  maps = np.asarray(maps)
  if maps.ndim != 3:
    raise ValueError(f"maps must be [K, H, W], got shape {maps.shape}")
  if not np.issubdtype(maps.dtype, np.floating):
    maps = maps.astype(np.float32)
  if has_background:
    return maps
  return np.pad(maps, ((1, 0), (0, 0), (0, 0)), mode="constant", constant_values=threshold)


def ir_label(
    image: np.ndarray,
    maps: np.ndarray,
    has_background: bool,
    *,
    fg_threshold: float = 0.30,
    bg_threshold: float = 0.05,
    bg_scale: float = 0.5,
    **crf_kwargs,
) -> np.ndarray:
  """cam_to_ir_label (docs/method.md 1.5 D2): confident foreground, confident background and 255
  (unsure) between them, uint8 [H, W] in channel indices (see the module docstring).

  Foreground-only maps (IRN): fg_conf = CRF(argmax [fg_threshold plane; maps]) and bg_conf =
  CRF(argmax [bg_threshold plane; maps]). Maps with channel 0 background (SIPE): fg_conf =
  CRF(argmax maps) and bg_conf = CRF(argmax maps with channel 0 scaled by bg_scale). Then label =
  fg_conf, 255 where fg_conf == 0, 0 where fg_conf + bg_conf == 0. crf_kwargs go to label_crf
  (gt_prob, iters, bi_sxy, ...)."""
  image = _check_image(image)
  maps = _check_volume("maps", maps, image)
  if has_background:
    if maps.shape[0] < 1:
      raise ValueError("maps with a background channel need at least that channel")
    fg_cam = maps
    bg_cam = maps.copy()  # SIPE scales its array in place; the caller's maps stay untouched
    bg_cam[0] = bg_cam[0] * bg_scale
  else:
    fg_cam = seed_probs(maps, False, fg_threshold)
    bg_cam = seed_probs(maps, False, bg_threshold)
  n = fg_cam.shape[0]
  if n >= IGNORE:
    raise ValueError(f"{n} channels do not fit a uint8 label map with {IGNORE} as unsure")
  fg_conf = label_crf(image, np.argmax(fg_cam, axis=0), n, **crf_kwargs)
  bg_conf = label_crf(image, np.argmax(bg_cam, axis=0), n, **crf_kwargs)
  conf = fg_conf.astype(np.uint8)
  conf[fg_conf == 0] = IGNORE
  conf[(fg_conf + bg_conf) == 0] = 0
  return conf


def to_class_ids(idx: np.ndarray, keys) -> np.ndarray:
  """Channel indices -> class ids through keys (keys[0] is background, 0), keeping 255."""
  idx = np.asarray(idx)
  keys = np.asarray(keys)
  unsure = idx == IGNORE
  if np.any(idx[~unsure] >= len(keys)):
    raise ValueError(f"index {idx[~unsure].max()} outside keys of length {len(keys)}")
  out = keys[np.where(unsure, 0, idx)].astype(np.uint8)
  out[unsure] = IGNORE
  return out


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_env():
  """Spawned children copy os.environ when they start; the BLAS pools read it when numpy loads,
  which happens while the child unpickles its first function, before any initializer could run."""
  old = {k: os.environ.get(k) for k in _THREAD_VARS}
  os.environ.update({k: "1" for k in _THREAD_VARS})
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def available_cores() -> int:
  """Cores this process may run on (the affinity mask, which os.cpu_count ignores)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _ignore_sigint() -> None:
  import signal

  signal.signal(signal.SIGINT, signal.SIG_IGN)


def map_images(fn, items, workers: int, *, chunksize: int = 1):
  """Yields fn(item) for each item, in order. workers=0: one process per available core; 1: in
  this process, no pool. fn must be a picklable top-level function, and items should be light
  (ids, paths): Pool.imap queues every item at once, so heavy arrays would all sit in memory.
  chunksize 1 suits CRF jobs, which take about a second each against milliseconds of IPC."""
  if workers < 0:
    raise ValueError(f"workers must be >= 0, got {workers}")
  n = workers or available_cores()
  if hasattr(items, "__len__"):
    n = max(1, min(n, len(items)))
  if n == 1:
    yield from map(fn, items)
    return
  import multiprocessing

  ctx = multiprocessing.get_context("spawn")
  with _single_threaded_env():
    # Ctrl-C reaches the whole process group: the parent stops the stage (and the pool with it);
    # the workers ignore it rather than each print a KeyboardInterrupt.
    pool = ctx.Pool(n, initializer=_ignore_sigint)
  with pool:
    yield from pool.imap(fn, items, chunksize=chunksize)
