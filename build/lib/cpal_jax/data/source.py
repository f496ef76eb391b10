"""What every random-access source (VOC, COCO, TFDS-packed) shares: an ordered id list, its
length, Python-style indexing with a clear IndexError, and the mask-against-image size check.
No jax import: grain workers load it."""

import operator


class IdListSource:
  """Subclasses set `self._ids` (the split's ids in order) and read elements by position."""

  _ids: list[str]

  def __len__(self) -> int:
    return len(self._ids)

  def ids(self) -> list[str]:
    return list(self._ids)

  def _position(self, index) -> int:
    """index as a position in 0..len-1 (negative indices count from the end)."""
    index = operator.index(index)
    n = len(self._ids)
    if not -n <= index < n:
      raise IndexError(f"{type(self).__name__} index {index} out of range for {n} ids")
    return index % n


def check_mask_size(mask, mask_path, height: int, width: int, dataset: str, hint: str = "") -> None:
  """A mask must cover its image pixel for pixel; anything else was resized or is another image's."""
  if mask.shape != (height, width):
    raise ValueError(
        f"{dataset} mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image is "
        f"{height}x{width}; the mask belongs to another image or was resized" + (f", {hint}" if hint else "")
    )
