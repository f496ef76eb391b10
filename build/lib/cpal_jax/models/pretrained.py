"""Loading converted weights into a variable tree, without unpickling anything.

Files are .npz (numpy.load with allow_pickle=False) or .safetensors whose keys are '/'-joined paths
into the Flax variables, e.g. `params/backbone/layer1_0/conv1/kernel` or
`batch_stats/backbone/bn1/mean`. Keys absent from the file keep their initial values (new heads);
a key in the file that the model does not have, or a shape mismatch, is an error.
"""

import os

import jax
import numpy as np
from flax import traverse_util


def read_flat(path: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained weights not found: {path} (config key model.pretrained)")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return load_file(path)
  raise ValueError(f"unsupported weight file {path}: use .npz or .safetensors (convert .pth first)")


def load_into(variables: dict, path: str, prefix: str = "") -> tuple[dict, int]:
  """Returns (variables with the file's tensors, number of tensors loaded).

  prefix: inserted after the collection name, e.g. 'backbone' to load a bare ResNet checkpoint
  (`params/layer1_0/...`) into a CAM network; a file whose keys already start with it (a whole
  CAM network, `params/backbone/...` and its heads) loads as it is.
  """
  return load_flat_into(variables, read_flat(path), path, prefix)


def load_flat_into(variables: dict, flat_file: dict, source: str, prefix: str = "") -> tuple[dict, int]:
  """load_into for tensors already in memory ('/'-joined keys as in the files); `source` names them
  in errors."""
  path = source
  if prefix and any(k.split("/")[1:2] == [prefix] for k in flat_file):
    prefix = ""  # a whole network's file (a converted SIPE model): its keys already carry the prefix
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(jax.device_get(variables)).items()}
  loaded = 0
  for key, value in flat_file.items():
    col, _, rest = key.partition("/")
    target = f"{col}/{prefix}/{rest}" if prefix else key
    if target not in flat:
      raise KeyError(
          f"{path}: tensor {key!r} has no place in the model ({target!r} missing); "
          "was it converted for another backbone?"
      )
    if tuple(flat[target].shape) != tuple(value.shape):
      raise ValueError(
          f"{path}: {key!r} has shape {tuple(value.shape)}, the model expects " f"{tuple(flat[target].shape)}"
      )
    flat[target] = np.asarray(value, dtype=flat[target].dtype)
    loaded += 1
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return tree, loaded
