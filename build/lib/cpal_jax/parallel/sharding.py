"""The device mesh and the few shardings the pipeline uses (data parallel over a 'data' axis)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(num_data: int = -1) -> Mesh:
  devices = jax.devices()
  n = len(devices) if num_data in (-1, 0, None) else num_data
  if n > len(devices) or len(devices) % n:
    raise ValueError(f"mesh.data={num_data} does not fit {len(devices)} devices")
  return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA))


def global_batch(local: dict, mesh: Mesh) -> dict:
  """This process's numpy slice of a batch -> global jax.Arrays sharded over the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def check_batch(batch_size: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA]
  if batch_size % n:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the {n} devices of the data axis")


def local_mesh(num_data: int = -1) -> Mesh:
  """This process's devices on the data axis: per-image stages (inference, export) run
  independently in every process, each on its own share of the images."""
  devices = jax.local_devices()
  n = len(devices) if num_data in (-1, 0, None) else num_data
  if n > len(devices) or len(devices) % n:
    raise ValueError(f"mesh.data={num_data} does not fit the {len(devices)} local devices")
  return Mesh(np.asarray(devices[:n]), (DATA,))
