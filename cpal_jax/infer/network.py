"""The trained CAM network as inference reads it: parameters, BatchNorm statistics and the method
state (CPAL's banks and centres), restored without the optimiser or anything else only training
needs; or a whole network from a weight file (cam.weights)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from cpal_jax import checkpointing, paths
from cpal_jax.method import objectives
from cpal_jax.models import cam_net, pretrained
from cpal_jax.parallel import sharding

log = logging.getLogger(__name__)


def class_pad(config) -> int:
  """CPAL's class axis is padded as train_cam padded it: to the devices of its (global) mesh, of
  which inference's local mesh is a part when there are several processes."""
  return sharding.make_mesh(config.mesh.data).shape[sharding.DATA]


def spec(config, mesh):
  """(model, {"params", "batch_stats", "extra"} as shapes with their shardings over `mesh`, the
  prototype feature width)."""
  model = cam_net.from_config(config)
  dummy = jnp.zeros((1, config.train.crop_size, config.train.crop_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(config.seed), dummy)
  feat_dim = cam_net.projected_features(config, jax.eval_shape(model.apply, shapes, dummy)).shape[-1]
  extra = jax.eval_shape(lambda: objectives.init_state(config, feat_dim, class_pad(config)))
  repl = sharding.replicated(mesh)
  split = all(x.shape[0] % mesh.shape[sharding.DATA] == 0 for x in jax.tree.leaves(extra))

  def with_sharding(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)

  parts = {
      "params": with_sharding(shapes["params"], jax.tree.map(lambda _: repl, shapes["params"])),
      "batch_stats": with_sharding(shapes["batch_stats"], jax.tree.map(lambda _: repl, shapes["batch_stats"])),
      "extra": with_sharding(
          extra, objectives.state_sharding(config, mesh, extra) if split else jax.tree.map(lambda _: repl, extra)
      ),
  }
  return model, parts, feat_dim


def load(config, workdir: str, mesh):
  """(model, variables, method state, step) of the CAM stage's latest checkpoint, or of the network
  in cam.weights (step None) when set."""
  if config.cam.get("weights"):
    return load_weights(config, mesh, config.cam.weights)
  model, parts, _ = spec(config, mesh)
  if not jax.tree.leaves(parts["extra"]):
    del parts["extra"]  # SIPE, PPC and the plain CAM keep no method state
  got, step = checkpointing.restore_latest_parts(
      paths.cam_ckpt(workdir), parts, None, "run the train_cam stage first (--config.stages=train_cam,...)"
  )
  return model, {"params": got["params"], "batch_stats": got["batch_stats"]}, got.get("extra", {}), step


def load_weights(config, mesh, path: str):
  """A whole CAM network from a weight file (convert_weights of an upstream SIPE checkpoint): every
  parameter and BatchNorm statistic must be in it. CPAL's bank is not: method.cpal.refresh_bank
  builds it from the training split with these weights."""
  if config.method.name == "cpal" and not config.method.cpal.refresh_bank:
    raise ValueError(
        f"cam.weights={path} holds a network but no CPAL bank; set --config.method.cpal.refresh_bank=True "
        "to build the bank from the training split with these weights"
    )
  model, parts, feat_dim = spec(config, mesh)
  shapes = {"params": parts["params"], "batch_stats": parts["batch_stats"]}
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  flat = pretrained.read_flat(path)
  variables, n = pretrained.load_flat_into(zeros, flat, path)
  expected = len(jax.tree.leaves(zeros))
  if n != expected:
    have = {k.split("/")[1] for k in flat if "/" in k}
    raise ValueError(
        f"cam.weights={path} holds {n} of the CAM network's {expected} tensors (modules {sorted(have)}); "
        "a whole network is needed (python -m cpal_jax.convert_weights of a SIPE checkpoint), not a backbone"
    )
  log.info("read the CAM network from %s (%d tensors)", path, n)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  extra = jax.jit(
      lambda: objectives.init_state(config, feat_dim, class_pad(config)),
      out_shardings=jax.tree.map(lambda s: s.sharding, parts["extra"]),
  )()
  return model, variables, extra, None
