"""PASCAL VOC 2012 as a grain random-access source.

Reads the standard ``VOCdevkit/VOC2012`` layout and yields the element schema
every cpal_jax source shares::

    {"id": str,
     "image": uint8[H, W, 3] RGB,
     "label": float32[20] multi-hot over the foreground classes (class c at c-1),
     "mask": uint8[H, W] class indices, 255 = ignore}   # only with with_mask=True

Bad input (data.on_bad_input): "strict" stops with a one-line error that names the file and the
fix; "skip" checks every listed id when the source is built and drops the bad ones (counted,
logged, and listed in ``VOCSource.skipped``). Label tables are read without unpickling unless
allow_pickle=True (data.allow_pickle).

No jax import: this module runs inside grain worker processes.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageFile

from cpal_jax.data.source import IdListSource, check_mask_size

log = logging.getLogger(__name__)

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
ON_BAD_INPUT = ("strict", "skip")
_FG_INDEX = {name: i - 1 for i, name in enumerate(VOC_CLASSES) if i > 0}
_IGNORE = 255
_FILE_EXTS = (".jpg", ".jpeg", ".png")
# What PIL raises on a corrupt, truncated or unreadable file (UnidentifiedImageError is an OSError;
# some plugins raise SyntaxError, struct.error or ValueError on malformed data).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, Image.DecompressionBombError)
_SKIP_HINT = "or set data.on_bad_input=skip to drop such ids"
# data.on_bad_input=skip: each id's check result, keyed by VOCSource._check_key. Every stage builds
# its sources again; with this a process decodes each unchanged file once (train_aug: ~30 s).
_CHECKED: dict[tuple, str | None] = {}
_warned_truncated = False


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


def _one_line(e: BaseException) -> str:
  msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
  return " ".join(str(msg).split())


def read_split(path: Path) -> list[str]:
  """Reads a split list; one id (or "image_path [mask_path]") per line. Repeats are kept."""
  ids = []
  with open(path) as f:
    for line in f:
      tokens = line.split()
      if tokens:
        ids.append(_id_from_token(tokens[0]))
  if not ids:
    raise ValueError(
        f"VOC split list is empty: {path}; put one image id per line or check data.train_split / "
        "data.eval_split / data.val_split"
    )
  return ids


# --- label tables ----------------------------------------------------------------------------


def _pickle_fix(path: Path) -> str:
  return (
      'convert it once to JSON with: python -c "from cpal_jax.data.voc import npy_to_json; '
      f"npy_to_json('{path}')\" and pass labels='{path.with_suffix('.json')}', or set "
      "data.allow_pickle=True if you trust the file (unpickling runs code from it)"
  )


def npy_to_json(src, dst=None) -> Path:
  """Writes a pickled id -> vector .npy (IRN/SIPE cls_labels.npy) as JSON; returns the JSON path.

  This unpickles `src`: run it once, on a file you trust. IRN's int ids (2007000032) are
  written as VOC ids ("2007_000032"). `dst` defaults to `src` with a .json suffix.
  """
  src = Path(src)
  dst = Path(dst) if dst is not None else src.with_suffix(".json")
  raw = np.load(src, allow_pickle=True)
  raw = raw.item() if raw.dtype == object and raw.shape == () else raw
  if not isinstance(raw, dict):
    raise ValueError(f"{src} does not hold an id -> vector dict; nothing to convert")
  table = {_decode_irn_int_id(k): np.asarray(v, np.float32).reshape(-1).tolist() for k, v in raw.items()}
  with open(dst, "w") as f:
    json.dump(table, f)
  return dst


def _read_table_file(path: Path, allow_pickle: bool):
  if path.suffix == ".json":
    try:
      with open(path) as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(
          f"VOC label file is not valid JSON: {path} ({_one_line(e)}); rewrite it as {{id: [20 x 0/1]}}"
      ) from None
  if path.suffix not in (".npy", ".npz"):
    raise ValueError(
        f"VOC label file must end in .json, .npy or .npz: {path}; convert it or pass labels='xml'/'mask'"
    )
  try:
    raw = np.load(path, allow_pickle=allow_pickle)
    if isinstance(raw, np.lib.npyio.NpzFile):
      with raw:
        return {k: raw[k] for k in raw.files}
    return raw.item() if raw.dtype == object and raw.shape == () else raw
  except ValueError as e:
    if "allow_pickle" in str(e):
      raise ValueError(
          f"VOC label file {path} is a pickled numpy file, which is not unpickled by default; {_pickle_fix(path)}"
      ) from None
    raise ValueError(f"VOC label file cannot be read: {path} ({_one_line(e)}); replace it") from None
  except (OSError, EOFError) as e:
    raise ValueError(f"VOC label file cannot be read: {path} ({_one_line(e)}); replace it") from None


def _table_entries(raw, path: Path, num_fg: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(id -> vector for the good entries, id -> one-line reason for the bad ones)."""
  if not isinstance(raw, dict):
    what = f"a {raw.shape} {raw.dtype} array" if isinstance(raw, np.ndarray) else type(raw).__name__
    raise ValueError(
        f"VOC label file {path} holds {what}, not an id -> vector table; use SIPE's cls_labels "
        "format: JSON {id: [20 x 0/1]} or np.savez(path, **{id: vector})"
    )
  table, bad = {}, {}
  for key, vec in raw.items():
    image_id = _decode_irn_int_id(key)
    try:
      v = np.asarray(vec, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
      v = None
    if v is None:
      got = f"got {type(vec).__name__}"
    elif v.shape != (num_fg,):
      got = f"got length {v.size}" + (
          "; drop the background entry at index 0" if v.size == num_fg + 1 else ""
      )
    elif not np.all((v == 0) | (v == 1)):
      got = f"got values {sorted(set(v[(v != 0) & (v != 1)].tolist()))[:5]}"
    else:
      table[image_id] = v
      continue
    bad[image_id] = (
        f"VOC label for {key!r} in {path} is not a 0/1 vector of length {num_fg} ({got}); "
        "labels exclude background (class c at index c-1)"
    )
  return table, bad


def load_label_table(
    path: Path, num_fg: int = len(VOC_CLASSES) - 1, *, allow_pickle: bool = False
) -> dict[str, np.ndarray]:
  """Loads an id -> multi-hot table from SIPE/IRN-style cls_labels (.json, .npz or .npy).

  Nothing is unpickled unless allow_pickle=True: IRN/SIPE's cls_labels.npy is a pickled dict
  (loading it runs code from the file), so by default it fails with the command that converts
  it to JSON (`npy_to_json`). A .npz written by np.savez(path, **{id: vector}) needs no pickle.
  Raises on the first entry that is not a 0/1 vector of length num_fg.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"VOC label file missing: {path}; check data.labels / data.root")
  table, bad = _table_entries(_read_table_file(path, allow_pickle), path, num_fg)
  if bad:
    raise ValueError(next(iter(bad.values())))
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


# --- images and masks ------------------------------------------------------------------------


def _decode(path: Path, what: str, missing_hint: str, context: str = "", reduce: bool = False):
  """Opens and fully decodes `path`; returns (PIL image, (h, w) as stored in the file).

  Truncation is caught because PIL's ImageFile.LOAD_TRUNCATED_IMAGES is False by default:
  load() then raises "image file is truncated" (verify() would not: it does not decode JPEG
  data). reduce=True decodes a JPEG at 1/8 scale (libjpeg still reads every byte of the
  entropy-coded data, so truncation and corruption are still found, in about 2/3 the time of
  a full decode: 2.7 vs 3.9 ms for a 500x375 VOC JPEG on one core).
  """
  global _warned_truncated
  if not path.is_file():
    raise FileNotFoundError(f"VOC {what} missing: {path}{context}; {missing_hint}")
  if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
    _warned_truncated = True
    log.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by other code in this process): truncated "
        "VOC images will decode with grey filler instead of failing"
    )
  try:
    with Image.open(path) as im:
      w, h = im.size
      if reduce and im.format == "JPEG":
        im.draft(im.mode, (1, 1))
      im.load()
  except _DECODE_ERRORS as e:
    raise ValueError(
        f"VOC {what} cannot be decoded: {path}{context} ({type(e).__name__}: {_one_line(e)}); the file is "
        f"corrupt or truncated: replace it, remove its id from the list, {_SKIP_HINT}"
    ) from None
  return im, (h, w)


def to_rgb_uint8(im: Image.Image, path="") -> np.ndarray:
  """uint8[H, W, 3] from any PIL mode VOC-style data may come in.

  Gray (L, 1), palette (P, PA), RGBA/LA (alpha dropped, colours kept), CMYK and YCbCr go
  through PIL's convert. 16-bit gray (I;16, I;16B, ...) and 32-bit integer (I, as 16-bit
  PNGs open in older PIL) are scaled 0..65535 -> 0..255 (round(v * 255 / 65535)); PIL's own
  convert would clip them to 255 instead. Float images (F) have no fixed range and fail.
  """
  mode = im.mode
  if mode == "RGB":
    return np.array(im)
  if mode.startswith("I"):
    a = np.array(im)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if lo < 0 or hi > 65535:
      raise ValueError(
          f"VOC image {path} is an integer image (PIL mode {mode!r}) with values {lo}..{hi}, outside "
          "the 16-bit range 0..65535; save it as 8-bit RGB"
      )
    gray = ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  if mode == "F":
    raise ValueError(
        f"VOC image {path} is a floating-point image (PIL mode 'F') with no fixed value range; "
        "save it as 8-bit RGB"
    )
  try:
    return np.array(im.convert("RGB"))
  except ValueError as e:
    raise ValueError(
        f"VOC image {path} has PIL mode {mode!r}, which PIL cannot convert to RGB ({_one_line(e)}); "
        "save it as 8-bit RGB"
    ) from None


def load_image(path: Path, context: str = "") -> np.ndarray:
  """Decodes an image to uint8 RGB (see to_rgb_uint8 for the modes); corrupt files fail."""
  im, _ = _decode(path, "image", "check data.root", context)
  return to_rgb_uint8(im, path)


def load_mask(path: Path, num_classes: int = len(VOC_CLASSES), context: str = "") -> np.ndarray:
  """Reads an index mask from a palette ("P") or gray ("L") PNG; values 0..C-1 or 255."""
  im, _ = _decode(path, "mask", "check data.mask_dir (SegmentationClass or SegmentationClassAug)", context)
  if im.mode not in ("P", "L"):
    raise ValueError(
        f"VOC mask {path} has PIL mode {im.mode!r}; need a palette (P) or gray (L) PNG of class indices, "
        "not a colour rendering"
    )
  # For "P" the array holds palette indices, which VOC defines as class ids.
  mask = np.array(im)
  bad = (mask >= num_classes) & (mask != _IGNORE)
  if bad.any():
    raise ValueError(
        f"VOC mask {path} has values {sorted(np.unique(mask[bad]).tolist())[:5]} outside 0..{num_classes - 1} "
        "and 255; point data.mask_dir at class-index masks (SegmentationClass or SegmentationClassAug, "
        f"not SegmentationObject), {_SKIP_HINT}"
    )
  return mask


def _list_names(folder: Path) -> set[str]:
  try:
    with os.scandir(folder) as it:
      return {e.name for e in it}
  except OSError:
    return set()


class VOCSource(IdListSource):
  """Random-access VOC 2012 split (grain RandomAccessDataSource protocol).

  Args:
    root: the ``VOCdevkit/VOC2012`` folder.
    split: a name resolved to ``ImageSets/Segmentation/<split>.txt``, or a path to an
      existing .txt list (IRN/SIPE ``train_aug.txt`` style).
    labels: where image-level labels come from.
      "xml": Annotations/<id>.xml (difficult objects included, as IRN/SIPE do);
      "cls_labels": <root>/cls_labels.json (SIPE layout; <root>/cls_labels.npy if only that
        exists and allow_pickle);
      a path to a .json, .npz or .npy file (a pickled .npy needs allow_pickle=True);
      "mask": the classes present in the mask (0 and 255 excluded);
      "auto": "xml" if Annotations/ exists, else cls_labels.json if present, else "mask".
    mask_dir: "auto" (SegmentationClassAug if present, else SegmentationClass), a folder
      name under root, or a path.
    with_mask: add "mask" to each element.
    on_bad_input: "strict" or "skip" (data.on_bad_input).
      strict: construction stays cheap (no image is decoded): duplicate ids, missing files
        (one listing per folder) and label-table problems fail here; a corrupt image, a bad
        mask or an empty xml label fails when that element is read. Every error is one line
        naming the file and the fix.
      skip: every listed id is checked here: files exist, the image decodes (JPEGs at 1/8
        scale, about 3 ms per VOC image on one core), the mask decodes (about 2 ms) with
        valid values and the image's size, the label has a class; a thread pool of up to 8
        runs the checks (train_aug, 10,582 ids: about 30 s on one core). Bad ids are
        dropped, later repeats of an id are dropped, one warning gives the count and the
        first reasons, and `skipped` lists every (id, reason). Results are kept for the
        process, keyed by each file's size and mtime: a later construction only stats the
        files and decodes the ones that changed.
    allow_pickle: let a pickled .npy label table load (data.allow_pickle); it runs code
      from the file.

  Attributes: labels_mode ("xml", "mask" or "table"), labels_path (the table file or
  None), mask_dir (None unless masks are read), split_path, skipped.
  """

  num_classes = len(VOC_CLASSES)
  class_names = VOC_CLASSES

  def __init__(
      self,
      root: str,
      split: str,
      *,
      labels: str = "auto",
      mask_dir: str = "auto",
      with_mask: bool = False,
      on_bad_input: str = "strict",
      allow_pickle: bool = False,
  ):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(
          f"data.on_bad_input={on_bad_input!r} not understood; choose 'strict' (stop at a bad file) "
          "or 'skip' (drop bad ids at startup, counted and logged)"
      )
    self.on_bad_input = on_bad_input
    self.allow_pickle = bool(allow_pickle)
    self.root = Path(root)
    self._check_root()
    self.split_path = self._resolve_split(split)
    listed = read_split(self.split_path)
    self.with_mask = with_mask
    self.labels_mode, self._table, self.labels_path, self._bad_labels = self._resolve_labels(labels)
    self.mask_dir = self._resolve_mask_dir(mask_dir) if (with_mask or self.labels_mode == "mask") else None
    self.skipped: list[tuple[str, str]] = []
    self._ids = self._validate(listed)

  # --- construction -------------------------------------------------------------------------

  def _check_root(self):
    if not self.root.is_dir():
      state = "is not a folder" if self.root.exists() else "does not exist"
      raise FileNotFoundError(f"VOC data root {state}: {self.root}; set data.root to VOCdevkit/VOC2012")
    if not (self.root / "JPEGImages").is_dir():
      hint = ""
      for sub in ("VOC2012", "VOCdevkit/VOC2012"):
        if (self.root / sub / "JPEGImages").is_dir():
          hint = f" (did you mean {self.root / sub}?)"
      raise FileNotFoundError(
          f"VOC root has no JPEGImages/: {self.root}; set data.root to VOCdevkit/VOC2012{hint}"
      )

  def _resolve_split(self, split: str) -> Path:
    as_path = Path(split)
    if as_path.suffix == ".txt":
      if as_path.is_file():
        return as_path
      raise FileNotFoundError(
          f"VOC split list missing: {as_path}; check data.train_split / data.eval_split / data.val_split"
      )
    path = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
      if not path.parent.is_dir():
        raise FileNotFoundError(
            f"VOC root {self.root} has no ImageSets/Segmentation/ for split {split!r}; fix data.root or "
            "pass the split as a path to a .txt list (e.g. train_aug.txt)"
        )
      have = sorted(p.stem for p in path.parent.glob("*.txt"))
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
      return labels, None, None, {}
    if labels == "cls_labels":
      path = self.root / "cls_labels.json"
      if not path.is_file():
        npy = self.root / "cls_labels.npy"
        if npy.is_file() and self.allow_pickle:
          path = npy
        elif npy.is_file():
          raise FileNotFoundError(
              f"VOC label file missing: {path}; {npy} exists but is a pickle: {_pickle_fix(npy)}"
          )
        else:
          raise FileNotFoundError(
              f"VOC label file missing: {path}; use labels='xml' or 'mask' or a label file path"
          )
    else:
      path = Path(labels)
      if path.suffix not in (".json", ".npy", ".npz"):
        raise ValueError(
            f"VOC labels={labels!r} not understood; use 'auto', 'xml', 'cls_labels', 'mask' or a "
            ".json/.npz/.npy path"
        )
    if not path.is_file():
      raise FileNotFoundError(f"VOC label file missing: {path}; check data.labels")
    table, bad = _table_entries(_read_table_file(path, self.allow_pickle), path, self.num_classes - 1)
    if bad and self.on_bad_input == "strict":
      raise ValueError(f"{next(iter(bad.values()))}; fix the file, {_SKIP_HINT}")
    return "table", table, path, bad

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

  def _validate(self, listed: list[str]) -> list[str]:
    """The ids to serve; raises (strict) or fills self.skipped (skip)."""
    strict = self.on_bad_input == "strict"
    split = self._split_display()
    ids, seen, repeats = [], set(), []
    for i in listed:
      (repeats if i in seen else ids).append(i)
      seen.add(i)
    if repeats:
      dup = sorted(set(repeats))
      if strict:
        raise ValueError(
            f"VOC split list {self.split_path} lists {len(dup)} ids more than once: {dup[:5]}"
            f"{' ...' if len(dup) > 5 else ''}; remove the repeated lines, or set data.on_bad_input=skip "
            "to keep the first of each"
        )
      self.skipped += [(i, f"listed again in {split}") for i in repeats]

    problems: dict[str, str] = {}
    if self._table is not None:
      for i in ids:
        try:
          self._table_label(i)
        except (KeyError, ValueError) as e:
          if strict:
            raise
          problems[i] = _one_line(e)

    folders = [("image", self.root / "JPEGImages", ".jpg", "check data.root")]
    if self.labels_mode == "xml":
      hint = "use labels='cls_labels' or 'mask' if Annotations/ is incomplete"
      folders.append(("annotation", self.root / "Annotations", ".xml", hint))
    if self.mask_dir is not None:
      folders.append(("mask", self.mask_dir, ".png", "check data.mask_dir"))
    for what, folder, ext, hint in folders:
      names = _list_names(folder)  # one listing; is_file() only for names it lacks (case-insensitive fs)
      missing = [
          i for i in ids if i not in problems and i + ext not in names and not (folder / (i + ext)).is_file()
      ]
      if missing and strict:
        shown = ", ".join(str(folder / (i + ext)) for i in missing[:3])
        raise FileNotFoundError(
            f"VOC {what} missing for {len(missing)} of {len(ids)} ids listed in {split}: {shown}"
            f"{' ...' if len(missing) > 3 else ''}; {hint}, remove those ids from the list, {_SKIP_HINT}"
        )
      for i in missing:
        problems[i] = f"VOC {what} missing: {folder / (i + ext)}"

    if not strict:
      todo = [i for i in ids if i not in problems]
      workers = max(1, min(8, os.cpu_count() or 1))
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i, reason in zip(todo, pool.map(self._problem, todo)):
          if reason:
            problems[i] = reason
      self.skipped += [(i, problems[i]) for i in ids if i in problems]
      ids = [i for i in ids if i not in problems]
      if self.skipped:
        first = "; ".join(f"{i}: {r}" for i, r in self.skipped[:3])
        if not ids:
          raise ValueError(
              f"VOC split {split}: all {len(listed)} listed entries are bad input; first: {first}"
          )
        log.warning(
            "VOC split %s: skipped %d of %d listed entries as bad input (data.on_bad_input=skip; "
            "VOCSource.skipped lists them all); first: %s",
            split,
            len(self.skipped),
            len(listed),
            first,
        )
    return ids

  def _problem(self, image_id: str) -> str | None:
    key = self._check_key(image_id)
    if key is not None and key in _CHECKED:
      return _CHECKED[key]
    try:
      self._load(image_id, check_only=True)
      reason = None
    except (OSError, ValueError, KeyError) as e:  # OSError: FileNotFoundError, PermissionError
      reason = _one_line(e)
    if key is not None:
      _CHECKED[key] = reason
    return reason

  def _check_key(self, image_id: str) -> tuple | None:
    """What the check of one id depends on: its files' paths, sizes and mtimes, and how labels are
    read. None (check again) if a file cannot be stat'ed."""
    files = [self.root / "JPEGImages" / f"{image_id}.jpg"]
    if self.mask_dir is not None:
      files.append(self.mask_dir / f"{image_id}.png")
    if self.labels_mode == "xml":
      files.append(self.root / "Annotations" / f"{image_id}.xml")
    if self.labels_path is not None:
      files.append(Path(self.labels_path))
    stats = []
    try:
      for f in files:
        st = f.stat()
        stats.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
    except OSError:
      return None
    return (self.labels_mode, self.num_classes, self.allow_pickle, tuple(stats))

  def _table_label(self, image_id: str) -> np.ndarray:
    if image_id in self._bad_labels:
      raise ValueError(self._bad_labels[image_id])
    return self._check_label(image_id, self._table.get(image_id), self.labels_path)

  def _check_label(self, image_id: str, label, source) -> np.ndarray:
    if label is None:
      raise KeyError(
          f"VOC id {image_id} has no entry in {source}; use a label file that covers {self.split_path.name}"
          f", {_SKIP_HINT}"
      )
    if not label.any():
      raise ValueError(
          f"VOC id {image_id} has no foreground class in {source}; drop it from {self.split_path} "
          f"(weak supervision needs at least one class), {_SKIP_HINT}"
      )
    return label

  # --- reading ------------------------------------------------------------------------------

  def __getitem__(self, index) -> dict:
    return self._load(self._ids[self._position(index)])

  def _load(self, image_id: str, check_only: bool = False):
    """The element of `image_id`; check_only decodes JPEGs at 1/8 scale and returns None."""
    context = f" (listed in {self._split_display()})"
    image_path = self.root / "JPEGImages" / f"{image_id}.jpg"
    im, (h, w) = _decode(image_path, "image", "check data.root", context, reduce=check_only)
    image = to_rgb_uint8(im, image_path)
    mask = None
    if self.mask_dir is not None:
      mask_path = self.mask_dir / f"{image_id}.png"
      mask = load_mask(mask_path, self.num_classes, context)
      check_mask_size(mask, mask_path, h, w, "VOC", _SKIP_HINT)
    if self.labels_mode == "table":
      label = self._table_label(image_id).copy()
    elif self.labels_mode == "xml":
      xml_path = self.root / "Annotations" / f"{image_id}.xml"
      label = self._check_label(image_id, label_from_xml(xml_path), xml_path)
    else:
      present = np.unique(mask)
      label = np.zeros(self.num_classes - 1, np.float32)
      label[present[(present > 0) & (present != _IGNORE)] - 1] = 1.0
      label = self._check_label(image_id, label, mask_path)
    if check_only:
      return None
    element = {"id": image_id, "image": image, "label": label}
    if self.with_mask:
      element["mask"] = mask
    return element

  def size_mismatches(self, limit: int = 5) -> list[str]:
    """Masks whose size differs from their image's, from the file headers alone (no decoding):
    the first `limit` of them, one line each."""
    if self.mask_dir is None:
      return []
    out = []
    for image_id in self._ids:
      mask_path = self.mask_dir / f"{image_id}.png"
      try:
        with Image.open(self.root / "JPEGImages" / f"{image_id}.jpg") as im, Image.open(mask_path) as m:
          if im.size != m.size:
            (w, h), (mw, mh) = im.size, m.size
            out.append(
                f"VOC mask {mask_path} is {mh}x{mw} but its image is {h}x{w}; the mask belongs to another "
                f"image or was resized, {_SKIP_HINT}"
            )
      except OSError:
        continue  # unreadable files are reported when they are decoded
      if len(out) >= limit:
        break
    return out

  def _split_display(self) -> str:
    try:
      return str(self.split_path.relative_to(self.root))
    except ValueError:
      return str(self.split_path)

  def __repr__(self) -> str:
    return (
        f"VOCSource(root={str(self.root)!r}, split={self._split_display()!r}, n={len(self)}, "
        f"labels={self.labels_mode!r}, with_mask={self.with_mask}, on_bad_input={self.on_bad_input!r})"
    )
