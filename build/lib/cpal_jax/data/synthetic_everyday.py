"""A second procedural world for the same renderer: everyday objects, none of them in the default
world and none built around the pretraining vocabulary (cpal_jax/data/procnet.py draws single
convex-ish outlines; these are objects of several parts).

    1 car  2 house  3 mushroom  4 bottle  5 key  6 umbrella  7 cup  8 flower  9 bird

It keeps the failure modes the default world has, on other objects:
* sub-types: 2-3 palettes/textures per class with unequal frequencies;
* unlabelled context: cars stand on a road (asphalt, dashed centre line) and flowers in a grass
  tuft, both background in the mask and sometimes drawn with no object;
* look-alikes: mushroom caps and umbrella canopies share their two main appearances (red with
  white dots, blue with white sectors) and differ in the stem/handle below them.

Clutter, sizes, occlusion, sub-type frequencies and the split layout are the shared renderer's
(cpal_jax/data/synthetic.py, which serves this world as data.world=everyday); this world has its own seed streams. No jax import (grain workers).

    python -m cpal_jax.data.synthetic --world everyday --grid docs/synthetic_everyday_samples.png
"""

from __future__ import annotations

import numpy as np

from cpal_jax.data.procedural import World
from cpal_jax.data.procedural import colours as _c
from cpal_jax.data.procedural import frac as _frac
from cpal_jax.data.procedural import jitter as _jitter

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "car",
    "house",
    "mushroom",
    "bottle",
    "key",
    "umbrella",
    "cup",
    "flower",
    "bird",
)
CAR, HOUSE, MUSHROOM, BOTTLE, KEY, UMBRELLA, CUP, FLOWER, BIRD = range(1, len(CLASS_NAMES))

# Mushroom caps and umbrella canopies share these two: main colour, pattern colour, stem/handle.
_RED_DOTS = _c((205, 30, 35), (245, 240, 230), (235, 225, 200))
_BLUE_SECTORS = _c((35, 70, 190), (240, 240, 245), (230, 220, 195))
_PALETTES = {
    # body, windows, wheels, stripe
    CAR: [
        _c((210, 35, 30), (170, 210, 235), (30, 30, 30), (245, 245, 245)),
        _c((40, 90, 200), (170, 210, 235), (30, 30, 30), (250, 200, 30)),
        _c((240, 200, 30), (60, 70, 90), (30, 30, 30), (30, 30, 30)),
    ],
    # walls, roof, door/window, brick lines
    HOUSE: [
        _c((235, 225, 200), (170, 50, 35), (80, 55, 35), (200, 185, 160)),
        _c((175, 80, 55), (60, 60, 70), (240, 240, 240), (230, 220, 210)),
        _c((140, 190, 220), (120, 70, 40), (250, 250, 250), (120, 170, 200)),
    ],
    MUSHROOM: [_RED_DOTS, _BLUE_SECTORS, _c((150, 95, 50), (215, 180, 130), (240, 230, 210))],
    # glass, label, cap
    BOTTLE: [
        _c((40, 140, 60), (245, 240, 225), (200, 170, 40)),
        _c((120, 70, 30), (210, 30, 40), (220, 220, 225)),
        _c((150, 200, 230), (40, 60, 150), (240, 240, 245)),
    ],
    # metal, head, highlight
    KEY: [
        _c((215, 175, 60), (215, 175, 60), (250, 235, 160)),
        _c((185, 190, 200), (30, 120, 220), (240, 245, 250)),
    ],
    UMBRELLA: [_RED_DOTS, _BLUE_SECTORS, _c((250, 205, 20), (250, 205, 20), (40, 35, 30))],
    # body, pattern, rim
    CUP: [
        _c((245, 245, 240), (40, 110, 200), (200, 200, 200)),
        _c((230, 120, 40), (255, 225, 170), (160, 80, 25)),
        _c((60, 170, 150), (250, 245, 235), (30, 110, 100)),
    ],
    # petals, centre, stem/leaf
    FLOWER: [
        _c((240, 60, 140), (250, 210, 30), (40, 140, 45)),
        _c((250, 250, 245), (245, 180, 20), (40, 140, 45)),
        _c((150, 70, 210), (255, 240, 120), (40, 140, 45)),
    ],
    # body, wing, beak, eye
    BIRD: [
        _c((60, 110, 210), (30, 60, 140), (245, 170, 30), (10, 10, 10)),
        _c((200, 40, 40), (120, 20, 25), (245, 170, 30), (10, 10, 10)),
        _c((245, 215, 40), (90, 80, 60), (235, 120, 30), (10, 10, 10)),
    ],
}
_UPRIGHT = frozenset({CAR, HOUSE, MUSHROOM, BOTTLE, UMBRELLA, CUP, FLOWER})
_ASPHALT = _c((70, 70, 75), (90, 88, 85), (55, 58, 65))
_GRASS = _c((60, 150, 50), (90, 165, 55), (45, 120, 60))


# ----------------------------------------------------------------- shapes
def _disc(u, v, cu, cv, r):
  return (u - cu) ** 2 + (v - cv) ** 2 <= r * r


def _car_parts(u, v):
  body = (np.abs(u) <= 1.0) & (v >= -0.05) & (v <= 0.42)
  cabin = (v >= -0.5) & (v < -0.05) & (np.abs(u + 0.1) <= 0.42 + 0.45 * (v + 0.5))
  windows = cabin & (v >= -0.42) & (np.abs(u + 0.1) <= 0.33 + 0.45 * (v + 0.5)) & (np.abs(u + 0.1) >= 0.04)
  wheels = _disc(u, v, -0.58, 0.44, 0.22) | _disc(u, v, 0.58, 0.44, 0.22)
  return body | cabin, windows, wheels


def _house_parts(u, v):
  walls = (np.abs(u) <= 0.7) & (v >= -0.15) & (v <= 0.95)
  roof = (v >= -0.95) & (v < -0.15) & (np.abs(u) <= 0.95 * (v + 0.95) / 0.8)
  door = (np.abs(u - 0.28) <= 0.15) & (v >= 0.45)
  window = (np.abs(u + 0.3) <= 0.16) & (v >= 0.1) & (v <= 0.4)
  return walls, roof, door | (window & walls)


def _mushroom_parts(u, v):
  cap = (v <= 0.05) & ((u / 0.95) ** 2 + ((v - 0.05) / 0.95) ** 2 <= 1.0)
  stem = (v > 0.05) & (v <= 0.95) & (np.abs(u) <= 0.22 + 0.08 * v)
  return cap, stem


def _umbrella_parts(u, v):
  # A dome whose lower edge is scalloped between the ribs.
  edge = 0.05 - 0.14 * np.abs(np.sin(u * np.float32(np.pi * 2.0)))
  canopy = (v <= edge) & ((u / 1.0) ** 2 + ((v - 0.05) / 0.85) ** 2 <= 1.0)
  shaft = (np.abs(u) <= 0.05) & (v > edge) & (v <= 0.8)
  r2 = (u + 0.14) ** 2 + (v - 0.8) ** 2
  hook = (v >= 0.8) & (r2 <= 0.19**2) & (r2 >= 0.09**2)
  return canopy, shaft | hook


def _bottle_parts(u, v):
  shoulder = np.clip((v + 0.45) / 0.3, 0.0, 1.0)  # 0 at the neck, 1 at the body
  glass = (v >= -0.95) & (v <= 0.95) & (np.abs(u) <= 0.15 + 0.27 * shoulder)
  cap = glass & (v <= -0.78)
  return glass, cap


def _key_parts(u, v):
  r2 = (u + 0.62) ** 2 + v * v
  head = (r2 <= 0.38**2) & (r2 >= 0.14**2)
  shaft = (u >= -0.3) & (u <= 1.0) & (np.abs(v) <= 0.09)
  teeth = (u >= 0.5) & (u <= 0.95) & (v > 0.0) & (v <= 0.32) & (_frac(u * 6.0) < 0.55)
  return head, shaft | teeth


def _cup_parts(u, v):
  body = (v >= -0.65) & (v <= 0.75) & (np.abs(u + 0.15) <= 0.62 - 0.12 * (v + 0.65))
  r2 = (u - 0.5) ** 2 + (v - 0.02) ** 2
  handle = (u >= 0.3) & (r2 <= 0.36**2) & (r2 >= 0.2**2)
  rim = body & (v <= -0.55)
  return body | handle, rim


def _flower_parts(u, v):
  cv = -0.35
  petals = np.zeros(u.shape, bool)
  for k in range(6):
    a = k * np.pi / 3
    petals |= _disc(u, v, 0.4 * np.cos(a), cv + 0.4 * np.sin(a), 0.26)
  centre = _disc(u, v, 0.0, cv, 0.2)
  stem = (np.abs(u) <= 0.06) & (v > cv) & (v <= 1.0)
  leaf = ((u - 0.25) / 0.24) ** 2 + ((v - 0.55) / 0.1) ** 2 <= 1.0
  return petals | centre, centre, stem | leaf


def _bird_parts(u, v):
  body = (u / 0.62) ** 2 + ((v - 0.05) / 0.36) ** 2 <= 1.0
  head = _disc(u, v, -0.6, -0.25, 0.25)
  beak = (u >= -1.0) & (u <= -0.8) & (np.abs(v + 0.25) <= (u + 1.0) * 0.45)
  tail = (u >= 0.5) & (u <= 0.98) & (np.abs(v) <= 0.06 + (u - 0.5) * 0.45)
  wing = ((u - 0.08) / 0.4) ** 2 + ((v + 0.02 - 0.3 * (u - 0.08)) / 0.18) ** 2 <= 1.0
  eye = _disc(u, v, -0.66, -0.3, 0.06)
  return body | head | tail, wing, beak, eye


def _shape(cls, u, v):
  if cls == CAR:
    b, _, w = _car_parts(u, v)
    return b | w
  if cls == HOUSE:
    w, r, _ = _house_parts(u, v)
    return w | r
  if cls == MUSHROOM:
    c, s = _mushroom_parts(u, v)
    return c | s
  if cls == UMBRELLA:
    c, h = _umbrella_parts(u, v)
    return c | h
  if cls == BOTTLE:
    return _bottle_parts(u, v)[0]
  if cls == KEY:
    h, s = _key_parts(u, v)
    return h | s
  if cls == CUP:
    return _cup_parts(u, v)[0]
  if cls == FLOWER:
    f, _, s = _flower_parts(u, v)
    return f | s
  if cls == BIRD:
    b, w, k, _ = _bird_parts(u, v)
    return b | w | k
  raise ValueError(cls)


# --------------------------------------------------------------- textures
def _dots(u, v, freq, radius):
  du, dv = _frac(u * freq) - 0.5, _frac(v * freq) - 0.5
  return du * du + dv * dv < radius * radius


def _cap_pattern(sub, u, v):
  """Shared by mushroom caps and umbrella canopies: the look-alike pair."""
  if sub == 0:
    return _dots(u, v, 2.6, 0.2)
  if sub == 1:
    return _frac(np.arctan2(v - 0.05, u) * np.float32(4.0 / np.pi)) < 0.5
  return np.zeros(u.shape, bool)


def _texture(cls, sub, u, v):
  """Palette-row index per pixel, in object coordinates (patterns rotate with the object)."""
  idx = np.zeros(u.shape, np.intp)
  if cls == CAR:
    _, windows, wheels = _car_parts(u, v)
    if sub == 0:
      idx[(np.abs(v - 0.18) <= 0.05) & (np.abs(u) <= 0.95)] = 3
    elif sub == 1:
      idx[(np.abs(u + 0.1) <= 0.1) & (v <= 0.42)] = 3  # a racing stripe over the roof
    else:
      idx[_dots(u, v, 4.0, 0.15) & (v >= -0.05)] = 3
    idx[windows] = 1
    idx[wheels & (v >= 0.3)] = 2
  elif cls == HOUSE:
    walls, roof, openings = _house_parts(u, v)
    if sub == 0:
      idx[walls & ((_frac(v * 6.0) < 0.12) | ((_frac(u * 3.0 + 0.5 * np.floor(v * 6.0)) < 0.08)))] = 3
    elif sub == 2:
      idx[walls & (_frac(u * 5.0) < 0.2)] = 3
    idx[roof] = 1
    if sub == 1:
      idx[roof & (_frac((v + 0.95) * 5.0) < 0.25)] = 3
    idx[openings] = 2
  elif cls in (MUSHROOM, UMBRELLA):
    if cls == MUSHROOM:
      top, below = _mushroom_parts(u, v)
    else:
      top, below = _umbrella_parts(u, v)
    idx[top & _cap_pattern(sub, u, v)] = 1
    if sub == 2 and cls == MUSHROOM:
      idx[top & (v >= -0.2)] = 1  # a paler rim under the brown cap
    idx[below & ~top] = 2
  elif cls == BOTTLE:
    _, cap = _bottle_parts(u, v)
    label = (v >= 0.05) & (v <= 0.5)
    idx[label] = 1
    if sub == 2:
      idx[label & (_frac(u * 4.0) < 0.3)] = 0
    idx[cap] = 2
  elif cls == KEY:
    head, _ = _key_parts(u, v)
    idx[head] = 1
    idx[(np.abs(v + 0.03) <= 0.025) & (u >= -0.25)] = 2
  elif cls == CUP:
    _, rim = _cup_parts(u, v)
    if sub == 0:
      idx[(_frac(v * 4.0) < 0.3) & (v >= -0.5)] = 1
    elif sub == 1:
      idx[_dots(u, v, 3.5, 0.18)] = 1
    else:
      idx[np.abs(v - 0.1) <= 0.12] = 1
    idx[rim] = 2
  elif cls == FLOWER:
    _, centre, green = _flower_parts(u, v)
    if sub == 2:
      idx[_frac(np.arctan2(v + 0.35, u) * np.float32(6.0 / np.pi)) < 0.2] = 1
    idx[centre] = 1
    idx[green] = 2
  elif cls == BIRD:
    body, wing, beak, eye = _bird_parts(u, v)
    idx[wing] = 1
    if sub == 2:
      idx[body & ~wing & (_frac(u * 5.0) < 0.2)] = 1
    idx[beak & ~body] = 2
    idx[eye] = 3
  else:
    raise ValueError(cls)
  return idx


# ---------------------------------------------------------------- context
def _draw_road(img, rng, frame):
  sl, u, v = frame
  region = (v >= 0.3) & (v <= 1.1) & (np.abs(u) <= 3.2)
  ur, vr = u[region], v[region]
  base = _jitter(rng, _ASPHALT[rng.integers(len(_ASPHALT))][None])[0]
  speck = np.frombuffer(rng.bytes(ur.size), np.uint8)
  col = base + (speck[:, None] * np.float32(30.0 / 255.0) - np.float32(15.0))
  col[(np.abs(vr - 0.88) <= 0.04) & (_frac(ur * 1.2) < 0.5)] = (240, 240, 235)  # centre dashes
  col[np.abs(vr - 0.33) <= 0.03] = (200, 200, 200)  # kerb
  img[sl][region] = col


def _draw_grass(img, rng, frame):
  sl, u, v = frame
  ph = rng.uniform(0, 2 * np.pi)
  region = (u / 1.6) ** 2 + ((v - 1.0) / 0.55) ** 2 <= 1.0 + 0.2 * np.sin(5.0 * u + ph)
  base = _jitter(rng, _GRASS[rng.integers(len(_GRASS))][None])[0]
  blades = _frac(u[region] * 7.0 + 0.6 * np.sin(v[region] * 6.0 + ph)) < 0.3
  col = np.broadcast_to(base, (int(region.sum()), 3)).copy()
  col[blades] *= np.float32(0.7)
  img[sl][region] = col


WORLD = World(
    name="everyday",
    class_names=CLASS_NAMES,
    palettes=_PALETTES,
    shape=_shape,
    texture=_texture,
    upright=_UPRIGHT,
    contexts={CAR: (2.8, _draw_road), FLOWER: (2.2, _draw_grass)},
    split_offset=100,
)
