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


def file_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """Each tensor's shape, read from the file's headers without its data (preflight on 100+ MB files)."""
  import json
  import struct
  import zipfile

  if not os.path.exists(path):
    raise FileNotFoundError(f"pretrained weights not found: {path}")
  if path.endswith(".npz"):
    out = {}
    with zipfile.ZipFile(path) as z:
      for name in z.namelist():
        with z.open(name) as f:
          fmt = np.lib.format
          read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
          shape, _, _ = read(f)
        out[name[: -len(".npy")] if name.endswith(".npy") else name] = tuple(shape)
    return out
  if path.endswith(".safetensors"):
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
  raise ValueError(f"unsupported weight file {path}: use .npz or .safetensors (convert .pth first)")


def _placement(file_keys, prefix: str):
  """file key -> model key: `prefix` inserted after the collection name, unless the file's keys
  already carry it (a whole network's file, e.g. a converted SIPE model)."""
  if prefix and any(k.split("/")[1:2] == [prefix] for k in file_keys):
    prefix = ""
  out = {}
  for key in file_keys:
    col, _, rest = key.partition("/")
    out[key] = f"{col}/{prefix}/{rest}" if prefix else key
  return out


def _problem(source: str, key: str, target: str, model_shapes: dict, shape) -> str | None:
  if target not in model_shapes:
    return (
        f"{source}: tensor {key!r} has no place in the model ({target!r} missing); "
        "was it converted for another backbone?"
    )
  if tuple(model_shapes[target]) != tuple(shape):
    return (
        f"{source}: {key!r} has shape {tuple(shape)}, the model expects {tuple(model_shapes[target])}; "
        "converted for another backbone?"
    )
  return None


def mismatches(abstract_variables: dict, path: str, prefix: str = "", whole: bool = False) -> list[str]:
  """What load_into would refuse, from the file's headers and the model's abstract variables
  (jax.eval_shape of its init): tensors with no place or another shape, and with `whole` the model
  tensors the file lacks. [] when it loads."""
  shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(abstract_variables).items()}
  found = file_shapes(path)
  placed = _placement(found, prefix)
  out = [p for k, t in placed.items() if (p := _problem(path, k, t, shapes, found[k]))]
  if whole and out and not prefix:
    as_backbone = _placement(found, "backbone")
    if not any(_problem(path, k, t, shapes, found[k]) for k, t in as_backbone.items()):
      placed, out = as_backbone, []  # a backbone's file: say what is missing, below
  if whole and not out and len(placed) < len(shapes):
    missing = sorted(set(shapes) - set(placed.values()))
    out.append(
        f"{path}: holds {len(placed)} of the network's {len(shapes)} tensors (missing e.g. {missing[0]!r}); "
        "a whole network is needed (python -m cpal_jax.convert_weights of a SIPE checkpoint), not a backbone"
    )
  return out


def load_flat_into(variables: dict, flat_file: dict, source: str, prefix: str = "") -> tuple[dict, int]:
  """load_into for tensors already in memory ('/'-joined keys as in the files); `source` names them
  in errors."""
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(jax.device_get(variables)).items()}
  shapes = {k: v.shape for k, v in flat.items()}
  for key, target in _placement(flat_file, prefix).items():
    problem = _problem(source, key, target, shapes, flat_file[key].shape)
    if problem:
      raise (KeyError if target not in flat else ValueError)(problem)
    flat[target] = np.asarray(flat_file[key], dtype=flat[target].dtype)
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return tree, len(flat_file)
