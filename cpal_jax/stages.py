"""The pipeline's stages in order on one workdir: what `python -m cpal_jax.main` (and the ablation
runner, and tests) call. Every stage reads only what earlier stages wrote to the workdir, so any
suffix of the stages can be re-run."""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import sys
import time

from cpal_jax import paths, preflight, provenance

STAGES = ("train_cam", "make_cam", "eval_cam", "refine", "export", "train_seg", "eval_seg")
log = logging.getLogger(__name__)


def parse_stages(spec: str) -> list[str]:
  stages = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ValueError(
        f"config.stages={spec!r}: unknown stage(s) {unknown}; this version runs {', '.join(STAGES)}"
    )
  return stages


def run(config, workdir: str) -> dict:
  """Runs config.stages on workdir; returns the merged summary."""
  from cpal_jax import run_record
  from cpal_jax.eval import seed as seed_eval
  from cpal_jax.eval import seg as seg_eval
  from cpal_jax.infer import cam as make_cam
  from cpal_jax.infer import export
  from cpal_jax.parallel import distributed
  from cpal_jax.refine import stage as refine
  from cpal_jax.train import cam as cam_stage
  from cpal_jax.train import loop
  from cpal_jax.train import seg as seg_stage

  runners = {
      "train_cam": cam_stage.train,
      "make_cam": make_cam.run,
      "eval_cam": seed_eval.evaluate,
      "refine": refine.run,
      "export": export.run,
      "train_seg": seg_stage.train,
      "eval_seg": seg_eval.evaluate,
  }

  stages = parse_stages(config.stages)
  distributed.initialize(config)
  preflight.check(config, stages, workdir)
  check_workdir(workdir)
  check_resume(config, workdir, stages)
  # Accepted: only now does this config become the workdir's record.
  entry = {
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "commit": provenance.git_commit(),
      "config_hash": config_hash(config),
      "stages": stages,
  }
  if distributed.is_main():
    paths.write_text(paths.config_json(workdir), config.to_json_best_effort(indent=2) + "\n")
  status = "error"
  try:
    summary = run_record.read(workdir)
    for k, stage in enumerate(stages, 1):
      t0 = time.time()
      log.info("stage %d/%d %s -> %s", k, len(stages), stage, workdir)
      updates = runners[stage](config, workdir)
      updates["stage_seconds"] = {stage: round(time.time() - t0, 1)}
      summary = run_record.update(workdir, **updates)
    figures = {}
    if config.report.enabled:
      from cpal_jax import report

      figures = report.write_report(config, workdir)
    if distributed.is_main():
      paths.write_text(paths.summary_md(workdir), run_record.markdown(summary, figures))
      print(run_record.digest(summary))
      print(f"\nsummary: {paths.summary_json(workdir)}")
    status = "ok"
    return summary
  except loop.Preempted:
    status = "preempted"
    raise
  except BaseException as e:
    status = f"error: {type(e).__name__}"
    raise
  finally:
    if distributed.is_main():
      entry["ended"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      entry["status"] = status
      with open(paths.runs_jsonl(workdir), "a") as f:
        f.write(json.dumps(entry) + "\n")


def config_hash(config) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


def check_resume(config, workdir: str, stages: list[str]) -> None:
  """Refuses, before anything is written, a config other than the one the workdir's checkpoints
  and per-image outputs were made with, for the stages this run will resume."""
  from cpal_jax.data import pipeline
  from cpal_jax.eval import seg as seg_eval
  from cpal_jax.infer import cam as make_cam
  from cpal_jax.train import cam as cam_stage
  from cpal_jax.train import irn as irn_stage
  from cpal_jax.train import seg as seg_stage

  counts: dict[str, int] = {}

  def count(split: str) -> int:
    if split not in counts:
      counts[split] = len(pipeline.make_source(config, split))
    return counts[split]

  if "train_cam" in stages:
    cam_stage.check_resume(config, workdir, count(config.data.train_split))
  elif "make_cam" in stages and (record := make_cam.protocol_record(config, workdir)) is not None:
    provenance.check(*record)
  if "refine" in stages and config.refine.mode == "irn":
    irn_stage.check_resume(config, workdir, count(config.cam.split or config.data.train_split))
  if "train_seg" in stages:
    seg_stage.check_resume(config, workdir, count(seg_stage.train_split(config)))
  elif "eval_seg" in stages and (record := seg_eval.protocol_record(config, workdir)) is not None:
    provenance.check(*record)


def check_workdir(workdir: str) -> None:
  """Fails before any work when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-test-{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
        f"workdir {workdir} is not writable ({e.strerror}); pass --workdir=<a folder you can write>"
    ) from None


@contextlib.contextmanager
def exit_on_preemption():
  """A stage stopped by SIGTERM/SIGINT ends the command with its resume hint and exit code 75
  (what launchers retry on), not with a traceback."""
  from cpal_jax.train import loop

  try:
    yield
  except loop.Preempted as e:
    log.warning("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
