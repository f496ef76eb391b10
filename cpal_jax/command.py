"""What every command-line program of the package shares: the --config flag and logging. Flags exist
only when a module runs as a program, so importing the library defines none."""

import logging
import os

from absl import logging as absl_logging
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_logging() -> None:
  # Our progress lines at INFO; the libraries' (orbax, absl, jax) only when something is wrong.
  absl_logging.set_verbosity(absl_logging.WARNING)
  pkg = logging.getLogger("cpal_jax")
  if not pkg.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    pkg.addHandler(handler)
  pkg.setLevel(logging.INFO)
  pkg.propagate = False


def define_config_flag(help_text: str, config_file: str = "synthetic.py"):
  """--config (flags exist only when a module runs as a program, so library imports stay clean)."""
  return config_flags.DEFINE_config_file(
      "config", os.path.join(_REPO, "configs", config_file), help_text, lock_config=True
  )
