"""Training sources of images paired with per-image label PNGs that an earlier stage wrote (IR labels
for the boundary network, exported pseudo masks for DeepLab).

Every label file is looked up when the source is made, so a missing one fails before training
starts, not in a loader thread hours in; a label of the wrong size or with values outside the
classes and 255 is an error naming the file and the stage that rewrites it.
"""

import os

from cpal_jax.data import palette

from cpal_jax.data.transforms import IGNORE_INDEX as IGNORE


class LabelPNGSource:
  """{"id", "image" uint8 [H, W, 3], <key> uint8 [H, W]} for every image of `source`."""

  def __init__(self, source, label_dir: str, num_classes: int, *, key: str, kind: str, stage: str, hint: str):
    self._source, self._dir, self._num_classes = source, label_dir, num_classes
    self._key, self._kind, self._stage = key, kind, stage
    ids = source.ids()
    missing = [i for i in ids if not os.path.exists(self.path(i))]
    if missing:
      raise FileNotFoundError(
          f"{kind} {self.path(missing[0])} not found ({len(missing)} of the {len(ids)} training "
          f"images have none): {hint}"
      )

  def path(self, image_id: str) -> str:
    return os.path.join(self._dir, f"{image_id}.png")

  def __len__(self) -> int:
    return len(self._source)

  def ids(self) -> list[str]:
    return self._source.ids()

  def __getitem__(self, index: int) -> dict:
    el = self._source[index]
    path = self.path(el["id"])
    label = palette.load_label_png(path)
    if label.shape != el["image"].shape[:2]:
      raise ValueError(
          f"{self._kind} {path} is {label.shape[0]}x{label.shape[1]} but its image is "
          f"{el['image'].shape[0]}x{el['image'].shape[1]}; delete it and re-run the {self._stage} stage"
      )
    bad = (label >= self._num_classes) & (label != IGNORE)
    if bad.any():
      raise ValueError(
          f"{self._kind} {path} holds value {int(label[bad][0])}, not a class of data.num_classes="
          f"{self._num_classes} nor {IGNORE}"
      )
    return {"id": el["id"], "image": el["image"], self._key: label}
