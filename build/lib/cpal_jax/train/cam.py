"""Stage train_cam: the CAM network (plain CAM or SIPE) trained from image-level labels.

One pure step `(state, batch, key) -> (state, metrics)`, jitted once with explicit shardings and
a donated state; the loop around it feeds global batches, logs, checkpoints (state + data iterator)
and resumes from the workdir.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from cpal_jax import image_ops, paths
from cpal_jax.data import pipeline
from cpal_jax.method import objectives, ppc
from cpal_jax.models import cam_net
from cpal_jax.parallel import sharding
from cpal_jax.train import loop, optim, state as state_lib, trainer

def make_train_step(model, tx: optax.GradientTransformation, config):

  def second_view(params, batch_stats, images, valid_px):
    """PPC's view 2: the same crop, smaller (docs/method.md 4.2), through the same network. BatchNorm
    statistics chain through both passes, as the reference's two forward calls update them."""
    size = ppc.view2_size(images.shape[1:3], cam_net.output_stride(config), config.method.ppc)
    images2, valid2 = ppc.second_view(images, valid_px, size)
    out2, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats}, images2, train=True, mutable=["batch_stats"]
    )
    valid2 = image_ops.resize_nearest(valid2[..., None], out2["cam"].shape[1:3])[..., 0]
    view2 = {
        **out2,
        "features": cam_net.projected_features(config, out2),
        "valid": valid2,
        "image_size": size,
    }
    return view2, new_vars

  def train_step(state: state_lib.TrainState, batch: dict, key: jax.Array):
    # key: cam/sipe/cpal are deterministic and never read it; ppc samples pixels with it.
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    labels = batch["label"].astype(jnp.float32)

    def loss_fn(params):
      out, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      h, w = out["cam"].shape[1:3]
      valid = image_ops.resize_nearest(batch["valid"].astype(jnp.float32)[..., None], (h, w))[..., 0]
      feats = cam_net.projected_features(config, out)
      view2 = None
      if objectives.needs_second_view(config):
        view2, new_vars = second_view(params, new_vars["batch_stats"], images, batch["valid"])
      terms, aux = objectives.compute_losses(
          config, out, feats, labels, valid, state.extra, view2=view2, key=key
      )
      return terms["total"], (terms, aux, new_vars["batch_stats"])

    (_, (terms, aux, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v for k, v in terms.items() if k != "ready_classes"}
    metrics["grad_norm"] = optax.tree.norm(grads)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        batch_stats=batch_stats,
        extra=objectives.after_step(config, state.extra, aux),
    )
    return new_state, metrics

  return train_step


def fingerprint(config, num_steps: int) -> dict:
  """The config keys a resumed CAM run must share with its checkpoint."""
  keys = ["data.name", "data.num_classes", "model.backbone", "model.strides", "model.side_dims"]
  keys += ["model.batch_norm", "method.name", "train.batch_size", "seed"]
  dilations = tuple(config.model.get("dilations", (1, 1, 1, 1)))
  # None for the default keeps checkpoints written before this key resumable.
  extra = {"model.dilations": None if dilations == (1, 1, 1, 1) else list(dilations)}
  if config.method.name == "cpal":
    # The support bank and its centres are part of the state: their shapes must match.
    cpal = ["capacity", "num_clusters", "proj_head", "proj_dim"]
    extra.update(trainer.fingerprint(config, [f"method.cpal.{k}" for k in cpal]))
    # bank_bg adds the background row to the bank; the other modes share one shape, and None for
    # them keeps checkpoints written before this key resumable.
    bg_mode = config.method.cpal.bg_mode
    extra["method.cpal.bg_mode"] = bg_mode if bg_mode == "bank_bg" else None
  extra["train.num_steps"] = num_steps
  return trainer.fingerprint(config, keys, extra)


def check_resume(config, workdir: str, num_train: int) -> None:
  num_steps = pipeline.make_schedule(config.train, num_train).num_steps
  trainer.check_resume(paths.cam_ckpt(workdir), fingerprint(config, num_steps))


def build(config, mesh, num_train: int) -> trainer.Setup:
  objectives.check(config)
  loop.check_nonfinite_policy(config.train.nonfinite, "train.nonfinite")
  schedule = pipeline.make_schedule(config.train, num_train)
  sharding.check_batch(config.train.batch_size, mesh)
  model = cam_net.from_config(config)
  crop = config.train.crop_size
  dummy = jnp.zeros((1, crop, crop, 3), jnp.float32)
  abstract_vars = jax.eval_shape(model.init, jax.random.key(config.seed), dummy)
  feat_dim = cam_net.projected_features(config, jax.eval_shape(model.apply, abstract_vars, dummy)).shape[-1]
  num_devices = mesh.shape[sharding.DATA]

  setup = trainer.build(
      model,
      mesh,
      seed=config.seed,
      crop_size=crop,
      make_tx=lambda v: optim.make_optimizer(
          config.train, schedule.num_steps, v["params"], config.model.detach_after
      ),
      make_step=lambda tx: make_train_step(model, tx, config),
      nonfinite=config.train.nonfinite,
      keyed=True,
      load=trainer.backbone_loader(config.model.pretrained, "train_cam"),
      extra=lambda: objectives.init_state(config, feat_dim, num_devices),
      extra_sharding=lambda abstract: objectives.state_sharding(config, mesh, abstract),
  )
  recluster = None
  if config.method.name == "cpal":
    recluster = objectives.make_recluster(config, setup.shardings.extra)
  return dataclasses.replace(setup, schedule=schedule, recluster=recluster)


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the CAM network; returns the stage's summary entries."""
  mesh = sharding.make_mesh(config.mesh.data)
  source = pipeline.make_source(config, config.data.train_split)
  setup = build(config, mesh, len(source))
  schedule = setup.schedule
  data_iter = pipeline.train_iterator(config, source, schedule, jax.process_index(), jax.process_count())
  t = config.train
  dirs = (paths.cam_ckpt(workdir), paths.cam_tb(workdir))
  spec = trainer.loop_spec("train_cam", t, schedule, *dirs, fingerprint(config, schedule.num_steps))
  base_key = jax.random.key(config.seed + 1)
  kmeans_key = jax.random.key(config.seed + 2)

  def before_step(state, step):
    if objectives.recluster_due(config, step, schedule.steps_per_epoch):
      state = state.replace(extra=setup.recluster(state.extra, jax.random.fold_in(kmeans_key, step)))
    return state

  def after_log(state, step, writer):
    writer.scalars(step, objectives.bank_fill(state.extra, config.data.num_classes - 1))

  res = trainer.fit(
      spec,
      setup,
      data_iter,
      mesh,
      t.stop_at_step,
      lambda state, batch, step: setup.step_fn(state, batch, jax.random.fold_in(base_key, step)),
      before_step=before_step,
      after_log=after_log,
  )
  fill = objectives.bank_fill(res.state.extra, config.data.num_classes - 1)
  return {"train_cam": trainer.summary(res, schedule, **fill)}
