"""The CPAL train step compiled (not run) for a 2x4 mesh of fake CPU devices: the multi-host layout of
2 hosts x 4 local devices, the batch split over both axes jointly, parameters replicated and the
class banks split over all 8 devices. Compiling proves the step has no single-axis assumption
(XLA's SPMD partitioner inserts the collectives); the shardings of the executable are checked.

That 8 devices and 1 reach the same CPAL state (banks, centres, parameters) over a few steps with
k-means in between is tests/test_train.py::test_cpal_eight_devices_match_one."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cpal_jax.data import pipeline
from cpal_jax.parallel import sharding
from cpal_jax.train import cam as cam_stage
from test_train import cpal_config

HOSTS, LOCAL = 2, 4
BATCH_AXES = ("replica", sharding.DATA)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def mesh_2x4() -> Mesh:
  # jax.devices() lists each process's devices together: row r of the mesh is host r.
  return Mesh(np.asarray(jax.devices()[: HOSTS * LOCAL]).reshape(HOSTS, LOCAL), BATCH_AXES)


def test_cpal_train_step_compiles_on_2x4_mesh():
  if jax.device_count() < HOSTS * LOCAL:
    pytest.skip("needs 8 fake CPU devices (conftest)")
  config = cpal_config(**{"mesh.data": HOSTS * LOCAL})
  source = pipeline.make_source(config, config.data.train_split)
  # The real step of build(); its 8-device data mesh pads the class axis of the banks to 16.
  setup = cam_stage.build(config, sharding.make_mesh(HOSTS * LOCAL), len(source))
  batch = next(pipeline.train_iterator(config, source, setup.schedule))

  mesh = mesh_2x4()
  repl = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(BATCH_AXES))  # leading axis over replica x data, 8 ways

  def on_2x4(sh: NamedSharding) -> NamedSharding:
    """build()'s sharding of a leaf with its data axis spread over both axes of the 2x4 mesh."""
    return NamedSharding(mesh, P(*(BATCH_AXES if a == sharding.DATA else a for a in sh.spec)))

  state_sh = jax.tree.map(lambda s: on_2x4(s.sharding), setup.abstract_state)
  batch_sh = on_2x4(sharding.batch_sharded(sharding.make_mesh(HOSTS * LOCAL)))
  step = jax.jit(
      setup.step_fn.__wrapped__,  # the function build() jits for its 1-D mesh
      in_shardings=(state_sh, batch_sh, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
  )
  shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)  # noqa: E731
  args = (
      jax.tree.map(shape, setup.abstract_state),
      jax.tree.map(shape, batch),
      jax.eval_shape(lambda: jax.random.key(0)),
  )
  compiled = step.lower(*args).compile()

  (state_in, batch_in, _), kwargs = compiled.input_shardings  # cpal never reads the key
  state_out, metrics_out = compiled.output_shardings
  assert not kwargs
  for tree in (state_in, state_out):
    for name in ("step", "params", "batch_stats", "opt_state"):
      for sh in jax.tree.leaves(getattr(tree, name)):
        assert sh.is_fully_replicated, (name, sh)
    # CPAL's state (banks, pointers, centres, means, ready flags): split along its class axis.
    extra = zip(jax.tree.leaves(tree.extra), jax.tree.leaves(setup.abstract_state.extra))
    assert all(sh.is_equivalent_to(split, a.ndim) for sh, a in extra)
    assert not tree.extra.bank.feats.is_fully_replicated
  assert all(sh.is_fully_replicated for sh in jax.tree.leaves(metrics_out))
  for k in ("image", "valid", "label"):  # the step reads these (unused inputs have no sharding)
    assert batch_in[k].is_equivalent_to(split, batch[k].ndim), k

  # Every device holds 2 of the 16 padded classes' banks and 1 of the 8 images; host r's 4 devices
  # hold images 4r..4r+3, the contiguous slice it loads (sharding.global_batch).
  k_pad, capacity, dim = setup.abstract_state.extra.bank.feats.shape
  assert k_pad == 16
  assert state_in.extra.bank.feats.shard_shape((k_pad, capacity, dim)) == (2, capacity, dim)
  image = batch_in["image"]
  assert image.shard_shape(batch["image"].shape) == (1, *batch["image"].shape[1:])
  rows = image.devices_indices_map(batch["image"].shape)
  for host in range(HOSTS):
    mine = sorted(rows[d][0].start for d in mesh.devices[host])
    assert mine == list(range(host * LOCAL, (host + 1) * LOCAL))
