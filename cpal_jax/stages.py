"""The pipeline's stages in order on one workdir: what `python -m cpal_jax.main` (and the ablation
runner, and tests) call. Every stage reads only what earlier stages wrote to the workdir, so any
suffix of the stages can be re-run."""

import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import sys
import threading
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
  from cpal_jax.data import pipeline
  from cpal_jax.eval import seed as seed_eval
  from cpal_jax.eval import seg as seg_eval
  from cpal_jax.infer import cam as make_cam
  from cpal_jax.infer import export
  from cpal_jax.parallel import distributed
  from cpal_jax.refine import stage as refine
  from cpal_jax.train import cam as cam_stage
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
  with pipeline.shared_sources():
    return _run(config, workdir, stages, runners)


def _run(config, workdir: str, stages: list[str], runners: dict) -> dict:
  from cpal_jax import run_record
  from cpal_jax.parallel import distributed
  from cpal_jax.train import loop

  preflight.check(config, stages, workdir)
  if config.get("dry_run", False):
    print(dry_run(config, workdir, stages))
    return run_record.read(workdir) if os.path.isdir(workdir) else {}
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
  current = ["setup"]
  try:
    summary = run_record.rebuild(workdir)  # outputs deleted since the last run take their figures
    for k, stage in enumerate(stages, 1):
      t0 = time.time()
      current[0] = stage
      log.info("stage %d/%d %s -> %s", k, len(stages), stage, workdir)
      with signals_stop(lambda: current[0]):
        updates = runners[stage](config, workdir)
      # The next stage, and process 0's record of this one, read what every process wrote.
      distributed.barrier(f"stage {stage} finished")
      updates["stage_seconds"] = {stage: round(time.time() - t0, 1)}
      outputs = stage_outputs(config, workdir, stage)
      summary = run_record.record(workdir, STAGES.index(stage), stage, outputs, updates)
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
  except (loop.Preempted, Interrupted):
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


def dry_run(config, workdir: str, stages: list[str]) -> str:
  """The resolved config, then per stage what a run would do with this workdir: start, resume from a
  step, skip finished outputs, or be refused (and why)."""
  from cpal_jax import checkpointing

  def files(d: str) -> int:
    return len([f for f in os.listdir(d) if not f.startswith(".")]) if os.path.isdir(d) else 0

  def step(d: str) -> str:
    s = checkpointing.latest_step(d)
    return "starts from step 0" if s is None else f"resumes from the checkpoint of step {s} in {d}"

  what = {
      "train_cam": lambda: step(paths.cam_ckpt(workdir)),
      "make_cam": lambda: f"{files(paths.cam_maps(workdir))} maps exist in {paths.cam_maps(workdir)} (kept)",
      "eval_cam": lambda: "scores the maps",
      "refine": lambda: f"refine.mode={config.refine.mode}; {files(paths.refined(config, workdir))} masks exist",
      "export": lambda: f"{files(paths.masks(workdir))} masks exist in {paths.masks(workdir)} (kept)",
      "train_seg": lambda: step(paths.seg_ckpt(workdir)),
      "eval_seg": lambda: f"{files(paths.seg_pred(workdir))} predictions exist (kept)",
  }
  lines = ["config:", config.to_json_best_effort(indent=2), "", f"plan for {workdir}:"]
  lines += [f"  {k}/{len(stages)} {s}: {what[s]()}" for k, s in enumerate(stages, 1)]
  try:
    check_resume(config, workdir, stages)
    lines.append("accepted: nothing was run or written (--config.dry_run=False runs it)")
  except ValueError as e:
    lines.append(f"refused: {e}")
  return "\n".join(lines)


def stage_outputs(config, workdir: str, stage: str) -> list[str]:
  """The folders a stage's summary entries were computed from: deleting one drops them."""
  refined = [paths.crf_masks(workdir)] + ([paths.refined(config, workdir)] if config.refine.mode != "crf" else [])
  return {
      "train_cam": [paths.cam_ckpt(workdir)],
      "make_cam": [paths.cam_maps(workdir)],
      "eval_cam": [paths.cam_maps(workdir)],
      "refine": refined,
      "export": [paths.masks(workdir)],
      "train_seg": [paths.seg_ckpt(workdir)],
      "eval_seg": [paths.seg_pred(workdir)],
  }[stage]


def config_hash(config) -> str:
  """What the run computes, hashed: not how it was launched (the distributed section holds a
  launcher's coordinator port and this process's index, which differ per launch and process)."""
  fields = json.loads(config.to_json_best_effort())
  fields.pop("distributed", None)
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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


class Interrupted(Exception):
  """A stage other than a training loop stopped by SIGTERM/SIGINT; its finished per-image outputs
  are kept (each is written atomically) and the same command resumes after them."""

  def __init__(self, stage: str, signame: str):
    super().__init__(
        f"{stage}: stopped by a termination signal ({signame}); its finished outputs are kept. "
        "Run the same command again to resume."
    )


@contextlib.contextmanager
def signals_stop(stage):
  """SIGTERM and SIGINT raise Interrupted(stage()) for the duration, installed explicitly, so a run
  started with SIGINT ignored (a background job of a non-interactive shell) still stops on it. The
  training loops install their own handler on top (save a checkpoint at the next step). Multi-process
  runs rely on JAX's preemption sync point instead, and nothing is installed off the main thread."""
  if jax_process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return

  def handler(signum, frame):
    raise Interrupted(stage(), signal.Signals(signum).name)

  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def jax_process_count() -> int:
  import jax

  return jax.process_count()


@contextlib.contextmanager
def exit_on_preemption():
  """A stage stopped by SIGTERM/SIGINT ends the command with its resume hint and exit code 75
  (what launchers retry on), not with a traceback."""
  from cpal_jax.train import loop

  try:
    yield
  except (loop.Preempted, Interrupted) as e:
    log.warning("%s", e)
    sys.exit(loop.PREEMPTED_EXIT_CODE)
