"""The workdir contract: every file and folder a stage writes or reads, in one place, so stages
import this module rather than each other for paths (the table in README, Workdir)."""

import os


def config_json(workdir: str) -> str:
  return os.path.join(workdir, "config.json")


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
