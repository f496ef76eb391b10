"""The loop every training stage shares (CAM, IRN boundary net, DeepLab): global batches into a
jitted step, metric windows, checkpoints of the state and the data-iterator position, resume, and
the two guards a long run needs: preemption (SIGTERM/SIGINT save a checkpoint and stop) and
non-finite losses (stop with the step range, or skip the step and count it).
"""

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import checkpointing, diskspace, faults, monitor
from cpal_jax.data import pipeline

log = logging.getLogger(__name__)

NONFINITE = ("stop", "skip")
# EX_TEMPFAIL: not a failure of the run, "try again" -- schedulers that requeue on non-zero exit
# codes restart it, and the same command resumes from the checkpoint just written.
PREEMPTED_EXIT_CODE = 75


class NonFiniteError(FloatingPointError):
  pass


class Preempted(Exception):
  """A training stage stopped on SIGTERM/SIGINT after saving a checkpoint."""

  def __init__(self, stage: str, step: int, directory: str):
    super().__init__(
        f"{stage}: stopped by a termination signal at step {step}; checkpoint saved in {directory}. "
        "Run the same command again to resume."
    )
    self.step = step


@dataclasses.dataclass(frozen=True)
class Loop:
  """What differs between the training stages; everything else is this module."""

  name: str  # "train_cam", "train_irn", "train_seg": progress bar, messages
  ckpt_dir: str
  tb_dir: str
  meta: dict  # checkpoint fingerprint: keys a resumed run must agree with
  schedule: pipeline.Schedule
  lr: Callable[[int], float]  # lr at a 0-based step, for the logs
  log_every: int
  ckpt_every: int
  ckpt_keep: int = 2
  nonfinite: str = "stop"  # stop | skip
  hint: str = ""  # appended to the non-finite message: what to change
  summary_line: Callable[[int, dict], str] | None = None  # an extra log line per window


@dataclasses.dataclass
class Result:
  state: object
  start: int
  stop: int
  first: dict  # this invocation's first metric window
  last: dict
  seconds: float
  skipped_steps: int  # non-finite steps skipped (nonfinite=skip), this invocation

  def images_per_second(self, global_batch: int) -> float | None:
    return (self.stop - self.start) * global_batch / self.seconds if self.stop > self.start else None


def check_nonfinite_policy(value: str, key: str) -> None:
  if value not in NONFINITE:
    raise ValueError(f"{key}={value!r}: choose one of {', '.join(NONFINITE)}")


def skip_nonfinite(train_step: Callable) -> Callable:
  """Wraps a step (state, *args) -> (state, metrics) so a step whose loss or gradient norm is not
  finite leaves the state as it was (only the step counter advances, so the data and lr schedule
  stay aligned with an uninterrupted run) and reports `skipped` = 1."""

  def step(state, *args):
    new_state, metrics = train_step(state, *args)
    ok = jnp.isfinite(metrics["loss/total"]) & jnp.isfinite(metrics["grad_norm"])
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    return kept.replace(step=new_state.step), {**metrics, "skipped": 1.0 - ok.astype(jnp.float32)}

  return step


def restore_or_init(loop: Loop, abstract_state, init_state: Callable, data_iter):
  """(checkpointer, state, start step): the latest checkpoint of loop.ckpt_dir restored into the
  abstract state's shardings (data iterator position included), or a fresh state."""
  os.makedirs(loop.ckpt_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(loop.ckpt_dir, keep=loop.ckpt_keep)
  start = ckpt.latest_step() or 0
  # keep + 1 checkpoints exist while a new one is written before the oldest goes.
  diskspace.require(
      loop.ckpt_dir, tree_bytes(abstract_state) * (loop.ckpt_keep + 1), f"{loop.name} checkpoints"
  )
  if start:
    checkpointing.check_compatible(ckpt.restore_meta(start), loop.meta, ckpt.directory)
    state, _ = ckpt.restore(start, abstract_state, data_iter)
    log.info("%s: resumed from step %d in %s", loop.name, start, ckpt.directory)
  else:
    state = init_state()
  return ckpt, state, start


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def run(
    loop: Loop,
    ckpt: checkpointing.Checkpointer,
    state,
    data_iter,
    mesh,
    start: int,
    stop: int,
    step_fn: Callable,
    before_step: Callable | None = None,
    after_log: Callable | None = None,
) -> Result:
  """Steps start..stop-1; saves every ckpt_every steps and at the end; closes ckpt and data_iter.

  step_fn(state, global_batch, step) -> (state, metrics); before_step(state, step) -> state runs
  first (CPAL's k-means at epoch starts); after_log(state, step, writer) after each metric window.
  """
  from cpal_jax.parallel import sharding

  writer = monitor.ScalarWriter(loop.tb_dir)
  bar = monitor.progress(stop, loop.name, initial=start)
  t0, first, last, pending, skipped = time.time(), {}, {}, [], 0
  try:
    with _termination_flag() as terminated:
      for step in range(start, stop):
        if before_step is not None:
          state = before_step(state, step)
        batch = sharding.global_batch(next(data_iter), mesh)
        state, metrics = step_fn(state, batch, step)
        pending.append(metrics)
        bar.update(1)
        done = step + 1
        if step == start:
          monitor.restart_clock(bar)  # the ETA from here excludes the step's compile time
        faults.point(f"{loop.name}/step/{done}")
        if done % loop.log_every == 0 or done == stop:
          window, n_skipped = _window(loop, pending, done)
          skipped += n_skipped
          last, first, pending = window, first or window, []
          writer.scalars(done, last)
          bar.set_postfix(loss=f"{last.get('loss/total', float('nan')):.4f}", epoch=f"{last['epoch']:.2f}")
          if loop.summary_line is not None:
            log.info("%s", loop.summary_line(done, last))
          if after_log is not None:
            after_log(state, done, writer)
        preempt = terminated() if jax.process_count() == 1 else ckpt.reached_preemption(done)
        if (done % loop.ckpt_every == 0 or preempt) and done != stop:
          # A checkpoint must never hold a state that a non-finite step already spoiled.
          if pending:
            _window(loop, pending, done, record=False)
          ckpt.save(done, state, data_iter, loop.meta)
          log.info("%s: checkpoint of step %d saving to %s", loop.name, done, ckpt.directory)
          faults.point(f"{loop.name}/saving/{done}")
        if preempt and done != stop:
          raise Preempted(loop.name, done, ckpt.directory)
    if stop > start or start == 0:
      ckpt.save(stop, state, data_iter, loop.meta)
      log.info("%s: checkpoint of step %d saving to %s", loop.name, stop, ckpt.directory)
  finally:
    # Also on errors: an asynchronous checkpoint already under way is finished, not abandoned.
    bar.close()
    ckpt.close()
    writer.close()
    # Worker processes and their shared memory go now, not at interpreter teardown.
    data_iter.close()
  return Result(state, start, stop, first, last, time.time() - t0, skipped)


def _window(loop: Loop, pending: list, step: int, record: bool = True) -> tuple[dict, int]:
  """Averages the metrics of the steps since the last window over the steps that were not skipped;
  raises NonFiniteError (nonfinite=stop) with the step range."""
  host = jax.device_get(pending)
  skipped = int(sum(m.get("skipped", 0.0) for m in host))
  good = [m for m in host if not m.get("skipped", 0.0)] or host
  avg = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "skipped"}
  if not all(np.isfinite(v) for v in avg.values()):
    if loop.nonfinite == "skip":
      avg = {k: v for k, v in avg.items() if np.isfinite(v)}
    else:
      raise NonFiniteError(
          f"{loop.name}: non-finite loss or gradient between steps {step - len(host) + 1} and {step}: "
          f"{avg}; the last checkpoint ({loop.ckpt_dir}) is kept{loop.hint}"
      )
  if skipped and record:
    log.warning("%s: skipped %d non-finite step(s) up to step %d", loop.name, skipped, step)
  if record:
    avg["lr"] = float(loop.lr(step - 1))
    avg["epoch"] = step / loop.schedule.steps_per_epoch
    avg["skipped_steps"] = float(skipped)
  return avg, skipped


@contextlib.contextmanager
def _termination_flag():
  """Yields a callable telling whether SIGTERM or SIGINT arrived; the loop saves and stops at the
  next step boundary. A second signal falls through to the previous handler (a stuck run can still
  be interrupted). Multi-process runs use JAX's preemption sync point instead (every process must
  stop at the same step), so nothing is installed there, nor off the main thread."""
  got: list[int] = []
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return
  previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

  def handler(signum, frame):
    if got:
      prev = previous[signum]
      signal.signal(signum, prev)
      if callable(prev):
        prev(signum, frame)
      else:
        os.kill(os.getpid(), signum)
      return
    got.append(signum)
    log.warning("%s received: saving a checkpoint at the end of this step", signal.Signals(signum).name)

  for s in previous:
    signal.signal(s, handler)
  try:
    yield lambda: bool(got)
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
