"""The training objective of each method and the life cycle of its state (CPAL's bank and centres).

The train loop only calls these: losses of a forward pass, the state update after the step, and
the epoch-start hook (k-means). cam/sipe/ppc have no state ({}); ppc alone needs a second forward
pass (its smaller view) and the step's PRNG key (random pixel samples).
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from cpal_jax.method import cpal, ppc, sipe

METHODS = ("cam", "sipe", "cpal", "ppc")


def check(config) -> None:
  if config.method.name not in METHODS:
    raise ValueError(f"method.name={config.method.name!r} is not available; choose one of {METHODS}")


def init_state(config, feat_dim: int, num_devices: int):
  if config.method.name != "cpal":
    return {}
  p = config.method.cpal
  return cpal.init_state(
      config.data.num_classes - 1,
      p.capacity,
      feat_dim,
      p.num_clusters,
      pad_to=num_devices,
      background=p.bg_mode == "bank_bg",  # row C-1: the background bank
  )


def state_sharding(config, mesh, abstract_extra):
  """CPAL's state is sharded along its (padded) class axis: each device holds and clusters its
  own classes' banks."""
  if config.method.name != "cpal":
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_extra)
  return jax.tree.map(lambda _: NamedSharding(mesh, P("data")), abstract_extra)


def needs_second_view(config) -> bool:
  return config.method.name == "ppc"


def compute_losses(config, out: dict, features, labels, valid, extra, view2=None, key=None):
  """Loss terms of one forward pass and what the post-step update needs.

  features: the projected features CPAL's and PPC's prototypes live in; valid: [B, h, w] real
  pixels. ppc only: view2 holds the second view's network outputs plus "features" (projected),
  "valid" (real pixels on its map) and "image_size" (its input size); key drives its sampling.
  """
  m = config.method
  terms = {"cls": sipe.multilabel_soft_margin(out["score"], labels)}
  if m.name == "ppc":
    # The two-view BCE (docs/method.md 4.3).
    terms["cls"] = 0.5 * (terms["cls"] + sipe.multilabel_soft_margin(view2["score"], labels))
  total = m.cls_weight * terms["cls"]
  aux = {}
  gsc = m.name == "sipe" or (m.name == "cpal" and m.cpal.keep_sipe_gsc)
  if gsc or (m.name == "ppc" and m.ppc.keep_sipe_gsc):
    mask = sipe.label_mask(valid, labels)
    maps = sipe.sipe_maps(out["cam"], out["hie"], out["x4"], mask, mask_cam=True)
    terms["gsc"] = sipe.gsc_loss(maps["norm_cam"], maps["is_cam"])
    total = total + m.gsc_weight * terms["gsc"]
  if m.name == "cpal":
    maps = cpal.cpal_maps(out["cam"], features, labels, valid, extra, m.cpal, bg_feature=out["x4"])
    if m.cpal.self_loss:
      terms["self"] = cpal.self_loss(maps["norm_cam"], maps["pacam"], maps["loss_mask"])
      total = total + m.cpal.self_weight * terms["self"]
    if m.cpal.snclr_contrast:
      terms["snclr"] = maps["snclr"]
      total = total + m.cpal.snclr_weight * terms["snclr"]
    aux = {"protos": maps["protos"], "proto_valid": maps["proto_valid"]}
    if m.cpal.push_min_prob > 0:
      aux["score"] = out["score"]  # the push gate's class logits
    terms["ready_classes"] = jnp.sum(extra.ready[: labels.shape[1]])
  if m.name == "ppc":
    p = m.ppc
    terms.update(
        ppc.contrast_losses(
            out["cam"], features, view2["cam"], view2["features"], labels, key, p, valid=view2["valid"]
        )
    )
    total = total + terms["ppc_nce"]
    if p.er_size not in ("image", "map"):
      raise ValueError(f"method.ppc.er_size={p.er_size!r}: choose image or map")
    if p.er_weight:
      size = tuple(view2["image_size"]) if p.er_size == "image" else view2["cam"].shape[1:3]
      terms["er"] = ppc.equivariance_loss(out["cam"], view2["cam"], labels, size)
      total = total + p.er_weight * terms["er"]
  terms["total"] = total
  return terms, aux


def after_step(config, extra, aux):
  if config.method.name != "cpal":
    return extra
  return cpal.push_prototypes(
      extra, aux["protos"], aux["proto_valid"], aux.get("score"), config.method.cpal.push_min_prob
  )


def recluster_due(config, step: int, steps_per_epoch: int) -> bool:
  """Whether the context prototypes are rebuilt before `step` (docs/method.md 3.4 cold start)."""
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
  """Host-side figures of the bank for logs and the summary (padding rows excluded); with several
  processes a collective: every process calls it."""
  if not isinstance(extra, cpal.CPALState):
    return {}
  from cpal_jax.parallel import distributed

  count, ready = distributed.fetch((extra.bank.count, extra.ready))
  count, ready = count[:num_fg], ready[:num_fg]
  return {
      "bank/min_fill": float(count.min()),
      "bank/mean_fill": float(count.mean()),
      "bank/ready_classes": float(ready.sum()),
  }
