"""The workdir contract: every file and folder a stage writes or reads, in one place, so stages
import this module rather than each other for paths (the table in README, Workdir)."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic(path: str):
  """Yields a temporary name beside `path` (same extension) to write; it replaces `path` when the
  block ends without an error, so a reader or a killed run never sees half a file."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the outputs from other users
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically."""
  with atomic(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def populated(folder: str) -> bool:
  """The folder exists and holds an output (temporary and hidden files do not count)."""
  return os.path.isdir(folder) and any(not f.startswith(".") for f in os.listdir(folder))


def config_json(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


def runs_jsonl(workdir: str) -> str:
  return os.path.join(workdir, "runs.jsonl")


def stage_records(workdir: str) -> str:
  return os.path.join(workdir, "records")


def stage_record(workdir: str, stage: str) -> str:
  return os.path.join(stage_records(workdir), f"{stage}.json")


def summary_json(workdir: str) -> str:
  return os.path.join(workdir, "summary.json")


def summary_md(workdir: str) -> str:
  return os.path.join(workdir, "summary.md")


def cam_ckpt(workdir: str) -> str:
  return os.path.join(workdir, "cam", "ckpt")


def cam_tb(workdir: str) -> str:
  return os.path.join(workdir, "cam", "tb")


def cam_maps(workdir: str) -> str:
  return os.path.join(workdir, "cam", "maps")


def cam_map(workdir: str, image_id: str) -> str:
  return os.path.join(cam_maps(workdir), f"{image_id}.npz")


def cam_protocol(workdir: str) -> str:
  return os.path.join(workdir, "cam", "maps_protocol.json")


def crf_masks(workdir: str) -> str:
  return os.path.join(workdir, "refine", "crf")


def rw_masks(workdir: str) -> str:
  return os.path.join(workdir, "refine", "rw")


def ir_labels(workdir: str) -> str:
  return os.path.join(workdir, "irn", "ir_label")


def irn_ckpt(workdir: str) -> str:
  return os.path.join(workdir, "irn", "ckpt")


def irn_tb(workdir: str) -> str:
  return os.path.join(workdir, "irn", "tb")


def refined(config, workdir: str) -> str:
  """Where the refine stage leaves its class-index PNGs for config.refine.mode."""
  return {"irn": rw_masks, "crf": crf_masks, "ir_label": ir_labels}[config.refine.mode](workdir)


def masks(workdir: str) -> str:
  return os.path.join(workdir, "masks")


def seg_ckpt(workdir: str) -> str:
  return os.path.join(workdir, "seg", "ckpt")


def seg_tb(workdir: str) -> str:
  return os.path.join(workdir, "seg", "tb")


def seg_pred(workdir: str) -> str:
  return os.path.join(workdir, "seg", "pred")


def seg_pred_crf(workdir: str) -> str:
  return os.path.join(workdir, "seg", "pred_crf")


def seg_protocol(workdir: str) -> str:
  return os.path.join(workdir, "seg", "pred_protocol.json")


def seg_eval_json(workdir: str) -> str:
  return os.path.join(workdir, "seg", "eval.json")


def report(workdir: str) -> str:
  return os.path.join(workdir, "report")
