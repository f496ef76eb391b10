"""The support bank's ring buffer against a plain-Python FIFO that pushes entries one at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cpal_jax.method import bank as bank_lib

push = jax.jit(bank_lib.push)  # op-by-op dispatch is slower than compiling here


class RefBank:
  """One list of slots per class, written one entry at a time: the semantics push must match."""

  def __init__(self, k_pad, capacity, dim):
    self.feats = np.zeros((k_pad, capacity, dim), np.float32)
    self.ptr = np.zeros(k_pad, np.int64)
    self.count = np.zeros(k_pad, np.int64)
    self.capacity = capacity

  def push(self, protos, valid):
    for n in range(protos.shape[0]):
      for k in range(protos.shape[1]):
        if valid[n, k]:
          self.feats[k, self.ptr[k]] = protos[n, k]
          self.ptr[k] = (self.ptr[k] + 1) % self.capacity
          self.count[k] = min(self.count[k] + 1, self.capacity)

  def mean(self):
    out = np.zeros(self.feats.shape[::2])
    for k in range(self.feats.shape[0]):
      if self.count[k]:
        out[k] = self.feats[k, : self.count[k]].astype(np.float64).mean(0)
    return out


def assert_same(bank, ref):
  np.testing.assert_array_equal(np.asarray(bank.feats), ref.feats)
  np.testing.assert_array_equal(np.asarray(bank.ptr), ref.ptr)
  np.testing.assert_array_equal(np.asarray(bank.count), ref.count)


def test_create_pads_class_axis():
  b = bank_lib.create(20, 7, 3, pad_to=8)
  assert b.feats.shape == (24, 7, 3) and b.feats.dtype == jnp.float32
  assert b.ptr.shape == b.count.shape == (24,) and b.ptr.dtype == jnp.int32
  assert bank_lib.create(16, 7, 3, pad_to=8).feats.shape[0] == 16
  assert bank_lib.create(5, 7, 3).feats.shape[0] == 5


@pytest.mark.parametrize("capacity", [1, 4, 9])
def test_push_matches_one_by_one(capacity):
  # Class 5 is never pushed; classes 6, 7 are padding; N up to 3 x capacity makes pushes larger
  # than the buffer, which must keep the last `capacity` entries.
  rng = np.random.default_rng(capacity)
  k, k_pad, dim = 6, 8, 3
  b = bank_lib.create(k, capacity, dim, pad_to=8)
  ref = RefBank(k_pad, capacity, dim)
  for n in (2, 3 * capacity + 1, 5, 1, 2 * capacity):
    protos = rng.normal(size=(n, k, dim)).astype(np.float32)
    valid = rng.random((n, k)) < 0.6
    valid[:, 5] = False
    valid[:, 0] = True  # at least one class always fills in a single push
    b = push(b, protos, valid)
    ref.push(protos, valid)
    assert_same(b, ref)
  assert int(b.count[5]) == 0
  assert not np.asarray(b.feats[k:]).any()  # padding rows stay zero


def test_mean_over_filled_slots():
  rng = np.random.default_rng(1)
  k, capacity, dim = 5, 6, 4
  b = bank_lib.create(k, capacity, dim, pad_to=4)
  ref = RefBank(8, capacity, dim)
  for n in (3, 4, 2):
    protos = rng.normal(size=(n, k, dim)).astype(np.float32)
    valid = rng.random((n, k)) < 0.5
    valid[:, 2] = False
    valid[:, 1] = True
    b = push(b, protos, valid)
    ref.push(protos, valid)
  m = np.asarray(bank_lib.mean(b))
  np.testing.assert_allclose(m, ref.mean(), atol=1e-6)
  assert not m[2].any() and not m[k:].any()  # empty and padding classes give 0, not NaN


def test_mean_ignores_stale_slots():
  # Unfilled slots can hold anything (e.g. after a restore into a larger bank); mean must not read them.
  b = bank_lib.create(2, 4, 2)
  b = b.replace(feats=b.feats.at[:, 1:].set(1e30))
  b = push(b, jnp.ones((1, 2, 2)), jnp.array([[True, False]]))
  np.testing.assert_array_equal(np.asarray(bank_lib.mean(b)), [[1.0, 1.0], [0.0, 0.0]])


def test_push_rejects_too_many_classes():
  with pytest.raises(ValueError, match="classes"):
    bank_lib.push(bank_lib.create(3, 4, 2), jnp.zeros((1, 4, 2)), jnp.ones((1, 4), bool))


def test_sharded_push_matches_unsharded():
  if jax.device_count() < 8:  # 24 padded classes over 8 devices, 3 each, as asserted below
    pytest.skip(
        f"needs 8 devices, has {jax.device_count()}: tests/conftest.py sets "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8 unless XLA_FLAGS is already set"
    )
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  bank_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), bank_lib.partition_spec("data"))
  replicated = NamedSharding(mesh, P())
  sharded_push = jax.jit(
      bank_lib.push, in_shardings=(bank_sharding, replicated, replicated), out_shardings=bank_sharding
  )
  rng = np.random.default_rng(2)
  k, capacity, dim = 20, 5, 4
  b_plain = bank_lib.create(k, capacity, dim, pad_to=8)
  assert b_plain.feats.shape[0] == 24
  b_sharded = jax.device_put(b_plain, bank_sharding)
  for n in (4, 8, 3):
    protos = rng.normal(size=(n, k, dim)).astype(np.float32)
    valid = rng.random((n, k)) < 0.5
    b_plain = push(b_plain, protos, valid)
    b_sharded = sharded_push(b_sharded, protos, valid)
  assert b_sharded.feats.sharding.is_equivalent_to(bank_sharding.feats, 3)
  assert len(b_sharded.feats.addressable_shards) == 8
  assert b_sharded.feats.addressable_shards[0].data.shape == (3, capacity, dim)
  for a, e in zip(jax.tree.leaves(b_sharded), jax.tree.leaves(b_plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
