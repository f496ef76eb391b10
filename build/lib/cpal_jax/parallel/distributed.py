"""Multi-host start-up made explicit: initialise only when asked, log and assert the topology."""

import logging

import jax

log = logging.getLogger(__name__)


def initialize(config) -> None:
  d = config.distributed
  if d.initialize:
    jax.distributed.initialize()
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


def is_main() -> bool:
  """Process 0 writes the shared files (summaries, event logs)."""
  return jax.process_index() == 0
