import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cpal_jax.train import optim


def _params(rng):
  shape = (3, 2)
  return {
      "backbone": {
          "conv1": {"kernel": rng.normal(size=shape)},
          "bn1": {"scale": rng.normal(size=2)},
          "layer2_0": {"conv1": {"kernel": rng.normal(size=shape)}},
          "layer3_0": {"conv1": {"kernel": rng.normal(size=shape)}},
      },
      "classifier": {"kernel": rng.normal(size=shape)},
      "side1": {"kernel": rng.normal(size=shape)},
  }


def test_param_groups_follow_detach():
  p = _params(np.random.default_rng(0))
  labels = optim.param_labels(p, detach_after=2)
  assert labels["backbone"]["conv1"]["kernel"] == "frozen"
  assert labels["backbone"]["layer2_0"]["conv1"]["kernel"] == "frozen"
  assert labels["backbone"]["layer3_0"]["conv1"]["kernel"] == "backbone"
  assert labels["classifier"]["kernel"] == "head" and labels["side1"]["kernel"] == "head"
  scratch = optim.param_labels(p, detach_after=-1)
  assert scratch["backbone"]["conv1"]["kernel"] == "backbone"
  with pytest.raises(ValueError, match="no optimiser group"):
    optim.param_labels({"mystery": {"w": np.zeros(1)}}, 2)


def _torch_style_sgd(params, grads_seq, lr, mult, wd, momentum, clip, num_steps, power, labels):
  """PolyOptimizerSGD + clip_grad_norm_, written out: clip raw grads (over all params that get
  gradients), then per group d = g + wd p, buf = m buf + d, p -= lr_group (1 - t/T)^power buf."""
  flat = {k: v.copy() for k, v in params.items()}
  bufs = {}
  for t, grads in enumerate(grads_seq):
    live = {k: g for k, g in grads.items() if labels[k] != "frozen"}
    norm = np.sqrt(sum((g**2).sum() for g in live.values()))
    scale = min(1.0, clip / norm) if clip > 0 else 1.0
    for k, g in live.items():
      d = g * scale + wd * flat[k]
      bufs[k] = momentum * bufs[k] + d if k in bufs else d
      group_lr = lr * (mult if labels[k] == "head" else 1.0)
      flat[k] = flat[k] - group_lr * (1 - t / num_steps) ** power * bufs[k]
  return flat


@pytest.mark.parametrize("momentum", [1e-4, 0.9])
def test_matches_reference_sgd(momentum):
  rng = np.random.default_rng(1)
  params = _params(rng)
  cfg = ml_collections.ConfigDict(
      dict(lr=0.1, head_lr_mult=10.0, weight_decay=1e-4, momentum=momentum, clip_norm=1.0, poly_power=0.9)
  )
  num_steps = 5
  tx = optim.make_optimizer(cfg, num_steps, params, detach_after=2)
  flat_labels = {k: v for k, v in jax.tree_util.tree_leaves_with_path(optim.param_labels(params, 2))}
  grads_seq = [jax.tree.map(lambda x: rng.normal(size=x.shape) * 3, params) for _ in range(4)]
  p = jax.tree.map(jnp.asarray, params)
  state = tx.init(p)
  for g in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
    p = optax.apply_updates(p, updates)
  leaves = lambda tree: {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  ref = _torch_style_sgd(
      leaves(params),
      [leaves(g) for g in grads_seq],
      0.1,
      10.0,
      1e-4,
      momentum,
      1.0,
      num_steps,
      0.9,
      flat_labels,
  )
  got = leaves(p)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=str(k))
  # Frozen parameters are untouched: no update and no weight decay.
  np.testing.assert_array_equal(
      got[next(k for k in got if "conv1" in str(k) and "layer" not in str(k))],
      params["backbone"]["conv1"]["kernel"].astype(np.float32),
  )


def test_poly_schedule_starts_at_base_and_reaches_zero():
  f = optim.poly(0.1, 100, 0.9)
  assert float(f(0)) == pytest.approx(0.1)
  assert float(f(50)) == pytest.approx(0.1 * 0.5**0.9)
  assert float(f(100)) == 0.0
