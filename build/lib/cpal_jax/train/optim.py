"""SGD as the WSSS reference code runs it (docs/method.md 1.2): two lr groups, poly decay, weight decay
only on parameters that receive gradients, global-norm clipping of the raw gradients first."""

import jax
import optax
from flax import traverse_util

from cpal_jax.models.cam_net import HEAD_MODULES

FROZEN, BACKBONE, HEAD = "frozen", "backbone", "head"


def param_label(path: tuple[str, ...], detach_after: int) -> str:
  """Group of one parameter, from its path in the CAMNet tree."""
  top = path[0]
  if top in HEAD_MODULES:
    return HEAD
  if top != "backbone":
    raise ValueError(f"parameter {'/'.join(path)} belongs to no optimiser group")
  name = path[1]
  # IRN/SIPE freeze the pretrained stem (requires_grad=False); detach_after=-1 (training from
  # scratch) trains everything.
  stage = int(name[len("layer")]) if name.startswith("layer") else 0
  # Stages up to a stop_gradient get no gradient; PyTorch then skips them, weight decay included.
  return FROZEN if stage <= detach_after else BACKBONE


def param_labels(params, detach_after: int):
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: param_label(k, detach_after) for k in flat})


def poly(base_lr: float, num_steps: int, power: float):
  return lambda count: base_lr * jax.numpy.maximum(1.0 - count / num_steps, 0.0) ** power


def torch_sgd(lr, momentum: float, weight_decay: float) -> optax.GradientTransformation:
  """torch.optim.SGD: d = g + wd * p; buf = momentum * buf + d; p -= lr(step) * buf."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum),
      optax.scale_by_schedule(lambda c: -lr(c)),
  )


def grouped(groups: dict, labels, clip_norm: float) -> optax.GradientTransformation:
  """One transformation per parameter group (labels: a tree of group names), FROZEN parameters
  untouched; clip_norm > 0 clips the global norm of the raw gradients first, without the frozen
  ones (requires_grad=False in PyTorch: they are not the optimiser's)."""
  tx = optax.multi_transform({FROZEN: optax.set_to_zero(), **groups}, labels)
  if clip_norm > 0:
    frozen = jax.tree.map(lambda lab: lab == FROZEN, labels)
    tx = optax.chain(optax.masked(optax.set_to_zero(), frozen), optax.clip_by_global_norm(clip_norm), tx)
  return tx


def make_optimizer(train_cfg, num_steps: int, params, detach_after: int) -> optax.GradientTransformation:
  def group(lr: float):
    return torch_sgd(poly(lr, num_steps, train_cfg.poly_power), train_cfg.momentum, train_cfg.weight_decay)

  groups = {BACKBONE: group(train_cfg.lr), HEAD: group(train_cfg.lr * train_cfg.head_lr_mult)}
  return grouped(groups, param_labels(params, detach_after), train_cfg.clip_norm)
