"""IRN's boundary network at inference: its edge maps for the random walk (docs/method.md 1.5 D4
step 1), read from the checkpoint `train/irn.py` writes under `{workdir}/irn/ckpt`."""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import checkpointing, paths
from cpal_jax.models import irn as irn_model
from cpal_jax.train import state as state_lib


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
  """The edge map of the trained boundary network in `{workdir}/irn/ckpt` (its latest step): its
  parameters and BatchNorm statistics, without the optimiser state training kept."""
  model = irn_model.from_config(config)
  crop = config.refine.irn.crop_size
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, crop, crop, 3), jnp.float32))
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  variables, _ = checkpointing.restore_latest_parts(
      paths.irn_ckpt(workdir),
      shapes,
      device,
      "the refine stage trains the boundary network before the random walk; run it first",
  )
  return EdgePredictor(model, variables, config.refine.irn.pad_multiple, batch_size)
