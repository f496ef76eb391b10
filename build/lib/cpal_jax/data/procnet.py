"""ProcNet: procedural object-centric classification images, the CPU stand-in for ImageNet.

The papers start every network from ImageNet weights with frozen BatchNorm; the CPU proxy cannot
download them, so `python -m cpal_jax.pretrain` trains its backbone on this set instead. One
object per image, one label: a (shape, texture) pair out of 14 shapes x 8 textures = 112 classes.
Each class has two typical colour pairs (sub-types, from 12 hue families shared between classes,
jittered; 20% of its images take any colours), drawn at a random pose and scale over one of four
background kinds (smooth gradients, muted stripes, colour noise, clutter of muted shapes) with
small distractors. Colour is a cue, as it is for real object classes, but never a sufficient one:
the classifier must see shape and texture, so its features transfer to data it never saw.

It shares no drawing code, palette or class with `cpal_jax.data.synthetic` (the segmentation
stand-in): pretraining never sees the segmentation datasets' images, masks or labels.

Every sample is a pure function of ``(seed, split, index)``; ``train`` and ``val`` use disjoint
seed streams. No jax import: it runs inside grain worker processes.

CLI::

    python -m cpal_jax.data.procnet --grid docs/procnet_samples.png [--n 24]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

SHAPES: tuple[str, ...] = (
    "ellipse",
    "triangle",
    "square",
    "pentagon",
    "hexagon",
    "star4",
    "star7",
    "heart",
    "crescent",
    "arrow",
    "l_shape",
    "t_shape",
    "hourglass",
    "frame",
)
TEXTURES: tuple[str, ...] = ("solid", "stripes", "checker", "dots", "rings", "sectors", "waves", "speckle")
NUM_CLASSES = len(SHAPES) * len(TEXTURES)
SPLITS = {"train": 60000, "val": 2000}
_SPLIT_CODE = {"train": 7001, "val": 7002}  # disjoint from every other generator's codes
_BACKGROUNDS = 4


def class_name(label: int) -> str:
  return f"{SHAPES[label // len(TEXTURES)]}/{TEXTURES[label % len(TEXTURES)]}"


# ----------------------------------------------------------------- shapes
def _polygon(u, v, n: int, phase: float = 0.0):
  """Regular n-gon of circumradius 1 (polar: r <= cos(pi/n) / cos(theta mod 2pi/n - pi/n))."""
  seg = 2 * np.pi / n
  t = np.mod(np.arctan2(v, u) + phase, seg) - seg / 2
  return np.hypot(u, v) * np.cos(t) <= math.cos(math.pi / n)


def _star(u, v, n: int, inner: float):
  t = np.mod(np.arctan2(v, u) + np.pi / 2, 2 * np.pi / n) * (n / (2 * np.pi))
  r = inner + (1.0 - inner) * np.abs(2.0 * t - 1.0)
  return np.hypot(u, v) <= r


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask of SHAPES[shape] in object coordinates (the shape spans about [-1, 1])."""
  name = SHAPES[shape]
  au, av = np.abs(u), np.abs(v)
  if name == "ellipse":
    return (u / 1.0) ** 2 + (v / 0.6) ** 2 <= 1.0
  if name == "triangle":
    return _polygon(u, v, 3, np.pi / 2)
  if name == "square":
    return (au <= 0.8) & (av <= 0.8)
  if name == "pentagon":
    return _polygon(u, v, 5, np.pi / 2)
  if name == "hexagon":
    return _polygon(u, v, 6)
  if name == "star4":
    return _star(u, v, 4, 0.35)
  if name == "star7":
    return _star(u, v, 7, 0.55)
  if name == "heart":
    x, y = u * 1.15, -v * 1.15 + 0.15
    return (x * x + y * y - 0.7) ** 3 - x * x * y**3 * 0.9 <= 0.0
  if name == "crescent":
    return (u * u + v * v <= 1.0) & ((u - 0.45) ** 2 + (v + 0.1) ** 2 > 0.75**2)
  if name == "arrow":
    head = (u >= 0.1) & (av <= 0.9 * (1.0 - u) / 0.9) & (u <= 1.0)
    shaft = (u >= -1.0) & (u < 0.1) & (av <= 0.28)
    return head | shaft
  if name == "l_shape":
    return ((u >= -0.8) & (u <= -0.25) & (av <= 0.9)) | ((u >= -0.8) & (u <= 0.8) & (v >= 0.35) & (v <= 0.9))
  if name == "t_shape":
    return ((au <= 0.9) & (v >= -0.9) & (v <= -0.4)) | ((au <= 0.27) & (v >= -0.9) & (v <= 0.9))
  if name == "hourglass":
    return (av <= 0.9) & (au <= 0.15 + 0.75 * av)
  if name == "frame":
    return (np.maximum(au, av) <= 0.85) & (np.maximum(au, av) >= 0.5)
  raise ValueError(shape)


# --------------------------------------------------------------- textures
def _frac(x):
  return x - np.floor(x)


def texture_index(texture: int, u, v, rng: np.random.Generator) -> np.ndarray:
  """Per-pixel colour index (0/1) of TEXTURES[texture] in object coordinates, random frequency."""
  name = TEXTURES[texture]
  f = rng.uniform(2.0, 3.5)
  if name == "solid":
    return np.zeros(u.shape, np.intp)
  if name == "stripes":
    a = rng.uniform(0, np.pi)
    return (_frac((math.cos(a) * u + math.sin(a) * v) * f) < 0.45).astype(np.intp)
  if name == "checker":
    return ((np.floor(u * f) + np.floor(v * f)).astype(np.intp)) & 1
  if name == "dots":
    du, dv = _frac(u * f) - 0.5, _frac(v * f) - 0.5
    return (du * du + dv * dv < 0.2**2).astype(np.intp)
  if name == "rings":
    return (_frac(np.hypot(u, v) * f) < 0.45).astype(np.intp)
  if name == "sectors":
    return (_frac(np.arctan2(v, u) * (round(f * 2) / np.pi)) < 0.5).astype(np.intp)
  if name == "waves":
    return (_frac(v * f + 0.35 * np.sin(u * 2.5 * f)) < 0.4).astype(np.intp)
  if name == "speckle":
    return (rng.random(u.shape) < 0.35).astype(np.intp)
  raise ValueError(texture)


# ----------------------------------------------------------------- helpers
def _coords(cx, cy, s, theta, flip, h, w):
  dy = (np.arange(h, dtype=np.float32) + 0.5 - cy)[:, None]
  dx = (np.arange(w, dtype=np.float32) + 0.5 - cx)[None, :]
  c, sn = math.cos(theta), math.sin(theta)
  u = (c * dx + sn * dy) / s
  v = (-sn * dx + c * dy) / s
  return (-u if flip else u), v


def _hsv(hue, sat, val):
  k = (np.array([5.0, 3.0, 1.0])[None, :] + np.asarray(hue)[:, None] * 6.0) % 6.0
  rgb = np.asarray(val)[:, None] * (1.0 - np.asarray(sat)[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))
  return (rgb * 255.0).astype(np.float32)


def _vivid(rng, n):
  """n colours of random hue, well apart in hue (the texture must be visible)."""
  hue = rng.uniform(0, 1) + np.arange(n) * rng.uniform(0.25, 0.75)
  return _hsv(hue, rng.uniform(0.45, 1.0, n), rng.uniform(0.35, 1.0, n))


def class_palettes(label: int) -> np.ndarray:
  """[2 sub-types, 2 colours, (hue, sat, val)]: a class's typical colours, as real object classes
  have them. Hues come from 12 families, so many classes share colours and colour alone never
  names the class; shape and texture must."""
  rng = np.random.default_rng([7003, label])
  hue = rng.integers(0, 12, size=(2, 2)) / 12.0
  hue[:, 1] = (hue[:, 0] + rng.integers(3, 10, size=2) / 12.0) % 1.0
  return np.stack([hue, rng.uniform(0.5, 1.0, (2, 2)), rng.uniform(0.4, 1.0, (2, 2))], axis=-1)


def _class_colours(rng, label: int) -> np.ndarray:
  """A sub-type's two colours with jitter (60/40), or in 20% of images any two colours."""
  if rng.random() < 0.2:
    return _vivid(rng, 2)
  hsv = class_palettes(label)[0 if rng.random() < 0.6 else 1]
  return _hsv(
      hsv[:, 0] + rng.uniform(-0.03, 0.03, 2),
      np.clip(hsv[:, 1] + rng.uniform(-0.1, 0.1, 2), 0.0, 1.0),
      np.clip(hsv[:, 2] + rng.uniform(-0.12, 0.12, 2), 0.15, 1.0),
  )


def _muted(rng, n):
  c = rng.uniform(40, 215, size=(n, 3)).astype(np.float32)
  g = c.mean(axis=1, keepdims=True)
  return g + rng.uniform(0.15, 0.5, size=(n, 1)).astype(np.float32) * (c - g)


def _background(rng, h, w):
  kind = int(rng.integers(_BACKGROUNDS))
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / np.float32(max(h, w))
  if kind == 0:  # smooth gradient between two muted colours
    a, b = _muted(rng, 2)
    d = rng.uniform(-1, 1, 2)
    t = np.clip((xx * d[0] + yy * d[1]) / max(abs(d).sum(), 1e-3) + 0.5, 0, 1)[..., None]
    img = a + t * (b - a)
  elif kind == 1:  # muted stripes at a random angle
    a, b = _muted(rng, 2)
    ang = rng.uniform(0, np.pi)
    t = _frac((math.cos(ang) * xx + math.sin(ang) * yy) * rng.uniform(3, 8)) < 0.5
    img = np.where(t[..., None], a, b)
  elif kind == 2:  # low-frequency colour noise
    grid = _muted(rng, 16).reshape(4, 4, 3)
    iy = np.clip((yy * 3).astype(int), 0, 2)
    ix = np.clip((xx * 3).astype(int), 0, 2)
    fy, fx = (yy * 3 - iy)[..., None], (xx * 3 - ix)[..., None]
    img = (
        grid[iy, ix] * (1 - fy) * (1 - fx)
        + grid[iy + 1, ix] * fy * (1 - fx)
        + grid[iy, ix + 1] * (1 - fy) * fx
        + grid[iy + 1, ix + 1] * fy * fx
    )
  else:  # clutter: a plain muted colour under many muted blobs
    img = np.broadcast_to(_muted(rng, 1)[0], (h, w, 3)).copy()
    for _ in range(int(rng.integers(4, 10))):
      u, v = _coords(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.2) * h, rng.uniform(0, 6.3), False, h, w)
      img[u * u + (v / rng.uniform(0.3, 1.0)) ** 2 <= 1.0] = _muted(rng, 1)[0]
  return np.ascontiguousarray(img, np.float32)


def render(seed_seq: np.random.SeedSequence, image_size: int = 64) -> tuple[np.ndarray, int]:
  """One sample: (uint8 HxWx3 image, class index)."""
  rng = np.random.default_rng(seed_seq)
  h = w = image_size
  label = int(rng.integers(NUM_CLASSES))
  shape, texture = divmod(label, len(TEXTURES))
  img = _background(rng, h, w)
  # Small distractors: random vocabulary shapes in muted solid colours, so "a shape" alone is
  # never the answer.
  for _ in range(int(rng.integers(0, 4))):
    u, v = _coords(rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.06, 0.14) * h, rng.uniform(0, 6.3), False, h, w)
    img[shape_mask(int(rng.integers(len(SHAPES))), u, v)] = _muted(rng, 1)[0]
  s = rng.uniform(0.24, 0.44) * h
  cx, cy = (0.5 + rng.uniform(-0.15, 0.15, 2)) * np.array([w, h])
  u, v = _coords(cx, cy, s, rng.uniform(0, 2 * np.pi), bool(rng.integers(2)), h, w)
  m = shape_mask(shape, u, v)
  cols = _class_colours(rng, label)
  col = cols[texture_index(texture, u, v, rng)[m]]
  col *= (1.0 - 0.15 * np.clip(v[m], -1.0, 1.0))[:, None]  # top-lit shading
  img[m] = col
  img += rng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8), label


class ProcNetSource:
  """Random-access source (grain MapDataset.source compatible): {"id", "image", "label" (int32)}."""

  num_classes: int = NUM_CLASSES

  def __init__(self, split: str, *, seed: int = 0, num_images: int | None = None, image_size: int = 64):
    if split not in SPLITS:
      raise ValueError(f"unknown ProcNet split {split!r}; expected one of {sorted(SPLITS)}")
    self.split, self.seed, self.image_size = split, int(seed), int(image_size)
    self._n = SPLITS[split] if not num_images else int(num_images)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} out of range for ProcNet {self.split} ({self._n} images)")
    image, label = render(np.random.SeedSequence([self.seed, _SPLIT_CODE[self.split], index]), self.image_size)
    return {"id": f"{self.split}_{index:06d}", "image": image, "label": np.int32(label)}


def save_grid(path: str, n: int = 24, seed: int = 0, image_size: int = 64, cols: int = 8) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  src = ProcNetSource("train", seed=seed, num_images=max(n, 1), image_size=image_size)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.45), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(n):
    item = src[i]
    ax = axes[i // cols, i % cols]
    ax.imshow(item["image"], interpolation="nearest")
    ax.set_title(class_name(int(item["label"])), fontsize=6)
  fig.tight_layout(pad=0.3)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--grid", required=True, help="write a PNG grid of samples with their classes")
  ap.add_argument("--n", type=int, default=24)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--image-size", type=int, default=64)
  args = ap.parse_args(argv)
  save_grid(args.grid, n=args.n, seed=args.seed, image_size=args.image_size)
  print(f"wrote {args.grid}")


if __name__ == "__main__":
  _main()
