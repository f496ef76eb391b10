"""PASCAL VOC 2012 as a grain random-access source.

Reads the standard ``VOCdevkit/VOC2012`` layout and yields the element schema
every cpal_jax source shares::

    {"id": str,
     "image": uint8[H, W, 3] RGB,
     "label": float32[20] multi-hot over the foreground classes (class c at c-1),
     "mask": uint8[H, W] class indices, 255 = ignore}   # only with with_mask=True

No jax import: this module runs inside grain worker processes.
"""

from __future__ import annotations

import json
import operator
import os
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_FG_INDEX = {name: i - 1 for i, name in enumerate(VOC_CLASSES) if i > 0}
_IGNORE = 255
_FILE_EXTS = (".jpg", ".jpeg", ".png")


def _id_from_token(token: str) -> str:
  # Lists like IRN's train_aug.txt give "JPEGImages/x.jpg SegmentationClassAug/x.png";
  # plain lists give "x". Strip only known image suffixes so ids with dots survive.
  name = PurePosixPath(token).name
  stem, ext = os.path.splitext(name)
  return stem if ext.lower() in _FILE_EXTS else name


def _decode_irn_int_id(key) -> str:
  # IRN's make_cls_labels.py stores ids as ints (2007000032); SIPE stores strings.
  if isinstance(key, (int, np.integer)):
    s = str(int(key))
    return s[:4] + "_" + s[4:]
  return str(key)


def read_split(path: Path) -> list[str]:
  """Reads a split list; one id (or "image_path [mask_path]") per line."""
  ids = []
  with open(path) as f:
    for line in f:
      tokens = line.split()
      if tokens:
        ids.append(_id_from_token(tokens[0]))
  if not ids:
    raise ValueError(f"VOC split list is empty: {path}; check data.train_split / data.eval_split")
  return ids


def load_label_table(path: Path, num_fg: int = len(VOC_CLASSES) - 1) -> dict[str, np.ndarray]:
  """Loads an id -> multi-hot table from SIPE/IRN-style cls_labels (.json or .npy).

  The .npy file is a pickled dict, so loading it unpickles (runs code from the file);
  only pass a .npy you trust. The .json copy carries the same content without that risk.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"VOC label file missing: {path}; check data.labels / data.root")
  if path.suffix == ".json":
    with open(path) as f:
      raw = json.load(f)
  elif path.suffix == ".npy":
    raw = np.load(path, allow_pickle=True)
    raw = raw.item() if raw.dtype == object and raw.shape == () else raw
  else:
    raise ValueError(
        f"VOC label file must end in .json or .npy: {path}; convert it or pass labels='xml'/'mask'"
    )
  if not isinstance(raw, dict):
    raise ValueError(f"VOC label file is not an id -> vector dict: {path}; use SIPE's cls_labels format")
  table = {}
  for key, vec in raw.items():
    v = np.asarray(vec, dtype=np.float32).reshape(-1)
    if v.shape != (num_fg,) or not np.all((v == 0) | (v == 1)):
      raise ValueError(
          f"VOC label for {key!r} in {path} is not a 0/1 vector of length {num_fg}; "
          "labels exclude background (class c at index c-1)"
      )
    table[_decode_irn_int_id(key)] = v
  return table


def label_from_xml(path: Path) -> np.ndarray:
  """Multi-hot over every <object> in a VOC annotation, difficult ones included.

  IRN/SIPE (load_image_label_from_xml) collect every <name> element that is a class
  name, which includes objects marked difficult; keeping them makes our labels equal
  the published cls_labels.npy. Part names (head, hand, ...) sit under <part>, not
  directly under <object>, so they are not read here either.
  """
  if not path.is_file():
    raise FileNotFoundError(
        f"VOC annotation missing: {path}; use labels='cls_labels' or 'mask' if Annotations/ is incomplete"
    )
  try:
    tree = ET.parse(path)
  except ET.ParseError as e:
    raise ValueError(f"VOC annotation is not valid XML: {path} ({e}); re-extract the VOC tarball") from None
  label = np.zeros(len(_FG_INDEX), np.float32)
  for obj in tree.getroot().iter("object"):
    name = (obj.findtext("name") or "").strip()
    if name not in _FG_INDEX:
      raise ValueError(
          f"VOC annotation {path} has unknown object class {name!r}; expected one of VOC_CLASSES[1:]"
      )
    label[_FG_INDEX[name]] = 1.0
  return label


def load_image(path: Path, context: str = "") -> np.ndarray:
  """Decodes an image to uint8 RGB (gray, CMYK, palette and RGBA are converted)."""
  if not path.is_file():
    raise FileNotFoundError(f"VOC image missing: {path}{context}; check data.root")
  try:
    with Image.open(path) as im:
      return np.array(im.convert("RGB"))
  except OSError as e:
    raise ValueError(f"VOC image cannot be decoded: {path} ({e}); replace the file") from None


def load_mask(path: Path, num_classes: int = len(VOC_CLASSES), context: str = "") -> np.ndarray:
  """Reads an index mask from a palette ("P") or gray ("L") PNG; values 0..C-1 or 255."""
  if not path.is_file():
    raise FileNotFoundError(
        f"VOC mask missing: {path}{context}; check data.mask_dir (SegmentationClass or SegmentationClassAug)"
    )
  try:
    with Image.open(path) as im:
      mode = im.mode
      # For "P" the array holds palette indices, which VOC defines as class ids.
      mask = np.array(im) if mode in ("P", "L") else None
  except OSError as e:
    raise ValueError(f"VOC mask cannot be decoded: {path} ({e}); replace the file") from None
  if mask is None:
    raise ValueError(
        f"VOC mask {path} has PIL mode {mode!r}; need a palette (P) or gray (L) PNG of class indices, "
        "not a colour rendering"
    )
  bad = (mask >= num_classes) & (mask != _IGNORE)
  if bad.any():
    raise ValueError(
        f"VOC mask {path} has values {sorted(np.unique(mask[bad]).tolist())[:5]} outside 0..{num_classes - 1} "
        "and 255; check the mask folder"
    )
  return mask


class VOCSource:
  """Random-access VOC 2012 split (grain RandomAccessDataSource protocol).

  Args:
    root: the ``VOCdevkit/VOC2012`` folder.
    split: a name resolved to ``ImageSets/Segmentation/<split>.txt``, or a path to an
      existing .txt list (IRN/SIPE ``train_aug.txt`` style).
    labels: where image-level labels come from.
      "xml": Annotations/<id>.xml (difficult objects included, as IRN/SIPE do);
      "cls_labels": <root>/cls_labels.json (SIPE layout);
      a path to a .json or .npy file (a .npy is unpickled: pass only a trusted one);
      "mask": the classes present in the mask (0 and 255 excluded);
      "auto": "xml" if Annotations/ exists, else cls_labels.json if present, else "mask".
    mask_dir: "auto" (SegmentationClassAug if present, else SegmentationClass), a folder
      name under root, or a path.
    with_mask: add "mask" to each element.

  Attributes: labels_mode ("xml", "mask" or "table"), labels_path (the table file or
  None), mask_dir (None unless masks are read), split_path.

  Label tables are checked for every id at construction; xml and mask labels are read
  per element, so a missing or empty one fails when that element is loaded.
  """

  num_classes = len(VOC_CLASSES)
  class_names = VOC_CLASSES

  def __init__(
      self, root: str, split: str, *, labels: str = "auto", mask_dir: str = "auto", with_mask: bool = False
  ):
    self.root = Path(root)
    if not (self.root / "JPEGImages").is_dir():
      raise FileNotFoundError(f"VOC root has no JPEGImages/: {self.root}; set data.root to VOCdevkit/VOC2012")
    self.split_path = self._resolve_split(split)
    self._ids = read_split(self.split_path)
    self.with_mask = with_mask
    self.labels_mode, self._table, self.labels_path = self._resolve_labels(labels)
    self.mask_dir = self._resolve_mask_dir(mask_dir) if (with_mask or self.labels_mode == "mask") else None
    if self._table is not None:
      for i in self._ids:
        self._check_label(i, self._table.get(i), self.labels_path)

  def _resolve_split(self, split: str) -> Path:
    as_path = Path(split)
    if as_path.suffix == ".txt" and as_path.is_file():
      return as_path
    path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
      have = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
      raise FileNotFoundError(
          f"VOC split list missing: {path}; use one of {have} or a path to a .txt list (e.g. train_aug.txt)"
      )
    return path

  def _resolve_labels(self, labels: str):
    if labels == "auto":
      if (self.root / "Annotations").is_dir():
        labels = "xml"
      elif (self.root / "cls_labels.json").is_file():
        labels = "cls_labels"
      else:
        labels = "mask"
    if labels in ("xml", "mask"):
      if labels == "xml" and not (self.root / "Annotations").is_dir():
        raise FileNotFoundError(
            f"VOC Annotations/ missing under {self.root}; use labels='cls_labels' or 'mask'"
        )
      return labels, None, None
    if labels == "cls_labels":
      path = self.root / "cls_labels.json"
      if not path.is_file():
        npy = self.root / "cls_labels.npy"
        hint = (
            f"; {npy} exists but is a pickle: pass labels='{npy}' explicitly if you trust it"
            if npy.is_file()
            else "; use labels='xml' or 'mask' or a label file path"
        )
        raise FileNotFoundError(f"VOC label file missing: {path}{hint}")
      return "table", load_label_table(path, self.num_classes - 1), path
    path = Path(labels)
    if path.suffix in (".json", ".npy"):
      return "table", load_label_table(path, self.num_classes - 1), path
    raise ValueError(
        f"VOC labels={labels!r} not understood; use 'auto', 'xml', 'cls_labels', 'mask' or a .json/.npy path"
    )

  def _resolve_mask_dir(self, mask_dir: str) -> Path:
    if mask_dir == "auto":
      for name in ("SegmentationClassAug", "SegmentationClass"):
        if (self.root / name).is_dir():
          return self.root / name
      raise FileNotFoundError(
          f"VOC root {self.root} has neither SegmentationClassAug/ nor SegmentationClass/; set data.mask_dir"
      )
    path = Path(mask_dir)
    path = path if path.is_absolute() else self.root / path
    if not path.is_dir():
      raise FileNotFoundError(f"VOC mask folder missing: {path}; set data.mask_dir")
    return path

  def _check_label(self, image_id: str, label, source) -> np.ndarray:
    if label is None:
      raise KeyError(
          f"VOC id {image_id} has no entry in {source}; use a label file that covers {self.split_path.name}"
      )
    if not label.any():
      raise ValueError(
          f"VOC id {image_id} has no foreground class in {source}; drop it from {self.split_path} "
          "(weak supervision needs at least one class)"
      )
    return label

  def __len__(self) -> int:
    return len(self._ids)

  def ids(self) -> list[str]:
    return list(self._ids)

  def __getitem__(self, index) -> dict:
    index = operator.index(index)
    if not -len(self._ids) <= index < len(self._ids):
      raise IndexError(f"VOCSource index {index} out of range for {len(self._ids)} ids")
    image_id = self._ids[index]
    context = f" (listed in {self._split_display()})"
    image = load_image(self.root / "JPEGImages" / f"{image_id}.jpg", context)
    mask = None
    if self.mask_dir is not None:
      mask_path = self.mask_dir / f"{image_id}.png"
      mask = load_mask(mask_path, self.num_classes, context)
      if mask.shape != image.shape[:2]:
        raise ValueError(
            f"VOC mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but its image is "
            f"{image.shape[0]}x{image.shape[1]}; the mask belongs to another image or was resized"
        )
    if self.labels_mode == "table":
      label = self._table[image_id].copy()
    elif self.labels_mode == "xml":
      xml_path = self.root / "Annotations" / f"{image_id}.xml"
      label = self._check_label(image_id, label_from_xml(xml_path), xml_path)
    else:
      present = np.unique(mask)
      label = np.zeros(self.num_classes - 1, np.float32)
      label[present[(present > 0) & (present != _IGNORE)] - 1] = 1.0
      label = self._check_label(image_id, label, mask_path)
    element = {"id": image_id, "image": image, "label": label}
    if self.with_mask:
      element["mask"] = mask
    return element

  def _split_display(self) -> str:
    try:
      return str(self.split_path.relative_to(self.root))
    except ValueError:
      return str(self.split_path)

  def __repr__(self) -> str:
    return (
        f"VOCSource(root={str(self.root)!r}, split={self._split_display()!r}, n={len(self)}, "
        f"labels={self.labels_mode!r}, with_mask={self.with_mask})"
    )
