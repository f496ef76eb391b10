"""Multi-host start-up made explicit: initialise only when asked, log and assert the topology."""

import importlib.util
import logging
import os

import jax
import numpy as np

log = logging.getLogger(__name__)

# Accelerator plugins whose presence makes a device other than the CPU JAX's default platform.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "libtpu")


def initialize(config) -> None:
  d = config.distributed
  if d.initialize:
    kwargs = {
        "coordinator_address": d.get("coordinator", "") or None,
        "num_processes": d.get("num_processes", 0) or None,
        "process_id": None if d.get("process_id", -1) < 0 else d.process_id,
    }
    if _cpu_platform():
      # Without CPU collectives a computation over several processes' CPU devices fails to compile;
      # gloo rides on the coordinator's key-value store (launch/local.sh, tests/test_multiprocess.py).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
  log.info(
      "JAX process %d/%d, %d local / %d global devices (%s)",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  if d.expect_processes and jax.process_count() != d.expect_processes:
    raise RuntimeError(
        f"expected {d.expect_processes} processes (distributed.expect_processes), "
        f"found {jax.process_count()}; is distributed.initialize set on every worker?"
    )
  if d.expect_devices and jax.device_count() != d.expect_devices:
    raise RuntimeError(
        f"expected {d.expect_devices} devices (distributed.expect_devices), found {jax.device_count()}"
    )


def _cpu_platform() -> bool:
  """Whether JAX will run on the CPU, decided before any backend exists (initialize must come first)."""
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def is_main() -> bool:
  """Process 0 writes the shared files (summaries, event logs)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process): a stage reads
  what all processes' share of the previous stage wrote only after all of them finished it."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The elementwise sum of every process's `x` (same shape everywhere), on every process: the
  confusion matrices of each process's share of the images, before any mIoU is taken."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils

  if x.dtype.kind not in "iu":
    return np.asarray(multihost_utils.process_allgather(x)).sum(0).astype(x.dtype)
  # Without jax_enable_x64 an int64 array crosses as int32 (and float64 as float32, exact only up to
  # 2^24 pixels): counts go as two int32 halves of 31 bits each, summed here in int64.
  x = x.astype(np.int64)
  halves = np.stack([x >> 31, x & (2**31 - 1)]).astype(np.int32)
  hi, lo = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64).sum(0)
  return (hi * 2**31 + lo).astype(x.dtype)


def fetch(tree):
  """device_get that also reads arrays spanning other processes' devices (CPAL's bank, sharded over
  the global mesh): those are gathered, a collective, so every process must call it together."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree.map(one, tree)


def leave_on_failure(code) -> None:
  """Ends this process at once with `code` when it fails in a multi-process run. A normal exit
  would first wait (up to 5 minutes) at JAX's shutdown barrier for the other processes, which are
  themselves waiting for this one in a collective: the launcher could not tell that it failed."""
  if code in (None, 0) or not jax.distributed.is_initialized():
    return
  import sys

  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code if isinstance(code, int) else 1)
