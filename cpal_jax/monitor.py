"""What a running stage shows: progress bars with ETA on stderr and TensorBoard scalars, both on
process 0 only."""

import sys

import tqdm

from cpal_jax.parallel import distributed


class ScalarWriter:
  """TensorBoard event files (tensorboardX, no TensorFlow) on process 0; no-op elsewhere."""

  def __init__(self, logdir: str):
    self._w = None
    if distributed.is_main():
      from tensorboardX import SummaryWriter

      self._w = SummaryWriter(logdir)

  def scalars(self, step: int, values: dict) -> None:
    if self._w is not None:
      for k, v in values.items():
        self._w.add_scalar(k, float(v), step)

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def restart_clock(bar) -> None:
  """Starts the bar's rate and ETA from now, its count kept: called after the first step, so the
  compile time of a jitted step does not inflate the ETA."""
  done = bar.n
  bar.reset(total=bar.total)
  bar.n = bar.initial = bar.last_print_n = done
  bar.refresh()


def progress(total: int, desc: str, initial: int = 0):
  return tqdm.tqdm(
      total=total,
      initial=initial,
      desc=desc,
      dynamic_ncols=True,
      file=sys.stderr,
      disable=not distributed.is_main(),
      mininterval=1.0,
  )
