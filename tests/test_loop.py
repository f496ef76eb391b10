"""The shared training loop on a toy regression: preemption saves and resumes to the same state,
non-finite steps stop (keeping the last good checkpoint) or are skipped and counted, signal
handlers are restored; plus the free-space and workdir checks and the fault-injection points."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cpal_jax import checkpointing, diskspace, faults
from cpal_jax import stages as cli
from cpal_jax.data import pipeline
from cpal_jax.parallel import sharding
from cpal_jax.train import cam as cam_stage, loop, state as state_lib

STEPS = 8
TX = optax.sgd(0.05, momentum=0.9)


def toy_data():
  rng = np.random.default_rng(0)
  w = rng.normal(size=4).astype(np.float32)
  xs = rng.normal(size=(32, 4)).astype(np.float32)
  elements = [{"x": x, "y": np.float32(x @ w)} for x in xs]
  ds = grain.MapDataset.source(elements).seed(0).shuffle().repeat(STEPS).batch(4, drop_remainder=True)
  return iter(ds.to_iter_dataset())


def fresh_state():
  params = {"w": jnp.zeros(4, jnp.float32)}
  return state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state=TX.init(params), extra={}
  )


def make_step(nan_at: int = -1):
  def train_step(state, batch, step):
    def loss_fn(params):
      err = batch["x"] @ params["w"] - batch["y"]
      return jnp.mean(err**2) * jnp.where(step == nan_at, jnp.nan, 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    new = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
    )
    return new, {"loss/total": loss, "grad_norm": optax.tree.norm(grads)}

  return train_step


def spec(tmp_path, **kw):
  args = dict(
      name="train_toy",
      ckpt_dir=str(tmp_path / "ckpt"),
      tb_dir=str(tmp_path / "tb"),
      meta={"seed": 0},
      schedule=pipeline.Schedule(steps_per_epoch=8, num_steps=STEPS, global_batch=4),
      lr=lambda step: 0.05,
      log_every=2,
      ckpt_every=2,
  )
  args.update(kw)
  return loop.Loop(**args)


def run_toy(s, step_fn, before_step=None):
  """One invocation as a stage runs it: restore or init, then the loop to the end."""
  data_iter = toy_data()
  abstract = jax.eval_shape(fresh_state)
  ckpt, state, start = loop.restore_or_init(s, abstract, fresh_state, data_iter)
  jitted = jax.jit(step_fn)
  return loop.run(
      s,
      ckpt,
      state,
      data_iter,
      sharding.make_mesh(1),
      start,
      STEPS,
      lambda st, b, i: jitted(st, b, i),
      before_step=before_step,
  )


def test_sigterm_saves_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
  straight = run_toy(spec(tmp_path / "a"), make_step())

  def terminate_at_3(state, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the loop stops at the boundary
    return state

  s = spec(tmp_path / "b")
  with pytest.raises(loop.Preempted, match="step 4; checkpoint saved in .*Run the same command") as e:
    run_toy(s, make_step(), before_step=terminate_at_3)
  assert e.value.step == 4
  assert checkpointing.Checkpointer(s.ckpt_dir).latest_step() == 4
  resumed = run_toy(s, make_step())
  assert resumed.start == 4
  np.testing.assert_array_equal(np.asarray(resumed.state.params["w"]), np.asarray(straight.state.params["w"]))
  assert int(resumed.state.step) == STEPS


def test_handlers_restored_and_a_second_signal_reaches_the_previous_handler(tmp_path):
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:

    def terminate_twice(state, step):
      if step == 1:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
      return state

    with pytest.raises(loop.Preempted):
      run_toy(spec(tmp_path), make_step(), before_step=terminate_twice)
    assert seen == [signal.SIGTERM]  # the first was ours (save and stop), the second fell through
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler) and handler.__name__ == "<lambda>"  # the user's handler is back
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_nonfinite_stops_with_the_step_range_and_keeps_the_last_good_checkpoint(tmp_path):
  # log every 4, checkpoint every 2: the NaN of step 6 (0-based 5) is caught before checkpoint 6.
  s = spec(tmp_path, log_every=4)
  with pytest.raises(loop.NonFiniteError, match=r"between steps 5 and 6.*last checkpoint"):
    run_toy(s, make_step(nan_at=5))
  ckpt = checkpointing.Checkpointer(s.ckpt_dir)
  assert ckpt.latest_step() == 4
  state, _ = ckpt.restore(4, jax.eval_shape(fresh_state))
  assert np.isfinite(np.asarray(state.params["w"])).all()


def test_nonfinite_skip_leaves_the_state_and_counts_the_step(tmp_path):
  s = spec(tmp_path, nonfinite="skip")
  res = run_toy(s, loop.skip_nonfinite(make_step(nan_at=3)))
  assert res.skipped_steps == 1
  assert int(res.state.step) == STEPS
  assert np.isfinite(np.asarray(res.state.params["w"])).all()
  assert np.isfinite(res.last["loss/total"])

  # The skipped step changed nothing: the state after it equals the state before it.
  step = jax.jit(loop.skip_nonfinite(make_step(nan_at=0)))
  batch = {"x": jnp.ones((4, 4)), "y": jnp.ones(4)}
  before = fresh_state()
  after, metrics = step(before, batch, 0)
  assert float(metrics["skipped"]) == 1.0 and int(after.step) == 1
  np.testing.assert_array_equal(np.asarray(after.params["w"]), np.asarray(before.params["w"]))


def test_nonfinite_policy_is_checked():
  with pytest.raises(ValueError, match="train.nonfinite='ignore': choose one of stop, skip"):
    loop.check_nonfinite_policy("ignore", "train.nonfinite")


def test_mismatched_checkpoint_is_refused_naming_the_keys(tmp_path):
  run_toy(spec(tmp_path), make_step())
  with pytest.raises(ValueError, match=r"seed: checkpoint 0 vs config 1.*another --workdir"):
    run_toy(spec(tmp_path, meta={"seed": 1}), make_step())


def test_disk_space_is_checked_up_front(tmp_path, monkeypatch):
  free = diskspace.free_bytes(str(tmp_path))
  diskspace.require(str(tmp_path / "not" / "yet"), free // 4, "masks")  # enough: no error
  with pytest.raises(OSError, match=r"not enough disk space for masks in .*needs about .* free; free some"):
    diskspace.require(str(tmp_path), free, "masks")
  monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10)
  with pytest.raises(OSError, match="train_toy checkpoints"):
    run_toy(spec(tmp_path), make_step())
  assert not checkpointing.has_checkpoint(str(tmp_path / "ckpt"))


def test_unwritable_workdir_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(PermissionError, match=r"workdir .*a_file/run is not writable .* pass --workdir="):
    cli.check_workdir(str(blocker / "run"))
  cli.check_workdir(str(tmp_path / "fine"))
  assert os.listdir(tmp_path / "fine") == []  # the probe file is gone


def test_fault_points_fire_only_when_named(monkeypatch):
  got = []
  monkeypatch.setattr(os, "kill", lambda pid, sig: got.append(sig))
  monkeypatch.setenv("CPAL_JAX_FAULT", "export/image/5:TERM")
  faults.point("export/image/4")
  faults.point("export/image/5")
  monkeypatch.setenv("CPAL_JAX_FAULT", "train_cam/step/3")
  faults.point("train_cam/step/3")
  assert got == [signal.SIGTERM, signal.SIGKILL]


def test_a_different_bank_size_is_refused_by_name():
  import synthetic as synthetic_config

  saved = synthetic_config.get_config()
  saved.method.name = "cpal"
  current = synthetic_config.get_config()
  current.method.name = "cpal"
  current.method.cpal.capacity = saved.method.cpal.capacity // 2
  with pytest.raises(ValueError, match=r"method.cpal.capacity: checkpoint \d+ vs config \d+"):
    checkpointing.check_compatible(
        cam_stage.fingerprint(saved, 1), cam_stage.fingerprint(current, 1), "ckpt"
    )
