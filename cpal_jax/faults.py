"""Deterministic fault injection for the reliability suite: a named point in a stage kills the
process (or sends it a signal) when the environment asks for exactly that point.

  CPAL_JAX_FAULT=train_cam/step/3            SIGKILL after step 3 of the CAM stage
  CPAL_JAX_FAULT=train_cam/saving/2          SIGKILL while checkpoint 2 is being written (async)
  CPAL_JAX_FAULT=export/image/5:TERM         SIGTERM after the 5th exported mask
  CPAL_JAX_FAULT=train_cam/step/6@1          SIGKILL after step 6, in JAX process 1 only (the others
                                             of a multi-process run go on)

Points are cheap string comparisons; with the variable unset nothing happens.
"""

import os
import signal

_ENV = "CPAL_JAX_FAULT"


def point(name: str) -> None:
  spec = os.environ.get(_ENV)
  if not spec:
    return
  where, _, sig = spec.partition(":")
  sig, _, process = sig.partition("@")
  if "@" in where:
    where, _, process = where.partition("@")
  if where == name and (not process or _process_index() == int(process)):
    os.kill(os.getpid(), getattr(signal, f"SIG{sig or 'KILL'}"))


def _process_index() -> int:
  import jax

  return jax.process_index()
