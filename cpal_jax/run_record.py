"""The run's record: summary.json (replaced atomically, written by process 0 only), its terminal digest
and summary.md.

Each stage's entries are kept in records/<stage>.json with the outputs they were computed from;
summary.json is rebuilt from the records whose outputs still exist, so deleting a stage's outputs
takes its figures with it (a workdir from before the records keeps its summary.json as written)."""

import json
import math
import os

import numpy as np

from cpal_jax import paths
from cpal_jax.parallel import distributed

# Figures a summary always names (the workdir contract: README, Workdir); null until their stage has run.
SUMMARY_KEYS = ("seed_miou", "crf_miou", "mask_miou", "seg_val_miou")


def _json_safe(x):
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  if isinstance(x, (np.floating, float)):
    return None if not math.isfinite(float(x)) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def read(workdir: str) -> dict:
  path = paths.summary_json(workdir)
  summary = {k: None for k in SUMMARY_KEYS}
  if os.path.exists(path):
    with open(path) as f:
      summary.update(json.load(f))
  return summary


def _merge(summary: dict, updates: dict) -> dict:
  """Nested dicts merge one level deep."""
  for k, v in updates.items():
    if isinstance(v, dict) and isinstance(summary.get(k), dict):
      summary[k] = {**summary[k], **v}
    else:
      summary[k] = v
  return summary


def _write(workdir: str, summary: dict) -> dict:
  summary = _json_safe(summary)
  if distributed.is_main():
    paths.write_text(paths.summary_json(workdir), json.dumps(summary, indent=2, sort_keys=True) + "\n")
  return summary


def update(workdir: str, **updates) -> dict:
  """Merges `updates` into workdir/summary.json as it is (no stage record)."""
  return _write(workdir, _merge(read(workdir), updates))


def record(workdir: str, order: int, stage: str, outputs: list[str], updates: dict) -> dict:
  """Keeps a stage's entries with the folders they were computed from (its `order` in the pipeline
  sets the merge order), then rebuilds summary.json."""
  path = paths.stage_record(workdir, stage)
  entry = {"order": order, "outputs": outputs, "updates": {}}
  if os.path.exists(path):
    with open(path) as f:
      entry["updates"] = json.load(f)["updates"]
  entry["updates"] = _json_safe(_merge(entry["updates"], updates))
  if distributed.is_main():
    paths.write_text(path, json.dumps(entry, indent=2, sort_keys=True) + "\n")
  return rebuild(workdir)


def rebuild(workdir: str) -> dict:
  """summary.json from the stage records whose outputs exist; as it is without records."""
  folder = paths.stage_records(workdir)
  if not os.path.isdir(folder):
    return read(workdir)
  entries = []
  for name in os.listdir(folder):
    # Not the hidden temporaries of an atomic write: on a pod another process may be renaming one.
    if name.endswith(".json") and not name.startswith("."):
      with open(os.path.join(folder, name)) as f:
        entries.append(json.load(f))
  summary = {k: None for k in SUMMARY_KEYS}
  for entry in sorted(entries, key=lambda e: e["order"]):
    if all(paths.populated(p) for p in entry["outputs"]):
      summary = _merge(summary, entry["updates"])
  return _write(workdir, summary)


def digest(summary: dict) -> str:
  """The terminal digest of summary.json."""
  lines = ["", "== cpal_jax summary =="]
  for k in SUMMARY_KEYS:
    v = summary.get(k)
    lines.append(f"  {k:14s} {'-' if v is None else f'{v:.2f}'}")
  if summary.get("seg_val_miou_crf") is not None:
    lines.append(f"  {'  w/ CRF':14s} {summary['seg_val_miou_crf']:.2f}")
  for name, vals in (summary.get("baselines") or {}).items():
    lines.append(f"  baseline {name}: {vals:.2f}")
  th = summary.get("thresholds") or {}
  for k, v in th.items():
    if v is not None:
      lines.append(f"  threshold {k}: {v}")
  for stage, secs in (summary.get("stage_seconds") or {}).items():
    lines.append(f"  time {stage:10s} {secs:8.1f} s")
  return "\n".join(lines)


# One row per pipeline stage in summary.md: (stage, label, figure key in summary.json).
_MD_ROWS = (
    ("train_cam", "CAM network", None),
    ("make_cam", "multi-scale maps", None),
    ("eval_cam", "Seed", "seed_miou"),
    ("refine", "w/ CRF", "crf_miou"),
    ("export", "Mask", "mask_miou"),
    ("train_seg", "DeepLab-v2 training", None),
    ("eval_seg", "Segmentation (val)", "seg_val_miou"),
    # The papers' segmentation figures are MSC + flip + dense CRF (docs/method.md 1.7).
    ("eval_seg", "Segmentation (val) w/ CRF", "seg_val_miou_crf"),
)


def markdown(summary: dict, figures: dict | None = None) -> str:
  """summary.md: one row per stage with its mIoU and wall time (the shape of the paper's Tables 4-5),
  then the thresholds used and links to the report's figures."""
  secs = summary.get("stage_seconds") or {}
  th = summary.get("thresholds") or {}
  lines = ["# cpal_jax run", "", "| stage | figure | mIoU (%) | time (s) |", "| --- | --- | --- | --- |"]
  timed = set()
  for stage, label, key in _MD_ROWS:
    v = summary.get(key) if key else None
    if (stage not in secs or stage in timed) and v is None:
      continue
    t = "-" if stage in timed else secs.get(stage, "-")  # a stage with two figures: its time once
    timed.add(stage)
    lines.append(f"| `{stage}` | {label} | {'-' if v is None else f'{v:.2f}'} | {t} |")
  used = {k: v for k, v in th.items() if v is not None}
  if used:
    lines += [
        "",
        "Background thresholds (oracle sweep, see docs/method.md section 5): "
        + ", ".join(f"{k} t={v}" for k, v in used.items()),
    ]
  for name, v in (summary.get("baselines") or {}).items():
    lines.append(f"- baseline {name}: {v:.2f}")
  if figures:
    lines += ["", "## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
  return "\n".join(lines) + "\n"
