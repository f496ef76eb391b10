"""Procedural multi-label segmentation data standing in for PASCAL VOC.

The full WSSS loop (CAM classifier trained from image-level labels, seeds
scored against GT masks) must run from scratch on two CPU cores, so VOC is
replaced by a deterministic generator whose images are cheap (~1.5 ms at 96 px)
but that still contains the failure modes CPAL is about:

* 9 object classes + background (``num_classes == 10``)::

    1 boat   2 train  3 ball  4 crate  5 star  6 ring  7 cross  8 tree  9 fish

* **Sub-types**: every class has 2-3 visually different appearances (colour
  family and texture), drawn with unequal frequencies (e.g. 50/30/20 %), so a
  single prototype per class under-covers the minority appearances.
* **Unlabelled context**: boats sit on a patch of wavy blue water and trains on
  a gravel/sleeper/rail track in ~85 % of their instances.  The context is
  background (0) in the mask, so a classifier that leans on it produces CAMs
  that leak onto it.  Water / track patches also occur rarely without their
  class, so they are not perfectly predictive.
* **Look-alikes**: ``ball`` (disc) and ``crate`` (square) share exactly the same
  three textures (tiger stripes, purple/lime checker, teal with white dots) and
  differ only in shape.
* 1-3 classes and 1-4 instances per image, half-sizes 6-25 % of the image
  side (objects span ~12-50 % of it), random rotation (boat/train/tree stay
  roughly upright), truncation at the border and occlusion (later instances
  cover earlier ones; placement is re-tried so no instance loses more than
  ~65 % of its pixels).
* Clutter: smooth muted colour gradients + low-frequency colour noise + pixel
  noise, and 2-6 muted distractor shapes (ellipses, wiggly lines, blobs, some
  striped) that are background.

Masks are exact (objects are drawn without anti-aliasing), so there is no VOC
style 255 "ignore" band: masks only hold 0..num_classes-1.  Evaluation code
should still treat 255 as ignore so real VOC masks work unchanged.

Every sample is a pure function of ``(seed, split, index)`` through
``np.random.SeedSequence([seed, split_code, index])``; ``train_eval`` uses the
``train`` code, so it is exactly the first N ``train`` images (as VOC scores
seeds on training images), while ``val`` uses its own code and is disjoint.

This module must not import jax: it runs inside grain worker processes.

CLI::

    python -m cpal_jax.data.synthetic --grid docs/synthetic_samples.png [--n 12] [--seed 0]
    python -m cpal_jax.data.synthetic --bench 500
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np

from cpal_jax.data import palette, procedural
from cpal_jax.data.procedural import World

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "boat",
    "train",
    "ball",
    "crate",
    "star",
    "ring",
    "cross",
    "tree",
    "fish",
)
NUM_CLASSES = len(CLASS_NAMES)
BOAT, TRAIN, BALL, CRATE, STAR, RING, CROSS, TREE, FISH = range(1, NUM_CLASSES)

SPLITS = {"train": 1600, "train_eval": 200, "val": 200}
# train_eval shares train's seed stream on purpose: it is the train prefix.
_SPLIT_CODE = {"train": 0, "train_eval": 0, "val": 1}
_ID_PREFIX = {"train": "train", "train_eval": "train", "val": "val"}

_P_CONTEXT = 0.85  # context under its class's instance
_P_CONTEXT_ALONE = 0.06  # context patch with no object (keeps it non-decisive)
_MIN_VISIBLE = 0.35  # fraction of an instance that must survive occlusion
_SIZE_RANGE = (0.06, 0.25)  # half-size as a fraction of the image side

# Colour tables per class and sub-type; texture functions index into them.
_c = procedural.colours
_SHARED_BALL_CRATE = [
    _c((235, 140, 20), (25, 20, 15)),  # tiger: orange + black stripes
    _c((125, 40, 165), (170, 225, 60)),  # checker: purple / lime
    _c((20, 150, 140), (240, 240, 235)),  # teal with white dots
]
_PALETTES: dict[int, list[np.ndarray]] = {
    # hull, sail, mast, accent
    BOAT: [
        _c((200, 35, 35), (238, 236, 228), (60, 40, 25), (0, 0, 0)),
        _c((30, 40, 110), (245, 205, 40), (40, 40, 40), (240, 240, 240)),
        _c((120, 75, 35), (235, 110, 25), (50, 35, 20), (245, 245, 240)),
    ],
    # body, windows, wheels, stripe
    TRAIN: [
        _c((40, 140, 60), (245, 225, 90), (35, 35, 35), (40, 140, 60)),
        _c((200, 30, 40), (185, 195, 205), (35, 35, 35), (245, 245, 245)),
        _c((178, 182, 192), (40, 80, 165), (35, 35, 35), (40, 80, 165)),
    ],
    BALL: _SHARED_BALL_CRATE,
    CRATE: _SHARED_BALL_CRATE,
    STAR: [_c((250, 215, 30), (200, 150, 0)), _c((240, 100, 175), (255, 240, 250))],
    RING: [
        _c((30, 200, 225), (15, 120, 150)),
        _c((230, 30, 200), (250, 230, 40)),
        _c((205, 160, 40), (70, 45, 10)),
    ],
    CROSS: [
        _c((215, 25, 30), (250, 250, 250)),
        _c((30, 175, 70), (150, 240, 150)),
        _c((240, 240, 240), (20, 20, 20)),
    ],
    # canopy, speckle/snow, trunk
    TREE: [
        _c((25, 105, 40), (70, 160, 70), (95, 60, 30)),
        _c((225, 105, 25), (250, 190, 60), (95, 60, 30)),
        _c((20, 90, 60), (245, 250, 255), (95, 60, 30)),
    ],
    # body, pattern, eye
    FISH: [
        _c((250, 130, 25), (255, 235, 210), (10, 10, 10)),
        _c((35, 85, 205), (250, 220, 40), (10, 10, 10)),
        _c((190, 192, 205), (50, 55, 70), (10, 10, 10)),
    ],
}
# Unequal sub-type frequencies: minority appearances are what one prototype misses.
_SUBTYPE_P = {2: (0.6, 0.4), 3: (0.5, 0.3, 0.2)}
_UPRIGHT = frozenset({BOAT, TRAIN, TREE})
_WATER = _c((25, 70, 165), (20, 105, 185), (35, 115, 175))
_GRAVEL = _c((125, 115, 100), (110, 105, 100), (135, 120, 95))


# ----------------------------------------------------------------- shapes
def _star_mask(u, v):
  # Polar radius interpolated between notch (0.42) and tip (1.0) per sector.
  t = _frac((np.arctan2(v, u) + np.float32(np.pi / 2)) * np.float32(5 / (2 * np.pi)))
  rb = 0.42 + 0.58 * np.abs(2.0 * t - 1.0)
  return u * u + v * v <= rb * rb


def _boat_parts(u, v):
  hull = (v >= 0.15) & (v <= 0.6) & (np.abs(u) <= 1.0 - (v - 0.15) * 0.9)
  upper = (v >= -0.95) & (v < 0.15)
  main = upper & (u >= 0.03) & (u <= 0.72 * (v + 0.95) / 1.1)
  jib = upper & (v >= -0.7) & (u < -0.03) & (u >= -0.55 * (v + 0.7) / 0.85)
  mast = (np.abs(u) <= 0.06) & (v >= -1.0) & (v < 0.15)
  return hull, main | jib, mast


def _train_parts(u, v):
  body = (np.abs(u) <= 1.0) & (v >= -0.42) & (v <= 0.3)
  wheels = np.zeros_like(body)
  for wc in (-0.72, -0.4, 0.4, 0.72):
    wheels |= (u - wc) ** 2 + (v - 0.36) ** 2 <= 0.14**2
  return body, wheels


def _tree_parts(u, v):
  t = (v + 1.0) / 1.5
  # Saw-tooth width gives the layered pine silhouette.
  canopy = (v >= -1.0) & (v <= 0.5) & (np.abs(u) <= 0.78 * t * (0.7 + 0.3 * _frac(t * 3.0)))
  trunk = (np.abs(u) <= 0.14) & (v > 0.5) & (v <= 1.0)
  return canopy, trunk


def _fish_parts(u, v):
  body = ((u + 0.15) / 0.72) ** 2 + (v / 0.42) ** 2 <= 1.0
  tail = (u >= 0.45) & (u <= 1.0) & (np.abs(v) <= 0.12 + (u - 0.45) * 0.85)
  eye = (u + 0.6) ** 2 + (v + 0.08) ** 2 <= 0.09**2
  return body, tail, eye


def _shape(cls, u, v):
  if cls == BOAT:
    h, s, m = _boat_parts(u, v)
    return h | s | m
  if cls == TRAIN:
    b, w = _train_parts(u, v)
    return b | w
  if cls == BALL:
    return u * u + v * v <= 1.0
  if cls == CRATE:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.88
  if cls == STAR:
    return _star_mask(u, v)
  if cls == RING:
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.52**2)
  if cls == CROSS:
    au, av = np.abs(u), np.abs(v)
    return ((au <= 0.32) & (av <= 1.0)) | ((au <= 1.0) & (av <= 0.32))
  if cls == TREE:
    c, t = _tree_parts(u, v)
    return c | t
  if cls == FISH:
    b, t, _ = _fish_parts(u, v)
    return b | t
  raise ValueError(cls)


# --------------------------------------------------------------- textures
_frac = procedural.frac


def _texture(cls, sub, u, v):
  """Palette-row index per pixel, in object coordinates (patterns rotate with it).

  Returns an integer map into the sub-type's palette, or None for the one
  continuous-gradient sub-type (ring/1), which the caller blends itself.
  """
  idx = np.zeros(u.shape, np.intp)
  if cls == BOAT:
    hull, _, mast = _boat_parts(u, v)
    idx[~hull] = 1
    if sub == 1:
      idx[hull & (np.abs(v - 0.3) <= 0.05)] = 3
    elif sub == 2:
      idx[~hull & (_frac(v * 4.0) < 0.35)] = 3
    idx[mast] = 2
  elif cls == TRAIN:
    body, wheels = _train_parts(u, v)
    idx[(v >= -0.3) & (v <= -0.05) & (_frac(u * 2.5) < 0.55) & (np.abs(u) <= 0.9)] = 1
    if sub in (1, 2):
      idx[(v >= 0.05) & (v <= 0.14)] = 3
    idx[wheels & ~body] = 2
  elif cls in (BALL, CRATE):
    if sub == 0:
      idx[_frac((u + 0.6 * v) * 2.2) < 0.32] = 1
    elif sub == 1:
      idx[:] = (np.floor(u * 2.5) + np.floor(v * 2.5)).astype(np.intp) & 1
    else:
      du, dv = _frac(u * 2.5) - 0.5, _frac(v * 2.5) - 0.5
      idx[du * du + dv * dv < 0.2**2] = 1
  elif cls == STAR:
    if sub == 0:
      idx[u * u + v * v < 0.3**2] = 1
    else:
      du, dv = _frac(u * 3.0) - 0.5, _frac(v * 3.0) - 0.5
      idx[du * du + dv * dv < 0.22**2] = 1
  elif cls == RING:
    if sub == 1:
      return None
    if sub == 2:
      idx[_frac(np.arctan2(v, u) * (8.0 / np.pi)) < 0.25] = 1
    else:
      idx[u * u + v * v > 0.86**2] = 1
  elif cls == CROSS:
    au, av = np.abs(u), np.abs(v)
    if sub == 1:
      idx[(au <= 0.14) | (av <= 0.14)] = 1
    else:
      # Outline so the cross reads as a sign, not a blob.
      e = 0.9 if sub == 0 else 0.92
      t = 0.22 if sub == 0 else 0.24
      idx[:] = 1
      idx[((au <= t) & (av <= e)) | ((au <= e) & (av <= t))] = 0
  elif cls == TREE:
    canopy, _ = _tree_parts(u, v)
    if sub == 2:
      snow = _frac((v + 1.0) * 2.0) < 0.3
    else:
      snow = _frac(u * 7.0 + 3.0 * np.sin(v * 9.0)) < 0.2
    idx[snow] = 1
    idx[~canopy] = 2
  elif cls == FISH:
    _, tail, eye = _fish_parts(u, v)
    if sub == 0:
      idx[tail & (_frac(u * 8.0) < 0.45)] = 1
    elif sub == 1:
      idx[_frac(u * 3.2) < 0.3] = 1
    else:
      du, dv = _frac(u * 4.0) - 0.5, _frac(v * 4.0) - 0.5
      idx[du * du + dv * dv < 0.18**2] = 1
    idx[eye] = 2
  else:
    raise ValueError(cls)
  return idx


# ----------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=16)
def _interp_matrix(n: int, cells: int) -> np.ndarray:
  """(n, cells+1) bilinear weights from a coarse grid to n pixel centres."""
  pos = (np.arange(n, dtype=np.float64) + 0.5) / n * cells
  wts = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells + 1)[None, :]))
  return wts.astype(np.float32)


def _smooth(grid: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear upsampling of a (g+1, g+1, 3) grid: cheap low-frequency fields."""
  g = grid.shape[0] - 1
  wy, wx = _interp_matrix(h, g), _interp_matrix(w, g)
  # Two small matmuls beat fancy indexing by ~10x at this size.
  t = np.matmul(wx, grid.transpose(2, 1, 0))  # (3, w, g+1)
  return np.matmul(wy, t.transpose(0, 2, 1)).transpose(1, 2, 0)  # (h, w, 3)


def _frame(cx, cy, s, theta, flip, radius, h, w):
  """Crop window around an object and its rotated/normalised coordinates."""
  y0, y1 = max(0, int(cy - radius)), min(h, int(math.ceil(cy + radius)) + 1)
  x0, x1 = max(0, int(cx - radius)), min(w, int(math.ceil(cx + radius)) + 1)
  if y0 >= y1 or x0 >= x1:
    return None
  dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
  dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
  c, sn = math.cos(theta), math.sin(theta)
  u = (c * dx + sn * dy) / s
  v = (-sn * dx + c * dy) / s
  if flip:
    u = -u
  return (slice(y0, y1), slice(x0, x1)), u, v


_jitter = procedural.jitter


def _muted(rng, sat_lo, sat_hi, n=1):
  """Desaturated random colours: clutter must not outshine the objects."""
  c = rng.uniform(30, 225, size=(n, 3)).astype(np.float32)
  g = c.mean(axis=1, keepdims=True)
  return g + rng.uniform(sat_lo, sat_hi, size=(n, 1)).astype(np.float32) * (c - g)


def _pick(rng, probs) -> int:
  r, acc = rng.random(), 0.0
  for i, p in enumerate(probs):
    acc += p
    if r < acc:
      return i
  return len(probs) - 1


def _draw_water(img, rng, frame):
  sl, u, v = frame
  ph = rng.uniform(0, 2 * np.pi, size=4)
  region = (u * np.float32(1 / 2.1)) ** 2 + ((v - 0.25) * np.float32(1 / 1.25)) ** 2 <= 1.0 + 0.15 * np.sin(
      2.5 * u + ph[0]
  ) * np.cos(3.0 * v + ph[1])
  lam = 6.0 * img.shape[0] / 96.0
  ys = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None]
  xs = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :]
  # Horizontal wavelets in image space (water stays level when the boat tilts).
  wave = np.sin(
      np.float32(2 * np.pi / lam) * ys
      + 1.9 * np.sin(np.float32(2 * np.pi / (3.3 * lam)) * xs + ph[2])
      + ph[3]
  )[region]
  base = _jitter(rng, _WATER[rng.integers(len(_WATER))][None])[0]
  col = base + wave[:, None] * np.float32(10.0)
  col[wave > 0.75] += np.float32(45.0)
  img[sl][region] = col


def _draw_track(img, rng, frame):
  sl, u, v = frame
  region = (v >= -0.8) & (v <= 0.9) & (np.abs(u) <= 3.5)
  ur, vr = u[region], v[region]
  base = _jitter(rng, _GRAVEL[rng.integers(len(_GRAVEL))][None])[0]
  # Coarse gravel speckle: a high-frequency texture nothing else uses.
  speck = np.frombuffer(rng.bytes(ur.size), np.uint8)
  col = base + (speck[:, None] * np.float32(76.0 / 255.0) - np.float32(38.0))
  col[(vr >= 0.38) & (vr <= 0.82) & (_frac(ur * 3.0) < 0.35)] = (95, 62, 35)  # sleepers
  col[(np.abs(vr - 0.5) <= 0.045) | (np.abs(vr - 0.72) <= 0.045)] = (185, 185, 195)  # rails
  img[sl][region] = col


def _draw_context(img, rng, world, cls, cx, cy, s, theta, flip):
  """Context patch laid out in the owner's frame so it surrounds the object."""
  h, w = img.shape[:2]
  reach, draw = world.contexts[cls]
  fr = _frame(cx, cy, s, theta, flip, reach * s, h, w)
  if fr is not None:
    draw(img, rng, fr)


def _draw_distractor(img, rng, h, w):
  s = rng.uniform(0.04, 0.16) * h
  fr = _frame(rng.uniform(0, w), rng.uniform(0, h), s, rng.uniform(0, 2 * np.pi), False, 1.1 * s, h, w)
  if fr is None:
    return
  sl, u, v = fr
  kind = rng.integers(3)
  if kind == 0:
    m = u * u + (v * np.float32(1.0 / rng.uniform(0.2, 0.5))) ** 2 <= 1.0
  elif kind == 1:
    m = (np.abs(v - 0.3 * np.sin(4.0 * u + rng.uniform(0, 6.3))) <= 0.09) & (np.abs(u) <= 1.0)
  else:
    ang = np.arctan2(v, u)
    p = rng.uniform(0, 2 * np.pi, size=2)
    r = 0.7 + 0.2 * np.sin(3 * ang + p[0]) + 0.1 * np.sin(5 * ang + p[1])
    m = u * u + v * v <= r * r
  c = _muted(rng, 0.25, 0.7, n=2)
  if rng.random() < 0.35:  # striped clutter, so texture alone does not mean "object"
    img[sl][m] = np.take(c, (_frac(u[m] * 3.0) < 0.4).view(np.uint8), axis=0)
  else:
    img[sl][m] = c[0]


# ---------------------------------------------------------------- sampling
def _sample_instances(rng, n_fg):
  k = _pick(rng, (0.45, 0.4, 0.15)) + 1
  classes = [int(c) + 1 for c in rng.permutation(n_fg)[:k]]
  n_obj = k + int(rng.binomial(4 - k, 0.35))
  inst = classes + [classes[int(i)] for i in rng.integers(0, k, size=n_obj - k)]
  return [inst[int(i)] for i in rng.permutation(n_obj)]


def _place(rng, world, classes, h, w):
  """Sample poses; re-try each (<= 6x) so earlier instances stay >= _MIN_VISIBLE visible."""
  inst_map = np.zeros((h, w), np.int16)  # 0 = none, i+1 = instance i
  objs, areas, visible = [], [], np.zeros(0, np.int64)
  for cls in classes:
    best = None
    for _ in range(6):
      s = h * math.exp(rng.uniform(math.log(_SIZE_RANGE[0]), math.log(_SIZE_RANGE[1])))
      cx, cy = rng.uniform(0.08, 0.92) * w, rng.uniform(0.08, 0.92) * h
      theta = rng.uniform(-0.2, 0.2) if cls in world.upright else rng.uniform(0, 2 * np.pi)
      flip = bool(rng.integers(2))
      fr = _frame(cx, cy, s, theta, flip, 1.5 * s, h, w)
      if fr is None:
        continue
      m = world.shape(cls, fr[1], fr[2])
      if not m.any():
        continue
      covered = np.bincount(inst_map[fr[0]][m], minlength=len(objs) + 1)[1:]
      worst = float(((visible - covered) / np.maximum(areas, 1)).min()) if objs else 1.0
      if best is None or worst > best[0]:
        best = (worst, cx, cy, s, theta, flip, fr, m)
      if worst >= _MIN_VISIBLE:
        break
    if best is None:
      continue
    _, cx, cy, s, theta, flip, fr, m = best
    visible = visible - np.bincount(inst_map[fr[0]][m], minlength=len(objs) + 1)[1:]
    inst_map[fr[0]][m] = len(objs) + 1
    visible = np.append(visible, int(m.sum()))
    areas.append(int(m.sum()))
    objs.append((cls, cx, cy, s, theta, flip, fr, m))
  return objs


def render(seed_seq: np.random.SeedSequence, image_size: int = 96, world: "World | None" = None):
  """Render one sample of `world` (default: this module's classes); returns (image uint8 HxWx3,
  mask uint8 HxW)."""
  world = world or DEFAULT_WORLD
  rng = np.random.default_rng(seed_seq)
  h = w = image_size
  n_fg = len(world.class_names) - 1

  # Geometry first (masks only) so occlusion can be controlled by re-placement.
  objs = []
  while not objs:  # practically never loops; guarantees >= 1 labelled class
    objs = _place(rng, world, _sample_instances(rng, n_fg), h, w)

  # Background: muted corner-to-corner gradient + low-frequency colour noise,
  # both sampled on one coarse grid so a single upsampling draws them.
  corners = _muted(rng, 0.3, 0.65, n=4).reshape(2, 2, 3)
  t = _interp_matrix(6, 1)
  grid = np.einsum("ia,abc,jb->ijc", t, corners, t)
  grid += rng.uniform(-28, 28, size=(6, 6, 3)).astype(np.float32)
  img = _smooth(grid, h, w)

  for _ in range(int(rng.integers(2, 7))):
    _draw_distractor(img, rng, h, w)

  for cls in world.contexts:
    if rng.random() < _P_CONTEXT_ALONE:
      s = rng.uniform(0.08, 0.2) * h
      _draw_context(img, rng, world, cls, rng.uniform(0, w), rng.uniform(0, h), s, rng.uniform(-0.2, 0.2), False)
  for cls, cx, cy, s, theta, flip, _, _ in objs:
    if cls in world.contexts and rng.random() < _P_CONTEXT:
      _draw_context(img, rng, world, cls, cx, cy, s, theta, flip)

  mask = np.zeros((h, w), np.uint8)
  for cls, cx, cy, s, theta, flip, fr, m in objs:
    pal = world.palettes[cls]
    sub = _pick(rng, _SUBTYPE_P[len(pal)])
    sl, u, v = fr
    P = _jitter(rng, pal[sub])
    idx = world.texture(cls, sub, u, v)
    vm = v[m]
    if idx is None:  # a hue sweep around the object's centre (ring/1)
      t = (np.arctan2(vm, u[m]) * np.float32(0.5 / np.pi) + np.float32(0.5))[:, None]
      col = P[0] + t * (P[1] - P[0])
    else:
      col = np.take(P, idx[m], axis=0)
    col *= (1.0 - 0.12 * np.clip(vm, -1.0, 1.0))[:, None]  # top-lit shading
    img[sl][m] = col
    mask[sl][m] = cls

  # Uniform luminance byte noise (std ~5): far cheaper than Gaussian RGB draws.
  noise = np.frombuffer(rng.bytes(h * w), np.uint8).reshape(h, w, 1)
  img += noise * np.float32(18.0 / 255.0) - np.float32(9.0)
  return np.clip(img, 0, 255).astype(np.uint8), mask


# ------------------------------------------------------------------ worlds
DEFAULT_WORLD = World(
    name="default",
    class_names=CLASS_NAMES,
    palettes=_PALETTES,
    shape=_shape,
    texture=_texture,
    upright=_UPRIGHT,
    contexts={BOAT: (2.4, _draw_water), TRAIN: (3.7, _draw_track)},
)
WORLDS = ("default", "everyday")


def get_world(name: str) -> World:
  if name == "default":
    return DEFAULT_WORLD
  if name == "everyday":
    from cpal_jax.data import synthetic_everyday

    return synthetic_everyday.WORLD
  raise ValueError(f"data.world={name!r} not understood; choose one of {', '.join(WORLDS)}")


# ------------------------------------------------------------------ source
class SyntheticSource:
  """Random-access source (grain MapDataset.source compatible)."""

  def __init__(
      self, split: str, *, seed: int = 0, num_images: int | None = None, image_size: int = 96, world: str = "default"
  ):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    self.world = get_world(world)
    self.class_names = self.world.class_names
    self.num_classes = len(self.class_names)
    self.split = split
    self.seed = int(seed)
    self.image_size = int(image_size)
    self._n = SPLITS[split] if num_images is None else int(num_images)
    self._code = _SPLIT_CODE[split] + self.world.split_offset
    self._prefix = _ID_PREFIX[split]

  def __len__(self) -> int:
    return self._n

  def __repr__(self) -> str:
    return (
        f"SyntheticSource(split={self.split!r}, seed={self.seed}, "
        f"num_images={self._n}, image_size={self.image_size}, world={self.world.name!r})"
    )

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index < 0:
      index += self._n
    if not 0 <= index < self._n:
      raise IndexError(f"index {index} out of range for {self!r}")
    image, mask = render(np.random.SeedSequence([self.seed, self._code, index]), self.image_size, self.world)
    # The label is read off the final mask so fully occluded instances never count.
    n = self.num_classes
    label = (np.bincount(mask.ravel(), minlength=n)[1:n] > 0).astype(np.float32)
    return {"id": f"{self._prefix}_{index:06d}", "image": image, "label": label, "mask": mask}

  def ids(self) -> list[str]:
    return [f"{self._prefix}_{i:06d}" for i in range(self._n)]


# ------------------------------------------------------------ visualising
def colorize_mask(mask: np.ndarray) -> np.ndarray:
  return palette.voc_colormap()[mask]


def save_grid(
    path: str,
    n: int = 12,
    seed: int = 0,
    split: str = "train",
    image_size: int = 96,
    cols: int = 4,
    world: str = "default",
) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  src = SyntheticSource(split, seed=seed, num_images=max(n, 1), image_size=image_size, world=world)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.6, rows * 1.85), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i in range(n):
    item = src[i]
    names = [src.class_names[c + 1] for c in np.flatnonzero(item["label"])]
    a_img, a_msk = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
    a_img.imshow(item["image"], interpolation="nearest")
    a_img.set_title(f"{item['id']}: " + ", ".join(names), fontsize=7, loc="left")
    a_msk.imshow(colorize_mask(item["mask"]), interpolation="nearest")
  fig.tight_layout(pad=0.3)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--grid", help="write a PNG grid of samples + GT masks to this path")
  ap.add_argument("--n", type=int, default=12)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--split", default="train", choices=sorted(SPLITS))
  ap.add_argument("--image-size", type=int, default=96)
  ap.add_argument("--world", default="default", choices=WORLDS)
  ap.add_argument("--bench", type=int, default=0, help="time this many renders")
  args = ap.parse_args(argv)
  if args.grid:
    save_grid(args.grid, n=args.n, seed=args.seed, split=args.split, image_size=args.image_size, world=args.world)
    print(f"wrote {args.grid}")
  if args.bench:
    src = SyntheticSource(
        args.split, seed=args.seed, num_images=args.bench, image_size=args.image_size, world=args.world
    )
    src[0]
    t = time.perf_counter()
    for i in range(len(src)):
      src[i]
    dt = (time.perf_counter() - t) / len(src) * 1e3
    print(f"{dt:.3f} ms/image ({args.image_size}px, {len(src)} images)")
  if not (args.grid or args.bench):
    ap.print_help()


if __name__ == "__main__":
  _main()
