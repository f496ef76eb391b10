"""CPAL's per-class support bank (docs/method.md 3.4): a FIFO ring buffer that lives in the train state.

Static shapes throughout, so pushes run inside the jitted train step. The class axis is padded to a
multiple of the device count because the bank is sharded over the mesh along it (an axis of 20
classes cannot be split over 8 devices); padding rows are never written.
"""

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P


@struct.dataclass
class Bank:
  """Ring buffers for K_pad classes.

  Slots [0, count) are the filled ones: writes start at slot 0 and only wrap once the buffer is full,
  so readers can mask with `slot < count` without knowing the write order.
  """

  feats: jax.Array  # [K_pad, capacity, dim] float32
  ptr: jax.Array  # [K_pad] int32, next slot to write
  count: jax.Array  # [K_pad] int32, filled slots (saturates at capacity)


def padded_classes(num_classes: int, pad_to: int = 1) -> int:
  return -(-num_classes // pad_to) * pad_to


def create(num_classes: int, capacity: int, dim: int, pad_to: int = 1) -> Bank:
  """An empty bank for `num_classes` foreground classes (C-1), class axis padded to `pad_to`."""
  k_pad = padded_classes(num_classes, pad_to)
  return Bank(
      feats=jnp.zeros((k_pad, capacity, dim), jnp.float32),
      ptr=jnp.zeros((k_pad,), jnp.int32),
      count=jnp.zeros((k_pad,), jnp.int32),
  )


def push(bank: Bank, protos: jax.Array, valid: jax.Array) -> Bank:
  """Appends protos[n, k] for every valid (n, k) to class k's buffer, in order of n.

  protos: [N, K, dim] with K <= K_pad (missing classes are padding, never written);
  valid: [N, K] bool. The result equals pushing the valid entries one at a time.
  """
  k_pad, capacity, _ = bank.feats.shape
  _, k, _ = protos.shape
  if k > k_pad:
    raise ValueError(f"protos have {k} classes but the bank holds {k_pad}")
  # Class-major, so the scatter below is batched over the (sharded) class axis and stays per device.
  protos = jnp.swapaxes(protos, 0, 1).astype(bank.feats.dtype)
  valid = jnp.swapaxes(valid, 0, 1).astype(bool)
  if k < k_pad:
    protos = jnp.pad(protos, ((0, k_pad - k), (0, 0), (0, 0)))
    valid = jnp.pad(valid, ((0, k_pad - k), (0, 0)))

  rank = jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1  # position among this push's entries
  total = jnp.sum(valid, axis=1, dtype=jnp.int32)
  # Entries that a later entry of the same push would overwrite are dropped, so every written slot
  # has exactly one writer (a scatter with duplicate indices has no defined winner).
  keep = valid & (rank >= (total - capacity)[:, None])
  slot = jnp.where(keep, (bank.ptr[:, None] + rank) % capacity, capacity)  # capacity = out of bounds

  feats = jax.vmap(lambda f, s, p: f.at[s].set(p, mode="drop"))(bank.feats, slot, protos)
  return Bank(
      feats=feats,
      ptr=(bank.ptr + total) % capacity,
      count=jnp.minimum(bank.count + total, capacity),
  )


def filled_mask(bank: Bank) -> jax.Array:
  """[K_pad, capacity] bool: which slots hold data."""
  return jnp.arange(bank.feats.shape[1])[None, :] < bank.count[:, None]


def mean(bank: Bank) -> jax.Array:
  """[K_pad, dim] mean of each class's filled slots; 0 for empty classes."""
  total = jnp.sum(jnp.where(filled_mask(bank)[..., None], bank.feats, 0.0), axis=1)
  return total / jnp.maximum(bank.count, 1)[:, None].astype(total.dtype)


def partition_spec(axis_name: str = "data") -> Bank:
  """PartitionSpecs that split every field along the class axis over `axis_name`."""
  return Bank(feats=P(axis_name), ptr=P(axis_name), count=P(axis_name))
