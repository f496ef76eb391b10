"""MS COCO 2014 as a grain random-access source.

Reads the standard layout::

    <root>/train2014/COCO_train2014_000000000009.jpg ...
    <root>/val2014/COCO_val2014_000000000042.jpg ...
    <root>/annotations/instances_train2014.json, instances_val2014.json
    <root>/mask/train2014/<id>.png ...            # optional: SIPE's precomputed class-index masks

and yields the element schema every cpal_jax source shares::

    {"id": str (the file stem, COCO_train2014_000000000009),
     "image": uint8[H, W, 3] RGB,
     "label": float32[80] multi-hot over the foreground classes (class c at c-1),
     "mask": uint8[H, W] class indices 0..80, 255 = ignore}   # only with with_mask=True

Classes: the json's category ids (1..90 with gaps in COCO) sorted ascending become class indices
1..K (0 = background); that is SIPE's labels_coco.txt order. Class names are the json's.

Labels: every annotation of an image counts, crowd ones included: pycocotools' getAnnIds(imgIds=...)
defaults to iscrowd=None, which is how the IRN/SIPE-style COCO label scripts collect classes.

Masks (with_mask) come from <mask_dir>/<id>.png when a mask folder is in use, else they are
rasterised from the instances json: crowd regions are painted 255 (ignore) first, then the other
instances in decreasing order of their json "area" (ties: json order), so a small object on top
of a large one stays visible and a known instance inside a crowd region keeps its class.
Polygons and RLE (uncompressed and compressed) are decoded as pycocotools does, pixel for pixel
(a numpy port of its maskApi.c; the rendering is exact, the paint order above is this module's).

No jax and no pycocotools: this module runs inside grain worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from cpal_jax.data.source import IdListSource, check_mask_size

log = logging.getLogger(__name__)

_IGNORE = 255
_FILE_EXTS = (".jpg", ".jpeg", ".png")
_STEM_RE = re.compile(r"^COCO_([A-Za-z]+[0-9]+)_([0-9]+)$")


# --------------------------------------------------------------------------- segmentation decoding
def rle_counts_from_string(s: str | bytes) -> np.ndarray:
  """pycocotools' rleFrString: COCO's compressed RLE string to run lengths.

  Each count is a little-endian base-32 number, 5 bits per character (char - 48), bit 0x20 of a
  character marks "more characters follow" and bit 0x10 of the last one is the sign. From the
  fourth count on (index > 2) the value is a delta to the count two places back.
  """
  data = s.encode("ascii") if isinstance(s, str) else bytes(s)
  counts: list[int] = []
  p, n = 0, len(data)
  while p < n:
    x, k, more = 0, 0, True
    while more:
      if p >= n:
        raise ValueError("compressed RLE string ends inside a count")
      c = data[p] - 48
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and (c & 0x10):
        x |= -1 << (5 * k)
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x & 0xFFFFFFFF)  # stored as uint32, as in the C code
  return np.asarray(counts, np.int64)


def rle_to_mask(counts, h: int, w: int) -> np.ndarray:
  """Run lengths (0s first, alternating, column-major over h x w) to a bool [h, w] mask."""
  counts = np.asarray(counts, np.int64).reshape(-1)
  if (counts < 0).any() or int(counts.sum()) != h * w:
    raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected h*w = {h}*{w} = {h * w}")
  values = (np.arange(len(counts)) % 2).astype(bool)
  return np.repeat(values, counts).reshape(w, h).T


def _poly_toggles(xy: np.ndarray, h: int, w: int) -> np.ndarray:
  """pycocotools' rleFrPoly, vectorised: the column-major positions where one polygon's mask
  flips (an even-odd fill along the flattened h x w array).

  As in the C code: vertices are scaled by 5 and truncated to ints, every edge is walked densely
  (one point per step along its major axis, the other coordinate rounded from the edge's left or
  top end, so the walk does not depend on the edge's direction), and each step across a column
  centre records a flip at the first row below the edge.
  """
  scale = 5.0
  k = len(xy)
  q = (scale * xy + 0.5).astype(np.int64)  # C's (int) cast truncates toward zero, as astype does
  x, y = q[:, 0], q[:, 1]
  xe, ye = np.roll(x, -1), np.roll(y, -1)
  dx, dy = np.abs(xe - x), np.abs(ye - y)
  horiz = dx >= dy
  flip = (horiz & (x > xe)) | (~horiz & (y > ye))
  xs, xe = np.where(flip, xe, x), np.where(flip, x, xe)
  ys, ye = np.where(flip, ye, y), np.where(flip, y, ye)
  steps = np.where(horiz, dx, dy)
  num = np.where(horiz, ye - ys, xe - xs).astype(np.float64)
  # A zero-length edge is one point whose rounded coordinate C leaves undefined (0/0); it repeats
  # its neighbours' column, so it never makes a flip and any finite slope does here.
  slope = num / np.maximum(steps, 1)
  n = steps + 1
  edge = np.repeat(np.arange(k), n)
  d = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
  t = np.where(flip[edge], steps[edge] - d, d)
  h_e = horiz[edge]
  rounded = (np.where(h_e, ys[edge], xs[edge]) + slope[edge] * t + 0.5).astype(np.int64)
  u = np.where(h_e, xs[edge] + t, rounded)
  v = np.where(h_e, rounded, ys[edge] + t)
  # Steps across a column: u changes by one between consecutive points.
  j = np.nonzero(u[1:] != u[:-1])[0] + 1
  uj, vj, up, vp = u[j], v[j], u[j - 1], v[j - 1]
  xd = (np.where(uj < up, uj, uj - 1) + 0.5) / scale - 0.5
  keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
  yd = (np.where(vj < vp, vj, vp)[keep] + 0.5) / scale - 0.5
  yd = np.ceil(np.clip(yd, 0, h))
  return xd[keep].astype(np.int64) * h + yd.astype(np.int64)


def polygons_to_mask(polygons, h: int, w: int) -> np.ndarray:
  """Union of polygons ([x0, y0, x1, y1, ...] each, pixel coordinates) as a bool [h, w] mask,
  pixel for pixel what pycocotools' frPyObjects + merge + decode give (coordinates as float64, as
  json parses them). Unlike frPyObjects, a first polygon of exactly 4 numbers is still a polygon
  (pycocotools reads such a list as boxes)."""
  flat = np.zeros(h * w, bool)
  for p in polygons:
    xy = np.asarray(p, np.float64).reshape(-1)
    xy = xy[: len(xy) // 2 * 2].reshape(-1, 2)
    if not len(xy):
      continue
    pos = _poly_toggles(xy, h, w)
    if not len(pos):
      continue
    # Only the span between the first and last flip needs a cumulative sum (the polygon's columns).
    lo, hi = int(pos.min()), min(int(pos.max()), h * w)
    inside = np.cumsum(np.bincount(pos - lo, minlength=hi - lo + 1)[: hi - lo + 1]) % 2
    flat[lo:hi] |= inside[:-1].astype(bool)
    if inside[-1]:  # an odd number of flips leaves the rest of the array set, as in pycocotools
      flat[hi:] = True
  return flat.reshape(w, h).T


def segmentation_to_mask(seg, h: int, w: int) -> np.ndarray:
  """A COCO "segmentation" (polygon list, uncompressed or compressed RLE) as a bool [h, w] mask."""
  if isinstance(seg, dict):
    size = [int(v) for v in seg.get("size", ())]
    if size != [h, w]:
      raise ValueError(f"RLE size {size} differs from the image size [{h}, {w}]")
    counts = seg.get("counts")
    if isinstance(counts, (str, bytes)):
      counts = rle_counts_from_string(counts)
    return rle_to_mask(counts, h, w)
  return polygons_to_mask(seg, h, w)


def _compact_segmentation(seg):
  # Polygon coordinates as float64 arrays (float32 would change pycocotools' rounding) and RLE
  # counts as int32 arrays (or the string) take a fraction of the memory of json's lists.
  if isinstance(seg, dict):
    counts = seg.get("counts")
    if not isinstance(counts, str):
      counts = np.asarray(counts, np.int64).astype(np.int32)
    return {"size": seg.get("size"), "counts": counts}
  if isinstance(seg, list):
    return [np.asarray(p, np.float64) for p in seg]
  raise ValueError(f"segmentation of type {type(seg).__name__} is neither a polygon list nor an RLE dict")


# --------------------------------------------------------------------------- files
def load_image(path: Path, context: str = "") -> np.ndarray:
  """Decodes an image to uint8 RGB (gray, CMYK, palette and RGBA are converted)."""
  if not path.is_file():
    raise FileNotFoundError(
        f"COCO image missing: {path}{context}; check data.root (it must hold train2014/ and val2014/)"
    )
  try:
    with Image.open(path) as im:
      return np.array(im.convert("RGB"))
  except OSError as e:
    raise ValueError(f"COCO image cannot be decoded: {path} ({e}); replace the file") from None


def load_mask(path: Path, num_classes: int, context: str = "") -> np.ndarray:
  """Reads a precomputed class-index PNG (palette "P" or gray "L"); values 0..C-1 or 255."""
  if not path.is_file():
    raise FileNotFoundError(
        f"COCO mask missing: {path}{context}; complete the mask folder or set data.mask_dir='none' "
        "to rasterise masks from the instances json"
    )
  try:
    with Image.open(path) as im:
      mode = im.mode
      mask = np.array(im) if mode in ("P", "L") else None
  except OSError as e:
    raise ValueError(f"COCO mask cannot be decoded: {path} ({e}); replace the file") from None
  if mask is None:
    raise ValueError(
        f"COCO mask {path} has PIL mode {mode!r}; need a palette (P) or gray (L) PNG of class indices"
    )
  bad = (mask >= num_classes) & (mask != _IGNORE)
  if bad.any():
    raise ValueError(
        f"COCO mask {path} has values {sorted(np.unique(mask[bad]).tolist())[:5]} outside "
        f"0..{num_classes - 1} and 255; check data.mask_dir"
    )
  return mask


def read_id_list(path: Path) -> list[tuple[str | None, int]]:
  """Reads an id list: one id per line, a file stem (COCO_train2014_000000000009, optionally with a
  folder and .jpg) or a plain integer image id. Returns (subset from the stem or None, image id)."""
  entries = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      tokens = line.split()
      if not tokens:
        continue
      name = PurePosixPath(tokens[0]).name
      stem, ext = os.path.splitext(name)
      stem = stem if ext.lower() in _FILE_EXTS else name
      m = _STEM_RE.match(stem)
      if m:
        entries.append((m.group(1), int(m.group(2))))
      elif stem.isdigit():
        entries.append((None, int(stem)))
      else:
        raise ValueError(
            f"COCO id list {path} line {n}: {tokens[0]!r} is neither a file stem like "
            "COCO_train2014_000000000009 nor an integer image id"
        )
  if not entries:
    raise ValueError(f"COCO id list is empty: {path}; check data.train_split / data.eval_split")
  return entries


class _Index:
  """What one instances json leaves behind: categories, and per image only its file name, size,
  classes and (when masks are rasterised) its segmentations, in paint order."""

  @staticmethod
  def missing(path: Path):
    have = sorted(p.name for p in path.parent.glob("instances_*.json"))
    raise FileNotFoundError(
        f"COCO annotations missing: {path}; unzip annotations_trainval2014.zip into data.root (found {have})"
    )

  def __init__(self, path: Path, keep_segments: bool):
    self.path = path
    if not path.is_file():
      self.missing(path)

    def hook(d):
      # Called for every json object, innermost first: annotations and images shrink to tuples as
      # they are parsed, so the unneeded fields (bbox, urls, dates, segmentations when masks are
      # not rasterised) are freed at once.
      if "category_id" in d and "image_id" in d:
        seg = _compact_segmentation(d.get("segmentation", [])) if keep_segments else None
        return ("ann", d["image_id"], d["category_id"], bool(d.get("iscrowd", 0)), d.get("area"), seg)
      if "file_name" in d and "id" in d:
        return ("img", d["id"], d["file_name"], d.get("height"), d.get("width"))
      return d

    try:
      with open(path, "rb") as f:
        raw = json.load(f, object_hook=hook)
    except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
      raise ValueError(
          f"COCO annotations cannot be parsed: {path} ({e}); re-extract annotations_trainval2014.zip"
      ) from None
    if not isinstance(raw, dict) or not all(
        isinstance(raw.get(k), list) for k in ("images", "annotations", "categories")
    ):
      raise ValueError(
          f"COCO annotations {path} is not an instances file (needs the lists images, annotations "
          "and categories); use annotations/instances_<split>.json, not captions or keypoints"
      )
    try:
      cats = sorted((int(c["id"]), str(c["name"])) for c in raw["categories"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"COCO annotations {path}: a category lacks an integer id or a name") from None
    if not cats or len({c for c, _ in cats}) != len(cats):
      raise ValueError(f"COCO annotations {path}: categories are empty or repeat an id")
    self.class_names = ("background",) + tuple(name for _, name in cats)
    cat_to_class = {c: i + 1 for i, (c, _) in enumerate(cats)}

    images = raw["images"]
    if not all(isinstance(im, tuple) and im[0] == "img" for im in images):
      raise ValueError(f"COCO annotations {path}: every image needs an id and a file_name")
    self.row = {int(im[1]): r for r, im in enumerate(images)}
    self.file_names = [str(im[2]) for im in images]
    self.sizes = np.asarray([(im[3] or 0, im[4] or 0) for im in images], np.int32).reshape(-1, 2)
    self.labels = np.zeros((len(images), len(cats)), np.uint8)
    per_image: list[list] | None = [[] for _ in images] if keep_segments else None
    for k, a in enumerate(raw["annotations"]):
      if not (isinstance(a, tuple) and a[0] == "ann"):
        raise ValueError(f"COCO annotations {path}: annotation {k} lacks image_id or category_id")
      _, image_id, cat, crowd, area, seg = a
      r = self.row.get(image_id)
      cls = cat_to_class.get(cat)
      if r is None or cls is None:
        what = f"image_id {image_id}" if r is None else f"category_id {cat}"
        raise ValueError(f"COCO annotations {path}: annotation {k} names an unknown {what}")
      self.labels[r, cls - 1] = 1
      if per_image is not None:
        per_image[r].append((cls, crowd, float(area) if area is not None else 0.0, seg))
    if per_image is not None:
      # Paint order: crowd regions first (they become 255), then instances by decreasing area;
      # sorted() is stable, so equal areas keep their json order.
      per_image = [sorted(anns, key=lambda a: (not a[1], -a[2])) for anns in per_image]
    self.segments = per_image


class COCOSource(IdListSource):
  """Random-access COCO 2014 split (grain RandomAccessDataSource protocol).

  Args:
    root: the folder holding train2014/, val2014/ and annotations/.
    split: "train2014", "val2014" (any <name> with annotations/instances_<name>.json and images in
      <name>/) for every image of that json that has at least one annotation (the others are
      dropped at construction and counted in `dropped`, as SIPE's lists leave them out); or a path
      to a .txt id list (SIPE style), one id per line, either a file stem
      (COCO_train2014_000000000009) or a plain integer image id. Listed ids must be in the json
      and have an annotation.
    subset: which json (and image folder) a .txt list refers to: "auto" takes it from the stems'
      COCO_<subset>_ prefix; plain integer ids need it set (data.coco_subset, e.g. "train2014").
      A list must not mix subsets.
    mask_dir: precomputed class-index PNGs (<mask_dir>/<id>.png, as SIPE distributes
      mask/train2014/): "auto" uses <root>/mask/<subset> if that folder exists and rasterises the
      instances json otherwise; "none" (or "") always rasterises; any other value is a folder
      (relative to root or absolute) that must exist and hold a PNG for every id.
    with_mask: add "mask" to each element.

  Attributes: subset, annotations (the json path), image_dir, mask_dir (None unless PNG masks are
  read), split_path (the .txt list or None), dropped, num_classes, class_names.

  The json is parsed once per construction (train2014's 82,783 images: some seconds and memory
  for the parse); afterwards each image keeps its file name, size and classes, plus its
  segmentations only when with_mask rasterises masks.
  """

  def __init__(
      self, root: str, split: str, *, subset: str = "auto", mask_dir: str = "auto", with_mask: bool = False
  ):
    self.root = Path(root)
    if not self.root.is_dir():
      raise FileNotFoundError(
          f"COCO root missing: {self.root}; set data.root to the folder holding train2014/, val2014/ "
          "and annotations/"
      )
    if not (self.root / "annotations").is_dir():
      raise FileNotFoundError(
          f"COCO root {self.root} has no annotations/ folder; unzip annotations_trainval2014.zip there "
          "(annotations/instances_train2014.json, instances_val2014.json)"
      )
    self.with_mask = with_mask
    as_path = Path(split)
    if as_path.suffix == ".txt":
      if not as_path.is_file():
        raise FileNotFoundError(f"COCO id list missing: {as_path}; check data.train_split / data.eval_split")
      self.split_path = as_path
      entries = read_id_list(as_path)
      self.subset = self._subset_of(entries, subset)
    else:
      self.split_path, entries = None, None
      self.subset = split
      if not (self.root / "annotations" / f"instances_{split}.json").is_file():
        have = sorted(
            p.name[len("instances_") : -len(".json")]
            for p in (self.root / "annotations").glob("instances_*.json")
        )
        raise FileNotFoundError(
            f"COCO split {split!r} has no annotations/instances_{split}.json under {self.root}; "
            f"use one of {have} or a path to a .txt id list"
        )
    self.annotations = self.root / "annotations" / f"instances_{self.subset}.json"
    if not self.annotations.is_file():  # a list's subset; checked before the images and the parse
      _Index.missing(self.annotations)
    self.image_dir = self.root / self.subset
    if not self.image_dir.is_dir():
      raise FileNotFoundError(
          f"COCO image folder missing: {self.image_dir}; unzip {self.subset}.zip into data.root"
      )
    self.mask_dir = self._resolve_mask_dir(mask_dir) if with_mask else None
    index = _Index(self.annotations, keep_segments=with_mask and self.mask_dir is None)
    self.num_classes = len(index.class_names)
    self.class_names = index.class_names
    self._rows = self._select_rows(index, entries)
    if not self._rows:
      raise ValueError(f"COCO split {split!r} has no image with an annotation in {self.annotations}")
    self._file_names = [index.file_names[r] for r in self._rows]
    self._ids = [os.path.splitext(n)[0] for n in self._file_names]
    self._sizes = index.sizes[self._rows]
    self._labels = index.labels[self._rows]
    self._segments = [index.segments[r] for r in self._rows] if index.segments is not None else None

  def _subset_of(self, entries, subset: str) -> str:
    prefixes = sorted({s for s, _ in entries if s is not None})
    if len(prefixes) > 1:
      raise ValueError(
          f"COCO id list {self.split_path} mixes subsets {prefixes}; use one list per instances json"
      )
    if subset != "auto":
      if prefixes and prefixes != [subset]:
        raise ValueError(
            f"COCO id list {self.split_path} holds {prefixes[0]} ids but data.coco_subset={subset!r}; "
            "set it to 'auto' or to the ids' subset"
        )
      return subset
    if not prefixes:
      raise ValueError(
          f"COCO id list {self.split_path} has plain integer ids, which do not say which json they "
          "belong to; set data.coco_subset (e.g. 'train2014') or list file stems"
      )
    if any(s is None for s, _ in entries):
      raise ValueError(f"COCO id list {self.split_path} mixes file stems and plain integer ids; use one form")
    return prefixes[0]

  def _select_rows(self, index: _Index, entries) -> list[int]:
    has_class = index.labels.any(axis=1)
    if entries is None:
      order = sorted(index.row.items())  # by image id, which is the stems' order as well
      rows = [r for _, r in order if has_class[r]]
      self.dropped = len(order) - len(rows)
      if self.dropped:
        log.info(
            "COCO %s: %d of %d images have no annotation and are left out",
            self.subset,
            self.dropped,
            len(order),
        )
      return rows
    self.dropped = 0
    missing = [i for _, i in entries if i not in index.row]
    if missing:
      raise KeyError(
          f"COCO id list {self.split_path}: {len(missing)} ids are not in {self.annotations}, e.g. "
          f"{missing[:5]}; remove them or check data.coco_subset"
      )
    rows = [index.row[i] for _, i in entries]
    empty = [i for i, r in zip((i for _, i in entries), rows) if not has_class[r]]
    if empty:
      raise ValueError(
          f"COCO id list {self.split_path}: {len(empty)} ids have no annotation in {self.annotations}, "
          f"e.g. {empty[:5]}; drop them from the list (weak supervision needs at least one class)"
      )
    return rows

  def _resolve_mask_dir(self, mask_dir: str) -> Path | None:
    if mask_dir in ("", "none"):
      return None
    if mask_dir == "auto":
      path = self.root / "mask" / self.subset
      return path if path.is_dir() else None
    path = Path(mask_dir)
    path = path if path.is_absolute() else self.root / path
    if not path.is_dir():
      raise FileNotFoundError(
          f"COCO mask folder missing: {path}; set data.mask_dir to a folder of <id>.png, or to 'auto' "
          "or 'none' to rasterise masks from the instances json"
      )
    return path

  def __getitem__(self, index) -> dict:
    index = self._position(index)
    image_id = self._ids[index]
    context = f" (listed in {self._split_display()})"
    image = load_image(self.image_dir / self._file_names[index], context)
    element = {"id": image_id, "image": image, "label": self._labels[index].astype(np.float32)}
    if self.with_mask:
      h, w = image.shape[:2]
      jh, jw = (int(v) for v in self._sizes[index])
      if (jh or jw) and (jh, jw) != (h, w):
        # Segmentations are in the json's pixel coordinates; a resized image would misplace them.
        raise ValueError(
            f"COCO image {self.image_dir / self._file_names[index]} is {h}x{w} but {self.annotations} "
            f"says {jh}x{jw}; the image was resized or belongs to another split"
        )
      if self.mask_dir is not None:
        path = self.mask_dir / f"{image_id}.png"
        mask = load_mask(path, self.num_classes, context)
        check_mask_size(mask, path, h, w, "COCO")
      else:
        mask = self._rasterise(index, h, w)
      element["mask"] = mask
    return element

  def _rasterise(self, index: int, h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for cls, crowd, _, seg in self._segments[index]:
      try:
        m = segmentation_to_mask(seg, h, w)
      except ValueError as e:
        raise ValueError(
            f"COCO {self.annotations}: a segmentation of {self._ids[index]} cannot be decoded ({e})"
        ) from None
      mask[m] = _IGNORE if crowd else cls
    return mask

  def _split_display(self) -> str:
    path = self.split_path if self.split_path is not None else self.annotations
    try:
      return str(path.relative_to(self.root))
    except ValueError:
      return str(path)

  def __repr__(self) -> str:
    return (
        f"COCOSource(root={str(self.root)!r}, split={self._split_display()!r}, n={len(self)}, "
        f"with_mask={self.with_mask}, masks={'png' if self.mask_dir is not None else 'json'!r})"
    )
