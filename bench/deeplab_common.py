"""What both sides of bench/deeplab_step_bench.py share, numpy and the standard library only, so the
PyTorch script can use it before torch is imported and the JAX bench without torch: the synthetic
training batch, the backbone sizes, the process's peak memory (which torch_make_cam.py reads too).

The batch looks like one of train_seg's augmentation (models/deeplab.py, train/seg.py): uint8 RGB
crops, a pseudo mask of blobs of a few classes, and a bottom/right band of padding that the mask
ignores (255) and the normalised image zeroes.
"""

import numpy as np

IGNORE = 255

# cpal_jax.models.resnet.ARCHS, copied so the PyTorch side needs no jax: (blocks per stage, stem width).
ARCHS = {
    "resnet50": ((3, 4, 6, 3), 64),
    "resnet101": ((3, 4, 23, 3), 64),
    "resnet_small": ((1, 1, 2, 1), 32),
    "resnet_tiny": ((1, 1, 1, 1), 16),
}


def synthetic_batch(batch: int, size: int, num_classes: int, seed: int) -> dict:
  """{"image": uint8 [B, S, S, 3] RGB, "valid": uint8 [B, S, S], "mask": uint8 [B, S, S]}."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  # Blobs of 16 px cells, so every shrunk mask (down to the 0.5 scale's logits) holds several
  # classes, as a pseudo mask does; per-pixel noise would leave the nearest shrink nothing to keep.
  cells = -(-size // 16)
  coarse = rng.integers(0, num_classes, (batch, cells, cells))
  mask = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)[:, :size, :size].astype(np.uint8)
  valid = np.ones((batch, size, size), np.uint8)
  # A crop of an image smaller than the crop: padding on the last eighth of the rows and columns.
  edge = size - max(1, size // 8)
  valid[:, edge:, :] = 0
  valid[:, :, edge:] = 0
  mask[valid == 0] = IGNORE
  image[valid == 0] = 0
  return {"image": image, "valid": valid, "mask": mask}


def proc_status_mb(key: str = "VmHWM") -> float | None:
  """A memory line of /proc/self/status in MiB: VmHWM is the peak resident set of this process
  alone (ru_maxrss can carry over a parent's peak across fork), VmRSS the current one."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) / 1024.0  # kB
  except OSError:
    pass
  return None
