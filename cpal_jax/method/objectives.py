"""The training objective of each method and the life cycle of its state (CPAL's bank and centres).

The train loop only calls these: losses of a forward pass, the state update after the step, and
the epoch-start hook (k-means). cam/sipe have no state ({}).
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cpal_jax.method import cpal, sipe

METHODS = ("cam", "sipe", "cpal")


def check(config) -> None:
  if config.method.name not in METHODS:
    raise ValueError(f"method.name={config.method.name!r} is not available; choose one of {METHODS}")


def init_state(config, feat_dim: int, num_devices: int):
  if config.method.name != "cpal":
    return {}
  p = config.method.cpal
  return cpal.init_state(
      config.data.num_classes - 1, p.capacity, feat_dim, p.num_clusters, pad_to=num_devices
  )


def state_sharding(config, mesh, abstract_extra):
  """CPAL's state is sharded along its (padded) class axis: each device holds and clusters its
  own classes' banks."""
  if config.method.name != "cpal":
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_extra)
  return jax.tree.map(lambda _: NamedSharding(mesh, P("data")), abstract_extra)


def compute_losses(config, out: dict, features, labels, valid, extra):
  """Loss terms of one forward pass and what the post-step update needs.

  features: the projected features CPAL's prototypes live in; valid: [B, h, w] real pixels.
  """
  m = config.method
  terms = {"cls": sipe.multilabel_soft_margin(out["score"], labels)}
  total = m.cls_weight * terms["cls"]
  aux = {}
  if m.name == "sipe" or (m.name == "cpal" and m.cpal.keep_sipe_gsc):
    mask = sipe.label_mask(valid, labels)
    maps = sipe.sipe_maps(out["cam"], out["hie"], out["x4"], mask, mask_cam=True)
    terms["gsc"] = sipe.gsc_loss(maps["norm_cam"], maps["is_cam"])
    total = total + m.gsc_weight * terms["gsc"]
  if m.name == "cpal":
    maps = cpal.cpal_maps(out["cam"], features, labels, valid, extra, m.cpal, bg_feature=out["x4"])
    if m.cpal.self_loss:
      terms["self"] = cpal.self_loss(maps["norm_cam"], maps["pacam"], maps["loss_mask"])
      total = total + m.cpal.self_weight * terms["self"]
    aux = {"protos": maps["protos"], "proto_valid": maps["proto_valid"]}
    terms["ready_classes"] = jnp.sum(extra.ready[: labels.shape[1]])
  terms["total"] = total
  return terms, aux


def after_step(config, extra, aux):
  if config.method.name != "cpal":
    return extra
  return cpal.push_prototypes(extra, aux["protos"], aux["proto_valid"])


def recluster_due(config, step: int, steps_per_epoch: int) -> bool:
  """Whether the context prototypes are rebuilt before `step` (METHOD.md 3.4 cold start)."""
  if config.method.name != "cpal" or step == 0:
    return False
  p = config.method.cpal
  if step % steps_per_epoch == 0:
    return True
  in_first_epoch = step < steps_per_epoch
  return p.cold_start == "steps" and in_first_epoch and step % p.recluster_steps == 0


def make_recluster(config, sharding):
  p = config.method.cpal

  def run(extra, key):
    return cpal.recluster(extra, key, p)

  return jax.jit(run, in_shardings=(sharding, None), out_shardings=sharding)


def bank_fill(extra, num_fg: int) -> dict:
  """Host-side figures of the bank for logs and the summary (padding rows excluded)."""
  if not isinstance(extra, cpal.CPALState):
    return {}
  count = jax.device_get(extra.bank.count)[:num_fg]
  ready = jax.device_get(extra.ready)[:num_fg]
  return {
      "bank/min_fill": float(count.min()),
      "bank/mean_fill": float(count.mean()),
      "bank/ready_classes": float(ready.sum()),
  }
