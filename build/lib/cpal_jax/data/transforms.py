"""Host-side grain transforms: the IRN/SIPE training augmentation and eval padding.

Batches stay uint8 on the host; the device normalises with
``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD * valid`` (models/resnet.py: the pretrained weights'
input convention). Because the reference pipeline
normalises before zero-padding the crop, multiplying by ``valid`` afterwards gives the
same tensor while moving 4x fewer bytes to the device.

No jax import: these run inside grain worker processes.
"""

from __future__ import annotations

import grain
import numpy as np
from PIL import Image

IGNORE_INDEX = 255


def _name(element) -> str:
  return f" ({element['id']})" if "id" in element else ""


def _check_image(element) -> np.ndarray:
  image = element["image"]
  if not (
      isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  ):
    desc = f"{getattr(image, 'dtype', type(image))}{getattr(image, 'shape', '')}"
    raise ValueError(
        f"image{_name(element)} must be uint8[H,W,3] RGB, got {desc}; decode with the data source"
    )
  mask = element.get("mask")
  if mask is not None and mask.shape != image.shape[:2]:
    raise ValueError(
        f"mask{_name(element)} shape {mask.shape} differs from image {image.shape[:2]}; check mask_dir"
    )
  return image


def pil_rescale(array: np.ndarray, scale: float, resample: Image.Resampling) -> np.ndarray:
  """Rescales like IRN ``imutils.pil_rescale``: size = round(side * scale), PIL resampling."""
  h, w = array.shape[:2]
  # max(1, .) only matters for extreme aspect ratios, where IRN would crash.
  new_h, new_w = max(1, int(np.round(h * scale))), max(1, int(np.round(w * scale)))
  if (new_h, new_w) == (h, w):
    return array
  return np.asarray(Image.fromarray(array).resize((new_w, new_h), resample))


def random_crop_box(size: tuple[int, int], crop: int, rng: np.random.Generator):
  """IRN ``get_random_crop_box``: returns (container slices, image slices).

  On an axis longer than the crop the image offset is random; on a shorter one the
  image is placed at a random offset inside the crop container.
  """
  h, w = size
  ch, cw = min(crop, h), min(crop, w)
  # Same draw order as IRN (width first) so the mapping is easy to compare.
  if w > crop:
    cont_left, img_left = 0, int(rng.integers(0, w - crop + 1))
  else:
    cont_left, img_left = int(rng.integers(0, crop - w + 1)), 0
  if h > crop:
    cont_top, img_top = 0, int(rng.integers(0, h - crop + 1))
  else:
    cont_top, img_top = int(rng.integers(0, crop - h + 1)), 0
  cont = (slice(cont_top, cont_top + ch), slice(cont_left, cont_left + cw))
  img = (slice(img_top, img_top + ch), slice(img_left, img_left + cw))
  return cont, img


class TrainAugment(grain.transforms.RandomMap):
  """IRN/SIPE CAM-stage augmentation: random long-side resize, flip, random crop.

  Output: {"image": uint8[S,S,3], "valid": uint8[S,S] (1 = real pixel),
  "label": float32[C-1]}, plus "mask" (uint8[S,S], 255 outside the image) when the
  input has one, and "id" when keep_id. Other input keys are dropped.

  Args:
    crop_size: side S of the square output.
    resize_long: (lo, hi) inclusive range of the random long side; None or (0, 0)
      skips resizing.
    flip: horizontal flip with p = 0.5.
    keep_id: keep the "id" string (off by default: strings do not batch on device).
  """

  def __init__(
      self,
      crop_size: int,
      resize_long: tuple[int, int] | None = (320, 640),
      flip: bool = True,
      keep_id: bool = False,
  ):
    if int(crop_size) <= 0:
      raise ValueError(f"TrainAugment crop_size must be positive, got {crop_size}; set train.crop_size")
    if resize_long is not None and tuple(resize_long) != (0, 0):
      lo, hi = (int(v) for v in resize_long)
      if not 0 < lo <= hi:
        raise ValueError(f"TrainAugment resize_long must be (lo, hi) with 0 < lo <= hi, got {resize_long}")
      self.resize_long = (lo, hi)
    else:
      self.resize_long = None
    self.crop_size = int(crop_size)
    self.flip = flip
    self.keep_id = keep_id

  def random_map(self, element, rng: np.random.Generator):
    image = _check_image(element)
    mask = element.get("mask")
    if self.resize_long is not None:
      target = int(rng.integers(self.resize_long[0], self.resize_long[1] + 1))
      scale = target / max(image.shape[:2])
      image = pil_rescale(image, scale, Image.Resampling.BICUBIC)
      if mask is not None:
        mask = pil_rescale(mask, scale, Image.Resampling.NEAREST)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
      if mask is not None:
        mask = mask[:, ::-1]
    s = self.crop_size
    cont, src = random_crop_box(image.shape[:2], s, rng)
    out_image = np.zeros((s, s, 3), np.uint8)
    out_image[cont] = image[src]
    valid = np.zeros((s, s), np.uint8)
    valid[cont] = 1
    out = {"image": out_image, "valid": valid, "label": np.asarray(element["label"], np.float32)}
    if mask is not None:
      out_mask = np.full((s, s), IGNORE_INDEX, np.uint8)
      out_mask[cont] = mask[src]
      out["mask"] = out_mask
    if self.keep_id and "id" in element:
      out["id"] = element["id"]
    return out


class EvalPrepare(grain.transforms.Map):
  """Single-scale eval element: optional bottom/right padding to a fixed square.

  Output: "image" (padding 0), "valid" (uint8, 1 = real pixel), "size" (int32[2] =
  original h, w), "label", and "mask" (padding 255) when present; "id" only if keep_id.
  Without pad_to the shapes vary per image, so batch them one at a time.
  """

  def __init__(self, pad_to: int | None = None, keep_id: bool = False):
    if pad_to is not None and int(pad_to) <= 0:
      raise ValueError(f"EvalPrepare pad_to must be positive or None, got {pad_to}")
    self.pad_to = None if pad_to is None else int(pad_to)
    self.keep_id = keep_id

  def map(self, element):
    image = _check_image(element)
    h, w = image.shape[:2]
    mask = element.get("mask")
    if self.pad_to is None:
      valid = np.ones((h, w), np.uint8)
    else:
      p = self.pad_to
      if h > p or w > p:
        raise ValueError(
            f"image{_name(element)} is {h}x{w}, larger than EvalPrepare pad_to={p}; "
            f"set pad_to >= {max(h, w)} (VOC images are at most 500)"
        )
      padded = np.zeros((p, p, 3), np.uint8)
      padded[:h, :w] = image
      image = padded
      valid = np.zeros((p, p), np.uint8)
      valid[:h, :w] = 1
      if mask is not None:
        padded_mask = np.full((p, p), IGNORE_INDEX, np.uint8)
        padded_mask[:h, :w] = mask
        mask = padded_mask
    out = {
        "image": image,
        "valid": valid,
        "size": np.array([h, w], np.int32),
        "label": np.asarray(element["label"], np.float32),
    }
    if mask is not None:
      out["mask"] = mask
    if self.keep_id and "id" in element:
      out["id"] = element["id"]
    return out
