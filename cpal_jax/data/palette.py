"""The PASCAL VOC colour map, so class-index PNGs (masks, predictions) show in colour in viewers
while their pixel values stay the class indices."""

import numpy as np


def voc_colormap(n: int = 256) -> np.ndarray:
  """[n, 3] uint8: the devkit's bit-interleaved colour map (0 black, 255 = (224, 224, 192))."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def putpalette_list() -> list[int]:
  """The colour map flattened for PIL's Image.putpalette (mode 'P' PNGs)."""
  return voc_colormap().reshape(-1).tolist()
