"""Backbone pretraining: a ResNet classifier on ProcNet (data/procnet.py), the CPU proxy's stand-in
for the ImageNet weights every WSSS network starts from.

The same loop as the other stages (sharded jitted step, checkpoints with the data-iterator
position, resume); at the end the backbone's parameters and BatchNorm running statistics are
written in the layout `models.pretrained` loads for converted ImageNet checkpoints
(`params/layer1_0/conv1/kernel`, `batch_stats/bn1/mean`, ...), with a JSON record beside them
(the config's hash, the validation accuracy, the time).
"""

import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from cpal_jax import paths
from cpal_jax.data import pipeline, procnet, transforms
from cpal_jax.models import classifier
from cpal_jax.parallel import sharding
from cpal_jax.train import loop, optim, state as state_lib, trainer

log = logging.getLogger(__name__)

# Keys that change how long or how verbosely a run goes, not the weights it writes.
_NOT_HASHED = ("workdir", "out", "data.workers", "train.log_every", "train.ckpt_every", "train.ckpt_keep")


def config_hash(config) -> str:
  """sha256 (16 hex digits) of the config keys that determine the weights."""
  flat = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
  kept = {k: v for k, v in sorted(flat.items()) if k not in _NOT_HASHED}
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def data_hash() -> str:
  """sha256 (16 hex digits) of the ProcNet generator's source: the images the weights learned from."""
  with open(procnet.__file__, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:16]


def record_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".json"


def _model(config) -> classifier.Classifier:
  return classifier.Classifier(
      num_classes=procnet.NUM_CLASSES, backbone=config.model.backbone, strides=tuple(config.model.strides)
  )


def _source(config, split: str):
  n = config.data.num_train if split == "train" else config.data.num_val
  return procnet.ProcNetSource(split, seed=config.seed, num_images=n or None, image_size=config.data.image_size)


def make_train_step(model, tx, smoothing: float):

  def train_step(state: state_lib.TrainState, batch: dict, key: jax.Array):
    del key
    images = state_lib.normalize_images(batch["image"], batch["valid"])
    labels = batch["label"].astype(jnp.int32)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, procnet.NUM_CLASSES), smoothing)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, images, train=True, mutable=["batch_stats"]
      )
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, (logits, new_vars["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {
        "loss/total": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.tree.norm(grads),
    }
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=batch_stats,
    )
    return new_state, metrics

  return train_step


def evaluate(config, model, variables) -> float:
  """Top-1 accuracy on ProcNet val with running BatchNorm statistics (as the weights are used)."""
  source = _source(config, "val")
  predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x), -1))
  b = config.eval.batch_size
  correct = 0
  for start in range(0, len(source), b):
    items = [source[i] for i in range(start, min(start + b, len(source)))]
    images = np.stack([it["image"] for it in items])
    valid = np.ones(images.shape[:3], np.uint8)
    pred = predict(variables, state_lib.normalize_images(jnp.asarray(images), jnp.asarray(valid)))
    correct += int(np.sum(np.asarray(pred) == np.array([it["label"] for it in items])))
  return correct / len(source)


def backbone_weights(variables) -> dict[str, np.ndarray]:
  """The backbone's tensors under the keys of a converted ImageNet checkpoint (no classifier)."""
  out = {}
  for col in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(jax.device_get(variables[col]["backbone"]))
    out.update({f"{col}/" + "/".join(k): np.asarray(v, np.float32) for k, v in flat.items()})
  return out


def write_weights(out: str, weights: dict, record: dict) -> None:
  """The .npz and its JSON record, each written atomically (a reader never sees half a file)."""
  with paths.atomic(out) as tmp:
    np.savez_compressed(tmp, **weights)
  paths.write_text(record_path(out), json.dumps(record, indent=2, sort_keys=True) + "\n")


def check(config) -> None:
  """Bad settings fail here, in one line, before any work."""
  if not config.out:
    raise ValueError("out is empty: pass --config.out=<file>.npz, where the backbone weights go")
  if not config.out.endswith(".npz"):
    raise ValueError(f"out={config.out!r}: write a .npz file (what model.pretrained reads)")
  if config.model.backbone not in classifier.resnet.ARCHS:
    raise ValueError(
        f"model.backbone={config.model.backbone!r}: choose one of {sorted(classifier.resnet.ARCHS)}"
    )
  if config.train.batch_size <= 0:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be positive")
  if not 0.0 <= config.train.label_smoothing < 1.0:
    raise ValueError(f"train.label_smoothing={config.train.label_smoothing} must be in [0, 1)")


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the classifier in workdir, evaluates it and writes config.out."""
  check(config)
  loop.check_nonfinite_policy(config.train.nonfinite, "train.nonfinite")
  t0 = time.time()
  mesh = sharding.make_mesh(config.mesh.data)
  sharding.check_batch(config.train.batch_size, mesh)
  source = _source(config, "train")
  schedule = pipeline.make_schedule(config.train, len(source))
  t = config.train
  augment = transforms.TrainAugment(t.crop_size, tuple(t.resize_long) or None)
  data_iter = pipeline.train_iterator(
      config, source, schedule, jax.process_index(), jax.process_count(), augment=augment
  )
  model = _model(config)
  lr = optim.poly(t.lr, schedule.num_steps, t.poly_power)
  tx = optax.chain(optax.clip_by_global_norm(t.clip_norm), optim.torch_sgd(lr, t.momentum, t.weight_decay))
  setup = trainer.build(
      model,
      mesh,
      seed=config.seed,
      crop_size=t.crop_size,
      make_tx=lambda _: tx,
      make_step=lambda tx: make_train_step(model, tx, t.label_smoothing),
      nonfinite=t.nonfinite,
      keyed=True,
  )
  spec = trainer.loop_spec(
      "pretrain",
      t,
      schedule,
      os.path.join(workdir, "ckpt"),
      os.path.join(workdir, "tb"),
      {"config_hash": config_hash(config)},
      summary_line=lambda step, m: f"pretrain step {step}: loss {m['loss/total']:.3f} acc {m['accuracy']:.3f}",
  )
  key = jax.random.key(config.seed)
  res = trainer.fit(spec, setup, data_iter, mesh, 0, lambda s, b, i: setup.step_fn(s, b, key))
  variables = {"params": res.state.params, "batch_stats": res.state.batch_stats}
  accuracy = evaluate(config, model, variables)
  record = {
      "config_hash": config_hash(config),
      "procnet_hash": data_hash(),
      "backbone": config.model.backbone,
      "val_accuracy": round(accuracy, 4),
      "chance": round(1.0 / procnet.NUM_CLASSES, 4),
      "num_classes": procnet.NUM_CLASSES,
      "steps": schedule.num_steps,
      "train_images_per_second": res.images_per_second(schedule.global_batch),
      "seconds": round(time.time() - t0, 1),
      "command": "python -m cpal_jax.pretrain --config=configs/pretrain.py",
  }
  if jax.process_index() == 0:
    write_weights(config.out, backbone_weights(variables), record)
  log.info("pretrain: val accuracy %.4f (chance %.4f); weights in %s", accuracy, 1 / procnet.NUM_CLASSES, config.out)
  return record
