"""Packs a local VOC or COCO tree into TFDS ArrayRecord shards (the tool; data/tfds_source.py reads them).

  python -m cpal_jax.data.tfds_pack --config=configs/voc.py \\
      --config.data.root=/data/VOCdevkit/VOC2012 --splits=train_aug,train,val --out=/data/tfds
  python -m cpal_jax.main --config=configs/voc.py --config.data.tfds_dir=/data/tfds

The optional extra: pip install tensorflow-datasets==4.9.10 (requirements-tfds.txt). TensorFlow is
not needed: packing uses TFDS's Python writer and reading uses `builder.as_data_source(split)`
(random access into the ArrayRecord shards). tensorflow_datasets is imported only inside functions;
this module otherwise needs only numpy and PIL, so grain worker processes can import it.

One dataset (<out>/<name>/1.0.0, name `cpal_<data.name>` unless data.tfds_name is set) holds one
TFDS split per data split, read through `pipeline.make_source(config, split, with_mask=...)` (so all
of VOCSource's / COCOSource's checks apply while packing). A split given as a .txt list path is
stored under the list's stem (`/x/train_aug.txt` -> `train_aug`). Each record:

  id        Text
  image     Image (None, None, 3). image_format="original" (default): the image FILE's bytes as
            they are (VOC/COCO JPEGs: no re-encoding, no quality loss, no size change); where a
            source has no file for an element, or decodes it differently from our reader (COCO's
            16-bit images), that image is stored as a lossless PNG of the decoded array instead.
            image_format="png": every image as a lossless PNG of the decoded RGB array (about 3.5x
            the JPEG's size on VOC). Either way TFDSSource returns exactly the source's pixels.
  label     Tensor float32 [num_classes - 1]
  mask      Image (None, None, 1), PNG of mode "L" (class indices 0..C-1, 255 = ignore): VOC's
            palette PNGs are re-encoded losslessly as plain gray PNGs.
  has_mask  bool. TFDS cannot leave an Image feature out of some records (only Tensor/Text/scalar
            features take optional=True), so a split packed without masks stores has_mask=False
            and an all-255 (all ignore) mask of the image's size (under 1 kB as PNG for 500x375).

Masks are packed for the splits in --mask_splits (default: the config's data.eval_split and
data.val_split, which are the splits the pipeline reads with masks); others store the placeholder.
metadata.json carries the class names and, per split, the ids in order and whether it has masks.
Records are written in the source's order (disable_shuffling): index i is the source's element i.

Images and masks are decoded by TFDSSource with PIL (SkipDecoding), not by TFDS: TFDS's numpy
decoder prefers OpenCV when it is installed, whose JPEG decoding need not match PIL's bit for bit;
ours is VOCSource's own decode path (PIL, voc.to_rgb_uint8), so the pixels are the tree's.
Gray or CMYK JPEGs kept as original bytes are 1 or 4 channels in the file: read them through
TFDSSource (which converts to RGB), not with tfds.data_source's own decoder.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cpal_jax.data import voc
from cpal_jax.data.tfds_source import DATASET_VERSION, dataset_name, import_tfds, split_name

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("original", "png")
_IGNORE = 255


# --------------------------------------------------------------------------- packing
def _image_file(src, index: int, image_id: str) -> Path | None:
  """The file the source decodes element `index` from, when the source is one we know."""
  from cpal_jax.data import coco  # pylint: disable=g-import-not-at-top

  if isinstance(src, voc.VOCSource):
    return src.root / "JPEGImages" / f"{image_id}.jpg"
  if isinstance(src, coco.COCOSource):
    return src.image_dir / src._file_names[index]  # pylint: disable=protected-access
  return None


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def _encode(src, index: int, image_format: str, with_mask: bool) -> tuple[dict, bool]:
  """(the record of element `index`, whether its image is the original file's bytes)."""
  el = src[index]
  image_id, image = el["id"], el["image"]
  h, w = image.shape[:2]
  data = None
  if image_format == "original":
    path = _image_file(src, index, image_id)
    if path is not None:
      data = path.read_bytes()
      with Image.open(io.BytesIO(data)) as im:  # the header only: size and mode, no decode
        size, mode = im.size, im.mode
      if size != (w, h):
        raise ValueError(
            f"{path} is {size[1]}x{size[0]} but the source read {h}x{w} from it; the file changed "
            "while packing"
        )
      # COCOSource decodes with convert("RGB"), our reader with voc.to_rgb_uint8: they agree on
      # everything but 16/32-bit and float images, which go in as PNGs of the source's pixels.
      if not isinstance(src, voc.VOCSource) and (mode.startswith("I") or mode == "F"):
        data = None
  if with_mask:
    mask = np.asarray(el["mask"], np.uint8)
  else:
    mask = np.full((h, w), _IGNORE, np.uint8)
  record = {
      "id": image_id,
      "image": data if data is not None else _png(np.ascontiguousarray(image, np.uint8)),
      "label": np.asarray(el["label"], np.float32),
      "mask": _png(mask),
      "has_mask": bool(with_mask),
  }
  return record, data is not None


def _in_order(fn, n: int, workers: int):
  """fn(0), fn(1), ... in order, computed by `workers` threads with a bounded lookahead."""
  if workers <= 1:
    for i in range(n):
      yield fn(i)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for i in range(n):
      pending.append(pool.submit(fn, i))
      if len(pending) >= 4 * workers:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def pack(
    config,
    splits,
    out: str,
    *,
    mask_splits=None,
    image_format: str = "original",
    overwrite: bool = False,
    workers: int = 0,
) -> dict:
  """Packs the data splits `splits` of config.data into <out>/<name>/1.0.0; returns a summary.

  Args:
    config: a pipeline config; data.name voc or coco with data.root (data.tfds_dir is ignored:
      the tree is read).
    splits: data split names or .txt list paths, as make_source takes them.
    out: the TFDS data_dir.
    mask_splits: the splits packed with masks; None: data.eval_split and data.val_split.
    image_format: "original" (file bytes) or "png" (lossless re-encode), see the module doc.
    overwrite: delete an existing <out>/<name>/1.0.0 first (TFDS builds a dataset's splits
      together: to add a split, rebuild with every split you need).
    workers: threads reading and encoding elements; 0 = min(8, cores).
  """
  tfds = import_tfds()
  from cpal_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format={image_format!r} not understood; choose one of {IMAGE_FORMATS}")
  splits = [s for s in ([splits] if isinstance(splits, str) else splits) if s]
  if not splits:
    raise ValueError("no split to pack; pass --splits=train_aug,train,val (names or .txt list paths)")
  if mask_splits is None:
    mask_splits = [config.data.eval_split, config.data.val_split]
  masked = {split_name(s) for s in mask_splits if s}
  keys = [split_name(s) for s in splits]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise ValueError(f"splits {splits} give the TFDS split name(s) {repeated} more than once; rename a list")
  name = dataset_name(config)
  workers = workers or max(1, min(8, os.cpu_count() or 1))

  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.tfds_dir = ""  # read the tree, not a packed dataset
  sources = {k: pipeline.make_source(config, s, with_mask=k in masked) for k, s in zip(keys, splits)}
  class_names = tuple(str(c) for c in next(iter(sources.values())).class_names)
  num_fg = len(class_names) - 1

  version_dir = Path(out) / name / DATASET_VERSION
  if version_dir.exists():
    if not overwrite:
      raise FileExistsError(
          f"{version_dir} already exists; pass --overwrite to rebuild it (TFDS builds all splits of a "
          "dataset together: list every split you need in --splits)"
      )
    shutil.rmtree(version_dir)

  stats = {"name": name, "dir": str(version_dir), "image_format": image_format, "splits": {}}
  metadata = {
      "class_names": list(class_names),
      "source": {"data.name": config.data.name, "data.root": str(config.data.root)},
      "image_format": image_format,
      "splits": {
          k: {"ids": sources[k].ids(), "has_mask": k in masked, "from": str(s)} for k, s in zip(keys, splits)
      },
  }
  features = tfds.features.FeaturesDict(
      {
          "id": tfds.features.Text(),
          # encoding_format None: original files (JPEG) and PNG fallbacks may both occur.
          "image": tfds.features.Image(
              shape=(None, None, 3), encoding_format=None if image_format == "original" else "png"
          ),
          "label": tfds.features.Tensor(shape=(num_fg,), dtype=np.float32),
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "has_mask": tfds.features.Scalar(dtype=np.bool_),
      }
  )

  def examples(key):
    src, t0, originals, nbytes = sources[key], time.time(), 0, 0
    fn = lambda i: _encode(src, i, image_format, key in masked)
    for i, (record, original) in enumerate(_in_order(fn, len(src), workers)):
      originals += original
      nbytes += len(record["image"]) + len(record["mask"])
      yield i, record
    stats["splits"][key] = {
        "num_examples": len(src),
        "has_mask": key in masked,
        "original_images": originals,
        "encoded_bytes": nbytes,
        "seconds": round(time.time() - t0, 2),
    }
    log.info("packed %s: %s", key, stats["splits"][key])

  ds_name = name

  class _Packed(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A cpal_jax split set packed from a local tree."""

    name = ds_name
    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Packed by cpal_jax.data.tfds_pack."}
    # TFDS looks for a checksums file next to the builder's module through code_path, which in
    # 4.9.10 imports the importlib_resources backport it does not declare for Python >= 3.9.
    # Nothing is downloaded here: no checksums, no lookup.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=(
              f"{config.data.name} splits {keys} packed by cpal_jax.data.tfds_pack from {config.data.root}"
          ),
          features=features,
          metadata=tfds.core.MetadataDict(metadata),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {k: self._generate_examples(k) for k in keys}

    def _generate_examples(self, key):
      yield from examples(key)

  t0 = time.time()
  with tempfile.TemporaryDirectory() as tmp:  # TFDS wants a download dir; nothing is downloaded
    _Packed(data_dir=str(out), file_format="array_record").download_and_prepare(download_dir=tmp)
  stats["seconds"] = round(time.time() - t0, 2)
  stats["disk_bytes"] = sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file())
  n = sum(s["num_examples"] for s in stats["splits"].values())
  stats["bytes_per_image"] = round(stats["disk_bytes"] / max(n, 1))
  return stats


# --------------------------------------------------------------------------- command line
def cli() -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  # pylint: disable-next=g-import-not-at-top
  from cpal_jax import command
  from cpal_jax.command import define_config_flag, setup_logging

  config_flag = define_config_flag(
      "Pipeline config file (get_config()); data.name voc or coco, data.root set."
  )
  splits_flag = flags.DEFINE_list("splits", None, "Data splits to pack (names or .txt list paths).")
  out_flag = flags.DEFINE_string("out", None, "TFDS data_dir to write; default: config.data.tfds_dir.")
  mask_flag = flags.DEFINE_list(
      "mask_splits", None, "Splits packed with masks; default: config.data.eval_split and val_split."
  )
  format_flag = flags.DEFINE_enum("image_format", "original", IMAGE_FORMATS, "original file bytes | png.")
  overwrite_flag = flags.DEFINE_bool("overwrite", False, "Rebuild an existing <out>/<name>/1.0.0.")
  workers_flag = flags.DEFINE_integer("workers", 0, "Reader/encoder threads; 0 = min(8, cores).")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    setup_logging()
    config = config_flag.value
    out = out_flag.value or config.data.get("tfds_dir", "")
    if not out:
      raise app.UsageError("pass --out=<TFDS data_dir> (or --config.data.tfds_dir)")
    if not splits_flag.value:
      raise app.UsageError("pass --splits=train_aug,train,val (data split names or .txt list paths)")
    stats = pack(
        config,
        splits_flag.value,
        out,
        mask_splits=mask_flag.value,
        image_format=format_flag.value,
        overwrite=overwrite_flag.value,
        workers=workers_flag.value,
    )
    for key, s in stats["splits"].items():
      print(
          f"{key}: {s['num_examples']} images, masks={s['has_mask']}, "
          f"{s['original_images']} as original file bytes, {s['seconds']} s"
      )
    print(
        f"{stats['dir']}: {stats['disk_bytes'] / 1e6:.1f} MB, {stats['bytes_per_image'] / 1e3:.1f} kB per "
        f"image, {stats['seconds']} s; read with --config.data.tfds_dir={out}"
        + (f" --config.data.tfds_name={stats['name']}" if stats["name"] != f"cpal_{config.data.name}" else "")
    )

  command.run(main, __doc__)


if __name__ == "__main__":
  cli()
