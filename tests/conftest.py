"""Eight fake CPU devices for the sharding tests; set before jax is imported anywhere."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "configs"))

import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA's optimisations off for a module of tiny models, where compiling costs far more than
  running; restored afterwards so other modules run as configured."""
  import jax

  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
