"""XLA's CPU thread pool for a bench process, so its figures compare with a reference run on the same
number of threads."""

import os
import sys


def limit_threads(threads: int) -> None:
  """Call before jax is imported: XLA reads its thread pool size once."""
  if "jax" in sys.modules:
    raise RuntimeError("limit_threads must run before jax is imported")
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + f" --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}"
      + f" intra_op_parallelism_threads={threads}"
  )
