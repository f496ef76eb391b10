"""Reads a dataset packed by `python -m cpal_jax.data.tfds_pack` (TFDS ArrayRecord shards) as a
random-access source with VOCSource's element schema; the record layout is the packer's (see
cpal_jax/data/tfds_pack.py).

The optional extra: pip install tensorflow-datasets==4.9.10 (requirements-tfds.txt). TensorFlow is
not needed: reading uses `builder.as_data_source(split)`. tensorflow_datasets is imported only inside
functions; this module otherwise needs only numpy and PIL, so grain worker processes can import it.
Images and masks are decoded here with PIL (SkipDecoding), not by TFDS: TFDS's numpy decoder prefers
OpenCV when it is installed, whose JPEG decoding need not match PIL's bit for bit; ours is
VOCSource's own decode path (PIL, voc.to_rgb_uint8), so the pixels are the tree's.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from cpal_jax.data import voc
from cpal_jax.data.source import IdListSource

DATASET_VERSION = "1.0.0"
INSTALL_HINT = "pip install tensorflow-datasets==4.9.10 (the optional extra; TensorFlow is not needed)"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def import_tfds():
  """tensorflow_datasets, or an ImportError that says how to install the extra."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"tensorflow_datasets is not available ({e}); {INSTALL_HINT}") from e
  return tfds


def split_name(split: str) -> str:
  """The TFDS split that stores data split `split`: a .txt list path becomes its stem; characters
  other than letters, digits and _ become _ (TFDS's split syntax reserves +, [, ], %, :)."""
  name = Path(split).stem if str(split).endswith(".txt") else str(split)
  name = re.sub(r"\W", "_", name)
  if not re.search(r"[A-Za-z0-9]", name):
    raise ValueError(f"split {split!r} gives no usable TFDS split name; name the list file with letters")
  return name


def dataset_name(config) -> str:
  """data.tfds_name, or cpal_<data.name>."""
  name = config.data.get("tfds_name", "") or f"cpal_{config.data.name}"
  if not _NAME_RE.match(name):
    raise ValueError(
        f"TFDS dataset name {name!r} is not snake_case (a-z, 0-9, _; starting with a letter); "
        "set data.tfds_name"
    )
  return name


class TFDSSource(IdListSource):
  """A packed split as a random-access source (the VOCSource protocol and element schema).

  Args:
    data_dir: the TFDS data_dir given to the packer (--out, data.tfds_dir).
    name: the dataset name (cpal_voc, cpal_coco or data.tfds_name).
    split: a data split name or .txt list path (mapped with split_name).
    with_mask: add "mask"; the split must have been packed with masks.

  Elements: {"id": str, "image": uint8[H, W, 3], "label": float32[C-1], "mask": uint8[H, W]}.
  Picklable: grain worker processes reopen the shards on their first read.
  """

  def __init__(self, data_dir: str, name: str, split: str, with_mask: bool = False):
    tfds = import_tfds()
    self.data_dir, self.name, self.split, self.with_mask = str(data_dir), name, split, with_mask
    self.version_dir = Path(data_dir) / name / DATASET_VERSION
    if not (self.version_dir / "dataset_info.json").is_file():
      have = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) if Path(data_dir).is_dir() else []
      raise FileNotFoundError(
          f"no packed dataset {name} {DATASET_VERSION} in {data_dir} ({self.version_dir} has no "
          f"dataset_info.json; datasets there: {have}); build it with python -m cpal_jax.data.tfds_pack --config=<config> "
          f"--splits=<splits> --out={data_dir}, or check data.tfds_dir / data.tfds_name"
      )
    builder = tfds.builder_from_directory(str(self.version_dir))
    meta = builder.info.metadata or {}
    self.key = split_name(split)
    packed = meta.get("splits", {})
    if self.key not in packed or self.key not in builder.info.splits:
      raise ValueError(
          f"split {split!r} (TFDS split {self.key!r}) is not in {self.version_dir}, which holds "
          f"{sorted(packed)}; repack with it in --splits (and --overwrite)"
      )
    if with_mask and not packed[self.key]["has_mask"]:
      raise ValueError(
          f"split {self.key!r} of {self.version_dir} was packed without masks; repack with it in "
          "--mask_splits (and --overwrite), or read it with with_mask=False"
      )
    self.class_names = tuple(meta["class_names"])
    self.num_classes = len(self.class_names)
    self._ids = list(packed[self.key]["ids"])
    self._ds = self._open(builder)
    if len(self._ds) != len(self._ids):
      raise ValueError(
          f"{self.version_dir} split {self.key!r} holds {len(self._ds)} records but its metadata lists "
          f"{len(self._ids)} ids; the dataset is damaged: repack it with --overwrite"
      )

  def _open(self, builder=None):
    tfds = import_tfds()
    if builder is None:
      builder = tfds.builder_from_directory(str(self.version_dir))
    skip = tfds.decode.SkipDecoding
    return builder.as_data_source(self.key, decoders={"image": skip(), "mask": skip()})

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None  # the shard readers stay in their process; reopened on first read
    return state

  def __getitem__(self, index) -> dict:
    index = self._position(index)
    if self._ds is None:
      self._ds = self._open()
    record = self._ds[index]
    image_id = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    if image_id != self._ids[index]:
      raise ValueError(
          f"{self.version_dir} split {self.key!r}: record {index} is {image_id!r} but the metadata says "
          f"{self._ids[index]!r}; the dataset is damaged: repack it with --overwrite"
      )
    where = f"{self.version_dir} {self.key}[{index}] ({image_id})"
    with Image.open(io.BytesIO(record["image"])) as im:
      im.load()
      image = voc.to_rgb_uint8(im, where)
    element = {"id": image_id, "image": image, "label": np.array(record["label"], np.float32)}
    if self.with_mask:
      with Image.open(io.BytesIO(record["mask"])) as im:
        if im.mode != "L":
          raise ValueError(f"mask of {where} has PIL mode {im.mode!r}, not 'L'; repack the dataset")
        element["mask"] = np.array(im)
    return element

  def __repr__(self) -> str:
    return (
        f"TFDSSource(dir={str(self.version_dir)!r}, split={self.key!r}, n={len(self)}, "
        f"with_mask={self.with_mask})"
    )
