"""The PASCAL VOC colour map, so class-index PNGs (masks, predictions) show in colour in viewers
while their pixel values stay the class indices."""

import numpy as np

from cpal_jax import paths


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


def save_label_png(path: str, labels: np.ndarray, palette: bool = True) -> None:
  """Writes class indices [H, W] (0..254, 255 = ignore) as a PNG, atomically: a reader or a killed
  run never sees a half-written file. Palette PNGs show VOC colours; the pixel values stay indices."""
  from PIL import Image

  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
    raise ValueError(f"{path}: a label PNG needs a 2-D map of values 0..255, got {labels.shape}")
  im = Image.fromarray(labels.astype(np.uint8), mode="P" if palette else "L")
  if palette:
    im.putpalette(putpalette_list())
  with paths.atomic(path) as tmp:
    im.save(tmp, format="PNG")


def load_label_png(path: str) -> np.ndarray:
  """The class indices of a palette ("P") or gray ("L") PNG as uint8 [H, W]."""
  from PIL import Image

  try:
    with Image.open(path) as im:
      if im.mode not in ("P", "L"):
        raise ValueError(f"label PNG {path} has mode {im.mode!r}; need a palette (P) or gray (L) PNG")
      return np.asarray(im, np.uint8)
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError) as e:
    raise ValueError(
        f"label PNG {path} is unreadable ({e}); delete it and re-run the stage that wrote it"
    ) from e
