"""Stage train_cam: the CAM network (plain CAM or SIPE) trained from image-level labels.

One pure step `(state, batch, key) -> (state, metrics)`, jitted once with explicit shardings and
a donated state; the loop around it feeds global batches, logs, checkpoints (state + data iterator)
and resumes from the workdir.
"""

import dataclasses
import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cpal_jax import checkpointing, image_ops, reporting
from cpal_jax.data import pipeline
from cpal_jax.method import sipe
from cpal_jax.models import cam_net, pretrained
from cpal_jax.parallel import sharding
from cpal_jax.train import optim, state as state_lib

METHODS = ("cam", "sipe")

log = logging.getLogger(__name__)


def compute_losses(method_cfg, out: dict, labels: jnp.ndarray, valid: jnp.ndarray) -> dict:
  """Loss terms of one forward pass. valid: [B, h, w] real-pixel mask at the CAM's resolution."""
  terms = {"cls": sipe.multilabel_soft_margin(out["score"], labels)}
  total = method_cfg.cls_weight * terms["cls"]
  if method_cfg.name == "sipe":
    mask = sipe.label_mask(valid, labels)
    maps = sipe.sipe_maps(out["cam"], out["hie"], out["x4"], mask, mask_cam=True)
    terms["gsc"] = sipe.gsc_loss(maps["norm_cam"], maps["is_cam"])
    total = total + method_cfg.gsc_weight * terms["gsc"]
  elif method_cfg.name != "cam":
    raise ValueError(f"method.name={method_cfg.name!r} is not available; choose one of {METHODS}")
  terms["total"] = total
  return terms


def make_train_step(model, tx: optax.GradientTransformation, method_cfg):

  def train_step(state: state_lib.TrainState, batch: dict, key: jax.Array):
    del key  # cam/sipe are deterministic; the regularisers that sample draw from it
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    labels = batch["label"].astype(jnp.float32)

    def loss_fn(params):
      out = model.apply({"params": params, "batch_stats": state.batch_stats}, images)
      h, w = out["cam"].shape[1:3]
      valid = image_ops.resize_nearest(batch["valid"].astype(jnp.float32)[..., None], (h, w))[..., 0]
      terms = compute_losses(method_cfg, out, labels, valid)
      return terms["total"], terms

    (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


class NonFiniteError(FloatingPointError):
  pass


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the loop, the tests and the inference stages need from one config."""

  model: cam_net.CAMNet
  schedule: pipeline.Schedule
  step_fn: Callable  # jitted (state, batch, key) -> (state, metrics)
  abstract_state: state_lib.TrainState  # shapes, dtypes and shardings: enough to restore
  init_state: Callable[[], state_lib.TrainState]  # a fresh (or pretrained) sharded state


def build(config, mesh, num_train: int) -> Setup:
  if config.method.name not in METHODS:
    raise ValueError(f"method.name={config.method.name!r} is not available; choose one of {METHODS}")
  schedule = pipeline.make_schedule(config, num_train)
  sharding.check_batch(config.train.batch_size, mesh)
  model = cam_net.from_config(config)
  repl = sharding.replicated(mesh)
  dummy = jnp.zeros((1, config.train.crop_size, config.train.crop_size, 3), jnp.float32)
  key = jax.random.key(config.seed)
  abstract_vars = jax.eval_shape(model.init, key, dummy)
  tx = optim.make_optimizer(
      config.train, schedule.num_steps, abstract_vars["params"], config.model.detach_after
  )

  def fresh(variables):
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]),
        extra={},
    )

  abstract = jax.eval_shape(lambda: fresh(abstract_vars))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)

  def init_state():
    variables = jax.jit(model.init, out_shardings=repl)(key, dummy)
    if config.model.pretrained:
      variables, n = pretrained.load_into(variables, config.model.pretrained, prefix="backbone")
      log.info("loaded %d tensors from %s", n, config.model.pretrained)
    return jax.jit(fresh, out_shardings=repl)(variables)

  step_fn = jax.jit(
      make_train_step(model, tx, config.method),
      in_shardings=(repl, sharding.batch_sharded(mesh), repl),
      out_shardings=(repl, repl),
      donate_argnums=(0,),
  )
  return Setup(model, schedule, step_fn, abstract, init_state)


def ckpt_dir(workdir: str) -> str:
  return os.path.join(workdir, "cam", "ckpt")


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the CAM network; returns the stage's summary entries."""
  mesh = sharding.make_mesh(config.mesh.data)
  source = pipeline.make_source(config, config.data.train_split)
  setup = build(config, mesh, len(source))
  schedule, step_fn = setup.schedule, setup.step_fn
  data_iter = pipeline.train_iterator(config, source, schedule, jax.process_index(), jax.process_count())

  ckpt = checkpointing.Checkpointer(ckpt_dir(workdir), keep=config.train.ckpt_keep)
  meta = checkpointing.fingerprint(config, {"train.num_steps": schedule.num_steps})
  start = ckpt.latest_step() or 0
  if start:
    checkpointing.check_compatible(ckpt.restore_meta(start), meta, ckpt.directory)
    state, _ = ckpt.restore(start, setup.abstract_state, data_iter)
    log.info("resumed from step %d in %s", start, ckpt.directory)
  else:
    state = setup.init_state()
  stop = min(config.train.stop_at_step or schedule.num_steps, schedule.num_steps)

  writer = reporting.ScalarWriter(os.path.join(workdir, "cam", "tb"))
  base_key = jax.random.key(config.seed + 1)
  bar = reporting.progress(stop, "train_cam", initial=start)
  t0, last, pending = time.time(), {}, []
  for step in range(start, stop):
    batch = sharding.global_batch(next(data_iter), mesh)
    state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
    pending.append(metrics)
    bar.update(1)
    done = step + 1
    if done % config.train.log_every == 0 or done == stop:
      last = _log(pending, done, schedule, config, writer, bar)
      pending = []
    if done % config.train.ckpt_every == 0 and done != stop:
      ckpt.save(done, state, data_iter, meta)
  bar.close()
  if stop > start or start == 0:
    ckpt.save(stop, state, data_iter, meta)
  ckpt.close()
  writer.close()
  secs = time.time() - t0
  return {
      "train_cam": {
          "steps": stop,
          "num_steps": schedule.num_steps,
          "epochs": stop / schedule.steps_per_epoch,
          "final_loss": last.get("loss/total"),
          "images_per_second": (stop - start) * schedule.global_batch / secs if stop > start else None,
      },
  }


def _log(pending: list, step: int, schedule, config, writer, bar) -> dict:
  """Averages the metrics since the last log; stops on a non-finite loss with the step range."""
  host = jax.device_get(pending)
  avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
  if not all(np.isfinite(v) for v in avg.values()):
    raise NonFiniteError(
        f"non-finite loss or gradient between steps {step - len(host) + 1} and {step}: "
        f"{avg}; the last checkpoint is kept"
    )
  avg["lr/backbone"] = float(
      optim.poly(config.train.lr, schedule.num_steps, config.train.poly_power)(step - 1)
  )
  avg["epoch"] = step / schedule.steps_per_epoch
  writer.scalars(step, avg)
  bar.set_postfix(loss=f"{avg['loss/total']:.4f}", epoch=f"{avg['epoch']:.2f}")
  return avg


def load_params(config, workdir: str, mesh):
  """The final trained variables of the CAM stage (for inference stages)."""
  ckpt = checkpointing.Checkpointer(ckpt_dir(workdir), keep=config.train.ckpt_keep, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"no CAM checkpoint in {ckpt.directory}: run the train_cam stage first "
        "(--config.stages=train_cam,...)"
    )
  source_len = len(pipeline.make_source(config, config.data.train_split))
  setup = build(config, mesh, source_len)
  state, _ = ckpt.restore(step, setup.abstract_state)
  ckpt.close()
  return setup.model, {"params": state.params, "batch_stats": state.batch_stats}, step
