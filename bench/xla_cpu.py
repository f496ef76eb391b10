"""XLA's CPU thread count for a bench process, so its figures compare with a reference run on the same
number of threads.

XLA has no flag for its CPU thread pool: it sizes the pool from the CPUs the process may run on. So
the process is pinned to `threads` CPUs (os.sched_setaffinity), which also binds every thread it
starts later; with one thread the Eigen pool is switched off as well. (An earlier version appended
`intra_op_parallelism_threads=N` to XLA_FLAGS: not an XLA flag, silently ignored after another flag.)
"""

import os
import sys


def limit_threads(threads: int) -> None:
  """Call before jax is imported: XLA reads the CPU count and its flags once."""
  if "jax" in sys.modules:
    raise RuntimeError("limit_threads must run before jax is imported")
  allowed = sorted(os.sched_getaffinity(0))
  if threads < len(allowed):
    os.sched_setaffinity(0, allowed[:threads])
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}"
  ).strip()
