"""From a config to data: the source of a split, the resumable training iterator, eval batches.

Every process reads only its slice of each global batch; batches stay uint8 on the host and are
normalised on the device. No jax import here: grain worker processes import this module.
"""

import contextlib
import dataclasses

import grain
import numpy as np

from cpal_jax.data import transforms


# make_source's memory inside shared_sources(); None outside it.
_SHARED: dict | None = None


@contextlib.contextmanager
def shared_sources():
  """Within it, make_source returns the source it built before for the same data config, seed, split
  and mask flag, so one run's preflight, resume checks and stages list a split, read its label
  tables and check its files once (COCO's instances file alone is hundreds of MB)."""
  global _SHARED
  outer = _SHARED
  _SHARED = {} if outer is None else outer
  try:
    yield
  finally:
    _SHARED = outer


def make_source(config, split: str, with_mask: bool = False):
  """The random-access source of `split` for config.data.name."""
  if _SHARED is None:
    return _build_source(config, split, with_mask)
  key = (config.data.to_json(sort_keys=True), config.seed, split, with_mask)
  if key not in _SHARED:
    _SHARED[key] = _build_source(config, split, with_mask)
  return _SHARED[key]


def _build_source(config, split: str, with_mask: bool):
  d = config.data
  on_bad_input = d.get("on_bad_input", "strict")
  if on_bad_input not in ("strict", "skip"):
    raise ValueError(
        f"data.on_bad_input={on_bad_input!r} not understood; choose 'strict' (stop at a bad file) "
        "or 'skip' (drop bad ids at startup, counted and logged)"
    )
  if d.get("tfds_dir"):  # a packed copy of the voc/coco tree (cpal_jax.data.tfds_pack)
    from cpal_jax.data import tfds_source

    src = tfds_source.TFDSSource(d.tfds_dir, tfds_source.dataset_name(config), split, with_mask=with_mask)
  elif d.name == "synthetic":
    from cpal_jax.data import synthetic

    sizes = {"train": d.num_train, "train_eval": d.num_eval, "val": d.num_eval}
    src = synthetic.SyntheticSource(
        split,
        seed=config.seed,
        num_images=sizes.get(split) or None,
        image_size=d.image_size or 96,
        world=d.get("world", "default"),
    )
  elif d.name == "voc":
    from cpal_jax.data import voc

    if not d.root:
      raise ValueError("data.root is empty: pass --config.data.root=/path/to/VOCdevkit/VOC2012")
    src = voc.VOCSource(
        d.root,
        split,
        labels=d.labels,
        mask_dir=d.mask_dir,
        with_mask=with_mask,
        on_bad_input=on_bad_input,
        allow_pickle=d.get("allow_pickle", False),
    )
  elif d.name == "coco":
    from cpal_jax.data import coco

    if not d.root:
      raise ValueError("data.root is empty: pass --config.data.root=/path/to/coco (train2014/, annotations/)")
    src = coco.COCOSource(
        d.root, split, subset=d.get("coco_subset", "auto"), mask_dir=d.mask_dir, with_mask=with_mask
    )
  else:
    raise ValueError(f"unknown data.name {d.name!r}: choose synthetic, voc or coco")
  if src.num_classes != d.num_classes:
    raise ValueError(
        f"data.num_classes={d.num_classes} but the {d.name} data has {src.num_classes} "
        f"classes (background included); set --config.data.num_classes={src.num_classes}"
    )
  return src


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Step bookkeeping shared by the loop, the lr schedule and the epoch hooks."""

  steps_per_epoch: int
  num_steps: int
  global_batch: int


def make_schedule(section, num_images: int, prefix: str = "train") -> Schedule:
  """Steps of a config section with batch_size, num_steps and epochs (num_steps wins when set);
  `prefix` names the section in errors."""
  b = section.batch_size
  per_epoch = num_images // b if b > 0 else 0
  if per_epoch < 1:
    raise ValueError(f"{prefix}.batch_size={b} is larger than the {num_images} training images")
  num_steps = section.num_steps or per_epoch * section.epochs
  if num_steps < 1:
    raise ValueError(f"{prefix}.num_steps and {prefix}.epochs are both 0: set one of them")
  return Schedule(per_epoch, num_steps, b)


def train_dataset(
    config,
    source,
    schedule: Schedule,
    process_index: int = 0,
    process_count: int = 1,
    augment=None,
    batch_key: str = "train.batch_size",
):
  """Shuffled (a new order each epoch), augmented, batched; this process's share of each batch.

  Element k of the repeated, shuffled stream belongs to global batch k // B; process p takes the
  p-th of P equal blocks of each batch, so the processes' slices, put together in process order as
  make_array_from_process_local_data does, are the single-process batch in its order (CPAL's banks
  are FIFO: the order of a batch's prototypes decides which entries a full bank keeps, and where).
  augment: a grain RandomMapTransform (default: the CAM stage's); batch_key names the batch size
  in errors. The IRN and DeepLab stages deal their batches through here with their own augment.
  """
  b = schedule.global_batch
  if b % process_count:
    raise ValueError(f"{batch_key}={b} must be divisible by the process count {process_count}")
  epochs = -(-schedule.num_steps // schedule.steps_per_epoch)
  aug = augment or transforms.TrainAugment(config.train.crop_size, tuple(config.train.resize_long) or None)
  shuffled = grain.MapDataset.source(source).seed(config.seed).shuffle().repeat(epochs)
  stream = _DropLast(shuffled, len(source), schedule.steps_per_epoch * b)
  ds = grain.MapDataset.source(stream).seed(config.seed + 1).random_map(aug)
  if process_count > 1:
    ds = grain.MapDataset.source(_ProcessBlock(ds, b, process_index, process_count))
  return ds.batch(b // process_count, drop_remainder=True)


class _ProcessBlock:
  """Process p's block of every global batch of `ds`: position i is element
  (i // m) * batch + p * m + i % m of `ds`, m = batch // count."""

  def __init__(self, ds, batch: int, index: int, count: int):
    self._ds, self._batch, self._index, self._m = ds, batch, index, batch // count

  def __len__(self) -> int:
    return len(self._ds) // self._batch * self._m

  def __getitem__(self, i: int):
    step, j = divmod(i, self._m)
    return self._ds[step * self._batch + self._index * self._m + j]


class _DropLast:
  """Each epoch's shuffled order cut to whole batches (PyTorch's drop_last): position g of the
  stream is element g % keep of epoch g // keep."""

  def __init__(self, shuffled, epoch_len: int, keep: int):
    self._shuffled, self._n, self._keep = shuffled, epoch_len, keep

  def __len__(self) -> int:
    return len(self._shuffled) // self._n * self._keep

  def __getitem__(self, g: int):
    epoch, j = divmod(g, self._keep)
    return self._shuffled[epoch * self._n + j]


def train_iterator(config, source, schedule: Schedule, *args, **kwargs):
  """train_dataset (the same arguments) as a checkpointable iterator (grain worker processes if
  data.workers > 0)."""
  ds = train_dataset(config, source, schedule, *args, **kwargs)
  if config.data.workers > 0:
    return iter(
        ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.workers))
    )
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(source, batch_size: int, pad_multiple: int, process_index: int = 0, process_count: int = 1):
  """Yields (ids, batch) over this process's share of `source`, in order.

  Images are padded (bottom/right) to a multiple of pad_multiple and grouped by padded size, so a
  jitted predictor compiles once per size bucket; a short final batch is padded with copies of its
  last image and `keep` marks the real entries.
  """
  ids = source.ids()
  mine = list(range(process_index, len(source), process_count))
  buckets: dict[tuple[int, int], list] = {}

  def flush(key):
    items = buckets.pop(key)
    keep = np.zeros(batch_size, bool)
    keep[: len(items)] = True
    items = items + [items[-1]] * (batch_size - len(items))
    batch = {k: np.stack([it[1][k] for it in items]) for k in items[0][1]}
    batch["keep"] = keep
    return [ids[it[0]] for it in items[: keep.sum()]], batch

  for i in mine:
    el = source[i]
    h, w = el["image"].shape[:2]
    key = (-(-h // pad_multiple) * pad_multiple, -(-w // pad_multiple) * pad_multiple)
    buckets.setdefault(key, []).append((i, _pad_eval(el, key)))
    if len(buckets[key]) == batch_size:
      yield flush(key)
  for key in list(buckets):
    yield flush(key)


def _pad_eval(el: dict, size: tuple[int, int]) -> dict:
  h, w = el["image"].shape[:2]
  out = {
      "image": np.zeros((*size, 3), np.uint8),
      "valid": np.zeros(size, np.uint8),
      "label": el["label"].astype(np.float32),
      "size": np.array([h, w], np.int32),
  }
  out["image"][:h, :w] = el["image"]
  out["valid"][:h, :w] = 1
  if "mask" in el:
    out["mask"] = np.full(size, 255, np.uint8)
    out["mask"][:h, :w] = el["mask"]
  return out
