"""Where a --config value points and what it holds: a path, or a config shipped with the package by
its name, with an optional `:variant` (configs/*.py define get_config(variant) and VARIANTS)."""

import importlib.util
import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# configs/ of a source checkout (and of an editable install), then the copy an installed package
# ships as cpal_jax/configs.
CONFIG_DIRS = (os.path.join(os.path.dirname(_PACKAGE), "configs"), os.path.join(_PACKAGE, "configs"))


def config_file(value: str) -> str:
  """The file a --config value names, `:variant` kept: a path as given when it exists (relative to
  the current folder), else a config shipped with the package by its name (`voc`, `voc.py`,
  `configs/voc.py` from any folder)."""
  path, sep, variant = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.basename(path)
  name = name if name.endswith(".py") else f"{name}.py"
  for d in CONFIG_DIRS:
    if os.path.isfile(os.path.join(d, name)):
      return os.path.join(d, name) + sep + variant
  return value  # ml_collections reports the missing file


def shipped() -> list[str]:
  """The names of the configs the package ships."""
  return sorted(f[:-3] for d in CONFIG_DIRS if os.path.isdir(d) for f in os.listdir(d) if f.endswith(".py"))


def module(path: str):
  """A config file executed as a module (its get_config and VARIANTS)."""
  spec = importlib.util.spec_from_file_location("_config_" + os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(value: str):
  """The config a --config value names (`path[:variant]`, or a packaged name such as `voc`)."""
  path, _, variant = config_file(value).partition(":")
  mod = module(path)
  return mod.get_config(variant) if variant else mod.get_config()
