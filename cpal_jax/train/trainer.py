"""What every trainer shares (the CAM network, IRN's boundary net, DeepLab-v2, the pretraining
classifier): the state's abstract shapes and shardings, its jitted init, the jitted step, the loop
spec from a config section, and the stage summary. Each trainer keeps only its model, loss,
optimiser groups and augmentation."""

import dataclasses
import json
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from cpal_jax import checkpointing
from cpal_jax.data import pipeline
from cpal_jax.models import pretrained
from cpal_jax.parallel import sharding
from cpal_jax.train import loop, optim, state as state_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the loop, the tests and the inference stages need from one config."""

  model: Any
  step_fn: Callable  # jitted (state, batch[, key]) -> (state, metrics)
  abstract_state: state_lib.TrainState  # shapes, dtypes and shardings: enough to restore
  init_state: Callable[[], state_lib.TrainState]  # a fresh (or pretrained) sharded state
  shardings: state_lib.TrainState
  schedule: pipeline.Schedule | None = None
  recluster: Callable | None = None  # jitted (extra, key) -> extra: CPAL's k-means at epoch starts


def build(
    model,
    mesh,
    *,
    seed: int,
    crop_size: int,
    make_tx: Callable,
    make_step: Callable,
    nonfinite: str = "stop",
    keyed: bool = False,
    load: Callable | None = None,
    extra: Callable | None = None,
    extra_sharding: Callable | None = None,
    trainable: Callable | None = None,
) -> Setup:
  """The jitted step over `mesh` and the state (abstract and fresh) of one trainer.

  make_tx(abstract variables) -> the optax transformation; make_step(tx) -> the pure step
  (state, batch[, key]) -> (state, metrics), `keyed` when it takes a PRNG key; load(variables) ->
  variables puts pretrained weights in; extra() -> the method state (CPAL's bank), sharded by
  extra_sharding(abstract extra); trainable(params) -> the part the optimiser sees (all of them).
  """
  repl = sharding.replicated(mesh)
  dummy = jnp.zeros((1, crop_size, crop_size, 3), jnp.float32)
  key = jax.random.key(seed)
  abstract_vars = jax.eval_shape(model.init, key, dummy)
  tx = make_tx(abstract_vars)
  select = trainable or (lambda params: params)

  def fresh(variables):
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(select(variables["params"])),
        extra={} if extra is None else extra(),
    )

  abstract = jax.eval_shape(fresh, abstract_vars)
  shardings = jax.tree.map(lambda _: repl, abstract)
  if extra_sharding is not None:
    shardings = shardings.replace(extra=extra_sharding(abstract.extra))
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings
  )

  def init_state():
    variables = jax.jit(model.init, out_shardings=repl)(key, dummy)
    if load is not None:
      variables = load(variables)
    return jax.jit(fresh, out_shardings=shardings)(variables)

  train_step = make_step(tx)
  if nonfinite == "skip":
    train_step = loop.skip_nonfinite(train_step)
  step_fn = jax.jit(
      train_step,
      in_shardings=(shardings, sharding.batch_sharded(mesh)) + ((repl,) if keyed else ()),
      out_shardings=(shardings, repl),
      donate_argnums=(0,),
  )
  return Setup(model, step_fn, abstract, init_state, shardings)


def backbone_loader(path: str, stage: str) -> Callable | None:
  """For build's `load`: variables -> variables with the backbone read from a converted weight file
  (BN statistics included); None when `path` is empty (random init)."""
  if not path:
    return None

  def load(variables):
    variables, n = pretrained.load_into(variables, path, prefix="backbone")
    log.info("%s: loaded %d backbone tensors from %s", stage, n, path)
    return variables

  return load


def fingerprint(config, keys, extra: dict | None = None) -> dict:
  """The config values (dotted `keys`) a resumed run must share with its checkpoint, plus `extra`,
  as JSON stores them (tuples become lists)."""
  fp = {}
  for key in keys:
    node = config
    for part in key.split("."):
      node = node[part]
    fp[key] = node
  fp.update(extra or {})
  return json.loads(json.dumps(fp))


def check_resume(ckpt_dir: str, meta: dict) -> None:
  """Refuses, before anything runs, a config other than the one the checkpoint in ckpt_dir was made
  with (the keys of `meta`, the stage's fingerprint); nothing when there is no checkpoint."""
  step = checkpointing.latest_step(ckpt_dir)
  if step is None:
    return
  ckpt = checkpointing.Checkpointer(ckpt_dir, local=True)
  try:
    checkpointing.check_compatible(ckpt.restore_meta(step), meta, ckpt.directory)
  finally:
    ckpt.close()


def loop_spec(
    name: str, section, schedule: pipeline.Schedule, ckpt_dir: str, tb_dir: str, meta: dict, **kwargs
) -> loop.Loop:
  """A Loop whose logging, checkpoint and non-finite settings and logged lr (poly decay of
  section.lr) come from `section`; kwargs win."""
  fields = {
      # IRN's section has no poly_power: its PolyOptimizer's fixed 0.9.
      "lr": optim.poly(section.lr, schedule.num_steps, section.get("poly_power", 0.9)),
      "log_every": section.log_every,
      "ckpt_every": section.ckpt_every,
      "ckpt_keep": section.get("ckpt_keep", 2),
      "nonfinite": section.nonfinite,
  }
  return loop.Loop(name, ckpt_dir, tb_dir, meta, schedule, **{**fields, **kwargs})


def fit(spec: loop.Loop, setup: Setup, data_iter, mesh, stop_at_step: int, step_fn: Callable, **hooks):
  """Restores the latest checkpoint (or starts fresh) and runs to stop_at_step (0: the schedule's
  end); hooks are loop.run's before_step/after_log."""
  ckpt, state, start = loop.restore_or_init(spec, setup.abstract_state, setup.init_state, data_iter)
  num_steps = spec.schedule.num_steps
  stop = min(stop_at_step or num_steps, num_steps)
  return loop.run(spec, ckpt, state, data_iter, mesh, start, stop, step_fn, **hooks)


def summary(res: loop.Result, schedule: pipeline.Schedule, **entries) -> dict:
  """The entries every training stage reports, then its own."""
  return {
      "steps": res.stop,
      "num_steps": schedule.num_steps,
      "epochs": res.stop / schedule.steps_per_epoch,
      "final_loss": res.last.get("loss/total"),
      "images_per_second": res.images_per_second(schedule.global_batch),
      "skipped_steps": res.skipped_steps,
      **entries,
  }
