"""Orbax checkpoints of a training stage: the train state, the grain iterator position, and the
config keys a resumed run must agree with. Writes are atomic (orbax finalises a step directory
only when complete), so a half-written checkpoint is never restored."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """local=False (training): every process takes part in each call, saves and restores together
  (orbax synchronises them). local=True: for reading, this process alone, without waiting for the
  others: inference restoring onto its own devices, and the checks that read a step or the meta."""

  def __init__(self, directory: str, keep: int = 2, async_save: bool = True, local: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    if local:
      me = jax.process_index()
      # Not read_only=True, which logs two warnings per manager; nothing here saves or deletes.
      options = ocp.CheckpointManagerOptions(
          create=False,
          enable_async_checkpointing=False,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}"
          ),
      )
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """Whether a SIGTERM reached any process and every process has agreed to stop after `step`
    (JAX's preemption sync point: the multi-process loops save there, all at the same step)."""
    return self._mngr.reached_preemption(step)

  def save(self, step: int, state, data_iter, meta: dict) -> None:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores into the shapes, dtypes and shardings of `abstract_state` (jax.ShapeDtypeStruct
    leaves with shardings, or arrays), and `data_iter` in place. Returns (state, meta)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return out["state"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def restore_raw_state(directory: str) -> dict:
  """The newest finished checkpoint's state as saved (nested dicts of arrays), without the model
  that made it: for reading another stage's parameters."""
  ckpt = Checkpointer(directory, local=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {directory}")
    # As host arrays: the saved shardings may name other processes' devices.
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(ckpt.directory, str(step), "state")).item_metadata.tree
    to_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    args = ocp.args.PyTreeRestore(restore_args=to_numpy)
    return ckpt._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]  # pylint: disable=protected-access
  finally:
    ckpt.close()


def restore_parts(directory: str, step: int, parts: dict) -> dict:
  """The top-level entries `parts` names of checkpoint `step`'s state (e.g. params and batch_stats),
  restored into their shapes, dtypes and shardings: inference reads the network without the
  optimiser state or anything else training kept."""
  item = jax.tree.map(ocp.utils.to_shape_dtype_struct, parts)
  restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), item)
  ckpt = Checkpointer(directory, local=True)
  try:
    args = ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    return ckpt._mngr.restore(step, args=ocp.args.Composite(state=args))["state"]  # pylint: disable=protected-access
  finally:
    ckpt.close()


def restore_latest_parts(directory: str, parts: dict, sharding, missing: str) -> tuple[dict, int]:
  """(parts restored from the newest finished checkpoint of `directory`, its step). `parts`: shapes
  and dtypes (e.g. a model's abstract variables), placed with `sharding` (None: each leaf's own);
  `missing` says what to run when there is no checkpoint."""
  step = latest_step(directory)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.abspath(directory)}: {missing}")
  if sharding is not None:
    parts = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), parts)
  return restore_parts(directory, step, parts), step


def latest_step(directory: str) -> int | None:
  """The newest finished checkpoint's step, or None (without creating the folder)."""
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, local=True)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def has_checkpoint(directory: str) -> bool:
  return latest_step(directory) is not None


def check_compatible(saved: dict, current: dict, directory: str) -> None:
  """Refuses to resume when a key that shapes the state differs from the checkpoint's."""
  diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
  if diff:
    lines = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
    raise ValueError(
        f"the checkpoint in {directory} was made with a different config ({lines}); "
        "use another --workdir or restore those keys"
    )
