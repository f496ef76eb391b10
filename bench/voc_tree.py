"""A VOC2012-layout tree of generated images for the benches that read VOC through the real reader
(cpal_jax/data/voc.py): JPEGImages/, SegmentationClass/ (palette PNGs with the 255 band),
ImageSets/Segmentation/{train,val}.txt and SIPE's cls_labels.json, so labels come from the table and
the training source decodes no masks, as on the real tree with its cls_labels.

Images are VOC-sized (500x375 and 375x500 by default, alternating) and built so their JPEGs cost
what VOC's do to decode: a smooth background, a few textured objects of 1-3 classes, sensor-like
noise, saved at quality 95 with 4:2:0 chroma as VOC's JPEGs are (about 90 KB a file, as theirs
average, and about the same decode time as tests/data/voc2012_sample's; pure noise would be three
times larger and slower to decode). numpy and PIL only.
"""

import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cpal_jax.data import palette as voc_palette  # noqa: E402  (the devkit's colour map)

SIZES = ((500, 375), (375, 500))  # W x H, VOC's two common shapes


def parse_sizes(text: str) -> list[tuple[int, int]]:
  """'500x375,375x500' -> [(500, 375), (375, 500)] (W x H)."""
  out = []
  for part in text.split(","):
    w, h = (int(v) for v in part.lower().split("x"))
    out.append((w, h))
  return out


def _smooth(rng, h, w, cells, channels):
  coarse = rng.uniform(0, 255, (cells, cells, channels)).astype(np.uint8)
  return np.asarray(Image.fromarray(coarse.squeeze()).resize((w, h), Image.Resampling.BICUBIC), np.float32)


def make_example(rng, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [h, w, 3] RGB, uint8 [h, w] class ids with a 255 band around each object)."""
  image = _smooth(rng, h, w, 4, 3).reshape(h, w, 3)
  mask = np.zeros((h, w), np.uint8)
  yy, xx = np.mgrid[:h, :w]
  classes = rng.choice(np.arange(1, 21), size=int(rng.integers(1, 4)), replace=False)
  for c in classes:
    for _ in range(int(rng.integers(1, 3))):
      cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
      ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
      inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
      texture = _smooth(rng, h, w, 24, 1).reshape(h, w, 1) * 0.4
      tint = rng.uniform(0, 255, 3).astype(np.float32)
      image = np.where(inside[..., None], 0.6 * tint + texture, image)
      mask[inside] = c
  image += rng.normal(0, 8, image.shape)
  # VOC's void band: 255 on object boundaries (about 5 px wide there).
  edge = np.zeros_like(mask, bool)
  for axis in (0, 1):
    diff = np.diff(mask.astype(np.int16), axis=axis) != 0
    for shift in range(-2, 3):
      rolled = np.roll(diff, shift, axis=axis)
      if axis == 0:
        edge[:-1] |= rolled
      else:
        edge[:, :-1] |= rolled
  mask[edge] = 255
  return np.clip(image, 0, 255).astype(np.uint8), mask


def write_voc_tree(root: str, n: int, sizes=SIZES, seed: int = 0, val: int = 0) -> dict:
  """Writes n images (sizes cycled) under root as train.txt, plus `val` more as val.txt (at least
  one: the reader wants every list non-empty). Returns {"root", "train", "val", "jpeg_kb_mean"}."""
  for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  rng = np.random.default_rng(seed)
  palette = voc_palette.putpalette_list()
  ids, labels, kb = [], {}, []
  for i in range(n + max(val, 1)):
    image_id = f"2099_{i:06d}"
    w, h = sizes[i % len(sizes)]
    image, mask = make_example(rng, w, h)
    while not ((mask > 0) & (mask < 255)).any():  # tiny sizes: the band can swallow every object
      image, mask = make_example(rng, w, h)
    path = os.path.join(root, "JPEGImages", f"{image_id}.jpg")
    Image.fromarray(image).save(path, quality=95)
    kb.append(os.path.getsize(path) / 1024)
    png = Image.fromarray(mask, mode="P")
    png.putpalette(palette)
    png.save(os.path.join(root, "SegmentationClass", f"{image_id}.png"))
    label = np.zeros(20, np.float32)
    present = [int(c) for c in np.unique(mask) if c not in (0, 255)]
    label[np.asarray(present) - 1] = 1
    labels[image_id] = label.tolist()
    ids.append(image_id)
  lists = {"train": ids[:n], "val": ids[n:]}
  for split, names in lists.items():
    with open(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
      f.write("\n".join(names) + "\n")
  with open(os.path.join(root, "cls_labels.json"), "w") as f:
    json.dump(labels, f)
  return {"root": root, **lists, "jpeg_kb_mean": round(float(np.mean(kb)), 1)}
