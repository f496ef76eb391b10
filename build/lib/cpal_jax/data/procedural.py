"""What every procedural world shares, below the renderer (cpal_jax/data/synthetic.py): the World
description and the small colour and pattern helpers. No jax import (grain workers)."""

from __future__ import annotations

import dataclasses

import numpy as np


def colours(*rows) -> np.ndarray:
  """A palette: rows of RGB as float32."""
  return np.array(rows, dtype=np.float32)


def frac(x):
  # x - floor(x) is ~6x faster than np.mod for float32.
  return x - np.floor(x)


def jitter(rng, P):
  """A palette under one random gain and offset: the same sub-type, never the same colours."""
  gain = rng.uniform(0.85, 1.12)
  return np.clip(P * gain + rng.uniform(-15, 15, size=(1, 3)), 0, 255).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class World:
  """A class vocabulary drawn by the shared renderer: what the objects are, nothing about how
  images are composed (clutter, occlusion, sizes and sub-type frequencies are the same in every
  world, so worlds differ only in their objects)."""

  name: str
  class_names: tuple[str, ...]
  palettes: dict  # class -> one (rows, 3) colour table per sub-type (2 or 3 sub-types)
  shape: object  # (cls, u, v) -> bool mask in object coordinates (about [-1, 1], v down)
  texture: object  # (cls, sub, u, v) -> palette-row index map, or None for a hue sweep
  upright: frozenset  # classes rotated by at most +-0.2 rad
  contexts: dict  # class -> (reach in object sizes, draw(img, rng, frame)): unlabelled context
  split_offset: int = 0  # added to the split codes so worlds never share a seed stream
